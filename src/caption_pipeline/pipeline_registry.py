"""Project pipelines: one per stage, found by name; `__default__` chains them all."""

from __future__ import annotations

from kedro.framework.project import find_pipelines
from kedro.pipeline import Pipeline


def register_pipelines() -> dict[str, Pipeline]:
    """Register each stage under its folder name; Kedro orders nodes by their datasets."""
    pipelines = find_pipelines(raise_errors=True)
    stages = [p for name, p in pipelines.items() if name != "__default__"]
    pipelines["__default__"] = sum(stages, Pipeline([]))
    return pipelines
