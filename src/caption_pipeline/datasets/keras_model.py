"""A Keras 3 model as a `.keras` file, saved atomically, loadable under any backend."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kedro.io import AbstractDataset, DatasetError

from caption_pipeline.atomic import temp_sibling


class KerasModelDataset(AbstractDataset[Any, Any]):
    """`filepath` must end in `.keras`. Loading imports `caption_pipeline.model`, so the
    project's layers are registered with Keras before the file is read."""

    def __init__(self, *, filepath: str, metadata: dict[str, Any] | None = None):
        if not filepath.endswith(".keras"):
            raise DatasetError(f"KerasModelDataset: {filepath} must end in .keras")
        self._filepath = Path(filepath)
        self.metadata = metadata

    def load(self) -> Any:
        import keras

        import caption_pipeline.model  # noqa: F401 (registers the custom layers)

        return keras.saving.load_model(self._filepath)

    def save(self, data: Any) -> None:
        self._filepath.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_sibling(self._filepath).with_suffix(".keras")
        try:
            data.save(tmp)
            tmp.replace(self._filepath)
        finally:
            tmp.unlink(missing_ok=True)

    def _exists(self) -> bool:
        return self._filepath.exists()

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath)}
