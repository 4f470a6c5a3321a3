"""Kedro dataset of a TFRecord shard set: save a ShardPlan, load a verified ShardSet."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kedro.io import AbstractDataset

from caption_pipeline.tfrecords import (
    ShardPlan,
    ShardSet,
    is_complete,
    load_shard_set,
    write_shards,
)


class TFRecordShardsDataset(AbstractDataset[ShardPlan, ShardSet]):
    """A folder of TFRecord shards and their `manifest.json`.

    The node stays pure: it returns a `ShardPlan` (which image, with which captions, goes
    into which shard). Saving executes the plan: worker processes decode and write the
    shards atomically, and the manifest is written last. A re-run with the same plan and
    unchanged images is a no-op; an interrupted one resumes from its verified shards.

    Example catalog entry:

        shards:
          type: caption_pipeline.datasets.TFRecordShardsDataset
          path: data/05_model_input/shards
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
        return load_shard_set(self._path, verify=self._verify_on_load)

    def save(self, data: ShardPlan) -> None:
        write_shards(data, self._path, progress=self._progress)

    def _exists(self) -> bool:
        return is_complete(self._path)

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path), "verify_on_load": self._verify_on_load}
