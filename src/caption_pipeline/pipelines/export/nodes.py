"""Nodes of the `export` pipeline; the work is done in `caption_pipeline.serving.export`,
`caption_pipeline.serving.export_check` and `caption_pipeline.tracking.mlflow_model`."""

from __future__ import annotations

import logging
from typing import Any

import pandas as pd

from caption_pipeline.data.shards.shard_set import ShardSet
from caption_pipeline.data.text import Vocabulary
from caption_pipeline.datasets.captioner_file import EvaluatedModel
from caption_pipeline.evaluation.scoring import EvaluateSettings
from caption_pipeline.serving.export import (
    ExportedCaptioner,
    ExportSettings,
    build_module,
    convert_tflite,
)
from caption_pipeline.serving.export_check import (
    HeldOutImages,
    InProcessCaptions,
    check_against_model,
    check_tflite,
    in_process_captions,
    read_held_out_images,
)

logger = logging.getLogger(__name__)


def read_test_images(shards: ShardSet, export: dict[str, Any]) -> HeldOutImages:
    """The test images that the checks and the MLflow example use, and the shards' JPEG
    quality: the one node that loads `shards`, since each load verifies every shard's sha256
    (COCO: 6 GB read), and the other nodes need only these."""
    return read_held_out_images(shards, ExportSettings.from_params(export).test_images_read)


def export_captioner(
    evaluated_model: EvaluatedModel,
    evaluation_metrics: dict[str, Any],
    vocabulary: dict[str, Any],
    test_images: HeldOutImages,
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
        test_images.jpeg_quality,
        settings.max_pixels,
    )


def caption_in_process(
    evaluated_model: EvaluatedModel,
    test_images: HeldOutImages,
    vocabulary: dict[str, Any],
    evaluate: dict[str, Any],
    export: dict[str, Any],
) -> InProcessCaptions:
    """The in-process model's captions of the self-check's images: its own node, so that the
    captioner is released before `check_export` loads the SavedModel (one NASNetLarge model
    in memory at a time)."""
    settings = ExportSettings.from_params(export)
    decoding = EvaluateSettings.from_params(evaluate).decoding
    return in_process_captions(
        evaluated_model.captioner,
        Vocabulary.from_dict(vocabulary),
        test_images,
        decoding,
        settings.check,
    )


def check_export(
    exported_model: ExportedCaptioner,
    in_process: InProcessCaptions,
    test_images: HeldOutImages,
    export: dict[str, Any],
) -> dict[str, Any]:
    """The saved export's captions on the test images equal the in-process model's, beam
    for beam; a DataError names the images that differ."""
    settings = ExportSettings.from_params(export)
    return check_against_model(exported_model, in_process, test_images, settings.check)


def export_tflite(
    exported_model: ExportedCaptioner,
    test_images: HeldOutImages,
    export_check: dict[str, Any],
    export: dict[str, Any],
) -> bytes:
    """The TFLite model (pixels in), checked against the SavedModel on a few test images;
    runs after the SavedModel's own check (`export_check`). With `export.tflite` off, no
    bytes: `exported_tflite` then removes the file of an earlier run (Kedro saves no None),
    so that no .tflite passes for this run's."""
    settings = ExportSettings.from_params(export)
    if not settings.tflite:
        logger.info("export.tflite is off: no TFLite model")
        return b""
    model = convert_tflite(exported_model.path)
    check_tflite(model, exported_model, test_images, settings.check.tflite_images)
    return model


def register_export(
    exported_model: ExportedCaptioner,
    test_images: HeldOutImages,
    export_check: dict[str, Any],
    evaluation_metrics: dict[str, Any],
    caption_table: pd.DataFrame,
    caption_scores: pd.DataFrame,
    export: dict[str, Any],
) -> dict[str, Any]:
    """Log the checked export as an MLflow pyfunc model and register a new version, tagged
    with the test scores of metrics.json (reported only); the champion gate pairs its
    per-image val CIDEr (`caption_scores`, evaluate's per-image table) with the champion's on
    the same val images and captions; the first test image is the MLflow model's input
    example."""
    from caption_pipeline.tracking.mlflow_model import MlflowSettings, ValScore, log_export

    example = test_images.jpegs[0]
    scores = {
        name: float(value)
        for name, value in evaluation_metrics.get("test", {}).items()
        if isinstance(value, int | float)
    }
    return log_export(
        exported_model.path,
        example,
        MlflowSettings.from_params(export),
        exported_model.default_beam_size,
        export_check,
        scores,
        ValScore.of_evaluation(evaluation_metrics, caption_table, caption_scores),
    )
