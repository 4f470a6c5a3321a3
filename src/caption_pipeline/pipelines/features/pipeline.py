"""`features` pipeline: the initial encoder (pretrained on object masks for the compact CNN),
then the model inputs, which the `model_inputs` dataset computes on save."""

from kedro.pipeline import Node, Pipeline

from caption_pipeline.pipelines.features.nodes import plan_features, prepare_encoder


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
                outputs="model_inputs",
                name="plan_features_node",
            ),
        ],
        tags=["features"],
        namespace="features",  # the kedro-viz group; dataset and parameter names stay global
        prefix_datasets_with_namespace=False,
    )
