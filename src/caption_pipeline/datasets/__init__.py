"""Kedro datasets of this project: atomic local writes and TFRecord shard sets."""

from caption_pipeline.datasets.atomic_datasets import (
    AtomicJSONDataset,
    AtomicMatplotlibDataset,
    AtomicParquetDataset,
)
from caption_pipeline.datasets.tfrecord_shards import TFRecordShardsDataset

__all__ = [
    "AtomicJSONDataset",
    "AtomicMatplotlibDataset",
    "AtomicParquetDataset",
    "TFRecordShardsDataset",
]
