"""Keras files, saved atomically: a whole model (`.keras`, loadable under any backend) or an
encoder's weights (`.weights.h5`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kedro.io import AbstractDataset, DatasetError

from caption_pipeline.atomic import atomic_path


class KerasModelDataset(AbstractDataset[Any, Any]):
    """`filepath` must end in `.keras`. Loading imports `caption_pipeline.model`, so the
    project's layers are registered with Keras before the file is read."""

    SUFFIX = ".keras"  # Keras refuses to write a file with another ending

    def __init__(self, *, filepath: str, metadata: dict[str, Any] | None = None):
        if not filepath.endswith(self.SUFFIX):
            raise DatasetError(f"{type(self).__name__}: {filepath} must end in {self.SUFFIX}")
        self._filepath = Path(filepath)
        self.metadata = metadata

    def load(self) -> Any:
        import keras

        import caption_pipeline.model  # noqa: F401 (registers the custom layers)

        return keras.saving.load_model(self._filepath)

    def save(self, data: Any) -> None:
        with atomic_path(self._filepath, suffix=self.SUFFIX) as tmp:
            self._write(data, tmp)

    def _write(self, model: Any, path: Path) -> None:
        model.save(path)

    def _exists(self) -> bool:
        return self._filepath.is_file()

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath)}


class EncoderWeightsDataset(KerasModelDataset):
    """An encoder's weights: saving takes the Keras model, loading gives the file's path, which
    is what `caption_pipeline.model.build_encoder` and the feature manifest (by its hash) take."""

    SUFFIX = ".weights.h5"

    def load(self) -> str:
        if not self._filepath.is_file():
            raise DatasetError(f"{self._filepath}: no encoder weights (run the features pipeline)")
        return str(self._filepath)

    def _write(self, model: Any, path: Path) -> None:
        model.save_weights(path)
