"""The `synthetic` pipeline through Kedro: conf/base's parameters at tiny sizes, in memory."""

from __future__ import annotations

import json

from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner
from PIL import Image

from caption_pipeline.pipelines.synthetic import create_pipeline

SPLITS = {"train": 4, "val": 2, "test": 1}


def run(dataset: dict, synthetic: dict) -> dict:
    catalog = DataCatalog(
        {
            "params:dataset": MemoryDataset(dataset),
            "params:synthetic": MemoryDataset(synthetic),
            "raw_dataset": MemoryDataset(),
        }
    )
    SequentialRunner().run(create_pipeline(), catalog)
    return catalog.load("raw_dataset")


def test_generates_coco_format_splits_and_records_the_dataset_block(params, tmp_path):
    dataset = params("dataset", root=str(tmp_path / "shapes"))
    synthetic = params("synthetic", image_size=64, splits=SPLITS)
    captions = synthetic["captions_per_image"]

    raw = run(dataset, synthetic)

    assert {key: raw[key] for key in dataset} == dataset  # what ingest checks it against
    assert raw["generated"] is True and len(raw["fingerprint"]) == 64
    assert {
        split: {k: c[k] for k in ("images", "captions")} for split, c in raw["counts"].items()
    } == {split: {"images": n, "captions": n * captions} for split, n in SPLITS.items()}
    ids = {}
    for split, entry in dataset["splits"].items():
        coco = json.loads((tmp_path / "shapes" / entry["annotations"]).read_text())
        ids[split] = {image["id"] for image in coco["images"]}
        assert len(ids[split]) == SPLITS[split]
        assert len(coco["annotations"]) == SPLITS[split] * captions
        assert {a["image_id"] for a in coco["annotations"]} == ids[split]
        assert all(a["caption"].strip() for a in coco["annotations"])
        for image in coco["images"]:
            with Image.open(tmp_path / "shapes" / entry["images"] / image["file_name"]) as jpeg:
                assert (jpeg.format, jpeg.size) == ("JPEG", (64, 64))
    assert not (ids["train"] & ids["val"] or ids["train"] & ids["test"] or ids["val"] & ids["test"])


def test_a_second_run_keeps_the_files_and_other_parameters_regenerate(params, tmp_path):
    dataset = params("dataset", root=str(tmp_path / "shapes"))
    synthetic = params("synthetic", image_size=64, splits=SPLITS)
    first = run(dataset, synthetic)
    marker = tmp_path / "shapes" / "generator.json"
    written = marker.stat().st_mtime_ns

    assert run(dataset, synthetic) == first
    assert marker.stat().st_mtime_ns == written  # up to date: not generated again

    reseeded = run(dataset, {**synthetic, "seed": synthetic["seed"] + 1})
    assert reseeded["fingerprint"] != first["fingerprint"]
    assert json.loads(marker.read_text())["fingerprint"] == reseeded["fingerprint"]


def test_another_dataset_is_recorded_and_nothing_is_generated(params, tmp_path):
    dataset = params("dataset", name="mydata", root=str(tmp_path / "mydata"))
    raw = run(dataset, params("synthetic", image_size=64, splits=SPLITS))
    assert raw == {**dataset, "generated": False}
    assert not (tmp_path / "mydata").exists()
