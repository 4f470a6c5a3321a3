"""The fixed feature projection: principal axes fitted on train, stored, and joined for images."""

from __future__ import annotations

import numpy as np
import pytest
from kedro.runner import SequentialRunner

from caption_pipeline.data.shards.reader import make_image_dataset
from caption_pipeline.data.shards.records import parse_feature_example
from caption_pipeline.errors import DataError
from caption_pipeline.model import Captioner, ModelConfig
from caption_pipeline.model.encoder import regions_model
from caption_pipeline.pipelines.features import create_pipeline
from caption_pipeline.training.features import build_frozen_encoder, feature_encoder_weights
from caption_pipeline.training.projection import Moments
from tests.test_features import (
    DEPTH,
    FEATURES,
    FROZEN,
    NUM_SHARDS,
    REGIONS,
    SPLIT_SIZES,
    features_catalog,
    records,
    write_image_shards,
)

K = 5
PROJECTED = {**FROZEN, "feature_projection": K}


def test_principal_axes_are_those_of_the_covariance():
    rng = np.random.default_rng(0)
    # 3 strong directions, 5 weak ones, and an offset.
    rows = (
        rng.normal(size=(4000, 8))
        * [9, 6, 4, 0.3, 0.2, 0.2, 0.1, 0.1]
        @ np.linalg.qr(rng.normal(size=(8, 8)))[0]
        + 3.0
    )
    moments = Moments(8)
    for chunk in np.array_split(rows, 7):  # streamed in chunks: the same moments
        moments.add(chunk.astype(np.float32))
    axes, mean, kept = moments.principal_axes(3)

    centred = rows - rows.mean(axis=0)
    _, singular, vt = np.linalg.svd(centred, full_matrices=False)
    np.testing.assert_allclose(mean, rows.mean(axis=0), atol=1e-5)
    np.testing.assert_allclose(axes.T @ axes, np.eye(3), atol=1e-9)  # orthonormal
    np.testing.assert_allclose(np.abs(axes.T @ vt[:3].T), np.eye(3), atol=1e-4)  # same axes
    assert kept == pytest.approx((singular[:3] ** 2).sum() / (singular**2).sum(), rel=1e-6)
    assert 0.99 < kept < 1.0
    assert (np.abs(axes).max(axis=0) == axes.max(axis=0)).all()  # signs fixed: largest > 0


def test_too_few_rows_or_too_many_axes_are_refused():
    with pytest.raises(DataError, match="feature_projection"):
        Moments(4).principal_axes(2)
    with pytest.raises(DataError, match=f"model.feature_projection: {DEPTH + 1}"):
        ModelConfig.from_dict(
            {**FROZEN, "feature_projection": DEPTH + 1, "vocab_size": 1}
        ).build_encoder(None)


@pytest.fixture(scope="module")
def projected(tmp_path_factory):
    """The features pipeline run with a projection, through a Kedro catalog."""
    root = tmp_path_factory.mktemp("projected")
    _, image_set = write_image_shards(root, SPLIT_SIZES, NUM_SHARDS)
    catalog = features_catalog(image_set.root, root, PROJECTED)
    SequentialRunner().run(create_pipeline(), catalog)
    return image_set, catalog


def test_stored_features_are_the_train_images_principal_components(projected):
    image_set, catalog = projected
    model_inputs = catalog.load("model_inputs")
    assert model_inputs.feature_shape == (REGIONS, K)
    assert model_inputs.manifest["params"]["encoder"]["feature_projection"] == K
    config = ModelConfig.from_dict({**PROJECTED, "vocab_size": 1})
    encoder = build_frozen_encoder(config, catalog.load("initial_encoder"))

    # The projection's axes are the principal axes of the first 8 train images' regions...
    pixels = np.concatenate(
        [b["image"].numpy() for b in make_image_dataset(image_set, "train", batch_size=4)]
    )[: FEATURES["projection_images"]]
    full = regions_model(encoder).predict_on_batch(pixels).reshape(-1, DEPTH)  # [N*R, D]
    centred = full - full.mean(axis=0)
    _, _, vt = np.linalg.svd(centred.astype(np.float64), full_matrices=False)
    kernel, bias = encoder.get_layer("feature_projection").get_weights()
    np.testing.assert_allclose(np.abs(kernel.T @ vt[:K].T), np.eye(K), atol=1e-3)
    np.testing.assert_allclose(bias, -full.mean(axis=0) @ kernel, rtol=1e-4, atol=1e-4)
    # ... so that on them the stored features are centred and uncorrelated, in falling variance.
    by_id = {
        int(r["image/id"]): r["image/features"].numpy().astype(np.float32)
        for r in records(model_inputs.files("train"), parse_feature_example)
    }
    ids = np.concatenate(
        [b["image_id"].numpy() for b in make_image_dataset(image_set, "train", batch_size=4)]
    )[: FEATURES["projection_images"]]
    assert len(by_id) == SPLIT_SIZES["train"]
    assert all(f.shape == (REGIONS, K) for f in by_id.values())
    fitted = np.concatenate([by_id[int(i)] for i in ids])  # [N*R, K]
    np.testing.assert_allclose(fitted.mean(axis=0), 0, atol=2e-2 * fitted.std())
    covariance = np.cov(fitted.T)
    variances = np.diag(covariance)
    assert (np.diff(variances) <= 1e-6 * variances[0]).all()
    off_diagonal = covariance - np.diag(variances)
    assert np.abs(off_diagonal).max() < 2e-2 * variances[0]


def test_decoder_on_projected_features_joins_the_projecting_encoder(projected):
    image_set, catalog = projected
    model_inputs = catalog.load("model_inputs")
    config = ModelConfig.from_dict(
        {**PROJECTED, "vocab_size": 12, "embed_dim": 8, "attention_dim": 8, "lstm_units": 8}
    )
    decoder = Captioner(config, feature_shape=model_inputs.feature_shape)
    assert decoder.encoder is None and decoder.feature_dim == K
    joined = decoder.with_encoder(feature_encoder_weights(model_inputs, config))
    # From images, the joined captioner sees the very features that were stored.
    batch = next(iter(make_image_dataset(image_set, "val", batch_size=4)))
    from_images = joined({"image": batch["image"]}).numpy()
    stored = {
        int(r["image/id"]): r["image/features"].numpy().astype(np.float32)
        for r in records(model_inputs.files("val"), parse_feature_example)
    }
    for image_id, features in zip(batch["image_id"].numpy(), from_images, strict=False):
        np.testing.assert_allclose(features, stored[int(image_id)], rtol=2e-3, atol=2e-3)
    for joined_weight, weight in zip(
        joined.decoder.get_weights(), decoder.decoder.get_weights(), strict=False
    ):
        np.testing.assert_array_equal(joined_weight, weight)
