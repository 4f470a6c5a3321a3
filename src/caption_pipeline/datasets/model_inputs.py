"""Kedro dataset of the model inputs: save a FeaturePlan, load the ShardSet training reads."""

from __future__ import annotations

from pathlib import Path

from caption_pipeline.datasets.tfrecord_shards import ShardFolderDataset
from caption_pipeline.features import (
    FeaturePlan,
    load_model_inputs,
    model_inputs_exist,
    write_model_inputs,
)
from caption_pipeline.shards.shard_set import ShardSet


class ModelInputsDataset(ShardFolderDataset):
    """Float16 feature shards of a frozen encoder, or only a manifest pointing at the image
    shards when the encoder is trained end to end.

    Saving a `FeaturePlan` runs the frozen encoder once per image and writes one feature shard
    per image shard (atomic, resumable, a no-op when nothing changed), or writes the pointer.
    Loading gives a verified `ShardSet` whose `kind` is "features" or "images".

    Example catalog entry:

        model_inputs:
          type: caption_pipeline.datasets.ModelInputsDataset
          path: data/05_model_input/model_inputs
    """

    @staticmethod
    def _write(plan: FeaturePlan, folder: Path, progress: bool) -> None:
        write_model_inputs(plan, folder, progress=progress)

    @staticmethod
    def _read(folder: Path, verify: bool) -> ShardSet:
        return load_model_inputs(folder, verify=verify)

    @staticmethod
    def _complete(folder: Path) -> bool:
        return model_inputs_exist(folder)
