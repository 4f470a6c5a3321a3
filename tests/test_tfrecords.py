"""TFRecord shards: format round trip, balanced seeded plans, manifest, crash recovery, reader."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageDraw

from caption_pipeline.data.shards.image_writer import write_shards
from caption_pipeline.data.shards.plan import ImageCaptions, build_shard_plan
from caption_pipeline.data.shards.reader import ReaderOptions, make_caption_dataset
from caption_pipeline.data.shards.records import parse_example
from caption_pipeline.data.shards.shard_set import MANIFEST, load_shard_set, skipped_examples
from caption_pipeline.errors import DataError
from tests.helpers import gone_pid, kill_9_when

SIZE = 64
NUM_SHARDS = {"train": 3, "val": 2, "test": 1}
SPLIT_SIZES = {"train": 10, "val": 4, "test": 3}


def make_images(
    folder: Path, split_sizes: dict[str, int], *, source_size: int = 0
) -> list[ImageCaptions]:
    """Smooth JPEGs of varied sizes (a gradient and a box), 1 to 3 captions of varied lengths."""
    folder.mkdir(parents=True, exist_ok=True)
    images, image_id = [], 100
    for split, count in split_sizes.items():
        for _ in range(count):
            width, height = (
                (source_size, source_size)
                if source_size
                else (40 + 7 * (image_id % 5), 30 + 5 * (image_id % 4))
            )
            ramp = np.linspace(0, 255, width, dtype=np.float32)
            pixels = np.stack(
                [
                    np.tile(ramp, (height, 1)),
                    np.full((height, width), image_id % 256),
                    np.tile(ramp[::-1], (height, 1)),
                ],
                axis=-1,
            ).astype(np.uint8)
            image = Image.fromarray(pixels)
            ImageDraw.Draw(image).rectangle(
                [width // 4, height // 4, width // 2, height // 2], fill=(250, 30, 30)
            )
            path = folder / f"{image_id:012d}.jpg"
            image.save(path, quality=95)
            captions = [
                [1, *range(4, 4 + (image_id + k) % 5 + 1), 2] for k in range(1 + image_id % 3)
            ]
            images.append(ImageCaptions(split, image_id, str(path), captions))
            image_id += 1
    return images


def shard_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def read_records(files: list[str]) -> list[dict]:
    return [parse_example(r) for r in tf.data.TFRecordDataset(files)]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    images = make_images(root / "images", SPLIT_SIZES)
    plan = build_shard_plan(images, num_shards=NUM_SHARDS, seed=7, image_size=SIZE)
    summary = write_shards(plan, root / "out", workers=1, progress=False)
    return images, root / "out", summary


def test_round_trip_keeps_ids_captions_and_pixels(written):
    images, folder, _ = written
    shard_set = load_shard_set(folder)
    for split in SPLIT_SIZES:
        expected = {image.image_id: image for image in images if image.split == split}
        records = read_records(shard_set.files(split))
        assert sorted(int(r["image/id"]) for r in records) == sorted(expected)  # one per image
        for record in records:
            source = expected[int(record["image/id"])]
            assert record["image/filename"].numpy().decode() == source.file_path
            assert record["caption/ids"].to_list() == source.captions
            original = Image.open(source.file_path).convert("RGB")
            assert (
                int(record["image/original_width"]),
                int(record["image/original_height"]),
            ) == original.size
            decoded = tf.io.decode_jpeg(record["image/encoded"]).numpy().astype(np.float32)
            resized = np.asarray(
                original.resize((SIZE, SIZE), Image.Resampling.LANCZOS), np.float32
            )
            assert decoded.shape == (SIZE, SIZE, 3)
            assert np.abs(decoded - resized).mean() < 3


def test_shards_are_balanced_and_seeded():
    images = [ImageCaptions("train", i, f"{i}.jpg", [[1, 2]]) for i in range(23)]
    images.append(ImageCaptions("val", 99, "99.jpg", [[1, 2]]))

    def order(seed: int) -> list[int]:
        plan = build_shard_plan(
            images, num_shards={"train": 4, "val": 3}, seed=seed, image_size=SIZE
        )
        sizes = [len(s) for s in plan.shards if s.split == "train"]
        assert len(sizes) == 4 and max(sizes) - min(sizes) <= 1 and sum(sizes) == 23
        assert [s.filename for s in plan.shards if s.split == "val"] == [
            "val-00000-of-00001.tfrecord"
        ]
        return [i.image_id for s in plan.shards for i in s.entries()]

    assert order(1) == order(1)
    assert order(1) != order(2)
    assert sorted(order(1)) == sorted(i.image_id for i in images)
    # The order depends on the seed only, not on the order the images come in.
    reversed_plan = build_shard_plan(
        images[::-1], num_shards={"train": 4, "val": 3}, seed=1, image_size=SIZE
    )
    assert [i.image_id for s in reversed_plan.shards for i in s.entries()] == order(1)


def test_plan_refuses_unknown_split_and_duplicates():
    with pytest.raises(DataError, match="split 'extra'"):
        build_shard_plan(
            [ImageCaptions("extra", 1, "a.jpg", [[1, 2]])],
            num_shards={"train": 1},
            seed=0,
            image_size=SIZE,
        )
    twice = [ImageCaptions("train", 1, "a.jpg", [[1, 2]])] * 2
    with pytest.raises(DataError, match="image 1: listed twice"):
        build_shard_plan(twice, num_shards={"train": 1}, seed=0, image_size=SIZE)


def test_manifest_counts_and_checksums_match_files(written):
    images, folder, summary = written
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest == summary.manifest and manifest["complete"] is True
    assert manifest["params"] == {
        "image_size": SIZE,
        "jpeg_quality": 90,
        "seed": 7,
        "num_shards": NUM_SHARDS,
    }
    for split, count in SPLIT_SIZES.items():
        entry = manifest["splits"][split]
        assert entry["records"] == count
        assert entry["captions"] == sum(len(i.captions) for i in images if i.split == split)
        assert len(entry["shards"]) == NUM_SHARDS[split]
        for shard in entry["shards"]:
            data = (folder / shard["file"]).read_bytes()
            assert shard["bytes"] == len(data)
            assert shard["sha256"] == hashlib.sha256(data).hexdigest()
            assert shard["records"] == sum(
                1 for _ in tf.data.TFRecordDataset(str(folder / shard["file"]))
            )
    assert manifest["totals"]["records"] == sum(SPLIT_SIZES.values())
    assert manifest["totals"]["shards"] == sum(NUM_SHARDS.values())
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [MANIFEST] + [s["file"] for e in manifest["splits"].values() for s in e["shards"]]
    )


def test_same_plan_again_is_a_noop(written):
    images, folder, summary = written
    before = shard_files(folder)
    plan = build_shard_plan(images, num_shards=NUM_SHARDS, seed=7, image_size=SIZE)
    again = write_shards(plan, folder, workers=1, progress=False)
    assert again.noop and not again.written
    assert shard_files(folder) == before


KILLABLE_WRITER = """
import json, sys, time
import caption_pipeline.data.shards.image_writer as image_writer
from caption_pipeline.data.shards.image_writer import write_shards
from caption_pipeline.data.shards.plan import ImageCaptions, build_shard_plan

load = image_writer.load_rgb_image
def slow_load(path):  # slows the real writer down enough to be killed in the middle
    time.sleep(0.05)
    return load(path)
image_writer.load_rgb_image = slow_load
images = [ImageCaptions(*i) for i in json.load(open(sys.argv[1]))]
plan = build_shard_plan(images, num_shards={"train": 40}, seed=3, image_size=32)
write_shards(plan, sys.argv[2], workers=1, progress=False)
"""


def test_killed_run_resumes_to_the_same_output(tmp_path):
    images = make_images(tmp_path / "images", {"train": 40}, source_size=200)
    (tmp_path / "images.json").write_text(json.dumps(images))
    (tmp_path / "writer.py").write_text(KILLABLE_WRITER)
    folder = tmp_path / "resumed"
    child = subprocess.Popen(
        [sys.executable, str(tmp_path / "writer.py"), str(tmp_path / "images.json"), str(folder)],
        start_new_session=True,
    )
    kill_9_when(
        child, lambda: len(list(folder.glob("train-*.tfrecord"))) >= 3, timeout=60, what="writer"
    )
    assert not (folder / MANIFEST).exists()

    plan = build_shard_plan(images, num_shards={"train": 40}, seed=3, image_size=32)
    resumed = write_shards(plan, folder, workers=1, progress=False)
    assert (
        len(resumed.reused) >= 2 and resumed.written
    )  # the shard being written at the kill is redone
    assert not [p for p in folder.rglob("*") if ".tmp-" in p.name]
    load_shard_set(folder, verify=True)

    # An uninterrupted run, on two worker processes, writes exactly the same files.
    reference = write_shards(plan, tmp_path / "reference", workers=2, progress=False)
    assert len(reference.written) == 40
    assert shard_files(folder) == shard_files(tmp_path / "reference")

    # A truncated shard under its final name is caught on load, then rewritten (only it).
    victim = folder / "train-00005-of-00040.tfrecord"
    victim.write_bytes(victim.read_bytes()[:-20])
    with pytest.raises(DataError, match="train-00005-of-00040.tfrecord"):
        load_shard_set(folder)
    repaired = write_shards(plan, folder, workers=1, progress=False)
    assert repaired.written == [victim.name] and len(repaired.reused) == 39
    assert shard_files(folder) == shard_files(tmp_path / "reference")


def test_shards_of_another_plan_or_older_images_are_rewritten(tmp_path):
    images = make_images(tmp_path / "images", {"train": 6})
    folder = tmp_path / "out"

    def write(num_shards: int, seed: int):
        plan = build_shard_plan(
            images, num_shards={"train": num_shards}, seed=seed, image_size=SIZE
        )
        return write_shards(plan, folder, workers=1, progress=False)

    names = [f"train-0000{i}-of-00003.tfrecord" for i in range(3)]
    assert write(3, seed=1).written == names
    # Same file names, other content: a new seed reuses nothing.
    reseeded = write(3, seed=2)
    assert reseeded.written == names and not reseeded.reused
    # A changed source image: only the shard that holds it is rewritten.
    changed = Image.open(images[4].file_path).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    changed.save(images[4].file_path, quality=95)
    holder = next(
        s["file"]
        for s in reseeded.manifest["splits"]["train"]["shards"]
        if any(
            int(r["image/id"]) == images[4].image_id
            for r in read_records([str(folder / s["file"])])
        )
    )
    assert write(3, seed=2).written == [holder]
    # Other shard counts: the old files go, and a temporary leftover of a killed run too.
    (folder / f".train-00000-of-00002.tfrecord.tmp-{gone_pid()}-deadbeef").write_bytes(b"partial")
    regrouped = write(2, seed=2)
    assert regrouped.written == ["train-00000-of-00002.tfrecord", "train-00001-of-00002.tfrecord"]
    assert sorted(p.name for p in folder.iterdir()) == [MANIFEST, *regrouped.written]


def test_bad_images_are_skipped_and_counted(tmp_path):
    images = make_images(tmp_path / "images", {"train": 8})
    Path(images[2].file_path).write_bytes(b"this is not a jpeg")
    Path(images[5].file_path).unlink()
    plan = build_shard_plan(
        images, num_shards={"train": 2}, seed=0, image_size=SIZE, max_bad_fraction=0.3
    )
    summary = write_shards(plan, tmp_path / "out", workers=1, progress=False)
    train = summary.manifest["splits"]["train"]
    assert (train["records"], train["skipped"]) == (6, 2)
    assert train["captions"] == sum(
        len(i.captions) for k, i in enumerate(images) if k not in (2, 5)
    )
    examples = skipped_examples(summary.manifest, "train")
    assert sorted(e["image_id"] for e in examples) == [images[2].image_id, images[5].image_id]
    assert any(images[5].file_path in e["error"] and "missing" in e["error"] for e in examples)
    ids = [
        int(r["image/id"]) for r in read_records(load_shard_set(tmp_path / "out").files("train"))
    ]
    assert sorted(ids) == sorted(i.image_id for k, i in enumerate(images) if k not in (2, 5))

    strict = build_shard_plan(
        images, num_shards={"train": 2}, seed=0, image_size=SIZE, max_bad_fraction=0.1
    )
    with pytest.raises(DataError, match=r"2 of 8 train images failed to load"):
        write_shards(strict, tmp_path / "strict", workers=1, progress=False)
    assert not (tmp_path / "strict" / MANIFEST).exists()


def test_load_names_the_missing_manifest(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path / "nothing" / MANIFEST)):
        load_shard_set(tmp_path / "nothing")


def test_reader_sample_and_all_modes(written):
    images, folder, _ = written
    shard_set = load_shard_set(folder)
    train = {i.image_id: i for i in images if i.split == "train"}
    sample = list(make_caption_dataset(shard_set, "train", batch_size=4, shuffle=True, seed=1))
    assert sorted(int(i) for x, _ in sample for i in x["image_id"]) == sorted(train)
    everything = list(make_caption_dataset(shard_set, "train", batch_size=4, caption_mode="all"))
    pairs = sorted(
        (int(i), tuple(c[c > 0].tolist()))
        for x, y in everything
        for i, c in zip(x["image_id"], y.numpy(), strict=False)
    )
    assert pairs == sorted((i.image_id, tuple(c)) for i in train.values() for c in i.captions)

    x, y = everything[0]
    assert x["image"].dtype == tf.float32 and x["image"].shape[1:] == (SIZE, SIZE, 3)
    assert float(tf.reduce_min(x["image"])) >= 0 and float(tf.reduce_max(x["image"])) <= 255
    assert x["image_id"].dtype == tf.int64 and y.dtype == tf.int32

    # "sample" draws again every epoch: over 12 epochs an image with 3 captions shows several.
    epochs = make_caption_dataset(
        shard_set,
        "train",
        batch_size=16,
        seed=5,
        options=ReaderOptions(repeat=12, decode_images=False),
    )
    seen: dict[int, set] = {}
    for x, y in epochs:
        for i, c in zip(x["image_id"].numpy(), y.numpy(), strict=False):
            seen.setdefault(int(i), set()).add(tuple(c[c > 0]))
    assert all(seen[i] <= {tuple(c) for c in train[i].captions} for i in seen)
    assert any(len(seen[i]) > 1 for i in seen if len(train[i].captions) == 3)


def test_reader_pads_with_zero_to_the_batch_max(written):
    images, folder, _ = written
    captions = {i.image_id: i.captions for i in images}
    for x, y in make_caption_dataset(
        load_shard_set(folder),
        "train",
        batch_size=5,
        caption_mode="all",
        options=ReaderOptions(decode_images=False),
    ):
        y = y.numpy()
        lengths = (y > 0).sum(axis=1)
        assert y.shape[1] == lengths.max()
        for image_id, row, length in zip(x["image_id"].numpy(), y, lengths, strict=False):
            assert row[:length].tolist() in captions[int(image_id)]
            assert not row[length:].any()


def test_reader_buckets_by_length(written):
    _, folder, _ = written
    batches = list(
        make_caption_dataset(
            load_shard_set(folder), "train", batch_size=3, caption_mode="all", bucket_boundaries=[5]
        )
    )
    for _, y in batches:
        lengths = (y.numpy() > 0).sum(axis=1)
        assert (lengths < 5).all() or (lengths >= 5).all()  # one bucket per batch
        assert y.shape[1] == lengths.max()
    assert {bool((y.numpy() > 0).sum(axis=1).max() >= 5) for _, y in batches} == {True, False}


def test_reader_without_decoding_gives_jpeg_bytes(written):
    _, folder, _ = written
    shard_set = load_shard_set(folder)
    x, _ = next(
        iter(
            make_caption_dataset(
                shard_set, "val", batch_size=2, options=ReaderOptions(decode_images=False)
            )
        )
    )
    assert x["image"].dtype == tf.string and x["image"].shape == (2,)
    assert tf.io.decode_jpeg(x["image"][0]).shape == (SIZE, SIZE, 3)
    resized = next(iter(make_caption_dataset(shard_set, "val", batch_size=2, image_size=48)))[0][
        "image"
    ]
    assert resized.shape == (2, 48, 48, 3)
