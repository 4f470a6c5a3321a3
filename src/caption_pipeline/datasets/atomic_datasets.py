"""kedro-datasets' JSON, CSV, Parquet and Matplotlib datasets, saved atomically on a local
filesystem."""

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
    """`pandas.CSVDataset` that never leaves a half-written file. An empty DataFrame (the
    history of a phase that is off) is written as an empty file and loads back as one, where
    pandas would refuse the file ("No columns to parse")."""

    def load(self) -> Any:
        import pandas as pd

        path = Path(self._filepath)
        if (
            self._protocol == "file"
            and self._version is None
            and path.is_file()
            and path.stat().st_size <= 2
            and not path.read_text().strip()
        ):  # "\n" or "\r\n"
            return pd.DataFrame()
        return super().load()


class AtomicParquetDataset(_AtomicSave, ParquetDataset):
    """`pandas.ParquetDataset` that never leaves a half-written file."""


class AtomicMatplotlibDataset(_AtomicSave, MatplotlibDataset):
    """`matplotlib.MatplotlibDataset` for one figure (a PNG) that never leaves a half-written
    file."""
