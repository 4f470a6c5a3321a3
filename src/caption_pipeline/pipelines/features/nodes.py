"""Nodes of the `features` pipeline: the initial encoder, the plan of the model inputs, then
the model inputs written (the frozen encoder over every image, or a pointer to the images)."""

from __future__ import annotations

from typing import Any

import pandas as pd

from caption_pipeline.data.coco_instances import instances_file
from caption_pipeline.data.shards.shard_set import ShardFolder, ShardSet
from caption_pipeline.model import ModelConfig
from caption_pipeline.training.encoder_pretraining import PretrainConfig, initial_encoder
from caption_pipeline.training.features import FeaturePlan, build_feature_plan, load_model_inputs
from caption_pipeline.training.features import write_model_inputs as write_into
from caption_pipeline.training.projection import fit_projection


def prepare_encoder(
    shards: ShardSet,
    raw_dataset: dict[str, Any],
    model: dict[str, Any],
    features: dict[str, Any],
    encoder_pretraining: dict[str, Any],
) -> tuple[Any, pd.DataFrame]:
    """The encoder the captioner starts from (pretrained on the train split's object masks
    when `encoder_pretraining.enabled`, its feature projection fitted on the train images when
    `model.feature_projection`), and the pretraining history per epoch."""
    config = ModelConfig.for_encoder(model)
    instances = {split: instances_file(raw_dataset, split) for split in ("train", "val")}
    encoder, history = initial_encoder(
        shards,
        instances,
        config,
        PretrainConfig.from_dict(encoder_pretraining),
        seed=int(features["seed"]),
    )
    if config.feature_projection is not None:
        fit_projection(
            encoder,
            shards,
            images=features["projection_images"],
            batch_size=int(features["batch_size"]),
        )
    return encoder, pd.DataFrame(history, columns=None if history else ["epoch"])


def plan_features(
    shards: ShardSet, initial_encoder: str, model: dict[str, Any], features: dict[str, Any]
) -> FeaturePlan:
    """Decide the model inputs: features of a frozen encoder, or the images themselves."""
    return build_feature_plan(shards, initial_encoder, model, features)


def write_model_inputs(feature_plan: FeaturePlan, model_inputs_folder: ShardFolder) -> ShardSet:
    """Run the frozen encoder once over every image into feature shards (atomic per shard,
    resumed after a kill, a no-op when nothing changed), or point at the image shards when
    the encoder is trained end to end. The model inputs written."""
    write_into(feature_plan, model_inputs_folder.path, progress=model_inputs_folder.progress)
    return load_model_inputs(model_inputs_folder.path, verify=False)
