"""Which task of a multi-worker cluster this process is, read from TF_CONFIG alone: no Keras
or TensorFlow is imported, so Kedro's hooks ask it at every run for free.

The chief is TF_CONFIG's "chief" task, or "worker" 0 when the cluster has none; a process
without a TF_CONFIG is its own chief. Under `train.strategy: multi_worker` only the chief
writes checkpoints, Kedro outputs and MLflow runs.
"""

from __future__ import annotations

import json
import os

from caption_pipeline.errors import DataError


def is_chief_of(strategy: str) -> bool:
    """Whether this process writes checkpoints, best weights and results under the strategy
    named `strategy`: always, but under "multi_worker" only the chief task (`is_chief_task`)."""
    return strategy != "multi_worker" or is_chief_task()


def non_chief_worker(train: dict | None) -> bool:
    """This process is a worker of a multi-worker training, but not its chief."""
    if (train or {}).get("strategy") != "multi_worker":
        return False
    return not is_chief_task()


def is_chief_task() -> bool:
    """TF_CONFIG's task is the cluster's chief (True without a TF_CONFIG)."""
    if not os.environ.get("TF_CONFIG"):
        return True
    try:
        tf_config = json.loads(os.environ["TF_CONFIG"])
        cluster, task = tf_config.get("cluster", {}), tf_config.get("task", {})
        kind, index = task.get("type"), int(task.get("index", 0))
    except (ValueError, TypeError, AttributeError) as error:
        raise DataError(f"TF_CONFIG: not a cluster and task ({error})") from None
    if "chief" in cluster:
        return kind == "chief"
    return kind == "worker" and index == 0
