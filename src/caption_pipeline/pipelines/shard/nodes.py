"""Nodes of the `shard` pipeline. Writing is done by the `shards` dataset, from the plan."""

from __future__ import annotations

from typing import Any

import pandas as pd

from caption_pipeline.shards.plan import ShardPlan, build_shard_plan, images_from_table
from caption_pipeline.text import Vocabulary


def plan_shards(
    tokenized_captions: pd.DataFrame, vocabulary: dict, params: dict[str, Any]
) -> ShardPlan:
    """Assign every image, with its captions as token ids, to a shard of its split (no pixels)."""
    vocab = Vocabulary.from_dict(vocabulary)
    return build_shard_plan(
        images_from_table(tokenized_captions, vocab.encode),
        num_shards=params["num_shards"],
        seed=params["seed"],
        image_size=params["image_size"],
        jpeg_quality=params["jpeg_quality"],
        workers=params.get("workers"),
        max_bad_fraction=params["max_bad_fraction"],
    )
