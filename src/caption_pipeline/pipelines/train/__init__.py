"""Training of the captioner on the model inputs (feature or image shards)."""

from caption_pipeline.pipelines.train.pipeline import create_pipeline

__all__ = ["create_pipeline"]
