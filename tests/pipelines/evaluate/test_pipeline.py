"""The `evaluate` pipeline through Kedro on the tiny shapes data, and what it decodes: the stored
features of `model_inputs` when the captioner's encoder is the frozen one that computed them
(running it again would only recompute them), else the images (issue 26).

tests/test_evaluation.py compares the two paths on the smoke run's captions and scores."""

from __future__ import annotations

import dataclasses
import logging

import keras
import numpy as np
import pytest
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner

from caption_pipeline.data.shards.shard_set import ShardSet
from caption_pipeline.data.text import Vocabulary
from caption_pipeline.datasets.captioner_file import EvaluatedModel
from caption_pipeline.evaluation.scoring import EvaluateSettings, caption_split, decoding_source
from caption_pipeline.model import Captioner, ModelConfig
from caption_pipeline.pipelines.evaluate import create_pipeline
from caption_pipeline.training.features import feature_encoder_weights

OUTPUTS = ("evaluation_captions", "evaluation_metrics", "caption_results_test", "attention_maps")
SOURCE_LOG = "caption_pipeline.evaluation.scoring"


class KeptDataset(MemoryDataset):
    """A MemoryDataset that the runner does not release once later nodes have read it."""

    def _release(self) -> None:
        pass


@pytest.fixture
def frozen_captioner(tiny_captions, tiny_features) -> Captioner:
    """A random decoder on the tiny features, joined with the frozen encoder that computed them,
    as the train pipeline joins its decoder."""
    _, _, vocabulary = tiny_captions
    model, model_inputs = tiny_features
    keras.utils.set_random_seed(7)
    config = ModelConfig.from_dict({**model, "vocab_size": len(vocabulary["tokens"])})
    decoder = Captioner(config, feature_shape=model_inputs.feature_shape)
    return decoder.with_encoder(feature_encoder_weights(model_inputs, config))


def evaluate_settings(params) -> EvaluateSettings:
    return EvaluateSettings.from_params(
        params("evaluate", batch_size=2, attention_samples=1, decoding={"jit_compile": False})
    )


def test_the_pipeline_decodes_the_stored_features_of_its_frozen_encoder(
    frozen_captioner, tiny_shapes, tiny_captions, tiny_shards, tiny_features, params, caplog
):
    table, _, vocabulary = tiny_captions
    _, model_inputs = tiny_features
    evaluate = params("evaluate", batch_size=2, attention_samples=1)
    catalog = DataCatalog(
        {
            "captioner@evaluated": MemoryDataset(
                EvaluatedModel(frozen_captioner, "frozen.keras"), copy_mode="assign"
            ),
            "shards": MemoryDataset(tiny_shards, copy_mode="assign"),
            "model_inputs": MemoryDataset(model_inputs, copy_mode="assign"),
            "vocabulary": MemoryDataset(vocabulary),
            "caption_table": MemoryDataset(table),
            "raw_dataset": MemoryDataset(tiny_shapes[1]),
            "params:evaluate": MemoryDataset(evaluate),
            **{name: KeptDataset(copy_mode="assign") for name in OUTPUTS},
        }
    )
    with caplog.at_level(logging.INFO, logger=SOURCE_LOG):
        SequentialRunner().run(create_pipeline(), catalog)

    assert "Decoding the stored features in" in caplog.text
    assert "Decoding the images" not in caplog.text
    captions = catalog.load("evaluation_captions")
    assert {s: len(c) for s, c in captions.items()} == {
        s: tiny_shards.num_images(s) for s in ("val", "test")
    }
    assert all(d.attention is not None for d in captions["test"])
    assert [r["image_id"] for r in catalog.load("caption_results_test")] == [
        d.image_id for d in captions["test"]
    ]
    assert list(catalog.load("attention_maps")) == [str(captions["test"][0].image_id)]
    assert catalog.load("evaluation_metrics")["details"]["model"] == "frozen.keras"


def test_stored_features_caption_as_the_images_do(
    frozen_captioner, tiny_captions, tiny_shards, tiny_features, params
):
    """Same captions, and log-probabilities within float16's rounding of the features (a
    relative 2^-11 per number): the stored features are the encoder's output, rounded."""
    vocabulary = Vocabulary.from_dict(tiny_captions[2])
    _, model_inputs = tiny_features
    settings = evaluate_settings(params)
    for split in ("val", "test"):
        images = caption_split(frozen_captioner, vocabulary, tiny_shards, split, settings)
        features = caption_split(frozen_captioner, vocabulary, model_inputs, split, settings)
        assert [d.image_id for d in features] == [d.image_id for d in images]
        assert [d.captions for d in features] == [d.captions for d in images]
        np.testing.assert_allclose(
            [d.log_probs for d in features], [d.log_probs for d in images], atol=1e-2
        )


def other_weights(captioner: Captioner, *_) -> Captioner:
    """The same decoder, its encoder's first kernel changed: as a fine-tuned encoder."""
    changed = Captioner(captioner.config)
    changed.set_weights(captioner.get_weights())
    kernel = changed.encoder.weights[0]
    kernel.assign(kernel + 1e-3)
    return changed


def other_architecture(captioner: Captioner, *_) -> Captioner:
    config = dataclasses.replace(captioner.config, compact_filters=(8, 8))
    return Captioner(config)


def decoder_alone(captioner: Captioner, model_inputs: ShardSet, _) -> Captioner:
    return Captioner(captioner.config, feature_shape=model_inputs.feature_shape)


def same(captioner: Captioner, *_) -> Captioner:
    return captioner


def image_pointer(_, __, shards: ShardSet) -> ShardSet:
    """The model inputs of an encoder trained end to end: the image shards themselves."""
    return shards


def of_other_shards(_, model_inputs: ShardSet, __) -> ShardSet:
    params = {**model_inputs.manifest["params"], "source_fingerprint": "0" * 64}
    return ShardSet(model_inputs.root, {**model_inputs.manifest, "params": params})


def stored(_, model_inputs: ShardSet, __) -> ShardSet:
    return model_inputs


@pytest.mark.parametrize(
    ("model", "inputs", "reason"),
    [
        (same, image_pointer, "no features are stored"),
        (same, of_other_shards, "are of other image shards than"),
        (other_weights, stored, "other weights than the frozen encoder"),
        (other_architecture, stored, "params.encoder: the features were computed with"),
        (decoder_alone, stored, "has no encoder"),
    ],
)
def test_the_images_are_decoded_when_the_features_are_not_its_encoders(
    frozen_captioner, tiny_shards, tiny_features, caplog, model, inputs, reason
):
    _, model_inputs = tiny_features
    captioner = model(frozen_captioner, model_inputs, tiny_shards)
    with caplog.at_level(logging.INFO, logger=SOURCE_LOG):
        source = decoding_source(captioner, tiny_shards, inputs(None, model_inputs, tiny_shards))
    assert source is tiny_shards
    assert "Decoding the images in" in caplog.text and reason in caplog.text
