"""Nodes of the `features` pipeline. The `model_inputs` dataset encodes images, from the plan."""

from __future__ import annotations

from typing import Any

from caption_pipeline.features import FeaturePlan, build_feature_plan
from caption_pipeline.tfrecords import ShardSet


def plan_features(shards: ShardSet, model: dict[str, Any], features: dict[str, Any]) -> FeaturePlan:
    """Decide the model inputs: features of a frozen encoder, or the images themselves."""
    return build_feature_plan(shards, model, features)
