"""Supervised pretraining of the compact encoder on object masks (dense region targets)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from caption_pipeline.data.coco_instances import instances_file
from caption_pipeline.data.shards.shard_set import load_shard_set
from caption_pipeline.errors import DataError
from caption_pipeline.model import ModelConfig
from caption_pipeline.params import defaults, from_conf
from caption_pipeline.training.encoder_pretraining import (
    PretrainConfig,
    RegionTargets,
    initial_encoder,
    object_region_accuracy,
    region_targets,
)


def square(x0: int, y0: int, x1: int, y1: int) -> list[list[float]]:
    """A polygon whose filled pixels are columns x0..x1 and rows y0..y1 (PIL includes edges)."""
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def write_instances(path: Path, annotations: list[dict]) -> Path:
    path.write_text(
        json.dumps(
            {
                "images": [{"id": 7, "width": 32, "height": 32}],
                "categories": [{"id": 1, "name": "square"}, {"id": 2, "name": "circle"}],
                "annotations": annotations,
            }
        )
    )
    return path


def test_region_targets_are_pixel_fractions_with_later_objects_on_top(tmp_path):
    path = write_instances(
        tmp_path / "instances.json",
        [
            {
                "image_id": 7,
                "category_id": 1,
                "segmentation": square(0, 0, 15, 7),
                "attributes": {"colour": "red"},
            },
            {
                "image_id": 7,
                "category_id": 2,
                "segmentation": square(8, 0, 15, 3),
                "attributes": {"colour": "blue"},
            },
        ],
    )
    targets = region_targets(path, image_size=32, grid=4)  # 8 x 8 px cells, row by row
    assert targets.groups == {
        "category": ["background", "circle", "square"],
        "colour": ["background", "blue", "red"],
    }
    assert list(targets.image_ids) == [7] and targets.values.shape == (1, 16, 6)
    category, colour = (targets.values[0][:, s] for s in targets.slices().values())
    np.testing.assert_allclose(category.sum(-1), 1.0)  # each group sums to 1 in every cell
    np.testing.assert_allclose(colour.sum(-1), 1.0)
    np.testing.assert_allclose(category[0], [0, 0, 1])  # the square alone
    np.testing.assert_allclose(category[1], [0, 0.5, 0.5])  # the circle over its top half
    np.testing.assert_allclose(colour[1], [0, 0.5, 0.5])
    np.testing.assert_allclose(category[2:], np.tile([1.0, 0, 0], (14, 1)))  # background


def test_bad_instances_files_are_named(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(DataError, match=f"{broken}: not a COCO instances file"):
        region_targets(broken, 32, 4)
    rle = write_instances(
        tmp_path / "rle.json",
        [{"image_id": 7, "category_id": 1, "segmentation": {"counts": "abc", "size": [32, 32]}}],
    )
    with pytest.raises(DataError, match=rf"{rle}: annotations\[0\]: needs .*polygon"):
        region_targets(rle, 32, 4)
    with pytest.raises(DataError, match="image_size 30 is not a multiple"):
        region_targets(rle, 30, 4)


def test_pretraining_teaches_the_regions_what_covers_them(smoke_project):
    dataset = json.loads((smoke_project / "data/01_raw/raw_dataset.json").read_text())
    instances = {
        split: instances_file({**dataset, "root": str(smoke_project / dataset["root"])}, split)
        for split in ("train", "val")
    }
    shards = load_shard_set(smoke_project / "data/03_primary/shards")
    model = from_conf(
        ModelConfig,
        "model",
        vocab_size=1,
        encoder="compact",
        image_size=128,
        encoder_trainable=False,
        compact_filters=(8, 16, 16),
        compact_pool_last=True,
    )
    off = from_conf(PretrainConfig, "encoder_pretraining", enabled=False)
    before, _ = initial_encoder(shards, instances, model, off, seed=1)
    config = from_conf(
        PretrainConfig,
        "encoder_pretraining",
        epochs=6,
        batch_size=8,
        learning_rate=3e-3,
        progress=False,
        seed=1,
    )
    encoder, history = initial_encoder(shards, instances, model, config, seed=1)
    assert [row["epoch"] for row in history] == list(range(1, 7))
    assert history[-1]["loss"] < 0.8 * history[0]["loss"]
    # Colour is the easiest group: about twice the 1-in-6 of guessing, on unseen images,
    # after 90 steps on 120 images.
    assert history[-1]["val_colour_accuracy"] > 0.3, history[-1]
    assert not all(
        np.array_equal(a, b)
        for a, b in zip(before.get_weights(), encoder.get_weights(), strict=False)
    )


def test_pretraining_refuses_what_it_cannot_do(smoke_project, tmp_path):
    shards = load_shard_set(smoke_project / "data/03_primary/shards")
    nasnet = from_conf(ModelConfig, "model", vocab_size=1, encoder="nasnet_mobile", image_size=32)
    with pytest.raises(
        DataError, match="encoder_pretraining.enabled: pretraining is for the compact encoder"
    ):
        initial_encoder(
            shards, {}, nasnet, from_conf(PretrainConfig, "encoder_pretraining"), seed=1
        )
    compact = from_conf(
        ModelConfig,
        "model",
        vocab_size=1,
        encoder="compact",
        encoder_trainable=False,
        compact_filters=(8,),
    )
    with pytest.raises(DataError, match="no COCO instances file .* train split"):
        initial_encoder(
            shards,
            {"train": None},
            compact,
            from_conf(PretrainConfig, "encoder_pretraining"),
            seed=1,
        )
    with pytest.raises(DataError, match="encoder_pretraining.epochs: must be an integer >= 1"):
        PretrainConfig.from_dict({**defaults("encoder_pretraining"), "epochs": 0})


def test_object_region_accuracy_per_group_and_object_size():
    """Regions more than half covered by an object count; per size with `by="size"`."""
    groups = {
        "category": ["background", "circle", "star"],
        "size": ["background", "small", "large"],
    }
    # 4 regions: a small circle, a large star, a large circle, background; one image.
    truth = {
        "category": np.array([[[0, 1, 0], [0, 0, 1], [0.2, 0.8, 0], [1, 0, 0]]], "float32"),
        "size": np.array([[[0, 1, 0], [0, 0, 1], [0.2, 0, 0.8], [1, 0, 0]]], "float32"),
    }
    predicted = {  # shape right on the small circle and the star; every size right
        "category": np.array([[[0, 1, 0], [0, 0, 1], [0, 0, 1], [0, 0, 1]]], "float32"),
        "size": truth["size"],
    }

    class Model:
        def predict_on_batch(self, images):
            return predicted

    targets = RegionTargets(np.array([1]), np.zeros((1, 4, 6), "float32"), groups)
    accuracy = object_region_accuracy(Model(), [(None, truth)], targets, by="size")
    assert accuracy == {
        "category": 2 / 3,
        "category/small": 1.0,
        "category/large": 0.5,
        "size": 1.0,
        "size/small": 1.0,
        "size/large": 1.0,
    }
    assert object_region_accuracy(Model(), [(None, truth)], targets) == {
        "category": 2 / 3,
        "size": 1.0,
    }
