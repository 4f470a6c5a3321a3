"""Kedro datasets of this project: atomic local writes, TFRecord shard sets, model inputs."""

from caption_pipeline.datasets.atomic_datasets import (
    AtomicCSVDataset,
    AtomicJSONDataset,
    AtomicMatplotlibDataset,
    AtomicParquetDataset,
)
from caption_pipeline.datasets.captioner_file import CaptionerFileDataset
from caption_pipeline.datasets.keras_model import EncoderWeightsDataset, KerasModelDataset
from caption_pipeline.datasets.model_inputs import ModelInputsDataset
from caption_pipeline.datasets.saved_model import AtomicBytesDataset, SavedModelDataset
from caption_pipeline.datasets.tfrecord_shards import ShardFolderDataset, TFRecordShardsDataset

__all__ = [
    "AtomicBytesDataset",
    "AtomicCSVDataset",
    "AtomicJSONDataset",
    "AtomicMatplotlibDataset",
    "AtomicParquetDataset",
    "CaptionerFileDataset",
    "EncoderWeightsDataset",
    "KerasModelDataset",
    "ModelInputsDataset",
    "SavedModelDataset",
    "ShardFolderDataset",
    "TFRecordShardsDataset",
]
