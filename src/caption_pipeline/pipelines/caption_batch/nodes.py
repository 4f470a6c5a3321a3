"""Nodes of the `caption_batch` pipeline; the work is done in
`caption_pipeline.serving.batch_captioning`, on the session that
`serving.spark_session.SparkSessionHooks` started."""

from __future__ import annotations

from typing import Any

from caption_pipeline.serving.batch_captioning import BatchSettings, caption_batch, log_to_mlflow


def caption_images(params: dict[str, Any]) -> dict[str, Any]:
    """Caption the images `params` names into its Parquet output; the summary (counts by
    kind, model version, throughput) is logged to the run and returned for the report."""
    from pyspark.sql import SparkSession

    spark = SparkSession.builder.getOrCreate()  # the hook's (or spark-submit's) session
    summary = caption_batch(spark, BatchSettings.from_params(params))
    log_to_mlflow(spark, summary)
    return summary
