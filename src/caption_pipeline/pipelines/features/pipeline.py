"""`features` pipeline: plan the model inputs; the `model_inputs` dataset computes them on save."""

from kedro.pipeline import Node, Pipeline

from caption_pipeline.pipelines.features.nodes import plan_features


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                func=plan_features,
                inputs=["shards", "params:model", "params:features"],
                outputs="model_inputs",
                name="plan_features_node",
            )
        ]
    )
