"""Kedro datasets of shard folders: the folder a node writes into, and the verified ShardSet
that the node returns and the next pipeline loads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kedro.io import AbstractDataset, DatasetError

from caption_pipeline.data.shards.shard_set import (
    ShardFolder,
    ShardSet,
    is_complete,
    load_shard_set,
)


class ShardFolderDataset(AbstractDataset[None, ShardFolder]):
    """The folder a writing node fills: loading gives a `ShardFolder` (the path, nothing read),
    so the node, not the dataset, runs the writer, and Kedro's node hooks and Kedro-Viz see
    the work. Its output is the set's own entry over the same `path` (`TFRecordShardsDataset`
    or `ModelInputsDataset`), which checks what the node wrote.

    Example catalog entry:

        shards_folder:
          type: caption_pipeline.datasets.ShardFolderDataset
          path: data/03_primary/shards
    """

    def __init__(
        self, *, path: str, progress: bool = True, metadata: dict[str, Any] | None = None
    ) -> None:
        self._path = Path(path)
        self._progress = progress
        self.metadata = metadata

    def load(self) -> ShardFolder:
        return ShardFolder(self._path, self._progress)

    def save(self, data: None) -> None:
        raise DatasetError(
            f"{self._path}: a shard folder is written by the node that loads it, not saved"
        )

    def _exists(self) -> bool:
        return True  # a destination: there is always a place to write to

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path), "progress": self._progress}


class ShardSetDataset(AbstractDataset[ShardSet, ShardSet]):
    """A folder of TFRecord shards and the `manifest.json` that says it is complete.

    Loading gives a verified `ShardSet`. Saving takes the `ShardSet` its node wrote into this
    folder (through the `ShardFolderDataset` of the same path) and writes nothing: it checks
    that the set on disk is the one the node returned, so that a node that wrote elsewhere,
    or a catalog whose two entries disagree, fails here by name. Subclasses say how to read
    with `_read(folder, verify)` and `_complete(folder)`.
    """

    def __init__(
        self, *, path: str, verify_on_load: bool = True, metadata: dict[str, Any] | None = None
    ) -> None:
        """`verify_on_load` checks every shard's sha256 on load (reads them once)."""
        self._path = Path(path)
        self._verify_on_load = verify_on_load
        self.metadata = metadata

    def load(self) -> ShardSet:
        return self._read(self._path, verify=self._verify_on_load)

    def save(self, data: ShardSet) -> None:
        if not isinstance(data, ShardSet):
            raise DatasetError(
                f"{self._path}: expected the ShardSet its node wrote, got {type(data).__name__}"
            )
        on_disk = self._read(self._path, verify=False) if self._complete(self._path) else None
        if on_disk is None or (on_disk.root.resolve(), on_disk.manifest) != (
            Path(data.root).resolve(),
            data.manifest,
        ):
            raise DatasetError(
                f"{self._path}: the node returned the shard set in {data.root}, which is not "
                f"the one in this folder (is the writing node's folder entry on another path?)"
            )

    def _exists(self) -> bool:
        return self._complete(self._path)

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path), "verify_on_load": self._verify_on_load}

    @staticmethod
    def _read(folder: Path, verify: bool) -> ShardSet:
        raise NotImplementedError

    @staticmethod
    def _complete(folder: Path) -> bool:
        raise NotImplementedError


class TFRecordShardsDataset(ShardSetDataset):
    """Image shards, written by the `shard` pipeline's `write_shards` node.

    Example catalog entry:

        shards:
          type: caption_pipeline.datasets.TFRecordShardsDataset
          path: data/03_primary/shards
    """

    @staticmethod
    def _read(folder: Path, verify: bool) -> ShardSet:
        return load_shard_set(folder, verify=verify, kind="images")

    @staticmethod
    def _complete(folder: Path) -> bool:
        return is_complete(folder, kind="images")
