"""Nodes of the `ingest` pipeline; the work is done in `caption_pipeline.data.ingestion`."""

from __future__ import annotations

import pandas as pd

from caption_pipeline.data.ingestion import check_recorded, ingest


def ingest_captions(raw_dataset: dict, dataset: dict, params: dict) -> tuple[pd.DataFrame, dict]:
    """Read and check every split's captions and images: caption table and report. The
    recorded `raw_dataset` must be the `dataset` parameters' (no stale record is read)."""
    check_recorded(raw_dataset, dataset)
    return ingest(raw_dataset, params)
