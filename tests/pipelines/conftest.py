"""Fixtures of the pipeline tests: conf/base's parameters, overridden to tiny sizes per test.

Each `tests/pipelines/<name>/test_pipeline.py` runs that stage's `create_pipeline()` with a
`SequentialRunner` on an in-memory `DataCatalog` (files only where the stage's output is a
folder or its input is one), as Kedro's spaceflights starter does.
"""

from __future__ import annotations

import copy

import pytest
from kedro.config import OmegaConfigLoader

from caption_pipeline.pipelines.synthetic.nodes import generate_dataset
from caption_pipeline.settings import CONFIG_LOADER_ARGS

# The smallest shapes dataset the generator takes (64 px is its minimum image size).
TINY_SPLITS = {"train": 6, "val": 2, "test": 2}
TINY_IMAGE_SIZE = 64
# conf/base's model at the smallest sizes: a 2-block compact CNN (16x16 regions) and a tiny LSTM.
TINY_MODEL = {
    "image_size": TINY_IMAGE_SIZE,
    "compact_filters": [8, 16],
    "compact_pool_last": True,
    "embed_dim": 8,
    "attention_dim": 8,
    "lstm_units": 16,
}


def merged(base: dict, overrides: dict) -> dict:
    """`base` with `overrides` applied key by key, nested dicts merged (as `--params` does)."""
    result = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = merged(result[key], value)
        else:
            result[key] = copy.deepcopy(value)
    return result


@pytest.fixture(scope="session")
def base_parameters(project_root) -> dict:
    """Every parameter block of conf/base (globals resolved), as `kedro run` loads them (in a
    pristine copy of the project: never the checkout's own conf/local)."""
    return dict(OmegaConfigLoader(str(project_root / "conf"), **CONFIG_LOADER_ARGS)["parameters"])


@pytest.fixture
def params(base_parameters):
    """`params("shard", workers=1)`: a copy of conf/base's `shard` block with those overrides."""

    def block(name: str, /, **overrides) -> dict:
        return merged(base_parameters[name], overrides)

    return block


@pytest.fixture(scope="session")
def tiny_shapes(tmp_path_factory, base_parameters):
    """A generated shapes dataset of 6/2/2 images of 64 px: (`params:dataset`, `raw_dataset`)."""
    dataset = merged(
        base_parameters["dataset"], {"root": str(tmp_path_factory.mktemp("shapes") / "shapes")}
    )
    synthetic = merged(
        base_parameters["synthetic"], {"image_size": TINY_IMAGE_SIZE, "splits": TINY_SPLITS}
    )
    return dataset, generate_dataset(dataset, synthetic)


@pytest.fixture(scope="session")
def tiny_captions(tiny_shapes, base_parameters):
    """`tiny_shapes` through the ingest and vocab nodes with conf/base's parameters:
    (caption_table, tokenized_captions, vocabulary)."""
    from caption_pipeline.pipelines.ingest.nodes import ingest_captions
    from caption_pipeline.pipelines.vocab.nodes import (
        build_vocabulary,
        limit_caption_lengths,
        tokenize_captions,
    )

    dataset, raw = tiny_shapes
    table, _ = ingest_captions(raw, dataset, merged(base_parameters["ingest"], {"workers": 1}))
    tokenized = limit_caption_lengths(tokenize_captions(table), base_parameters["vocab"])
    return table, tokenized, build_vocabulary(tokenized, base_parameters["vocab"])


@pytest.fixture(scope="session")
def tiny_shards(tiny_captions, base_parameters, tmp_path_factory):
    """`tiny_captions` written as shards (2/1/1, images of 64 px, one process): the ShardSet."""
    from caption_pipeline.data.shards.shard_set import ShardFolder
    from caption_pipeline.pipelines.shard.nodes import plan_shards, write_shards

    _, tokenized, vocabulary = tiny_captions
    shard = merged(
        base_parameters["shard"],
        {
            "num_shards": {"train": 2, "val": 1, "test": 1},
            "workers": 1,
            "image_size": TINY_IMAGE_SIZE,
        },
    )
    folder = ShardFolder(tmp_path_factory.mktemp("shards") / "shards", progress=False)
    return write_shards(plan_shards(tokenized, vocabulary, shard), folder)


@pytest.fixture
def tiny_model(params):
    """conf/base's model block at the smallest sizes: a 2-block compact CNN on 64 px."""
    return params("model", **TINY_MODEL)


@pytest.fixture(scope="session")
def tiny_features(tiny_shapes, tiny_shards, base_parameters, tmp_path_factory):
    """`tiny_shards` through the features nodes (a random, frozen tiny encoder, no
    pretraining): (model block, the model inputs as a ShardSet of features)."""
    from caption_pipeline.data.shards.shard_set import ShardFolder
    from caption_pipeline.datasets import EncoderWeightsDataset
    from caption_pipeline.pipelines.features.nodes import (
        plan_features,
        prepare_encoder,
        write_model_inputs,
    )

    model = merged(base_parameters["model"], TINY_MODEL)
    features = merged(base_parameters["features"], {"batch_size": 4})
    pretraining = merged(base_parameters["encoder_pretraining"], {"enabled": False})
    encoder, _ = prepare_encoder(tiny_shards, tiny_shapes[1], model, features, pretraining)
    folder = tmp_path_factory.mktemp("features")
    weights = EncoderWeightsDataset(filepath=str(folder / "encoder.weights.h5"))
    weights.save(encoder)
    plan = plan_features(tiny_shards, weights.load(), model, features)
    return model, write_model_inputs(plan, ShardFolder(folder / "model_inputs", progress=False))
