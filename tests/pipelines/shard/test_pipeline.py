"""The `shard` pipeline through Kedro: the plan node, the writing node, the shards dataset."""

from __future__ import annotations

import pandas as pd
import pytest
import tensorflow as tf
from kedro.framework.hooks import hook_impl
from kedro.framework.hooks.markers import HOOK_NAMESPACE
from kedro.framework.hooks.specs import DatasetSpecs, NodeSpecs
from kedro.io import DataCatalog, DatasetError, MemoryDataset
from kedro.runner import SequentialRunner
from PIL import Image
from pluggy import PluginManager

from caption_pipeline.data.shards.plan import images_from_table
from caption_pipeline.data.shards.reader import make_caption_dataset
from caption_pipeline.data.shards.records import parse_example
from caption_pipeline.data.shards.shard_set import MANIFEST
from caption_pipeline.datasets import ShardFolderDataset
from caption_pipeline.errors import DataError
from caption_pipeline.pipelines.shard import create_pipeline

WORDS = ["a", "red", "circle", "blue", "square"]
VOCABULARY = {
    "tokens": ["<pad>", "<start>", "<end>", "<unk>", *WORDS],
    "counts": dict.fromkeys(WORDS, 2),
    "min_count": 1,
    "max_caption_length": 6,
    "special_tokens": {"pad": "<pad>", "start": "<start>", "end": "<end>", "unk": "<unk>"},
}
PARAMS = {
    "num_shards": {"train": 2, "val": 1, "test": 1},
    "seed": 42,
    "image_size": 24,
    "jpeg_quality": 90,
    "workers": 1,
    "max_bad_fraction": 0.0,
}


def shard_catalog(path: str) -> DataCatalog:
    """conf/base's two entries of the shard folder: the one the node writes into, the set."""
    return DataCatalog.from_config(
        {
            "shards_folder": {"type": "caption_pipeline.datasets.ShardFolderDataset", "path": path},
            "shards": {"type": "caption_pipeline.datasets.TFRecordShardsDataset", "path": path},
        }
    )


def tokenized_table(folder) -> pd.DataFrame:
    """Two captions per image, rows deliberately out of order; "zebra" is out of vocabulary."""
    rows = []
    for image_id, split in [(5, "train"), (3, "train"), (9, "train"), (4, "val"), (7, "test")]:
        path = folder / f"{image_id:012d}.jpg"
        Image.new("RGB", (30 + image_id, 20), (20 * image_id, 90, 200)).save(path)
        rows.append((image_id, split, str(path), 20 * image_id + 1, ["a", "zebra", "circle"]))
        rows.append((image_id, split, str(path), 20 * image_id, ["a", "red", "square"]))
    columns = ["image_id", "split", "file_path", "annotation_id", "tokens"]
    return pd.DataFrame(rows[::-1], columns=columns)


def test_shard_pipeline_saves_a_plan_and_loads_a_shard_set(tmp_path):
    (tmp_path / "images").mkdir()
    table = tokenized_table(tmp_path / "images")
    catalog = shard_catalog(str(tmp_path / "shards"))
    catalog["tokenized_captions"] = MemoryDataset(table)
    catalog["vocabulary"] = MemoryDataset(VOCABULARY)
    catalog["params:shard"] = MemoryDataset(PARAMS)
    assert not catalog.exists("shards")

    SequentialRunner().run(create_pipeline(), catalog)

    assert catalog.exists("shards")
    shard_set = catalog.load("shards")
    assert shard_set.image_size == 24
    assert {s: shard_set.num_images(s) for s in shard_set.splits} == {
        "train": 3,
        "val": 1,
        "test": 1,
    }
    assert len(shard_set.files("train")) == 2
    records = [
        parse_example(r)
        for s in shard_set.splits
        for r in tf.data.TFRecordDataset(shard_set.files(s))
    ]
    assert sorted(int(r["image/id"]) for r in records) == [3, 4, 5, 7, 9]
    for record in records:
        # ordered by annotation_id: "a red square" first; ids include <start>=1 and <end>=2
        assert record["caption/ids"].to_list() == [[1, 4, 5, 8, 2], [1, 4, 3, 6, 2]]

    x, y = next(iter(make_caption_dataset(shard_set, "train", batch_size=8, caption_mode="all")))
    assert x["image"].shape == (6, 24, 24, 3) and y.shape == (6, 5)


def test_loading_missing_shards_names_the_folder(tmp_path):
    catalog = shard_catalog(str(tmp_path / "none"))
    assert not catalog.exists("shards")
    with pytest.raises(DatasetError, match=str(tmp_path / "none")) as error:
        catalog.load("shards")
    causes = [error.value]
    while causes[-1].__cause__ is not None:
        causes.append(causes[-1].__cause__)
    assert isinstance(causes[-1], DataError)  # under Kedro's wrappers: the hook shows it alone


def test_table_without_tokens_is_a_clear_error(tmp_path):
    (tmp_path / "images").mkdir()
    table = tokenized_table(tmp_path / "images").drop(columns="tokens")
    with pytest.raises(DataError, match=r"tokenized_captions: missing column\(s\) \['tokens'\]"):
        list(images_from_table(table, lambda tokens: [1, 2]))


def test_conf_base_parameters_on_generated_captions(tiny_captions, params, tmp_path):
    """conf/base's shard block (fewer shards, one writer process) on the tiny shapes data."""
    _, tokenized, vocabulary = tiny_captions
    shard = params("shard", num_shards={"train": 2, "val": 1, "test": 1}, workers=1)
    catalog = shard_catalog(str(tmp_path / "shards"))
    catalog["tokenized_captions"] = MemoryDataset(tokenized)
    catalog["vocabulary"] = MemoryDataset(vocabulary)
    catalog["params:shard"] = MemoryDataset(shard)

    SequentialRunner().run(create_pipeline(), catalog)

    shard_set = catalog.load("shards")
    images = tokenized.groupby("split")["image_id"].nunique().to_dict()
    assert {s: shard_set.num_images(s) for s in shard_set.splits} == images
    assert {s: shard_set.num_captions(s) for s in shard_set.splits} == tokenized.groupby(
        "split"
    ).size().to_dict()
    assert shard_set.image_size == shard["image_size"]
    assert {s: len(shard_set.files(s)) for s in shard_set.splits} == shard["num_shards"]

    ids = {token: i for i, token in enumerate(vocabulary["tokens"])}
    expected = {  # every image's captions, in annotation order, as <start> ids <end>
        image_id: [[1, *(ids.get(t, 3) for t in tokens), 2] for tokens in rows["tokens"]]
        for image_id, rows in tokenized.sort_values("annotation_id").groupby("image_id")
    }
    seen = {}
    for split in shard_set.splits:
        for serialized in tf.data.TFRecordDataset(shard_set.files(split)):
            record = parse_example(serialized)
            seen[int(record["image/id"])] = record["caption/ids"].to_list()
            pixels = tf.io.decode_jpeg(record["image/encoded"])
            assert tuple(pixels.shape) == (shard["image_size"],) * 2 + (3,)
    assert seen == expected


class ManifestSeen:
    """Records, at each node hook and before each save, whether the manifest is on disk."""

    def __init__(self, folder):
        self.manifest = folder / MANIFEST
        self.events: list[tuple[str, str, bool]] = []

    @hook_impl
    def before_node_run(self, node):
        self.events.append(("before", node.name, self.manifest.exists()))

    @hook_impl
    def after_node_run(self, node):
        self.events.append(("after", node.name, self.manifest.exists()))

    @hook_impl
    def before_dataset_saved(self, dataset_name):
        self.events.append(("save", dataset_name, self.manifest.exists()))


def test_the_node_writes_the_shards_inside_its_hooks(tmp_path):
    """Node hooks (timing, MLflow, errors) wrap the writing: the manifest appears between
    write_shards_node's before and after hooks, before `shards` is saved, not in the save."""
    (tmp_path / "images").mkdir()
    catalog = shard_catalog(str(tmp_path / "shards"))
    catalog["tokenized_captions"] = MemoryDataset(tokenized_table(tmp_path / "images"))
    catalog["vocabulary"] = MemoryDataset(VOCABULARY)
    catalog["params:shard"] = MemoryDataset(PARAMS)
    hooks = PluginManager(HOOK_NAMESPACE)
    hooks.add_hookspecs(NodeSpecs)
    hooks.add_hookspecs(DatasetSpecs)
    seen = ManifestSeen(tmp_path / "shards")
    hooks.register(seen)

    SequentialRunner().run(create_pipeline(), catalog, hook_manager=hooks)

    assert seen.events == [
        ("before", "shards.plan_shards_node", False),
        ("after", "shards.plan_shards_node", False),
        ("save", "shard_plan", False),
        ("before", "shards.write_shards_node", False),
        ("after", "shards.write_shards_node", True),
        ("save", "shards", True),
    ]


def test_shards_written_elsewhere_are_refused_by_name(tmp_path):
    """The two entries of one folder must agree: a set written into another folder is not
    saved as `shards`."""
    (tmp_path / "images").mkdir()
    catalog = shard_catalog(str(tmp_path / "shards"))
    catalog["shards_folder"] = ShardFolderDataset(path=str(tmp_path / "elsewhere"))
    catalog["tokenized_captions"] = MemoryDataset(tokenized_table(tmp_path / "images"))
    catalog["vocabulary"] = MemoryDataset(VOCABULARY)
    catalog["params:shard"] = MemoryDataset(PARAMS)
    with pytest.raises(DatasetError, match="not the one in this folder"):
        SequentialRunner().run(create_pipeline(), catalog)
