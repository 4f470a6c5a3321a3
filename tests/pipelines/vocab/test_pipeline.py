"""The `vocab` pipeline: its nodes on a small caption table, and a Kedro run with real datasets."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner
from kedro_datasets.matplotlib import MatplotlibDataset
from PIL import Image

from caption_pipeline.datasets import AtomicJSONDataset, AtomicParquetDataset
from caption_pipeline.errors import DataError
from caption_pipeline.pipelines.vocab import create_pipeline
from caption_pipeline.pipelines.vocab.nodes import (
    build_vocabulary,
    limit_caption_lengths,
    plot_caption_lengths,
    summarize_vocabulary,
    tokenize_captions,
)

PARAMS = {"min_count": 2, "max_caption_length": 6, "long_captions": "truncate"}
CAPTIONS = [  # (split, annotation_id, caption)
    ("train", 11, "A dog on a sofa."),
    ("train", 12, "A cat on a mat."),
    ("train", 13, "The dog and the cat."),
    ("train", 14, "A dog runs!"),
    ("train", 15, "..."),  # no words: dropped
    ("train", 16, "A dog, a cat, a zebra and a very old yak sleeping."),  # 12 tokens: cut to 6
    ("val", 21, "A dog on the mat."),
    ("val", 22, "A lion's den."),
    ("test", 31, "Two cats."),
    ("test", 32, "--"),
]


def caption_table(rows=CAPTIONS) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "image_id": [aid // 2 for _, aid, _ in rows],
            "split": [split for split, _, _ in rows],
            "file_path": [f"data/01_raw/x/{split}/{aid // 2:012d}.jpg" for split, aid, _ in rows],
            "annotation_id": [aid for _, aid, _ in rows],
            "caption": [caption for _, _, caption in rows],
            "width": 64,
            "height": 48,
        }
    )


SUMMARY_KEYS = ["captions", "mean", "min", "p50", "p90", "p95", "p99", "max"]

# Worked out by hand from CAPTIONS and PARAMS. Kept train tokens: a 8, dog 4, cat 3, on 2,
# the 2, and once each sofa mat and runs zebra: 24 tokens, 19 known.
EXPECTED_STATS = {
    "vocabulary_size": 9,
    "words": 5,
    "settings": PARAMS,
    "train_word_types": 10,
    "train_words_below_min_count": 5,
    "coverage": {
        "train": {"tokens": 24, "word_types": 10, "coverage": 0.791667, "oov_rate": 0.208333},
        "val": {"tokens": 9, "word_types": 8, "coverage": 0.555556, "oov_rate": 0.444444},
        "test": {"tokens": 2, "word_types": 2, "coverage": 0.0, "oov_rate": 1.0},
    },
    "captions": {
        "train": {"captions": 6, "empty_dropped": 1, "truncated": 1, "long_dropped": 0, "kept": 5},
        "val": {"captions": 2, "empty_dropped": 0, "truncated": 0, "long_dropped": 0, "kept": 2},
        "test": {"captions": 2, "empty_dropped": 1, "truncated": 0, "long_dropped": 0, "kept": 1},
    },
    "caption_length": {
        "train": dict(zip(SUMMARY_KEYS, [5, 6.0, 3, 5, 12, 12, 12, 12], strict=False)),
        "val": dict(zip(SUMMARY_KEYS, [2, 4.5, 4, 4, 5, 5, 5, 5], strict=False)),
        "test": dict(zip(SUMMARY_KEYS, [1, 2.0, 2, 2, 2, 2, 2, 2], strict=False)),
    },
    "empty_caption_examples": [
        {"split": "train", "annotation_id": 15, "caption": "..."},
        {"split": "test", "annotation_id": 32, "caption": "--"},
    ],
}


def run_nodes(params=PARAMS, table=None):
    caption_tokens = tokenize_captions(caption_table() if table is None else table)
    tokenized = limit_caption_lengths(caption_tokens, params)
    vocabulary = build_vocabulary(tokenized, params)
    stats = summarize_vocabulary(caption_tokens, tokenized, vocabulary, params)
    return caption_tokens, tokenized, vocabulary, stats


def test_nodes_end_to_end_on_a_known_table():
    _, tokenized, vocabulary, stats = run_nodes()

    assert list(tokenized.columns) == ["image_id", "split", "file_path", "annotation_id", "tokens"]
    by_id = dict(zip(tokenized["annotation_id"], tokenized["tokens"], strict=False))
    assert sorted(by_id) == [11, 12, 13, 14, 16, 21, 22, 31]  # the empty ones are gone
    assert by_id[16] == ["a", "dog", "a", "cat", "a", "zebra"]
    assert by_id[22] == ["a", "lion", "'s", "den"]

    assert vocabulary["tokens"][4:] == ["a", "dog", "cat", "on", "the"]
    assert vocabulary["tokens"][:4] == ["<pad>", "<start>", "<end>", "<unk>"]
    assert vocabulary["counts"] == {"a": 8, "dog": 4, "cat": 3, "on": 2, "the": 2}
    assert (vocabulary["min_count"], vocabulary["max_caption_length"]) == (2, 6)

    assert json.loads(json.dumps(stats)) == stats == EXPECTED_STATS


def test_drop_policy_removes_long_captions_everywhere_it_counts():
    params = {**PARAMS, "long_captions": "drop"}
    _, tokenized, vocabulary, stats = run_nodes(params)
    assert 16 not in set(tokenized["annotation_id"])
    assert vocabulary["counts"] == {"a": 5, "dog": 3, "cat": 2, "on": 2, "the": 2}
    assert stats["captions"]["train"] == {
        "captions": 6, "empty_dropped": 1, "truncated": 0, "long_dropped": 1, "kept": 4,
    }  # fmt: skip
    assert stats["caption_length"] == EXPECTED_STATS["caption_length"]  # measured before the cut


def test_histogram_shows_each_split_and_the_length_cut(tmp_path):
    caption_tokens, *_ = run_nodes()
    fig = plot_caption_lengths(caption_tokens, PARAMS)
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "train: 5 captions, 20.0% longer than 6",
        "val: 2 captions, 0.0% longer than 6",
        "test: 1 captions, 0.0% longer than 6",
        "max_caption_length = 6",
    ]
    (cut,) = ax.get_lines()
    assert list(cut.get_xdata()) == [6.5, 6.5]
    assert len(ax.patches) == 3  # one step outline per split
    fig.savefig(tmp_path / "h.png", dpi=50)
    assert Image.open(tmp_path / "h.png").size == (450, 240)


def test_kedro_run_with_parquet_and_json_datasets_gives_the_same_outputs(tmp_path):
    catalog = DataCatalog(
        {
            "caption_table": MemoryDataset(caption_table()),
            "params:vocab": MemoryDataset(PARAMS),
            "tokenized_captions": AtomicParquetDataset(filepath=str(tmp_path / "tokens.parquet")),
            "vocabulary": AtomicJSONDataset(filepath=str(tmp_path / "vocabulary.json")),
            "vocabulary_stats": AtomicJSONDataset(filepath=str(tmp_path / "stats.json")),
            "caption_length_histogram": MatplotlibDataset(filepath=str(tmp_path / "lengths.png")),
        }
    )
    SequentialRunner().run(create_pipeline(), catalog)

    _, tokenized, vocabulary, _ = run_nodes()
    saved = pd.read_parquet(tmp_path / "tokens.parquet")
    assert [list(t) for t in saved["tokens"]] == list(tokenized["tokens"])
    assert json.loads((tmp_path / "vocabulary.json").read_text()) == vocabulary
    assert json.loads((tmp_path / "stats.json").read_text()) == EXPECTED_STATS
    assert Image.open(tmp_path / "lengths.png").format == "PNG"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: t.drop(columns="caption"), r"caption_table: missing column\(s\) \['caption'\]"),
        (lambda t: t.assign(split=t["split"].replace("val", "dev")), r"value\(s\) \['dev'\]"),
        (
            lambda t: t.assign(caption=[None, *t["caption"][1:]]),
            "column 'caption' is not text for 1 row.*annotation_id 11",
        ),
    ],
)
def test_bad_caption_table_is_a_clear_error(change, message):
    with pytest.raises(DataError, match=message):
        tokenize_captions(change(caption_table()))


def test_no_train_captions_is_a_clear_error():
    with pytest.raises(DataError, match="no train captions"):
        run_nodes(table=caption_table([row for row in CAPTIONS if row[0] != "train"]))


def test_bad_params_are_a_clear_error():
    with pytest.raises(DataError, match=r"params:vocab\.long_captions"):
        run_nodes({**PARAMS, "long_captions": "shorten"})


class KeptDataset(MemoryDataset):
    """A MemoryDataset that the runner does not release once later nodes have read it."""

    def _release(self) -> None:
        pass


def test_conf_base_parameters_on_generated_captions(tiny_captions, params):
    """conf/base's vocab block on the tiny shapes data's captions, in memory end to end."""
    from collections import Counter

    from matplotlib.figure import Figure

    table, _, _ = tiny_captions
    vocab = params("vocab")
    outputs = ("tokenized_captions", "vocabulary", "vocabulary_stats", "caption_length_histogram")
    catalog = DataCatalog(
        {
            "caption_table": MemoryDataset(table),
            "params:vocab": MemoryDataset(vocab),
            **{name: KeptDataset(copy_mode="assign") for name in outputs},
        }
    )
    SequentialRunner().run(create_pipeline(), catalog)
    tokenized, vocabulary = catalog.load("tokenized_captions"), catalog.load("vocabulary")
    stats = catalog.load("vocabulary_stats")

    assert sorted(tokenized["annotation_id"]) == sorted(table["annotation_id"])
    assert all(0 < len(tokens) <= vocab["max_caption_length"] for tokens in tokenized["tokens"])
    assert all(
        token == token.lower() and token.isalpha()
        for tokens in tokenized["tokens"]
        for token in tokens
    )
    train = Counter(
        t for tokens in tokenized[tokenized["split"] == "train"]["tokens"] for t in tokens
    )
    kept = {word: n for word, n in train.items() if n >= vocab["min_count"]}
    assert kept and vocabulary["counts"] == kept
    assert vocabulary["tokens"] == [
        "<pad>",
        "<start>",
        "<end>",
        "<unk>",
        *sorted(kept, key=lambda w: (-kept[w], w)),
    ]
    assert stats["vocabulary_size"] == len(vocabulary["tokens"]) and stats["words"] == len(kept)
    assert stats["captions"]["train"]["kept"] == (table["split"] == "train").sum()
    assert 0 < stats["coverage"]["train"]["coverage"] <= 1
    assert isinstance(catalog.load("caption_length_histogram"), Figure)
