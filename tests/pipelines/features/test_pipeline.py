"""The `features` pipeline through Kedro: the initial encoder, then its features per image, on
the tiny shapes shards with conf/base's parameters at tiny sizes."""

from __future__ import annotations

import numpy as np
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner

from caption_pipeline.datasets import (
    EncoderWeightsDataset,
    ModelInputsDataset,
    ShardFolderDataset,
)
from caption_pipeline.pipelines.features import create_pipeline
from caption_pipeline.training.features import load_model_inputs


def run(tiny_shapes, tiny_shards, tiny_model, params, folder, **pretraining) -> DataCatalog:
    _, raw = tiny_shapes
    catalog = DataCatalog(
        {
            "shards": MemoryDataset(tiny_shards, copy_mode="assign"),
            "raw_dataset": MemoryDataset(raw),
            "params:model": MemoryDataset(tiny_model),
            "params:features": MemoryDataset(params("features", batch_size=4, projection_images=4)),
            "params:encoder_pretraining": MemoryDataset(
                params("encoder_pretraining", epochs=1, batch_size=4, progress=False, **pretraining)
            ),
            "initial_encoder": EncoderWeightsDataset(filepath=str(folder / "encoder.weights.h5")),
            "encoder_pretraining_history": MemoryDataset(),
            "model_inputs_folder": ShardFolderDataset(path=str(folder / "model_inputs")),
            "model_inputs": ModelInputsDataset(path=str(folder / "model_inputs")),
        }
    )
    SequentialRunner().run(create_pipeline(), catalog)
    return catalog


def test_the_frozen_encoders_features_are_stored_for_every_image(
    tiny_shapes, tiny_shards, tiny_model, params, tmp_path
):
    catalog = run(tiny_shapes, tiny_shards, tiny_model, params, tmp_path, enabled=False)

    assert catalog.load("encoder_pretraining_history").empty
    assert (tmp_path / "encoder.weights.h5").stat().st_size > 0
    inputs = load_model_inputs(tmp_path / "model_inputs")
    assert inputs.kind == "features"
    assert {s: inputs.num_images(s) for s in inputs.splits} == {
        s: tiny_shards.num_images(s) for s in tiny_shards.splits
    }
    assert {s: inputs.num_captions(s) for s in inputs.splits} == {
        s: tiny_shards.num_captions(s) for s in tiny_shards.splits
    }
    # 64 px through 2 blocks, the last one pooled: 16x16 regions of the last block's 16 channels
    assert tuple(inputs.feature_shape) == (16 * 16, 16)


def test_pretraining_on_a_val_split_without_every_colour(
    tiny_shapes, tiny_shards, tiny_model, params, tmp_path
):
    """A tiny val split lacks some colour or size: it is scored with train's classes (its
    targets get train's columns), not refused by a shape error."""
    catalog = run(tiny_shapes, tiny_shards, tiny_model, params, tmp_path)
    history = catalog.load("encoder_pretraining_history")
    assert history["epoch"].tolist() == [1]
    assert np.isfinite(history.drop(columns="epoch").to_numpy(float)).all()
