"""Kedro project settings."""

from caption_pipeline import conf_loader
from caption_pipeline.mlops.hooks import (
    ChiefWritesHooks,
    CleanDataErrorHooks,
    DvcLockHooks,
    MissingInputsHooks,
)
from caption_pipeline.serving.spark_session import SparkSessionHooks
from caption_pipeline.tracking.runs import MlflowRunHooks

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

# The config loader and its arguments live in conf_loader.py, which code outside a Kedro
# session imports too (settings.py imports the hooks, and they read conf/).
CONFIG_LOADER_CLASS = conf_loader.CONFIG_LOADER_CLASS
CONFIG_LOADER_ARGS = conf_loader.CONFIG_LOADER_ARGS
