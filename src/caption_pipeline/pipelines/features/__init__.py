"""`features` pipeline: image shards -> model inputs (precomputed features of a frozen encoder)."""

from caption_pipeline.pipelines.features.pipeline import create_pipeline

__all__ = ["create_pipeline"]
