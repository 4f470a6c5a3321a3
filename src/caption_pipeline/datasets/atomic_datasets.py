"""kedro-datasets' JSON, CSV, Parquet and Matplotlib datasets, saved atomically on a local filesystem."""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from typing import Any

from kedro_datasets.json import JSONDataset
from kedro_datasets.matplotlib import MatplotlibDataset
from kedro_datasets.pandas import CSVDataset, ParquetDataset

from caption_pipeline.atomic import temp_sibling


class _AtomicSave:
    """Save to a temporary sibling, then rename; remote or versioned saves are unchanged."""

    def save(self, data: Any) -> None:
        if self._protocol != "file" or self._version is not None:
            return super().save(data)
        final = PurePosixPath(self._filepath)
        tmp = temp_sibling(Path(final))
        Path(final.parent).mkdir(parents=True, exist_ok=True)
        self._filepath = PurePosixPath(tmp)
        try:
            super().save(data)
            os.replace(tmp, final)
        finally:
            self._filepath = final
            if tmp.exists():
                tmp.unlink()
            self._invalidate_cache()


class AtomicJSONDataset(_AtomicSave, JSONDataset):
    """`json.JSONDataset` that never leaves a half-written file."""


class AtomicCSVDataset(_AtomicSave, CSVDataset):
    """`pandas.CSVDataset` that never leaves a half-written file."""


class AtomicParquetDataset(_AtomicSave, ParquetDataset):
    """`pandas.ParquetDataset` that never leaves a half-written file."""


class AtomicMatplotlibDataset(_AtomicSave, MatplotlibDataset):
    """`matplotlib.MatplotlibDataset` for one figure (a PNG) that never leaves a half-written file."""
