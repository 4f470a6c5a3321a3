"""caption_pipeline.data.coco_like: a tiny COCO-shaped dataset, ingested with the project's
real COCO configuration; the distributions it models, checked on samples drawn without
writing images."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from caption_pipeline.data import coco_like
from caption_pipeline.data.coco_instances import load_instances
from caption_pipeline.data.coco_like import captions as coco_like_captions
from caption_pipeline.data.ingestion import SPLITS, clean_caption, ingest
from caption_pipeline.data.text import tokenize
from caption_pipeline.errors import DataError
from tests.helpers import gone_pid

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SCALE, SEED = 40, 7
VAL_IMAGES = coco_like.MIN_VAL_IMAGES  # 40 train images: val is at its minimum


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("coco_like") / "coco"
    return root, coco_like.generate(root, SCALE, SEED, workers=1)


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def coco_dataset_block(root: Path) -> dict:
    """conf/coco's `dataset` block, pointed at `root`."""
    dataset = yaml.safe_load((PROJECT_ROOT / "conf/coco/parameters.yml").read_text())["dataset"]
    return {**dataset, "root": str(root)}


def base_ingest_params() -> dict:
    return yaml.safe_load((PROJECT_ROOT / "conf/base/parameters_ingest.yml").read_text())["ingest"]


def file_digests(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` but the marker (which holds timings)."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != coco_like.MARKER_FILE
    }


# --- the generated dataset, through the project's ingestion ---------------------------------


def test_the_coco_configuration_ingests_it(generated):
    root, summary = generated
    table, report = ingest(coco_dataset_block(root), base_ingest_params())

    assert summary["images"] == {"train": SCALE, "val": VAL_IMAGES}
    assert report["skipped"] == {}
    assert set(report["format_notes"]) <= {"mode_L"}  # a grayscale image is noted, not skipped
    splits = report["splits"]
    assert splits["train"]["images_kept"] == splits["train"]["images_listed"] == SCALE
    assert splits["val"]["images_kept"] + splits["test"]["images_kept"] == VAL_IMAGES
    assert splits["val"]["images_kept"] == splits["test"]["images_kept"] == VAL_IMAGES // 2
    train_json = load(root / "annotations/captions_train2017.json")
    val_json = load(root / "annotations/captions_val2017.json")
    assert splits["train"]["captions_kept"] == len(train_json["annotations"])
    assert splits["val"]["captions_kept"] + splits["test"]["captions_kept"] == len(
        val_json["annotations"]
    )
    assert sum(summary["captions"].values()) == len(table) == report["totals"]["captions"]
    per_image = table.groupby("image_id").size()
    assert per_image.between(5, 7).all() and per_image.median() == 5
    assert table.groupby("split")["image_id"].nunique().to_dict() == {
        split: splits[split]["images_kept"] for split in SPLITS
    }


def test_the_karpathy_file_ingests_to_the_same_captions(generated):
    root, _ = generated
    karpathy = {
        "name": "coco_like_karpathy",
        "format": "karpathy",
        "root": str(root),
        "splits": {split: {"annotations": "dataset_coco.json", "images": ""} for split in SPLITS},
    }
    table, report = ingest(karpathy, base_ingest_params())  # restval goes to train

    assert report["skipped"] == {}
    assert report["splits"]["train"]["images_kept"] == SCALE
    assert report["splits"]["val"]["images_kept"] + report["splits"]["test"]["images_kept"] == (
        VAL_IMAGES
    )
    coco_table, _ = ingest(coco_dataset_block(root), base_ingest_params())
    pairs = Counter(zip(table["image_id"], table["caption"], strict=True))
    assert pairs == Counter(zip(coco_table["image_id"], coco_table["caption"], strict=True))
    train_files = set(table[table["split"] == "train"]["file_path"].map(lambda p: Path(p).parent))
    assert train_files == {root / "train2017"}


def test_the_json_files_have_coco_2017s_schema(generated):
    root, _ = generated
    image_keys = {"license", "file_name", "coco_url", "height", "width", "date_captured",
                  "flickr_url", "id"}  # fmt: skip
    for split in ("train", "val"):
        data = load(root / f"annotations/captions_{split}2017.json")
        assert set(data) == {"info", "licenses", "images", "annotations"}
        assert set(data["info"]) == {"description", "url", "version", "year", "contributor",
                                     "date_created"}  # fmt: skip
        assert all(set(entry) == {"url", "id", "name"} for entry in data["licenses"])
        assert all(set(image) == image_keys for image in data["images"])
        assert all(set(a) == {"image_id", "id", "caption"} for a in data["annotations"])
        ids = [image["id"] for image in data["images"]]
        assert len(set(ids)) == len(ids)
        assert all(
            re.fullmatch(r"\d{12}\.jpg", image["file_name"])
            and int(image["file_name"][:12]) == image["id"]
            for image in data["images"]
        )
        assert all(
            clean_caption(a["caption"], 1000) == (a["caption"], None) for a in data["annotations"]
        )

    instances = load(root / "annotations/instances_val2017.json")
    assert set(instances) == {"info", "licenses", "images", "annotations", "categories"}
    categories = instances["categories"]
    assert (
        len(categories)
        == 80
        == len({c["id"] for c in categories})
        == len({c["name"] for c in categories})
    )
    assert all(set(c) == {"id", "name", "supercategory"} for c in categories)
    sizes = {image["id"]: (image["width"], image["height"]) for image in instances["images"]}
    for annotation in instances["annotations"]:
        assert set(annotation) == {"segmentation", "area", "iscrowd", "image_id", "bbox",
                                   "category_id", "id"}  # fmt: skip
        x, y, w, h = annotation["bbox"]
        width, height = sizes[annotation["image_id"]]
        assert 0 <= x and 0 <= y and x + w <= width + 0.01 and y + h <= height + 0.01
        assert 0 < annotation["area"] <= w * h + 0.01
        polygon = np.array(annotation["segmentation"][0]).reshape(-1, 2)
        assert np.allclose(polygon.min(axis=0), [x, y], atol=0.01)
    objects = load_instances(root / "annotations/instances_val2017.json")  # attention_maps reads it
    assert set(objects.images) == set(sizes)
    assert sum(len(b) for scene in objects.images.values() for b in scene.boxes.values()) == len(
        instances["annotations"]
    )

    karpathy = load(root / "dataset_coco.json")
    assert karpathy["dataset"] == "coco"
    assert [image["imgid"] for image in karpathy["images"]] == list(range(SCALE + VAL_IMAGES))
    sentids = [s["sentid"] for image in karpathy["images"] for s in image["sentences"]]
    assert sentids == list(range(len(sentids)))
    for image in karpathy["images"]:
        assert set(image) == {"filepath", "sentids", "filename", "imgid", "split", "sentences",
                              "cocoid"}  # fmt: skip
        assert image["split"] in (
            ("train", "restval") if image["filepath"] == "train2017" else ("val", "test")
        )
        assert image["sentids"] == [s["sentid"] for s in image["sentences"]]
        for sentence in image["sentences"]:
            assert set(sentence) == {"tokens", "raw", "imgid", "sentid"}
            assert sentence["tokens"] == tokenize(sentence["raw"])
            assert sentence["imgid"] == image["imgid"]


def test_the_jpegs_have_the_listed_sizes(generated):
    root, summary = generated
    shapes, file_sizes = [], []
    for split, folder in coco_like.FOLDERS.items():
        for image in load(root / f"annotations/captions_{split}2017.json")["images"]:
            path = root / folder / image["file_name"]
            with Image.open(path) as opened:
                assert opened.format == "JPEG" and opened.mode in ("RGB", "L")
                assert opened.size == (image["width"], image["height"])
            shapes.append(opened.size)
            file_sizes.append(path.stat().st_size)
    assert len(shapes) == SCALE + VAL_IMAGES
    assert all(max(size) == 640 and 360 <= min(size) <= 640 for size in shapes)
    assert {w > h for w, h in shapes} == {True, False}  # both orientations
    assert 120_000 < np.mean(file_sizes) < 210_000  # COCO's ~160 kB
    assert summary["mean_jpeg_kb"] == round(np.mean(file_sizes) / 1000, 1)


def test_a_grayscale_image_is_a_one_channel_jpeg():
    plan = dataclasses.replace(coco_like.plan_dataset(1, 0)["val"][0], grayscale=True)
    pixels = coco_like.render_image(plan, 0)
    assert pixels.shape == (plan.height, plan.width) and pixels.dtype == np.uint8
    with Image.open(io.BytesIO(coco_like.encode_jpeg(pixels))) as image:
        assert image.mode == "L" and image.size == (plan.width, plan.height)


# --- distributions, sampled without images --------------------------------------------------


def test_image_sizes_follow_cocos_mix():
    rng = np.random.default_rng(0)
    sizes = np.array([coco_like.sample_image_size(rng) for _ in range(4000)])  # [N, 2] (w, h)
    assert (sizes.max(axis=1) == 640).all()
    assert ((sizes.min(axis=1) >= 360) & (sizes.min(axis=1) <= 640)).all()
    landscape_4_3 = (sizes == [640, 480]).all(axis=1).mean()  # the commonest size
    assert abs(landscape_4_3 - coco_like.SHORT_SIDES[480] * (1 - coco_like.PORTRAIT_P)) < 0.03
    portrait = (sizes[:, 1] > sizes[:, 0]).mean()
    square = coco_like.SHORT_SIDES[640]
    assert abs(portrait - (1 - square) * coco_like.PORTRAIT_P) < 0.03
    assert len({tuple(s) for s in sizes}) > 100  # varied aspect ratios


def test_caption_lengths_match_cocos():
    rng = np.random.default_rng(0)
    lengths = coco_like_captions.sample_caption_lengths(rng, 20_000)
    assert abs(lengths.mean() - 10.5) < 0.15
    assert (lengths >= 8).mean() > 0.98 and (lengths > 20).any() and lengths.max() <= 30
    captions = coco_like.sample_captions(rng, 3_000)
    words = [tokenize(caption) for caption in captions]
    assert [len(w) for w in words] == [len(c.split()) for c in captions]  # nothing split or lost
    assert abs(np.mean([len(w) for w in words]) - 10.5) < 0.25
    assert Counter(w for ws in words for w in ws).most_common(1)[0][0] == "a"


def test_every_word_survives_the_tokenizer():
    words = coco_like_captions.vocabulary_words()
    assert len(words) == len(set(words)) == coco_like_captions.VOCABULARY_SIZE
    for start in range(0, len(words), 100):
        chunk = list(words[start : start + 100])
        assert tokenize(" ".join(chunk).capitalize() + ".") == chunk


def test_the_full_scale_vocabulary_is_the_original_projects():
    expected = coco_like_captions.expected_vocabulary(coco_like.COCO_TRAIN_CAPTIONS)
    assert abs(expected - coco_like.TARGET_VOCABULARY) < 0.005 * coco_like.TARGET_VOCABULARY
    # The formula against the sampler itself, at a scale that samples quickly.
    simulated = coco_like_captions.simulated_vocabulary(100_000, seed=1)
    assert abs(simulated - coco_like_captions.expected_vocabulary(100_000)) < 0.03 * simulated


# --- determinism, resuming, refusing --------------------------------------------------------


def test_same_arguments_give_the_same_files_and_a_rerun_resumes(generated, tmp_path, capsys):
    root, _ = generated
    again = tmp_path / "again"
    args = ["--out", str(again), "--scale", str(SCALE), "--seed", str(SEED), "--workers", "2"]
    summary = coco_like.main(args)  # the command line, with worker processes this time
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == summary
    assert file_digests(again) == file_digests(root)

    victim = next((again / "val2017").iterdir())
    victim.unlink()
    # what a killed run leaves
    leftover = again / "val2017" / f".leftover.jpg.tmp-{gone_pid()}-abcdef12"
    leftover.write_bytes(b"half")
    resumed = coco_like.generate(again, SCALE, SEED, workers=1)
    assert resumed["images_written"] == 1 and not leftover.exists()
    assert file_digests(again) == file_digests(root)
    assert load(again / coco_like.MARKER_FILE)["complete"] is True

    with pytest.raises(DataError, match="other arguments"):
        coco_like.generate(again, SCALE, SEED + 1)
    foreign = tmp_path / "real_coco"
    (foreign / "annotations").mkdir(parents=True)
    with pytest.raises(DataError, match="not made by"):
        coco_like.generate(foreign, SCALE, SEED)


def test_the_seed_changes_the_content():
    one, other = coco_like.plan_dataset(SCALE, SEED), coco_like.plan_dataset(SCALE, SEED + 1)
    assert one == coco_like.plan_dataset(SCALE, SEED)
    assert [p.captions for p in one["train"]] != [p.captions for p in other["train"]]
    assert [p.image_id for p in one["val"]] != [p.image_id for p in other["val"]]
