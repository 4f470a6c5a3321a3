"""Kedro dataset of the captioner to evaluate: a `.keras` model or a `.weights.h5` checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kedro.io import AbstractDataset, DatasetError

from caption_pipeline.captioner_files import EvaluatedModel, read_captioner


class CaptionerFileDataset(AbstractDataset[Any, EvaluatedModel]):
    """Read only: loading gives an `EvaluatedModel`, the Captioner in `filepath` and where it
    came from (`caption_pipeline.captioner_files` says which files are accepted). A
    checkpoint's architecture, and a decoder checkpoint's frozen encoder, are those of the
    `.keras` captioner `architecture`.

    Example catalog entry, the model of `--params=evaluated_model=PATH` or else the trained one:

        captioner@evaluated:
          type: caption_pipeline.datasets.CaptionerFileDataset
          filepath: ${runtime_params:evaluated_model, data/06_models/captioner.keras}
          architecture: data/06_models/captioner.keras
    """

    def __init__(
        self,
        *,
        filepath: str,
        architecture: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self._filepath = Path(filepath)
        self._architecture = Path(architecture) if architecture else None
        self.metadata = metadata

    def load(self) -> EvaluatedModel:
        return read_captioner(self._filepath, self._architecture)

    def save(self, data: Any) -> None:
        raise DatasetError(f"{self._filepath}: the model to evaluate is read, never written")

    def _exists(self) -> bool:
        return self._filepath.is_file()

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath), "architecture": str(self._architecture)}
