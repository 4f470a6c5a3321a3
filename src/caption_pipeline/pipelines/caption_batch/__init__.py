"""`caption_batch`: a folder or bucket of images captioned on Apache Spark by a registered
model, into Parquet. Not part of `kedro run`: `kedro run --pipelines=caption_batch`."""

from caption_pipeline.pipelines.caption_batch.pipeline import create_pipeline

__all__ = ["create_pipeline"]
