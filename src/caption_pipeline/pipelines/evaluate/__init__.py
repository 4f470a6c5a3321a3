"""`evaluate`: caption the val and test splits, score them with pycocoevalcap beside a blind
baseline and human agreement, and show where the model looks."""

from caption_pipeline.pipelines.evaluate.pipeline import create_pipeline

__all__ = ["create_pipeline"]
