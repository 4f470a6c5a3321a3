"""Nodes of the `vocab` pipeline; the work is done in `caption_pipeline.data.text`."""

from __future__ import annotations

from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from caption_pipeline.data.ingestion import SPLITS
from caption_pipeline.data.text import (
    VocabSettings,
    Vocabulary,
    caption_length_figure,
    tokenize_all,
    vocabulary_stats,
)
from caption_pipeline.errors import DataError

KEY_COLUMNS = ["image_id", "split", "file_path", "annotation_id"]
MAX_EXAMPLES = 5  # empty captions quoted in the stats


def tokenize_captions(caption_table: pd.DataFrame) -> pd.DataFrame:
    """Every caption's tokens before the length limit (an empty list when it has no words)."""
    _check_caption_table(caption_table)
    tokens = tokenize_all(caption_table["caption"], total=len(caption_table))
    return caption_table.loc[:, [*KEY_COLUMNS, "caption"]].assign(tokens=tokens)


def limit_caption_lengths(caption_tokens: pd.DataFrame, params: dict[str, Any]) -> pd.DataFrame:
    """Captions with words, within max_caption_length (longer ones cut or dropped)."""
    settings = VocabSettings.from_params(params)
    tokens = caption_tokens["tokens"].map(settings.limit)
    keep = caption_tokens["tokens"].map(len).gt(0) & tokens.notna()
    return caption_tokens.loc[keep, KEY_COLUMNS].assign(tokens=tokens[keep]).reset_index(drop=True)


def build_vocabulary(tokenized_captions: pd.DataFrame, params: dict[str, Any]) -> dict[str, Any]:
    """The vocabulary of the train split's words seen at least min_count times."""
    settings = VocabSettings.from_params(params)
    train = tokenized_captions.loc[tokenized_captions["split"] == "train", "tokens"]
    if train.empty:
        raise DataError("tokenized_captions: no train captions to build the vocabulary from")
    return Vocabulary.build(train, settings.min_count, settings.max_caption_length).to_dict()


def summarize_vocabulary(
    caption_tokens: pd.DataFrame,
    tokenized_captions: pd.DataFrame,
    vocabulary: dict[str, Any],
    params: dict[str, Any],
) -> dict[str, Any]:
    """Vocabulary size, token coverage per split, captions cut or dropped, caption lengths."""
    lengths = _by_split(caption_tokens["tokens"].map(len), caption_tokens["split"])
    kept = _by_split(tokenized_captions["tokens"], tokenized_captions["split"])
    empty = caption_tokens.loc[caption_tokens["tokens"].map(len).eq(0)].head(MAX_EXAMPLES)
    return vocabulary_stats(
        Vocabulary.from_dict(vocabulary),
        VocabSettings.from_params(params),
        lengths,
        kept,
        empty[["split", "annotation_id", "caption"]].to_dict("records"),
    )


def plot_caption_lengths(caption_tokens: pd.DataFrame, params: dict[str, Any]) -> Figure:
    """Histogram of caption lengths (tokens) per split, with max_caption_length marked."""
    lengths = _by_split(caption_tokens["tokens"].map(len), caption_tokens["split"])
    return caption_length_figure(
        {split: [n for n in values if n] for split, values in lengths.items()},
        VocabSettings.from_params(params).max_caption_length,
    )


def _check_caption_table(table: pd.DataFrame, name: str = "caption_table") -> None:
    missing = [c for c in [*KEY_COLUMNS, "caption"] if c not in table.columns]
    if missing:
        raise DataError(f"{name}: missing column(s) {missing}")
    unknown = sorted(set(table["split"]) - set(SPLITS))
    if unknown:
        raise DataError(
            f"{name}: column 'split' has unknown value(s) {unknown}; expected {list(SPLITS)}"
        )
    not_text = table.loc[~table["caption"].map(lambda c: isinstance(c, str)), "annotation_id"]
    if len(not_text):
        raise DataError(
            f"{name}: column 'caption' is not text for {len(not_text)} row(s), "
            f"e.g. annotation_id {not_text.iloc[0]}"
        )


def _by_split(values: pd.Series, splits: pd.Series) -> dict[str, list]:
    """`values` grouped by split, in train, val, test order."""
    groups = {split: list(group) for split, group in values.groupby(splits, sort=False)}
    return {split: groups[split] for split in SPLITS if split in groups}
