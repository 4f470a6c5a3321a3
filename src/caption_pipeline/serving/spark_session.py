"""The Spark session of the pipelines that need one (`caption_batch`), as in Kedro's PySpark
starter: a hook builds it from `conf/<env>/spark.yml` and stops it when the run ends.

Unlike the starter's, the session starts only for a run with a node tagged `spark`: `kedro run`
and every other stage never start a JVM (about 5 s and 1 GB). The settings are read when the
context is created; the session is built before the pipeline runs, once kedro-mlflow has set
the tracking URI, which the executors are given (`MLFLOW_TRACKING_URI`, `MLFLOW_REGISTRY_URI`)
so that a `models:/` URI resolves there against the project's registry too.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import Any

from kedro.config import MissingConfigException
from kedro.framework.hooks import hook_impl

from caption_pipeline.errors import DataError

logger = logging.getLogger(__name__)

SPARK_TAG = "spark"  # the nodes that need the session


def spark_session(conf: Mapping[str, Any]):
    """A SparkSession with the settings of `conf` (spark.yml: `spark.*` keys), the executors
    pointed at the current MLflow tracking and registry URIs. Under `spark-submit` its
    `--master` wins over spark.yml's."""
    import mlflow

    try:
        from pyspark import SparkConf
        from pyspark.sql import SparkSession
    except ImportError:
        raise DataError(
            "caption_batch runs on Apache Spark, which is not installed: "
            'pip install -e ".[spark]" (and Java 17)'
        ) from None

    settings = {key: _conf_value(value) for key, value in conf.items()}
    if os.environ.get("PYSPARK_GATEWAY_PORT"):  # launched by spark-submit: its master
        settings.pop("spark.master", None)
    elif settings.get("spark.master", "local[*]").startswith("local"):
        # Python workers run PYSPARK_PYTHON, else PATH's python3: this one, with the model's
        # packages, when kedro was started without activating its virtual environment.
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    for variable, uri in (
        ("MLFLOW_TRACKING_URI", mlflow.get_tracking_uri()),
        ("MLFLOW_REGISTRY_URI", mlflow.get_registry_uri()),
    ):
        settings.setdefault(f"spark.executorEnv.{variable}", uri)
    session = SparkSession.builder.config(conf=SparkConf().setAll(settings.items())).getOrCreate()
    session.sparkContext.setLogLevel("WARN")
    logger.info("Spark session on %s (Spark %s)", session.sparkContext.master, session.version)
    return session


def _conf_value(value: Any) -> str:
    """YAML's true/false as Spark's "true"/"false"; the rest as written."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def stop_spark() -> bool:
    """Stop the active Spark session, if any; whether there was one."""
    from pyspark.sql import SparkSession

    session = SparkSession.getActiveSession()
    if session is None:
        return False
    session.stop()
    return True


class SparkSessionHooks:
    """Start the Spark session for a run that needs one; stop it when the run ends, failed or
    not, so that a notebook or test that runs several sessions leaves no JVM context behind."""

    def __init__(self) -> None:
        self._conf: dict[str, Any] = {}
        self._started = False

    @hook_impl
    def after_context_created(self, context) -> None:
        try:
            self._conf = dict(context.config_loader["spark"])
        except (MissingConfigException, KeyError):
            self._conf = {}

    @hook_impl(trylast=True)  # after kedro-mlflow's, which sets the tracking URI
    def before_pipeline_run(self, run_params, pipeline) -> None:  # noqa: ARG002
        if any(SPARK_TAG in node.tags for node in pipeline.nodes):
            spark_session(self._conf)
            self._started = True

    @hook_impl
    def after_pipeline_run(self) -> None:
        self._stop()

    @hook_impl
    def on_pipeline_error(self) -> None:
        self._stop()

    def _stop(self) -> None:
        if self._started and stop_spark():
            logger.info("Spark session stopped")
        self._started = False
