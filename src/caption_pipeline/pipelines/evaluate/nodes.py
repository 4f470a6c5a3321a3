"""Nodes of the `evaluate` pipeline; the work is done in `caption_pipeline.evaluation.scoring` and
`caption_pipeline.evaluation.attention_maps`."""

from __future__ import annotations

from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from caption_pipeline.data.images import load_rgb_image
from caption_pipeline.data.shards.shard_set import ShardSet
from caption_pipeline.data.text import Vocabulary
from caption_pipeline.datasets.captioner_file import EvaluatedModel
from caption_pipeline.errors import DataError
from caption_pipeline.evaluation.attention_maps import attention_figure, attention_localization
from caption_pipeline.evaluation.coco_scorer import CocoScorer, require_java
from caption_pipeline.evaluation.scoring import (
    SCORED_SPLITS,
    EvaluateSettings,
    caption_split,
    coco_results,
    decoding_source,
    metrics_report,
    score_splits,
)
from caption_pipeline.model.decoding import CaptionedImage

Captions = dict[str, list[CaptionedImage]]  # split -> captions of its images


def generate_captions(
    evaluated_model: EvaluatedModel,
    shards: ShardSet,
    model_inputs: ShardSet,
    vocabulary: dict[str, Any],
    evaluate: dict[str, Any],
) -> tuple[Captions, dict[str, str]]:
    """Caption the val and test images (test with attention maps) with the model to evaluate
    (`captioner@evaluated`), from the stored features of `model_inputs` when they are its
    frozen encoder's, else from the images (`decoding_source`); also say which model that
    was: its file(s) and weights digest."""
    require_java()  # the scorers need it: fail now, not after the decoding
    settings = EvaluateSettings.from_params(evaluate)
    vocab = Vocabulary.from_dict(vocabulary)
    evaluated_model.check_vocabulary(vocab)
    model = evaluated_model.captioner
    source = decoding_source(model, shards, model_inputs)
    captions = {
        split: caption_split(model, vocab, source, split, settings, keep_attention=split == "test")
        for split in SCORED_SPLITS
    }
    return captions, {
        "model": evaluated_model.source,
        "model_weights": evaluated_model.weights_digest,
    }


def write_results(evaluation_captions: Captions) -> tuple[list[dict], ...]:
    """The val and test captions in the COCO results format."""
    return tuple(coco_results(evaluation_captions[split]) for split in SCORED_SPLITS)


def score_captions(
    caption_results_val: list[dict], caption_results_test: list[dict], caption_table: pd.DataFrame
) -> tuple[dict[str, Any], pd.DataFrame]:
    """pycocoevalcap scores of both splits, the blind baseline and human agreement, and the
    per-image scores."""
    java = require_java()
    with CocoScorer(java) as scorer:
        return score_splits(
            {"val": caption_results_val, "test": caption_results_test}, caption_table, scorer
        )


def localize_attention(
    evaluation_captions: Captions, raw_dataset: dict[str, Any]
) -> dict[str, Any]:
    """Attention localization of object words on the test split (where the dataset has a COCO
    instances file for it)."""
    return attention_localization(evaluation_captions["test"], raw_dataset, "test")


def plot_attention(
    evaluation_captions: Captions, caption_table: pd.DataFrame, evaluate: dict[str, Any]
) -> dict[str, Figure]:
    """Word-by-word attention figures of the first `attention_samples` test images."""
    count = EvaluateSettings.from_params(evaluate).attention_samples
    samples = sorted(evaluation_captions["test"], key=lambda d: d.image_id)[:count]
    files = dict(zip(caption_table["image_id"], caption_table["file_path"], strict=True))
    missing = [d.image_id for d in samples if d.image_id not in files]
    if missing:
        raise DataError(f"caption_table: no file_path for test image {missing[0]}")
    return {
        str(d.image_id): attention_figure(load_rgb_image(files[d.image_id]), d) for d in samples
    }


def summarize_metrics(
    coco_scores: dict[str, Any],
    attention_scores: dict[str, Any],
    evaluated_model_source: dict[str, str],
    vocabulary: dict[str, Any],
    evaluate: dict[str, Any],
) -> dict[str, Any]:
    """metrics.json."""
    return metrics_report(
        coco_scores,
        attention_scores,
        evaluated_model_source,
        EvaluateSettings.from_params(evaluate),
        Vocabulary.from_dict(vocabulary),
    )
