"""The captioning model: attention, decoder, losses and training under both backends."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from keras import ops

from caption_pipeline.errors import DataError
from caption_pipeline.model import AttentionDecoder, Captioner, ModelConfig, caption_losses
from caption_pipeline.params import defaults, from_conf

B, R, D, V = 3, 6, 10, 15  # batch, regions, feature width, vocab


def tiny_decoder(**kwargs) -> AttentionDecoder:
    keras.utils.set_random_seed(0)
    decoder = AttentionDecoder(V, embed_dim=8, attention_dim=8, lstm_units=12, **kwargs)
    decoder.build((None, R, D))
    return decoder


def random_features(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((B, R, D)).astype("float32")


def captions_with_padding() -> np.ndarray:
    """<start> w w w <end> <pad>..., real lengths 5, 4 and 6 tokens."""
    return np.array(
        [[1, 5, 6, 7, 2, 0, 0], [1, 8, 9, 2, 0, 0, 0], [1, 4, 4, 5, 6, 2, 0]], dtype="int32"
    )


def test_attention_changes_over_time_and_with_the_hidden_state():
    decoder = tiny_decoder()
    features = random_features()
    _, alpha = decoder(features, captions_with_padding()[:, :-1])
    alpha = ops.convert_to_numpy(alpha)
    assert alpha.shape == (B, 6, R)
    np.testing.assert_allclose(alpha.sum(-1), 1.0, rtol=1e-5)
    # every image's attention moves between consecutive steps
    assert np.abs(np.diff(alpha, axis=1)).max(axis=(1, 2)).min() > 1e-3

    state = decoder.init_state(features)
    hidden = np.random.default_rng(1).standard_normal((B, 12)).astype("float32")
    _, alpha_a = decoder.attention(state.features, state.projected, state.h)
    _, alpha_b = decoder.attention(state.features, state.projected, hidden)
    assert np.abs(ops.convert_to_numpy(alpha_a) - ops.convert_to_numpy(alpha_b)).max() > 1e-3


def test_features_are_projected_once_per_image_not_once_per_step():
    decoder = tiny_decoder()
    projection = decoder.attention.feature_projection
    calls = []
    original = projection.call
    projection.call = lambda x, **kw: calls.append(x.shape) or original(x, **kw)  # a spy

    decoder(random_features(), captions_with_padding()[:, :-1])  # 6 steps
    assert calls == [(B, R, D)]

    state = decoder.init_state(random_features())
    for _ in range(4):
        _, _, state = decoder.step(np.ones(B, "int32"), state)
    assert len(calls) == 2  # the one init_state, none from the steps
    assert tuple(state.projected.shape) == (B, R, 8)


def test_step_api_reproduces_the_teacher_forced_pass():
    decoder = tiny_decoder()
    features, captions = random_features(), captions_with_padding()
    logits, alpha = decoder(features, captions[:, :-1])
    state = decoder.init_state(features)
    for t in range(captions.shape[1] - 1):
        step_logits, step_alpha, state = decoder.step(captions[:, t], state)
        np.testing.assert_allclose(
            ops.convert_to_numpy(step_logits),
            ops.convert_to_numpy(logits[:, t]),
            rtol=1e-4,
            atol=1e-5,
        )
        np.testing.assert_allclose(
            ops.convert_to_numpy(step_alpha),
            ops.convert_to_numpy(alpha[:, t]),
            rtol=1e-4,
            atol=1e-6,
        )


def test_k_captions_per_image_step_as_k_copies_of_the_image_do():
    """A search's step: K hidden states per image [B, K, n] against the image's features and
    W_a a held once give what the step gives on K copies of the features, one row per caption
    (how the searches ran before issue 11), and leave the per-image state as it was."""
    decoder, k = tiny_decoder(), 4
    state = decoder.init_state(random_features())
    rng = np.random.default_rng(2)
    h, c = (rng.standard_normal((B, k, 12)).astype("float32") for _ in range(2))
    words = rng.integers(3, V, (B, k)).astype("int32")
    logits, alpha, new = decoder.step(words, state._replace(h=h, c=c))
    assert tuple(logits.shape) == (B, k, V) and tuple(alpha.shape) == (B, k, R)
    assert new.features is state.features and new.projected is state.projected

    copies = type(state)(
        *(np.repeat(ops.convert_to_numpy(x), k, axis=0) for x in (state.features, state.projected)),
        h.reshape(B * k, 12),
        c.reshape(B * k, 12),
    )
    flat_logits, flat_alpha, flat = decoder.step(words.reshape(-1), copies)
    for grouped, rows in [
        (logits, flat_logits),
        (alpha, flat_alpha),
        (new.h, flat.h),
        (new.c, flat.c),
    ]:
        grouped = ops.convert_to_numpy(grouped)
        np.testing.assert_allclose(
            grouped.reshape(B * k, -1), ops.convert_to_numpy(rows), rtol=1e-5, atol=1e-6
        )


def test_appended_padding_adds_nothing_to_the_loss():
    model = Captioner(
        from_conf(
            ModelConfig,
            "model",
            vocab_size=V,
            image_size=16,
            compact_filters=(4, 8),
            embed_dim=8,
            attention_dim=8,
            lstm_units=12,
        )
    )
    x = {"features": np.random.default_rng(0).standard_normal((B, 16, 8)).astype("float16")}
    captions = captions_with_padding()
    longer = np.concatenate([captions, np.zeros((B, 5), "int32")], axis=1)
    features = model(x)
    loss = float(model.compute_loss(x, captions, features, training=False))
    loss_longer = float(model.compute_loss(x, longer, features, training=False))
    assert loss == pytest.approx(loss_longer, rel=1e-6)
    # ...whereas a real token where a pad was does change it
    changed = captions.copy()
    changed[1, 4] = 7
    assert float(model.compute_loss(x, changed, features, training=False)) != pytest.approx(loss)


def test_cross_entropy_is_the_mean_over_real_tokens():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 3, 5)).astype("float32")
    targets = np.array([[3, 2, 0], [4, 0, 0]], dtype="int32")
    alpha = np.full((2, 3, 4), 0.25, "float32")
    xent, _ = caption_losses(logits, alpha, targets)
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = -(log_p[0, 0, 3] + log_p[0, 1, 2] + log_p[1, 0, 4]) / 3
    assert float(xent) == pytest.approx(expected, rel=1e-5)


def test_doubly_stochastic_term_on_a_known_alpha():
    alpha = np.array(
        [
            [[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]],  # third step is padding
            [[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]],
        ],
        dtype="float32",
    )
    targets = np.array([[7, 2, 0], [7, 7, 2]], dtype="int32")
    logits = np.zeros((2, 3, 9), "float32")
    _, attention = caption_losses(logits, alpha, targets)
    # image 0: sums over its 2 real steps (1.4, 0.6) -> (0.4^2 + 0.4^2) / R = 0.16
    # image 1: sums over 3 steps (1.0, 2.0)          -> (0 + 1) / R = 0.5
    assert float(attention) == pytest.approx((0.16 + 0.5) / 2, rel=1e-6)
    # An all-pad row (a missing caption in a group) adds nothing and is not counted.
    padded_targets = np.concatenate([targets, np.zeros((1, 3), "int32")])
    padded_alpha = np.concatenate([alpha, np.full((1, 3, 2), 0.5, "float32")])
    _, padded = caption_losses(np.zeros((3, 3, 9), "float32"), padded_alpha, padded_targets)
    assert float(padded) == pytest.approx(float(attention), rel=1e-6)


def test_frozen_encoder_is_not_trained_and_compact_is_by_default():
    small = dict(
        vocab_size=V,
        image_size=16,
        compact_filters=(4, 8),
        embed_dim=8,
        attention_dim=8,
        lstm_units=12,
    )
    trained = Captioner(from_conf(ModelConfig, "model", **small, encoder_trainable=None))
    frozen = Captioner(from_conf(ModelConfig, "model", **small, encoder_trainable=False))
    encoder_ids = {id(v) for v in trained.encoder.trainable_variables}
    assert encoder_ids and encoder_ids <= {id(v) for v in trained.trainable_variables}
    assert len(frozen.trainable_variables) == len(trained.trainable_variables) - len(encoder_ids)
    assert (
        from_conf(
            ModelConfig, "model", vocab_size=V, encoder="nasnet_large", encoder_trainable=None
        ).trains_encoder
        is False
    )


def test_weights_and_whole_model_round_trip(tmp_path):
    config = from_conf(
        ModelConfig,
        "model",
        vocab_size=V,
        image_size=16,
        compact_filters=(4, 8),
        embed_dim=8,
        attention_dim=8,
        lstm_units=12,
    )
    model = Captioner(config)
    x = {"image": np.random.default_rng(0).uniform(0, 255, (B, 16, 16, 3)).astype("float32")}
    captions = captions_with_padding()
    expected, _ = model.teacher_forced(model(x), captions)

    model.save_weights(tmp_path / "captioner.weights.h5")
    fresh = Captioner(config)  # other random weights until loaded
    fresh.load_weights(tmp_path / "captioner.weights.h5")
    model.save(tmp_path / "captioner.keras")
    loaded = keras.models.load_model(tmp_path / "captioner.keras")
    assert loaded.config == config
    for other in (fresh, loaded):
        logits, _ = other.teacher_forced(other(x), captions)
        np.testing.assert_array_equal(ops.convert_to_numpy(logits), ops.convert_to_numpy(expected))


def test_on_features_the_captioner_is_the_decoder_alone_and_joins_its_encoder(tmp_path):
    """Trained on precomputed features, a Captioner builds no encoder (NASNetLarge: 85 M
    parameters it would never run); joined with the encoder of those features, it captions
    images exactly as the full model with that encoder does."""
    config = from_conf(
        ModelConfig,
        "model",
        vocab_size=V,
        image_size=16,
        compact_filters=(4, 8),
        embed_dim=8,
        attention_dim=8,
        lstm_units=12,
        encoder_trainable=False,
    )
    encoder_model = Captioner(config)  # its encoder computed the features
    features = encoder_model.encoder.predict(
        np.random.default_rng(0).uniform(0, 255, (B, 16, 16, 3)).astype("float32"), verbose=0
    )
    decoder_only = Captioner(config, feature_shape=features.shape[1:])
    assert decoder_only.encoder is None
    assert decoder_only.count_params() == decoder_only.decoder.count_params()
    assert decoder_only.count_params() < encoder_model.count_params()
    captions = captions_with_padding()
    expected, _ = decoder_only.teacher_forced(decoder_only({"features": features}), captions)
    with pytest.raises(DataError, match="no encoder"):
        decoder_only({"image": np.zeros((B, 16, 16, 3), "float32")})

    decoder_only.save(tmp_path / "decoder.keras")
    loaded = keras.models.load_model(tmp_path / "decoder.keras")
    assert loaded.encoder is None and (loaded.regions, loaded.feature_dim) == features.shape[1:]
    joined = loaded.with_encoder(encoder_model.encoder.get_weights())
    images = np.random.default_rng(0).uniform(0, 255, (B, 16, 16, 3)).astype("float32")
    logits, _ = joined.teacher_forced(joined({"image": images}), captions)
    np.testing.assert_allclose(
        ops.convert_to_numpy(logits), ops.convert_to_numpy(expected), atol=1e-5
    )
    with pytest.raises(DataError, match="cannot train its encoder"):
        Captioner(
            from_conf(
                ModelConfig,
                "model",
                vocab_size=V,
                image_size=16,
                compact_filters=(4, 8),
                encoder_trainable=None,
            ),
            feature_shape=(16, 8),
        )


def test_config_rejects_unknown_keys_and_encoders():
    with pytest.raises(DataError, match="lstm_size"):
        ModelConfig.from_dict({**defaults("model"), "vocab_size": V, "lstm_size": 3})
    with pytest.raises(
        DataError,
        match=r"model\.encoder: missing; it belongs in "
        r"conf/base/parameters_train\.yml",
    ):
        ModelConfig.from_dict({"vocab_size": V})
    with pytest.raises(DataError, match="resnet"):
        from_conf(ModelConfig, "model", vocab_size=V, encoder="resnet")
    with pytest.raises(DataError, match="image"):
        model = Captioner(
            from_conf(ModelConfig, "model", vocab_size=V, image_size=16, compact_filters=(4,))
        )
        model({"pixels": np.zeros((1, 16, 16, 3), "float32")})


def test_fit_on_reader_batches_under_tensorflow():
    """The reader's batch layout, ({"image", "image_id"}, captions), through tf.data and fit."""
    import tensorflow as tf

    keras.utils.set_random_seed(0)
    model = Captioner(
        from_conf(
            ModelConfig,
            "model",
            vocab_size=V,
            image_size=16,
            compact_filters=(4, 8),
            embed_dim=8,
            attention_dim=8,
            lstm_units=12,
        )
    )
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (6, 16, 16, 3)).astype("float32")
    captions = np.concatenate([captions_with_padding()] * 2)
    data = tf.data.Dataset.from_tensor_slices(
        ({"image": images, "image_id": np.arange(6, dtype="int64")}, captions)
    ).batch(3)
    history = model.fit(data, epochs=2, shuffle=False, verbose=0).history
    assert set(history) == {"loss", "xent", "attention_reg"}
    assert all(np.isfinite(history["loss"]))


JAX_TRAINING = textwrap.dedent("""
    import json, sys

    class NoTensorFlow:  # as on a JAX-only machine: any attempt to import it fails
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "tensorflow":
                raise ImportError("tensorflow is not installed here")

    sys.meta_path.insert(0, NoTensorFlow())
    import keras, numpy as np
    from caption_pipeline.model import Captioner, ModelConfig
    from caption_pipeline.params import from_conf
    keras.utils.set_random_seed(0)
    model = Captioner(from_conf(ModelConfig, "model",
                                vocab_size=12, image_size=16, compact_filters=(8, 8),
                                embed_dim=16, attention_dim=16, lstm_units=24))
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (8, 16, 16, 3)).astype("float32")
    captions = np.concatenate([np.ones((8, 1)), rng.integers(4, 12, (8, 5)),
                               np.full((8, 1), 2), np.zeros((8, 2))], axis=1).astype("int32")
    history = model.fit({"image": images, "image_id": np.arange(8)}, captions,
                        batch_size=4, epochs=30, verbose=0).history
    print(json.dumps({"backend": keras.backend.backend(), "xent": history["xent"]}))
""")


def test_a_few_training_steps_under_jax_lower_the_loss():
    """Also: the model code needs no TensorFlow under JAX (the GPU machine has none)."""
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(
        [sys.executable, "-c", JAX_TRAINING], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["backend"] == "jax"
    xent = result["xent"]
    assert xent[-1] < 0.7 * xent[0], xent
