"""Project pipelines: one per stage, found by name; `__default__` chains them all but the
ones run on demand."""

from __future__ import annotations

from kedro.framework.project import find_pipelines
from kedro.pipeline import Pipeline

# Pipelines that `kedro run` leaves out: run by name (`kedro run --pipelines=caption_batch`).
ON_DEMAND = frozenset({"caption_batch"})


def register_pipelines() -> dict[str, Pipeline]:
    """Register each stage under its folder name; Kedro orders nodes by their datasets."""
    pipelines = find_pipelines(raise_errors=True)
    stages = [p for name, p in pipelines.items() if name not in ON_DEMAND | {"__default__"}]
    pipelines["__default__"] = sum(stages, Pipeline([]))
    return pipelines
