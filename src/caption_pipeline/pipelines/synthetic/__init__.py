"""`synthetic` pipeline: generate the embedded shapes dataset when it is the configured one."""

from caption_pipeline.pipelines.synthetic.pipeline import create_pipeline

__all__ = ["create_pipeline"]
