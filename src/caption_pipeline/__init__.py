"""caption-pipeline: Show, Attend and Tell image captioning as an MLOps project."""

__version__ = "0.1.0"
