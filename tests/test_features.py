"""Model inputs: float16 feature shards of a frozen encoder, or a pointer to the image shards."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import tensorflow as tf
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner

from caption_pipeline.data.shards.image_writer import write_shards
from caption_pipeline.data.shards.plan import build_shard_plan
from caption_pipeline.data.shards.reader import make_caption_dataset
from caption_pipeline.data.shards.records import (
    decode_jpeg_image,
    parse_example,
    parse_feature_example,
)
from caption_pipeline.data.shards.shard_set import MANIFEST, load_shard_set
from caption_pipeline.datasets import EncoderWeightsDataset
from caption_pipeline.errors import DataError
from caption_pipeline.model import ModelConfig
from caption_pipeline.params import defaults, from_conf
from caption_pipeline.pipelines.features import create_pipeline
from caption_pipeline.training.encoder_pretraining import PretrainConfig, initial_encoder
from caption_pipeline.training.features import (
    build_feature_plan,
    build_frozen_encoder,
    load_model_inputs,
    weights_fingerprint,
    write_model_inputs,
)
from tests.helpers import kill_9_when
from tests.test_tfrecords import make_images, shard_files

SIZE = 64
SPLIT_SIZES = {"train": 6, "val": 3, "test": 2}
NUM_SHARDS = {"train": 2, "val": 1, "test": 1}
# 64 px through 3 pooling blocks: an 8x8 grid of 16 features
FROZEN = {
    **defaults("model"),
    "compact_pool_last": True,
    "encoder": "compact",
    "image_size": SIZE,
    "encoder_trainable": False,
    "compact_filters": [8, 16, 16],
}
REGIONS, DEPTH = 64, 16
FEATURES = {"batch_size": 4, "seed": 3, "projection_images": 8}


def write_image_shards(folder: Path, split_sizes: dict, num_shards: dict, seed: int = 1):
    images = make_images(folder / "images", split_sizes)
    plan = build_shard_plan(images, num_shards=num_shards, seed=seed, image_size=SIZE)
    write_shards(plan, folder / "shards", workers=1, progress=False)
    return images, load_shard_set(folder / "shards")


def encoder_file(path: Path, model: dict, seed: int) -> str:
    """The `initial_encoder` weights file, as the features pipeline writes it (no pretraining)."""
    config = ModelConfig.for_encoder(model)
    encoder, _ = initial_encoder(
        None, {}, config, from_conf(PretrainConfig, "encoder_pretraining", enabled=False), seed
    )
    EncoderWeightsDataset(filepath=str(path)).save(encoder)
    return str(path)


def records(files: list[str], parse) -> list[dict]:
    return [parse(r) for r in tf.data.TFRecordDataset(files)]


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    """Image shards, and the feature shards of the frozen compact encoder computed from them."""
    root = tmp_path_factory.mktemp("features")
    images, image_set = write_image_shards(root, SPLIT_SIZES, NUM_SHARDS)
    weights = encoder_file(root / "encoder.weights.h5", FROZEN, seed=3)
    plan = build_feature_plan(image_set, weights, FROZEN, FEATURES)
    summary = write_model_inputs(plan, root / "model_inputs", progress=False)
    return images, image_set, plan, root / "model_inputs", summary


def test_feature_shards_hold_the_encoders_output_per_image(features):
    images, image_set, plan, folder, _ = features
    feature_set = load_model_inputs(folder)
    assert feature_set.kind == "features" and feature_set.feature_shape == (REGIONS, DEPTH)
    # The encoder built afresh from the weights file the plan names.
    encoder = build_frozen_encoder(plan.model, plan.weights)
    for split in SPLIT_SIZES:
        assert [Path(f).name for f in feature_set.files(split)] == [
            Path(f).name for f in image_set.files(split)
        ]
        source = records(image_set.files(split), parse_example)
        stored = records(feature_set.files(split), parse_feature_example)
        assert len(stored) == len(source) == SPLIT_SIZES[split]  # one record per image
        for image, feature in zip(source, stored, strict=False):  # same order
            for key in (
                "image/id",
                "image/filename",
                "image/original_width",
                "image/original_height",
            ):
                assert feature[key].numpy() == image[key].numpy()
            assert feature["caption/ids"].to_list() == image["caption/ids"].to_list()
            values = feature["image/features"]
            assert values.dtype == tf.float16 and values.shape == (REGIONS, DEPTH)
            pixels = decode_jpeg_image(image["image/encoded"], SIZE)[None]
            expected = encoder.predict_on_batch(pixels.numpy())[0]  # float32 [R, D]
            assert np.abs(expected).max() > 0.1  # not a degenerate all-zero encoder
            np.testing.assert_allclose(
                values.numpy().astype(np.float32), expected, rtol=2e-3, atol=2e-3
            )


def test_manifest_records_kind_shape_encoder_and_source(features):
    images, image_set, _, folder, summary = features
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest == summary.manifest and manifest["complete"] is True
    assert (manifest["kind"], manifest["regions"], manifest["feature_dim"]) == (
        "features",
        REGIONS,
        DEPTH,
    )
    assert manifest["params"]["encoder"] == {
        "encoder": "compact",
        "image_size": SIZE,
        "compact_filters": [8, 16, 16],
        "compact_pool_last": True,
    }
    weights = manifest["params"]["weights_file"]  # relative: the project may move
    assert not Path(weights).is_absolute()
    assert (folder / weights).resolve() == (folder.parent / "encoder.weights.h5").resolve()
    assert manifest["params"]["weights"] == weights_fingerprint(folder / weights)
    assert manifest["params"]["source_fingerprint"] == image_set.manifest["fingerprint"]
    for split, count in SPLIT_SIZES.items():
        assert manifest["splits"][split]["records"] == count
        assert manifest["splits"][split]["captions"] == image_set.num_captions(split)
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [MANIFEST, *(Path(f).name for s in SPLIT_SIZES for f in image_set.files(s))]
    )


def test_same_plan_again_is_a_noop_and_other_weights_recompute(features, tmp_path):
    _, image_set, plan, folder, _ = features
    before = shard_files(folder)
    again = write_model_inputs(plan, folder, progress=False)
    assert again.noop and not again.written
    assert shard_files(folder) == before

    reseeded = encoder_file(tmp_path / "reseeded.weights.h5", FROZEN, seed=4)
    assert weights_fingerprint(reseeded) != weights_fingerprint(plan.weights)
    other = write_model_inputs(
        build_feature_plan(image_set, reseeded, FROZEN, FEATURES),
        tmp_path / "other",
        progress=False,
    )
    assert len(other.written) == sum(NUM_SHARDS.values()) and not other.reused
    assert other.manifest["params"]["weights"] == weights_fingerprint(reseeded)
    first = shard_files(tmp_path / "other")
    assert all(first[name] != before[name] for name in other.written)


KILLABLE_ENCODER = """
import sys, time
import caption_pipeline.training.features as features
from caption_pipeline.data.shards.shard_set import load_shard_set

encode = features.encode_batch
def slow_encode(encoder, images):  # slows the real encoder down enough to be killed mid-way
    time.sleep(0.15)
    return encode(encoder, images)
features.encode_batch = slow_encode
plan = features.build_feature_plan(load_shard_set(sys.argv[1]), sys.argv[3], {model}, {params})
features.write_model_inputs(plan, sys.argv[2], progress=False)
"""


def test_killed_run_resumes_to_the_same_output(tmp_path):
    _, image_set = write_image_shards(tmp_path, {"train": 10}, {"train": 10})
    script = tmp_path / "encode.py"
    script.write_text(KILLABLE_ENCODER.format(model=FROZEN, params=FEATURES))
    folder = tmp_path / "resumed"
    weights = encoder_file(tmp_path / "encoder.weights.h5", FROZEN, seed=3)
    child = subprocess.Popen(
        [sys.executable, str(script), str(image_set.root), str(folder), weights],
        start_new_session=True,
    )
    kill_9_when(
        child,
        lambda: len(list(folder.glob("train-*.tfrecord"))) >= 3,
        timeout=120,
        what="the encoding process",
    )
    assert not (folder / MANIFEST).exists()

    plan = build_feature_plan(image_set, weights, FROZEN, FEATURES)
    resumed = write_model_inputs(plan, folder, progress=False)
    # The shard renamed just before the kill may lack its receipt: then it is rewritten.
    assert len(resumed.reused) >= 2 and resumed.written
    assert len(resumed.reused) + len(resumed.written) == 10
    assert not [p for p in folder.rglob("*") if ".tmp-" in p.name or p.name == ".receipts"]
    # An uninterrupted run (in this process, the killed one in another) writes the same bytes.
    write_model_inputs(plan, tmp_path / "reference", progress=False)
    reference = shard_files(tmp_path / "reference")
    assert shard_files(folder) == reference and len(reference) == 11


def test_trainable_encoder_points_at_the_image_shards(features, tmp_path):
    _, image_set, frozen_plan, _, _ = features
    folder = tmp_path / "model_inputs"
    write_model_inputs(frozen_plan, folder, progress=False)  # features first, then the pointer

    trained = {**FROZEN, "encoder_trainable": None}  # null: the compact CNN is trained
    plan = build_feature_plan(image_set, frozen_plan.weights, trained, FEATURES)
    assert not plan.precompute
    summary = write_model_inputs(plan, folder, progress=False)
    assert summary.manifest["kind"] == "images"
    source = summary.manifest["source"]  # relative to the folder: the project may move
    assert not Path(source).is_absolute() and (folder / source).resolve() == image_set.root
    assert "trained end to end" in summary.manifest["reason"]
    assert sorted(p.name for p in folder.iterdir()) == [MANIFEST]  # the features are gone
    assert write_model_inputs(plan, folder, progress=False).noop

    loaded = load_model_inputs(folder)
    assert loaded.kind == "images" and loaded.root == image_set.root
    x, y = next(iter(make_caption_dataset(loaded, "train", batch_size=4)))
    assert set(x) == {"image", "image_id"} and y.dtype == tf.int32
    assert x["image"].dtype == tf.float32 and x["image"].shape == (4, SIZE, SIZE, 3)


def test_reader_yields_features_ids_and_captions(features):
    images, _, _, folder, _ = features
    feature_set = load_model_inputs(folder)
    train = {i.image_id: i for i in images if i.split == "train"}
    stored = {
        int(r["image/id"]): r["image/features"].numpy()
        for r in records(feature_set.files("train"), parse_feature_example)
    }

    everything = list(make_caption_dataset(feature_set, "train", batch_size=4, caption_mode="all"))
    x, y = everything[0]
    assert set(x) == {"features", "image_id"}
    assert x["features"].dtype == tf.float16 and x["features"].shape == (4, REGIONS, DEPTH)
    assert x["image_id"].dtype == tf.int64 and y.dtype == tf.int32 and y.shape[0] == 4
    pairs = sorted(
        (int(i), tuple(c[c > 0].tolist()))
        for x, y in everything
        for i, c in zip(x["image_id"], y.numpy(), strict=False)
    )
    assert pairs == sorted((i.image_id, tuple(c)) for i in train.values() for c in i.captions)

    sample = list(make_caption_dataset(feature_set, "train", batch_size=4, shuffle=True, seed=1))
    ids = [int(i) for x, _ in sample for i in x["image_id"]]
    assert sorted(ids) == sorted(train)  # one caption per image per epoch
    for x, y in sample:
        for image_id, values, caption in zip(
            x["image_id"].numpy(), x["features"].numpy(), y.numpy(), strict=False
        ):
            np.testing.assert_array_equal(values, stored[int(image_id)])
            assert caption[caption > 0].tolist() in train[int(image_id)].captions


def features_catalog(shards: Path, folder: Path, model: dict) -> DataCatalog:
    """The features pipeline's catalog: the image shards at `shards`, its outputs under
    `folder`, `params:model` = `model`, pretraining off, the raw dataset a bare block."""
    catalog = DataCatalog.from_config(
        {
            "shards": {
                "type": "caption_pipeline.datasets.TFRecordShardsDataset",
                "path": str(shards),
            },
            "model_inputs_folder": {
                "type": "caption_pipeline.datasets.ShardFolderDataset",
                "path": str(folder / "model_inputs"),
                "progress": False,
            },
            "model_inputs": {
                "type": "caption_pipeline.datasets.ModelInputsDataset",
                "path": str(folder / "model_inputs"),
            },
            "initial_encoder": {
                "type": "caption_pipeline.datasets.EncoderWeightsDataset",
                "filepath": str(folder / "initial_encoder.weights.h5"),
            },
        }
    )
    catalog["raw_dataset"] = MemoryDataset({"name": "images", "root": str(folder)})
    catalog["params:model"] = MemoryDataset(model)
    catalog["params:features"] = MemoryDataset(FEATURES)
    catalog["params:encoder_pretraining"] = MemoryDataset(
        {**defaults("encoder_pretraining"), "enabled": False}
    )
    return catalog


def test_features_pipeline_through_a_kedro_catalog(features, tmp_path):
    _, image_set, _, _, _ = features
    catalog = features_catalog(image_set.root, tmp_path, FROZEN)
    assert not catalog.exists("model_inputs")

    SequentialRunner().run(create_pipeline(), catalog)

    assert catalog.exists("model_inputs")
    loaded = catalog.load("model_inputs")
    assert loaded.kind == "features" and loaded.feature_shape == (REGIONS, DEPTH)
    assert {s: loaded.num_images(s) for s in loaded.splits} == SPLIT_SIZES
    # The features are those of the encoder the pipeline saved as `initial_encoder`.
    assert loaded.manifest["params"]["weights"] == weights_fingerprint(
        catalog.load("initial_encoder")
    )
    assert catalog.load("encoder_pretraining_history").empty  # pretraining disabled


def test_missing_or_incomplete_inputs_name_the_path(features, tmp_path):
    _, image_set, _, _, _ = features
    with pytest.raises(DataError, match=str(tmp_path / "none" / MANIFEST)):
        load_model_inputs(tmp_path / "none")
    weights = features[2].weights
    with pytest.raises(DataError, match="features.batch_size: must be an integer >= 1, got 0"):
        build_feature_plan(image_set, weights, FROZEN, {**FEATURES, "batch_size": 0})
    with pytest.raises(DataError, match=r"parameters features: has keys \['seed'\]"):
        build_feature_plan(image_set, weights, FROZEN, {"seed": 1})

    missing = str(tmp_path / "nasnet.weights.h5")
    nasnet = {
        **defaults("model"),
        "encoder": "nasnet_mobile",
        "image_size": SIZE,
        "encoder_weights": missing,
        "encoder_trainable": None,
    }
    with pytest.raises(DataError, match=f"model.encoder_weights: .*{missing}"):
        encoder_file(tmp_path / "initial.weights.h5", nasnet, seed=1)
    plan = build_feature_plan(image_set, missing, nasnet, FEATURES)
    assert plan.precompute  # NASNet is frozen unless told otherwise
    with pytest.raises(DataError, match=f"{missing}: encoder weights file does not exist"):
        write_model_inputs(plan, tmp_path / "out", progress=False)

    copy = tmp_path / "shards"
    shutil.copytree(image_set.root, copy)
    plan = build_feature_plan(load_shard_set(copy), weights, FROZEN, FEATURES)
    victim = copy / "train-00001-of-00002.tfrecord"
    victim.unlink()
    with pytest.raises(DataError, match=str(victim)):
        write_model_inputs(plan, tmp_path / "out", progress=False)
    (copy / MANIFEST).unlink()
    with pytest.raises(DataError, match=str(copy / MANIFEST)):
        write_model_inputs(plan, tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / MANIFEST).exists()


def test_features_of_rewritten_image_shards_are_refused(tmp_path):
    images, image_set = write_image_shards(tmp_path, {"train": 3, "val": 1}, {"train": 1, "val": 1})
    folder = tmp_path / "model_inputs"
    weights = encoder_file(tmp_path / "encoder.weights.h5", FROZEN, seed=3)
    write_model_inputs(
        build_feature_plan(image_set, weights, FROZEN, FEATURES), folder, progress=False
    )
    reshuffled = build_shard_plan(
        images, num_shards={"train": 2, "val": 1}, seed=9, image_size=SIZE
    )
    write_shards(reshuffled, image_set.root, workers=1, progress=False)
    with pytest.raises(DataError, match=f"{folder / MANIFEST}: source_fingerprint"):
        load_model_inputs(folder)


def test_weights_that_do_not_fit_the_encoder_are_refused(features, tmp_path):
    _, image_set, _, _, _ = features
    wrong = tmp_path / "wrong.weights.h5"
    with h5py.File(wrong, "w") as h5:  # one array, where NASNetMobile has hundreds
        h5["layers/dense/vars/0"] = np.zeros((3, 2), np.float32)
    nasnet = {
        **defaults("model"),
        "encoder": "nasnet_mobile",
        "image_size": 32,
        "encoder_weights": str(wrong),
        "encoder_trainable": None,
    }
    with pytest.raises(DataError, match=f"{wrong} does not fit"):
        encoder_file(tmp_path / "initial.weights.h5", nasnet, seed=1)
    plan = build_feature_plan(image_set, str(wrong), nasnet, FEATURES)
    with pytest.raises(DataError, match=f"{wrong} does not fit"):
        write_model_inputs(plan, tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / MANIFEST).exists()
