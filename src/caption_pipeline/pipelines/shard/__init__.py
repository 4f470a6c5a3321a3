"""`shard` pipeline: tokenized captions and their images -> TFRecord shards for training."""

from caption_pipeline.pipelines.shard.pipeline import create_pipeline

__all__ = ["create_pipeline"]
