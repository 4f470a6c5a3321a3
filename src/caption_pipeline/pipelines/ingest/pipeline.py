"""`ingest` pipeline: raw_dataset (checked against params:dataset) + params:ingest ->
caption_table, ingestion_report."""

from __future__ import annotations

from kedro.pipeline import Node, Pipeline

from caption_pipeline.pipelines.ingest.nodes import ingest_captions


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                func=ingest_captions,
                inputs=["raw_dataset", "params:dataset", "params:ingest"],
                outputs=["caption_table", "ingestion_report"],
                name="ingest_captions",
            )
        ],
        tags=["ingest"],
        namespace="ingestion",  # the kedro-viz group; dataset and parameter names stay global
        prefix_datasets_with_namespace=False,
    )
