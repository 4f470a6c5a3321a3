"""The exported SavedModel folder and the TFLite file as Kedro datasets, written atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kedro.io import AbstractDataset

from caption_pipeline.atomic import atomic_write_bytes


class SavedModelDataset(AbstractDataset[Any, Any]):
    """Saves an `export.ModelExport` as a SavedModel folder (a temporary sibling renamed when
    complete); loads it as a lazy `export.ExportedCaptioner`: each node that takes it gets its
    own copy, and only a node that runs it loads the SavedModel."""

    def __init__(self, *, path: str, metadata: dict[str, Any] | None = None):
        self._path = Path(path)
        self.metadata = metadata

    def load(self) -> Any:
        from caption_pipeline.serving.export import ExportedCaptioner

        return ExportedCaptioner(self._path, lazy=True)

    def save(self, data: Any) -> None:
        from caption_pipeline.serving.export import save_export

        save_export(data, self._path)

    def _exists(self) -> bool:
        return (self._path / "saved_model.pb").is_file()

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path)}


class AtomicBytesDataset(AbstractDataset[bytes, bytes]):
    """A binary file (e.g. a .tflite model) written to a temporary name and renamed.

    Saving empty bytes removes the file instead (an empty file would hold nothing either):
    they are what a node returns for an output that a parameter turned off (`export.tflite`;
    Kedro saves no None), so that the file of an earlier run is not taken for this run's."""

    def __init__(self, *, filepath: str, metadata: dict[str, Any] | None = None):
        self._filepath = Path(filepath)
        self.metadata = metadata

    def load(self) -> bytes:
        return self._filepath.read_bytes()

    def save(self, data: bytes) -> None:
        if data:
            atomic_write_bytes(self._filepath, data)
        else:
            self._filepath.unlink(missing_ok=True)

    def _exists(self) -> bool:
        return self._filepath.is_file()

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath)}
