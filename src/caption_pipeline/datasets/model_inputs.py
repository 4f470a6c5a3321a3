"""Kedro dataset of the model inputs: save a FeaturePlan, load the ShardSet training reads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kedro.io import AbstractDataset

from caption_pipeline.features import (
    FeaturePlan,
    load_model_inputs,
    model_inputs_exist,
    write_model_inputs,
)
from caption_pipeline.tfrecords import ShardSet


class ModelInputsDataset(AbstractDataset[FeaturePlan, ShardSet]):
    """A folder of float16 feature shards and their `manifest.json`, or only a manifest that
    points at the image shards.

    The node stays pure: it returns a `FeaturePlan`. Saving executes it: for a frozen encoder
    it runs the encoder once per image and writes one feature shard per image shard
    (atomic, resumable, a no-op when nothing changed); for an encoder trained end to end it
    writes only the pointer. Loading gives a verified `ShardSet` whose `kind` is "features"
    or "images".

    Example catalog entry:

        model_inputs:
          type: caption_pipeline.datasets.ModelInputsDataset
          path: data/04_feature/model_inputs
    """

    def __init__(
        self,
        *,
        path: str,
        verify_on_load: bool = True,
        progress: bool = True,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        """`verify_on_load` checks every shard's sha256 on load (reads them once)."""
        self._path = Path(path)
        self._verify_on_load = verify_on_load
        self._progress = progress
        self.metadata = metadata

    def load(self) -> ShardSet:
        return load_model_inputs(self._path, verify=self._verify_on_load)

    def save(self, data: FeaturePlan) -> None:
        write_model_inputs(data, self._path, progress=self._progress)

    def _exists(self) -> bool:
        return model_inputs_exist(self._path)

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path), "verify_on_load": self._verify_on_load}
