"""Kedro datasets of shard folders: save a plan, load a verified ShardSet."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kedro.io import AbstractDataset

from caption_pipeline.shards.image_writer import write_shards
from caption_pipeline.shards.plan import ShardPlan
from caption_pipeline.shards.shard_set import ShardSet, is_complete, load_shard_set


class ShardFolderDataset(AbstractDataset[Any, ShardSet]):
    """A folder of TFRecord shards and the `manifest.json` that says it is complete.

    The node stays pure: it returns a plan (what goes into which shard, no pixels). Saving
    executes the plan atomically, manifest last; loading gives a verified `ShardSet`.
    Subclasses say how with `_write(plan, folder, progress)`, `_read(folder, verify)` and
    `_complete(folder)`.
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
        return self._read(self._path, verify=self._verify_on_load)

    def save(self, data: Any) -> None:
        self._write(data, self._path, progress=self._progress)

    def _exists(self) -> bool:
        return self._complete(self._path)

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path), "verify_on_load": self._verify_on_load}


class TFRecordShardsDataset(ShardFolderDataset):
    """Image shards. Saving a `ShardPlan`: worker processes decode and write the shards; a
    re-run with the same plan and unchanged images is a no-op, an interrupted one resumes
    from its verified shards.

    Example catalog entry:

        shards:
          type: caption_pipeline.datasets.TFRecordShardsDataset
          path: data/03_primary/shards
    """

    @staticmethod
    def _write(plan: ShardPlan, folder: Path, progress: bool) -> None:
        write_shards(plan, folder, progress=progress)

    @staticmethod
    def _read(folder: Path, verify: bool) -> ShardSet:
        return load_shard_set(folder, verify=verify, kind="images")

    @staticmethod
    def _complete(folder: Path) -> bool:
        return is_complete(folder, kind="images")
