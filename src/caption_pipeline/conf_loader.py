"""How this project reads conf/: Kedro's config loader and its arguments, in one place.

`settings.py` hands them to Kedro. Code that reads conf/ outside a Kedro session (parameter
defaults, the CLI's project config, MLflow's changed-parameter tag) imports them from here,
not from `settings.py`, which imports the hooks (and `tracking.py`, one of them, reads conf/).
"""

from kedro.config import OmegaConfigLoader

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
