"""`export` pipeline: captioner + vocabulary -> SavedModel (image bytes in, captions out),
self-check against the in-process model's captions (a node of their own, before the export is
loaded: one model in memory at a time), TFLite model (if `export.tflite`), MLflow registered
model. One node loads the shards (each load verifies every shard's sha256); the others take the
test images and JPEG quality it read (`export_test_images`)."""

from __future__ import annotations

from kedro.pipeline import Node, Pipeline

from caption_pipeline.pipelines.export.nodes import (
    caption_in_process,
    check_export,
    export_captioner,
    export_tflite,
    read_test_images,
    register_export,
)


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                read_test_images,
                ["shards", "params:export"],
                "export_test_images",
                name="read_test_images",
            ),
            Node(
                export_captioner,
                [
                    "captioner@evaluated",  # the model evaluate scored, whose scores it carries
                    "evaluation_metrics",  # ... and that names its weights: checked first
                    "vocabulary",
                    "export_test_images",  # the shards' JPEG quality
                    "params:evaluate",
                    "params:export",
                ],
                "exported_model",
                name="export_saved_model",
            ),
            # What the check compares with, before the export is loaded. Kedro runs the nodes
            # that are ready in name order: this one before export_saved_model, on a heap that
            # holds no traced graphs yet (measured at COCO size: the stage peaks at 4.93 GB
            # this way, 5.32 GB the other way round).
            Node(
                caption_in_process,
                [
                    "captioner@evaluated",
                    "export_test_images",
                    "vocabulary",
                    "params:evaluate",
                    "params:export",
                ],
                "export_in_process_captions",
                name="caption_in_process",
            ),
            Node(  # loads the export back from disk: the check is of what was written
                check_export,
                [
                    "exported_model",
                    "export_in_process_captions",
                    "export_test_images",
                    "params:export",
                ],
                "export_check",
                name="check_export",
            ),
            Node(
                export_tflite,
                ["exported_model", "export_test_images", "export_check", "params:export"],
                "exported_tflite",
                name="export_tflite",
            ),
            Node(  # only a checked export is registered, with its test scores, and made
                register_export,  # the champion on its val score (so export follows evaluate)
                [
                    "exported_model",
                    "export_test_images",  # the MLflow model's input example
                    "export_check",
                    "evaluation_metrics",
                    "caption_table",
                    "caption_scores",  # per-image val CIDEr, paired with the champion's
                    "params:export",
                ],
                "export_registration",
                name="register_export",
            ),
        ],
        tags=["export"],
        namespace="export",  # the kedro-viz group; dataset and parameter names stay global
        prefix_datasets_with_namespace=False,
    )
