"""`export`: the trained captioner as one SavedModel from image bytes to captions, checked
against the in-process model, converted to TFLite (if `export.tflite`), and registered in
MLflow."""

from caption_pipeline.pipelines.export.pipeline import create_pipeline

__all__ = ["create_pipeline"]
