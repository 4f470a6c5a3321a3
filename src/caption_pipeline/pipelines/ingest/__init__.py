"""`ingest`: raw COCO-format captions and images -> the caption table and its report."""

from caption_pipeline.pipelines.ingest.pipeline import create_pipeline

__all__ = ["create_pipeline"]
