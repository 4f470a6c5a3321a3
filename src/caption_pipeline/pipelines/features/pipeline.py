"""`features` pipeline: the initial encoder (pretrained on object masks for the compact CNN),
the plan of the model inputs, then the model inputs written into their folder."""

from kedro.pipeline import Node, Pipeline

from caption_pipeline.pipelines.features.nodes import (
    plan_features,
    prepare_encoder,
    write_model_inputs,
)


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                func=prepare_encoder,
                inputs=[
                    "shards",
                    "raw_dataset",
                    "params:model",
                    "params:features",
                    "params:encoder_pretraining",
                ],
                outputs=["initial_encoder", "encoder_pretraining_history"],
                name="prepare_encoder",
            ),
            Node(
                func=plan_features,
                inputs=["shards", "initial_encoder", "params:model", "params:features"],
                outputs="feature_plan",
                name="plan_features_node",
            ),
            Node(
                func=write_model_inputs,
                inputs=["feature_plan", "model_inputs_folder"],
                outputs="model_inputs",
                name="write_model_inputs_node",
            ),
        ],
        tags=["features"],
        namespace="features",  # the kedro-viz group; dataset and parameter names stay global
        prefix_datasets_with_namespace=False,
    )
