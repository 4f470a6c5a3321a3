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
        ]
    )
