"""`shard` pipeline: plan the shards, then write them into the `shards` folder."""

from kedro.pipeline import Node, Pipeline

from caption_pipeline.pipelines.shard.nodes import plan_shards, write_shards


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                func=plan_shards,
                inputs=["tokenized_captions", "vocabulary", "params:shard"],
                outputs="shard_plan",
                name="plan_shards_node",
            ),
            Node(
                func=write_shards,
                inputs=["shard_plan", "shards_folder"],
                outputs="shards",
                name="write_shards_node",
            ),
        ],
        tags=["shard"],
        namespace="shards",  # the kedro-viz group; dataset and parameter names stay global
        prefix_datasets_with_namespace=False,
    )
