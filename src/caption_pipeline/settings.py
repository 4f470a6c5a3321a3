"""Kedro project settings."""

from kedro.config import OmegaConfigLoader

from caption_pipeline.hooks import (
    ChiefWritesHooks,
    CleanDataErrorHooks,
    DvcLockHooks,
    MissingInputsHooks,
)
from caption_pipeline.spark_session import SparkSessionHooks
from caption_pipeline.tracking import MlflowRunHooks

# kedro-mlflow's own hook (an entry point, so not listed here) opens one MLflow run per
# `kedro run` with the settings of conf/base/mlflow.yml; MlflowRunHooks adds the run tags
# (git commit, DVC hash of the data) and the error of a failed run. Under multi-worker
# training, ChiefWritesHooks keeps every output but the chief's in memory. DvcLockHooks
# records the stages a successful run ran in dvc.lock (`dvc commit`), so that `dvc status`
# and `dvc repro` see what `kedro run` made. SparkSessionHooks starts Spark (conf/*/spark.yml)
# for the runs that need it (`caption_batch`) and stops it at their end.
HOOKS = (
    CleanDataErrorHooks(),
    MissingInputsHooks(),
    ChiefWritesHooks(),
    MlflowRunHooks(),
    DvcLockHooks(),
    SparkSessionHooks(),
)

CONFIG_LOADER_CLASS = OmegaConfigLoader
CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    # Envs (and `--params`) override single nested keys, e.g. `dataset.root`, not whole blocks.
    "merge_strategy": {"parameters": "soft", "globals": "soft", "mlflow": "soft", "spark": "soft"},
    # kedro-mlflow's pattern, declared here so that MlflowRunHooks can read mlflow.yml first.
    # Spark's, as in Kedro's PySpark starter.
    "config_patterns": {
        "mlflow": ["mlflow*", "mlflow*/**", "**/mlflow*"],
        "spark": ["spark*", "spark*/**"],
    },
}
