"""Soft (additive) attention of Show, Attend and Tell, eq. (4)-(6).

    e_ti = v . tanh(W_a a_i + U_h h_{t-1})     alpha_t = softmax_i(e_t)     z_t = sum_i alpha_ti a_i

The hidden state enters INSIDE the tanh, so the scores change with every step. (Adding a
per-step scalar outside it, as the reference code did, is cancelled by the softmax and leaves
the attention constant over time.) W_a a_i does not depend on t: `project` computes it once per
image, before the time loop; `call` only adds U_h h_{t-1} to it.

A search keeps K hypotheses per image (beams, samples): `call` then takes the K hidden states of
each image as hidden [B, K, n] against that image's features [B, R, D] and W_a a [B, R, A], held
once, not K times. The scores broadcast, tanh(W_a a [B, 1, R, A] + U_h h [B, K, 1, A]), and
z = alpha [B, K, R] x a [B, R, D] is one batched product per image. Why: at COCO size
(121 x 4032 features, float32) a copy of the features per beam is 375 MB at batch 64, K = 3;
writing those copies and then reading them at every step cost more than the products
themselves (docs/benchmarks.md, "Decoding").
"""

from __future__ import annotations

import keras
from keras import layers, ops


@keras.saving.register_keras_serializable(package="caption_pipeline")
class SoftAttention(layers.Layer):
    def __init__(self, units: int, kernel_regularizer=None, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        dense = dict(kernel_regularizer=keras.regularizers.get(kernel_regularizer))
        self.feature_projection = layers.Dense(units, name="feature_projection", **dense)  # W_a
        self.hidden_projection = layers.Dense(
            units, use_bias=False, name="hidden_projection", **dense
        )  # U_h
        # A bias on the score would be the same for every region: softmax cancels it.
        self.score = layers.Dense(1, use_bias=False, name="score", **dense)  # v

    def build(self, features_shape, hidden_shape):
        self.feature_projection.build(features_shape)
        self.hidden_projection.build(hidden_shape)
        self.score.build((*features_shape[:-1], self.units))

    def project(self, features):
        """[B, R, D] -> [B, R, A]: W_a a_i + b, once per image."""
        return self.feature_projection(features)

    def call(self, features, projected, hidden):
        """features [B, R, D], projected [B, R, A], and hidden [B, n] -> z [B, D], alpha [B, R];
        or hidden [B, K, n], K queries per image -> z [B, K, D], alpha [B, K, R]."""
        query = self.hidden_projection(hidden)  # U_h h: [B, A] or [B, K, A]
        if len(hidden.shape) == 2:
            scores = self.score(ops.tanh(projected + query[:, None, :]))  # [B, R, 1]
            alpha = ops.softmax(scores[..., 0], axis=-1)
            return ops.einsum("br,brd->bd", alpha, features), alpha
        scores = self.score(ops.tanh(projected[:, None, :, :] + query[:, :, None, :]))
        alpha = ops.softmax(scores[..., 0], axis=-1)  # [B, K, R]
        return ops.matmul(alpha, features), alpha  # [B, K, R] x [B, R, D]

    def get_config(self):
        return {
            **super().get_config(),
            "units": self.units,
            "kernel_regularizer": keras.regularizers.serialize(
                self.feature_projection.kernel_regularizer
            ),
        }
