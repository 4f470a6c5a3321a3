"""The `ingest` pipeline through Kedro: a tiny generated shapes dataset, conf/base's parameters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner

from caption_pipeline.errors import DataError
from caption_pipeline.pipelines.ingest import create_pipeline


def run(raw_dataset: dict, dataset: dict, ingest: dict) -> DataCatalog:
    catalog = DataCatalog(
        {
            "raw_dataset": MemoryDataset(raw_dataset),
            "params:dataset": MemoryDataset(dataset),
            "params:ingest": MemoryDataset(ingest),
            "caption_table": MemoryDataset(),
            "ingestion_report": MemoryDataset(),
        }
    )
    SequentialRunner().run(create_pipeline(), catalog)
    return catalog


def test_every_caption_of_every_image_in_a_table_with_its_report(tiny_shapes, params):
    dataset, raw = tiny_shapes
    catalog = run(raw, dataset, params("ingest", workers=1))
    table, report = catalog.load("caption_table"), catalog.load("ingestion_report")

    assert list(table.columns) == [
        "image_id",
        "split",
        "file_path",
        "annotation_id",
        "caption",
        "width",
        "height",
    ]
    root = Path(dataset["root"])
    for split, entry in dataset["splits"].items():
        coco = json.loads((root / entry["annotations"]).read_text())
        rows = table[table["split"] == split]
        assert sorted(rows["annotation_id"]) == sorted(a["id"] for a in coco["annotations"])
        assert dict(zip(rows["annotation_id"], rows["caption"], strict=False)) == {
            a["id"]: a["caption"] for a in coco["annotations"]
        }
        assert set(rows["image_id"]) == {image["id"] for image in coco["images"]}
        assert all(
            Path(p).is_file() and Path(p).parent.name == entry["images"] for p in rows["file_path"]
        )
        assert report["splits"][split] | {"annotation_file": None} == {
            "annotation_file": None,
            "images_listed": raw["counts"][split]["images"],
            "images_kept": raw["counts"][split]["images"],
            "images_skipped": 0,
            "captions_kept": raw["counts"][split]["captions"],
            "captions_skipped": 0,
        }
    assert (table["width"] == 64).all() and (table["height"] == 64).all()
    assert report["totals"] == {"images": table["image_id"].nunique(), "captions": len(table)}
    assert report["skipped"] == {}


def test_a_damaged_image_is_skipped_and_counted(tiny_shapes, params, tmp_path):
    import shutil

    dataset, raw = tiny_shapes
    root = shutil.copytree(dataset["root"], tmp_path / "shapes")
    damaged = sorted((root / dataset["splits"]["train"]["images"]).glob("*.jpg"))[0]
    damaged.write_bytes(damaged.read_bytes()[:100])
    moved = {**dataset, "root": str(root)}
    # One bad train image of 6 is over conf/base's 5 %: allowed here, to see it counted.
    catalog = run(
        {**raw, "root": str(root)}, moved, params("ingest", workers=1, max_bad_image_fraction=0.5)
    )
    table, report = catalog.load("caption_table"), catalog.load("ingestion_report")

    assert str(damaged) not in set(table["file_path"])
    assert report["splits"]["train"]["images_kept"] == raw["counts"]["train"]["images"] - 1
    assert report["splits"]["train"]["images_skipped"] == 1
    assert report["totals"]["captions"] == len(table)

    with pytest.raises(DataError, match="train"):  # conf/base's limit stops the run
        run({**raw, "root": str(root)}, moved, params("ingest", workers=1))


def test_a_raw_dataset_recorded_for_other_parameters_is_refused(tiny_shapes, params):
    dataset, raw = tiny_shapes
    with pytest.raises(DataError, match=r"dataset\.root changed.*--pipelines=synthetic"):
        run(raw, {**dataset, "root": "elsewhere"}, params("ingest", workers=1))
