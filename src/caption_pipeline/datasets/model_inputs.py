"""Kedro dataset of the model inputs: the ShardSet training reads."""

from __future__ import annotations

from pathlib import Path

from caption_pipeline.data.shards.shard_set import ShardSet
from caption_pipeline.datasets.tfrecord_shards import ShardSetDataset
from caption_pipeline.training.features import load_model_inputs, model_inputs_exist


class ModelInputsDataset(ShardSetDataset):
    """Float16 feature shards of a frozen encoder, or only a manifest pointing at the image
    shards when the encoder is trained end to end; written by the `features` pipeline's
    `write_model_inputs` node. Loading gives a verified `ShardSet` whose `kind` is "features"
    or "images" (the pointed-at image shards).

    Example catalog entry:

        model_inputs:
          type: caption_pipeline.datasets.ModelInputsDataset
          path: data/05_model_input/model_inputs
    """

    @staticmethod
    def _read(folder: Path, verify: bool) -> ShardSet:
        return load_model_inputs(folder, verify=verify)

    @staticmethod
    def _complete(folder: Path) -> bool:
        return model_inputs_exist(folder)
