"""caption_pipeline.data.ingestion and the `ingest` pipeline, on tiny datasets written by hand."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from kedro.config import OmegaConfigLoader
from kedro.framework.cli.utils import _split_params
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner
from PIL import Image

from caption_pipeline.data.ingestion import TABLE_DTYPES, ingest
from caption_pipeline.datasets import AtomicJSONDataset, AtomicParquetDataset
from caption_pipeline.errors import DataError
from caption_pipeline.params import defaults
from caption_pipeline.pipelines.ingest import create_pipeline
from caption_pipeline.settings import CONFIG_LOADER_ARGS
from tests.helpers import run_kedro

# One process and a lenient bad-image limit, unless a test is about those.
PARAMS = {**defaults("ingest"), "workers": 1, "max_bad_image_fraction": 0.5}


def jpeg(path: Path, size=(32, 24), color=(120, 80, 40), mode="RGB", **save_args) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, format="JPEG", **save_args)


def write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def coco_split(root: Path, name: str, ids, folder: str, file_name="{:012d}.jpg") -> dict:
    """Write one JPEG per id and a COCO captions file with two captions each."""
    images = [{"id": i, "file_name": file_name.format(i), "width": 32, "height": 24} for i in ids]
    for image in images:
        jpeg(root / folder / image["file_name"])
    annotations = [
        {"id": 10 * i + k, "image_id": i, "caption": f"  A shape number {i}, caption {k}.\n"}
        for i in ids
        for k in (1, 2)
    ]
    data = {"info": {}, "licenses": [], "images": images, "annotations": annotations}
    write_json(root / "annotations" / name, data)
    return data


def dataset(root: Path, splits: dict, fmt: str = "coco") -> dict:
    return {"name": "tiny", "format": fmt, "root": str(root), "splits": splits}


def three_splits(root: Path, train=(1, 2, 3, 4), val=(5, 6), test=(7, 8)) -> dict:
    """A small COCO-layout dataset; returns its `dataset` block."""
    splits = {}
    for split, ids in (("train", train), ("val", val), ("test", test)):
        coco_split(root, f"captions_{split}.json", ids, split)
        splits[split] = {"annotations": f"annotations/captions_{split}.json", "images": split}
    return dataset(root, splits)


def test_coco2017_layout_with_the_coco_env_dataset_block(tmp_path, project_root):
    loader = OmegaConfigLoader(str(project_root / "conf"), env="coco", **CONFIG_LOADER_ARGS)
    block = {**loader["parameters"]["dataset"], "root": str(tmp_path)}
    coco_split(tmp_path, "captions_train2017.json", [9, 25, 30], "train2017")
    val_ids = [139, 285, 632, 724, 776, 785, 802, 872, 885, 1000]
    coco_split(tmp_path, "captions_val2017.json", val_ids, "val2017")

    table, report = ingest(block, PARAMS)

    assert list(table.columns) == list(TABLE_DTYPES)
    assert table.dtypes.astype(str).to_dict() == TABLE_DTYPES
    ids = {s: set(table.loc[table.split == s, "image_id"]) for s in ("train", "val", "test")}
    assert ids["train"] == {9, 25, 30}
    assert len(ids["val"]) == len(ids["test"]) == 5
    assert ids["val"].isdisjoint(ids["test"]) and ids["val"] | ids["test"] == set(val_ids)
    first = table[table.image_id == 139].iloc[0]
    assert first.file_path == f"{tmp_path}/val2017/000000000139.jpg"
    assert first.caption == "A shape number 139, caption 1."
    assert (first.annotation_id, first.width, first.height) == (1391, 32, 24)
    assert len(table) == 2 * 13
    assert report["totals"] == {"images": 13, "captions": 26}
    assert report["splits"]["test"]["images_kept"] == 5
    assert report["skipped"] == {} and report["format_notes"] == {}


def test_coco2014_style_file_names(tmp_path):
    for split, ids in (("train", [57870, 384029]), ("val", [391895, 522418])):
        file_name = f"COCO_{split}2014_{{:012d}}.jpg"
        coco_split(tmp_path, f"captions_{split}2014.json", ids, f"{split}2014", file_name)
    block = dataset(
        tmp_path,
        {
            "train": {"annotations": "annotations/captions_train2014.json", "images": "train2014"},
            "val": {"annotations": "annotations/captions_val2014.json", "images": "val2014"},
        },
    )

    table, report = ingest(block, PARAMS)

    assert sorted(table.split.unique()) == ["train", "val"]
    paths = set(table.file_path)
    assert f"{tmp_path}/val2014/COCO_val2014_000000391895.jpg" in paths
    assert all(Path(p).is_file() for p in paths)
    assert report["splits"]["val"]["captions_kept"] == 4


def karpathy_file(root: Path) -> Path:
    images = []
    for i, (split, folder) in enumerate(
        [("train", "train2014"), ("restval", "val2014"), ("val", "val2014"), ("test", "val2014")]
    ):
        cocoid = 1000 + i
        filename = f"COCO_{folder}_{cocoid:012d}.jpg"
        jpeg(root / folder / filename)
        sentences = [
            {"raw": f"A picture number {i}.", "tokens": ["a", "pic"], "imgid": i, "sentid": 2 * i},
            {"raw": "Another one", "tokens": ["another", "one"], "imgid": i, "sentid": 2 * i + 1},
        ]
        images.append(
            {"filepath": folder, "filename": filename, "imgid": i, "split": split,
             "sentences": sentences, "sentids": [2 * i, 2 * i + 1], "cocoid": cocoid}
        )  # fmt: skip
    return write_json(root / "dataset_coco.json", {"images": images, "dataset": "coco"})


@pytest.mark.parametrize(
    ("restval", "expected"),
    [
        ("train", {"train": {1000, 1001}, "val": {1002}, "test": {1003}}),
        ("val", {"train": {1000}, "val": {1001, 1002}, "test": {1003}}),
        ("drop", {"train": {1000}, "val": {1002}, "test": {1003}}),
    ],
)
def test_karpathy_split_file(tmp_path, restval, expected):
    karpathy_file(tmp_path)
    source = {"annotations": "dataset_coco.json", "images": ""}
    block = dataset(tmp_path, {s: source for s in ("train", "val", "test")}, fmt="karpathy")

    table, _ = ingest(block, {**PARAMS, "karpathy_restval": restval})

    assert {s: set(g.image_id) for s, g in table.groupby("split")} == expected
    row = table[table.annotation_id == 5].iloc[0]  # Karpathy's sentid
    assert (row.image_id, row.caption) == (1002, "Another one")
    assert row.file_path == f"{tmp_path}/val2014/COCO_val2014_000000001002.jpg"


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda p: p.unlink(), "missing"),
        (lambda p: (p.unlink(), p.mkdir()), "unreadable"),
        (lambda p: p.write_bytes(b""), "empty"),
        (lambda p: p.write_bytes(p.read_bytes()[:300]), "truncated"),
        (lambda p: p.write_text("<html>not found</html>"), "not_an_image"),
    ],
    ids=["missing", "folder", "empty", "truncated", "not-an-image"],
)
def test_a_bad_image_is_skipped_and_counted(tmp_path, damage, reason):
    block = three_splits(tmp_path)
    bad = tmp_path / "train" / "000000000003.jpg"
    jpeg(bad, size=(64, 64))  # big enough to cut in the middle of its pixels
    damage(bad)

    table, report = ingest(block, PARAMS)

    assert 3 not in set(table.image_id)
    assert set(table.image_id) == {1, 2, 4, 5, 6, 7, 8}
    entry = report["skipped"][f"image_{reason}"]
    assert entry["count"] == 1
    assert entry["examples"][0].startswith(f"{tmp_path}/train/000000000003.jpg")
    assert report["splits"]["train"]["images_skipped"] == 1
    assert report["splits"]["train"]["captions_skipped"] == 2


def test_decodable_odd_images_are_kept_with_format_notes(tmp_path):
    block = three_splits(tmp_path, train=(1, 2, 3, 4, 5, 6), val=(11, 12), test=(13, 14))
    folder = tmp_path / "train"
    Image.new("RGB", (32, 24), (0, 200, 0)).save(folder / "000000000001.jpg", format="PNG")
    jpeg(folder / "000000000002.jpg", mode="CMYK", color=(0, 255, 255, 0))
    jpeg(folder / "000000000003.jpg", mode="L", color=90)
    deep = Image.fromarray(np.full((24, 32), 65535, np.uint16))
    deep.save(folder / "000000000004.jpg", format="PNG")
    exif = Image.Exif()
    exif[0x0112] = 8
    jpeg(folder / "000000000005.jpg", size=(40, 20), exif=exif)

    table, report = ingest(block, PARAMS)

    assert set(table[table.split == "train"].image_id) == {1, 2, 3, 4, 5, 6}
    sizes = table.drop_duplicates("image_id").set_index("image_id")[["width", "height"]]
    assert tuple(sizes.loc[5]) == (20, 40)  # after the EXIF rotation
    assert tuple(sizes.loc[1]) == (32, 24)
    notes = {key: value["count"] for key, value in report["format_notes"].items()}
    assert notes == {
        "format_png_not_jpeg": 2,
        "mode_CMYK": 1,
        "mode_L": 1,
        "mode_I;16": 1,
        "exif_rotated": 1,
    }
    assert report["format_notes"]["exif_rotated"]["examples"] == [
        f"{folder}/000000000005.jpg: orientation 8"
    ]
    assert report["skipped"] == {}


def test_caption_and_annotation_problems_are_skipped_and_counted(tmp_path):
    block = three_splits(tmp_path)
    path = tmp_path / "annotations" / "captions_train.json"
    data = json.loads(path.read_text())
    data["annotations"] = [
        {"id": 1, "image_id": 1, "caption": "Un cafe\u0301 \u2615 sur la table"},
        {"id": 2, "image_id": 1, "caption": "A dog \U0001f436 runs"},
        {"id": 2, "image_id": 1, "caption": "a duplicate annotation id"},
        {"id": 3, "image_id": 99, "caption": "an image that is not listed"},
        {"id": 4, "image_id": 2, "caption": ""},
        {"id": 5, "image_id": 2, "caption": " \t\n "},
        {"id": 6, "image_id": 2, "caption": "\U0001f436\U0001f436 !!"},
        {"id": 7, "image_id": 3, "caption": "a " * 600},
        {"id": 8, "image_id": 3, "caption": "Three squares"},
        {"id": 9, "image_id": 4, "caption": "A lone \ud800 surrogate"},
        {"id": 10, "image_id": 4, "caption": "A circle\n"},
    ]
    path.write_text(json.dumps(data))  # ensure_ascii: the surrogate is written as \ud800

    table, report = ingest(block, PARAMS)

    train = table[table.split == "train"].set_index("annotation_id").caption.to_dict()
    assert train == {
        1: "Un caf\u00e9 \u2615 sur la table",  # NFC: e + combining accent -> one character
        2: "A dog \U0001f436 runs",
        8: "Three squares",
        10: "A circle",
    }
    counts = {key: value["count"] for key, value in report["skipped"].items()}
    assert counts == {
        "annotation_duplicate_id": 1,
        "annotation_unknown_image": 1,
        "caption_empty": 2,
        "caption_no_words": 1,
        "caption_too_long": 1,
        "caption_invalid_unicode": 1,
        "image_without_captions": 1,  # image 2: all its captions were bad
    }
    assert report["skipped"]["annotation_unknown_image"]["examples"] == [
        f"{path}: annotations[3] id=3, image_id=99"
    ]
    assert "annotation id=7" in report["skipped"]["caption_too_long"]["examples"][0]
    assert report["splits"]["train"]["captions_skipped"] == 5
    assert json.loads(json.dumps(report)) == report


def test_max_caption_chars_is_a_parameter(tmp_path):
    block = three_splits(tmp_path)
    path = tmp_path / "annotations" / "captions_val.json"
    data = json.loads(path.read_text())
    data["annotations"][0]["caption"] = "x" * 31
    path.write_text(json.dumps(data))

    table, report = ingest(block, {**PARAMS, "max_caption_chars": 30})

    assert len(table) == 15 and 51 not in set(table.annotation_id)
    assert report["skipped"]["caption_too_long"]["count"] == 1


STRUCTURE_ERRORS = {
    "id as a string": (
        lambda d: d["images"][1].update(id="2"),
        r"images\[1\]\.id must be an integer, got a string '2'",
    ),
    "image_id as a string": (
        lambda d: d["annotations"][0].update(image_id="1"),
        r"annotations\[0\]\.image_id must be an integer, got a string '1'",
    ),
    "float id": (
        lambda d: d["annotations"][3].update(id=31.0),
        r"annotations\[3\]\.id must be an integer, got a number 31\.0",
    ),
    "no file_name": (
        lambda d: d["images"][0].pop("file_name"),
        r"images\[0\]\.file_name is missing",
    ),
    "no annotations": (lambda d: d.pop("annotations"), r"annotations is missing"),
    "images not a list": (
        lambda d: d.update(images={"1": "a.jpg"}),
        r"images must be an array, got an object \{'1': 'a.jpg'\}",
    ),
    "caption a number": (
        lambda d: d["annotations"][2].update(caption=5),
        r"annotations\[2\]\.caption must be a string, got an integer 5",
    ),
    "entry not an object": (
        lambda d: d["annotations"].insert(0, "a caption"),
        r"annotations\[0\] must be an object, got a string 'a caption'",
    ),
    "duplicate image id": (
        lambda d: d["images"][1].update(id=5),
        r"images\[1\]\.id 5 is a duplicate image id",
    ),
}


@pytest.mark.parametrize(("mutate", "message"), STRUCTURE_ERRORS.values(), ids=STRUCTURE_ERRORS)
def test_structurally_wrong_coco_json_stops_with_file_and_field(tmp_path, mutate, message):
    block = three_splits(tmp_path)
    path = tmp_path / "annotations" / "captions_val.json"
    data = json.loads(path.read_text())
    mutate(data)
    path.write_text(json.dumps(data))

    with pytest.raises(DataError, match=f"^{path}: {message}"):
        ingest(block, PARAMS)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"images: []\n", r"not valid JSON: Expecting value at line 1, column 1"),
        (b"", r"not valid JSON"),
        (b'{"images": [], "annotations": [}', r"not valid JSON: .* line 1, column 32"),
        (b"[]", r"top level must be a JSON object with keys \['images', 'annotations'\]"),
        ('{"images": "caf\u00e9"}'.encode("latin-1"), r"not UTF-8 text \(bad byte at offset 15\)"),
        (None, r"annotation file not found"),
    ],
    ids=["yaml", "empty", "broken", "list", "latin-1", "missing"],
)
def test_unreadable_annotation_files_stop_with_the_file_name(tmp_path, content, message):
    block = three_splits(tmp_path)
    path = tmp_path / "annotations" / "captions_test.json"
    if content is None:
        path.unlink()
    else:
        path.write_bytes(content)

    with pytest.raises(DataError, match=f"^{path}: {message}"):
        ingest(block, PARAMS)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (
            lambda d: d["images"][2]["sentences"][1].pop("raw"),
            r"images\[2\]\.sentences\[1\]\.raw is missing",
        ),
        (lambda d: d["images"][0].update(split="holdout"), r"images\[0\]\.split must be in"),
        (lambda d: d["images"][3].update(cocoid="1003"), r"images\[3\]\.cocoid must be an integer"),
        (lambda d: d.update(images=None), r"images must be an array, got null"),
    ],
    ids=["no raw", "unknown split", "string id", "images null"],
)
def test_structurally_wrong_karpathy_file_stops_with_file_and_field(tmp_path, mutate, message):
    path = karpathy_file(tmp_path)
    data = json.loads(path.read_text())
    mutate(data)
    path.write_text(json.dumps(data))
    block = dataset(tmp_path, {"train": {"annotations": "dataset_coco.json"}}, fmt="karpathy")

    with pytest.raises(DataError, match=f"^{path}: {message}"):
        ingest(block, PARAMS)


def test_overlapping_splits_are_refused(tmp_path):
    block = three_splits(tmp_path, train=(1, 2, 3, 4, 5), val=(4, 5, 6), test=(7, 8))

    with pytest.raises(DataError) as info:
        ingest(block, PARAMS)

    message = str(info.value)
    assert "2 image id(s) are in both 'train'" in message
    assert f"'val' ({tmp_path}/annotations/captions_val.json), e.g. [4, 5]" in message
    assert "'test'" not in message


def test_overlapping_select_ranges_of_one_file_are_refused(tmp_path):
    coco_split(tmp_path, "captions_val2017.json", range(1, 21), "val2017")
    source = {"annotations": "annotations/captions_val2017.json", "images": "val2017"}
    block = dataset(
        tmp_path, {"val": {**source, "select": [0.0, 0.6]}, "test": {**source, "select": [0.5, 1]}}
    )
    with pytest.raises(DataError, match=r"2 image id\(s\) are in both 'val' .* and 'test'"):
        ingest(block, PARAMS)


def test_too_many_bad_images_in_a_split_stop_the_run(tmp_path):
    block = three_splits(tmp_path)
    (tmp_path / "train" / "000000000003.jpg").unlink()

    with pytest.raises(DataError) as info:
        ingest(block, {**defaults("ingest"), "workers": 1})  # conf/base's limit: 5%

    message = str(info.value)
    assert message.startswith(f"split 'train': 1 of 4 images (25.0%) under {tmp_path}/train")
    assert f"missing: 1; e.g. {tmp_path}/train/000000000003.jpg" in message
    assert "ingest.max_bad_image_fraction = 5.0%" in message


def test_a_split_left_without_captions_stops_the_run(tmp_path):
    block = three_splits(tmp_path)
    path = tmp_path / "annotations" / "captions_test.json"
    data = json.loads(path.read_text())
    for annotation in data["annotations"]:
        annotation["caption"] = " "
    path.write_text(json.dumps(data))

    with pytest.raises(DataError, match=rf"split 'test': none of the 2 images of {path} is usable"):
        ingest(block, PARAMS)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda b, p: p.update(worker=2), r"parameters ingest\.worker \(.*\): unknown key; known"),
        (lambda b, p: p.update(karpathy_restval="val2"), r"ingest: karpathy_restval is invalid"),
        (lambda b, p: b["splits"]["val"].update(select=[0.5, 0.5]), r"splits\.val\.select must be"),
        (lambda b, p: b.update(format="yolo"), r"dataset\.format must be one of"),
        (lambda b, p: b["splits"].update(holdout={}), r"dataset\.splits must map some of"),
        (lambda b, p: b["splits"]["test"].pop("annotations"), r"splits\.test\.annotations must"),
    ],
    ids=["ingest key", "restval", "select", "format", "split name", "annotations"],
)
def test_bad_parameters_are_named(tmp_path, change, message):
    block, params = three_splits(tmp_path), dict(PARAMS)
    change(block, params)
    with pytest.raises(DataError, match=message):
        ingest(block, params)


def test_ingest_pipeline_end_to_end_through_the_catalog(tmp_path):
    block = three_splits(tmp_path)
    shutil.copy(tmp_path / "train" / "000000000002.jpg", tmp_path / "val" / "000000000005.jpg")
    (tmp_path / "test" / "000000000008.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut")
    table_path, report_path = tmp_path / "out" / "captions.parquet", tmp_path / "report.json"
    catalog = DataCatalog(
        {
            "raw_dataset": MemoryDataset({**block, "generated": False}),
            "params:dataset": MemoryDataset(block),
            "params:ingest": MemoryDataset({**PARAMS, "workers": 2, "chunk_size": 2}),
            "caption_table": AtomicParquetDataset(filepath=str(table_path)),
            "ingestion_report": AtomicJSONDataset(filepath=str(report_path)),
        }
    )

    SequentialRunner().run(create_pipeline(), catalog)

    table = pd.read_parquet(table_path)
    assert table.dtypes.astype(str).to_dict() == TABLE_DTYPES
    assert len(table) == 2 * 7 and 8 not in set(table.image_id)
    assert table.groupby("split").image_id.nunique().to_dict() == {"train": 4, "val": 2, "test": 1}
    report = json.loads(report_path.read_text())
    assert report["skipped"]["image_truncated"]["count"] == 1
    assert report["totals"] == {"images": 7, "captions": 14}
    assert not list(tmp_path.glob("out/.*tmp-*"))


def test_command_line_params_override_nested_dataset_keys(tmp_path, project_root):
    # `kedro run --params=...` with an env that has parameters of its own (as conf/smoke does).
    conf = tmp_path / "conf"
    shutil.copytree(project_root / "conf" / "base", conf / "base")
    (conf / "other").mkdir()
    (conf / "other" / "parameters_train.yml").write_text("train: {epochs: 1}\n")
    runtime = _split_params(None, None, "dataset.root=/data/x,dataset.name=x")

    loader = OmegaConfigLoader(str(conf), env="other", runtime_params=runtime, **CONFIG_LOADER_ARGS)
    params = loader["parameters"]

    assert params["dataset"]["root"] == "/data/x"
    assert params["dataset"]["name"] == "x"
    assert params["dataset"]["splits"]["train"]["images"] == "train"  # the rest is kept
    # The env's own block is merged key by key too: its key wins, the base's others stay.
    assert params["train"]["epochs"] == 1
    assert params["train"]["batch_size"] == loader_base_batch_size(conf)


def loader_base_batch_size(conf: Path) -> int:
    import yaml

    return yaml.safe_load((conf / "base" / "parameters_train.yml").read_text())["train"][
        "batch_size"
    ]


def test_ingest_alone_on_a_fresh_project_names_the_stage_to_run_first(tmp_path):
    """Issue 12: `kedro run --pipelines=ingest` on a fresh clone with one's own dataset ends in
    one line saying to run `synthetic` first (it records the dataset block), not a traceback;
    and that advice works."""
    from caption_pipeline.project import copy_project

    project = copy_project(tmp_path / "project")
    three_splits(tmp_path / "mydata")
    own = f"--params=dataset.name=mydata,dataset.root={tmp_path / 'mydata'}"
    alone = run_kedro(project, "run", "--pipelines=ingest", own)
    assert alone.returncode != 0
    assert "Traceback" not in alone.stderr + alone.stdout
    assert (
        "Error: raw_dataset (" in alone.stderr
        and "data/01_raw/raw_dataset.json) does not "
        "exist yet: run `kedro run --pipelines=synthetic` first"
        in alone.stderr
    ), alone.stderr
    advised = run_kedro(project, "run", "--pipelines=synthetic,ingest", own)
    assert advised.returncode == 0, advised.stderr[-3000:]
    table = pd.read_parquet(project / "data/02_intermediate/captions.parquet")
    assert set(table.split) == {"train", "val", "test"}
    # The record is now mydata's: ingest under other dataset parameters refuses it, in one
    # line, rather than silently reading mydata again.
    stale = run_kedro(project, "run", "--pipelines=ingest")
    assert stale.returncode != 0 and "Traceback" not in stale.stderr + stale.stdout
    assert (
        "raw_dataset records dataset 'mydata'" in stale.stderr
        and "the parameters now say "
        "'shapes' at 'data/01_raw/shapes' (dataset.name, dataset.root changed): run `kedro "
        "run --pipelines=synthetic` first"
        in stale.stderr
    ), stale.stderr[-3000:]
