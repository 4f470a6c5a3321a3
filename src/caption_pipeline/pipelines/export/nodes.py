"""Nodes of the `export` pipeline; the work is done in `caption_pipeline.export` and
`caption_pipeline.mlflow_model`."""

from __future__ import annotations

from typing import Any

import pandas as pd

from caption_pipeline.captioner_files import EvaluatedModel
from caption_pipeline.evaluation import EvaluateSettings
from caption_pipeline.export import (
    ExportedCaptioner,
    ExportSettings,
    build_module,
    convert_tflite,
)
from caption_pipeline.export_check import check_against_model, check_tflite, held_out_images
from caption_pipeline.shards.shard_set import ShardSet
from caption_pipeline.text import Vocabulary


def export_captioner(
    evaluated_model: EvaluatedModel,
    evaluation_metrics: dict[str, Any],
    vocabulary: dict[str, Any],
    shards: ShardSet,
    evaluate: dict[str, Any],
    export: dict[str, Any],
):
    """The captioner that `evaluate` scored (`captioner@evaluated`: the registered version
    carries its scores, so metrics.json must name its weights), its vocabulary, the
    evaluation's search settings and the image shards' JPEG quality (the graph repeats their
    round trip) as one module (saved by the `exported_model` dataset)."""
    evaluated_model.require_scored(evaluation_metrics)
    settings = ExportSettings.from_params(export)
    decoding = EvaluateSettings.from_params(evaluate).decoding
    return build_module(
        evaluated_model.captioner,
        Vocabulary.from_dict(vocabulary),
        decoding,
        settings.max_beam_size,
        int(shards.manifest["params"]["jpeg_quality"]),
        settings.max_pixels,
    )


def check_export(
    exported_model: ExportedCaptioner,
    evaluated_model: EvaluatedModel,
    shards: ShardSet,
    vocabulary: dict[str, Any],
    evaluate: dict[str, Any],
    export: dict[str, Any],
) -> dict[str, Any]:
    """The saved export's captions on the test images equal the in-process model's, beam
    for beam; a DataError names the images that differ."""
    settings = ExportSettings.from_params(export)
    decoding = EvaluateSettings.from_params(evaluate).decoding
    return check_against_model(
        exported_model,
        evaluated_model.captioner,
        Vocabulary.from_dict(vocabulary),
        shards,
        decoding,
        settings.check,
    )


def export_tflite(
    exported_model: ExportedCaptioner,
    shards: ShardSet,
    export_check: dict[str, Any],
    export: dict[str, Any],
) -> bytes:
    """The TFLite model (pixels in), checked against the SavedModel on a few test images;
    runs after the SavedModel's own check (`export_check`)."""
    model = convert_tflite(exported_model.path)
    check_tflite(
        model, exported_model, shards, ExportSettings.from_params(export).check.tflite_images
    )
    return model


def register_export(
    exported_model: ExportedCaptioner,
    shards: ShardSet,
    export_check: dict[str, Any],
    evaluation_metrics: dict[str, Any],
    caption_table: pd.DataFrame,
    export: dict[str, Any],
) -> dict[str, Any]:
    """Log the checked export as an MLflow pyfunc model and register a new version, tagged
    with the test scores of metrics.json (reported only); the champion gate compares its
    val CIDEr, on the same val captions, with the champion's."""
    from caption_pipeline.mlflow_model import GATE_METRIC, MlflowSettings, ValScore, log_export
    from caption_pipeline.tracking import caption_digest

    _, (example, *_) = held_out_images(shards, 1)
    scores = {
        name: float(value)
        for name, value in evaluation_metrics.get("test", {}).items()
        if isinstance(value, int | float)
    }
    val = ValScore(
        float(evaluation_metrics["val"][GATE_METRIC]),
        caption_digest(caption_table[caption_table["split"] == "val"]),
    )
    return log_export(
        exported_model.path,
        example,
        MlflowSettings.from_params(export),
        exported_model.default_beam_size,
        export_check,
        scores,
        val,
    )
