"""`export` pipeline: captioner + vocabulary -> SavedModel (image bytes in, captions out),
self-check against the in-process model, TFLite model, MLflow registered model."""

from __future__ import annotations

from kedro.pipeline import Node, Pipeline

from caption_pipeline.pipelines.export.nodes import (
    check_export,
    export_captioner,
    export_tflite,
    register_export,
)


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                export_captioner,
                [
                    "captioner@evaluated",  # the model evaluate scored, whose scores it carries
                    "evaluation_metrics",  # ... and that names its weights: checked first
                    "vocabulary",
                    "shards",
                    "params:evaluate",
                    "params:export",
                ],
                "exported_model",
                name="export_saved_model",
            ),
            Node(  # loads the export back from disk: the check is of what was written
                check_export,
                [
                    "exported_model",
                    "captioner@evaluated",
                    "shards",
                    "vocabulary",
                    "params:evaluate",
                    "params:export",
                ],
                "export_check",
                name="check_export",
            ),
            Node(
                export_tflite,
                ["exported_model", "shards", "export_check", "params:export"],
                "exported_tflite",
                name="export_tflite",
            ),
            Node(  # only a checked export is registered, with its test scores, and made
                register_export,  # the champion on its val score (so export follows evaluate)
                [
                    "exported_model",
                    "shards",
                    "export_check",
                    "evaluation_metrics",
                    "caption_table",
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
