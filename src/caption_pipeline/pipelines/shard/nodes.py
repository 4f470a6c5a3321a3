"""Nodes of the `shard` pipeline: plan the shards, then write them."""

from __future__ import annotations

from typing import Any

import pandas as pd

from caption_pipeline.data.shards.image_writer import write_shards as write_into
from caption_pipeline.data.shards.plan import ShardPlan, build_shard_plan, images_from_table
from caption_pipeline.data.shards.shard_set import ShardFolder, ShardSet, load_shard_set
from caption_pipeline.data.text import Vocabulary


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


def write_shards(shard_plan: ShardPlan, shards_folder: ShardFolder) -> ShardSet:
    """Load, resize and JPEG-encode every image into its shard, on a pool of processes:
    atomic per shard, resumed after a kill, a no-op when nothing changed. The set written."""
    write_into(shard_plan, shards_folder.path, progress=shards_folder.progress)
    return load_shard_set(shards_folder.path, verify=False, kind="images")
