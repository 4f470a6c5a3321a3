"""`vocab`: caption_table -> tokenized captions, vocabulary, stats and a length histogram."""

from caption_pipeline.pipelines.vocab.pipeline import create_pipeline

__all__ = ["create_pipeline"]
