"""`caption_batch` pipeline: images (any URI Spark reads) -> the registered captioner through
`mlflow.pyfunc.spark_udf` -> Parquet (`caption_batch.output`), and a JSON summary. Its node is
tagged `spark`, so the session hook starts Spark for it alone."""

from __future__ import annotations

from kedro.pipeline import Node, Pipeline

from caption_pipeline.pipelines.caption_batch.nodes import caption_images
from caption_pipeline.serving.spark_session import SPARK_TAG


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                caption_images,
                "params:caption_batch",
                "caption_batch_summary",
                name="caption_images",
                tags=[SPARK_TAG],
            )
        ],
        tags=["caption_batch"],
        namespace="caption_batch",  # the kedro-viz group; dataset and parameter names stay global
        prefix_datasets_with_namespace=False,
    )
