"""`shard` pipeline: plan the shards; the `shards` dataset writes them when the plan is saved."""

from kedro.pipeline import Node, Pipeline

from caption_pipeline.pipelines.shard.nodes import plan_shards


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                func=plan_shards,
                inputs=["tokenized_captions", "vocabulary", "params:shard"],
                outputs="shards",
                name="plan_shards_node",
            )
        ],
        tags=["shard"],
        namespace="shards",  # the kedro-viz group; dataset and parameter names stay global
        prefix_datasets_with_namespace=False,
    )
