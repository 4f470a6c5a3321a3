"""`synthetic` pipeline: params:dataset + params:synthetic -> raw_dataset."""

from __future__ import annotations

from kedro.pipeline import Node, Pipeline

from caption_pipeline.pipelines.synthetic.nodes import generate_dataset


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                func=generate_dataset,
                inputs=["params:dataset", "params:synthetic"],
                outputs="raw_dataset",
                name="generate_dataset",
            )
        ],
        tags=["synthetic"],
        namespace="synthetic",  # the kedro-viz group; dataset and parameter names stay global
        prefix_datasets_with_namespace=False,
    )
