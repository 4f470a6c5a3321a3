"""LSTM decoder with soft attention (Show, Attend and Tell, sec. 3.1.2 and 4.2.1).

One step, given the previous word y_{t-1} and state (h_{t-1}, c_{t-1}):

    z_t, alpha_t = attention(a, h_{t-1})                  # a: region features [B, R, D]
    beta_t       = sigmoid(f_beta(h_{t-1}))               # gating scalar
    i,f,o,g      = W [E y_{t-1}; beta_t z_t; h_{t-1}] + b  # z_t at full width D, as in the paper
    c_t = f*c_{t-1} + i*g,   h_t = o*tanh(c_t)
    p(y_t)       = softmax(L_o dropout(tanh(E y_{t-1} + L_h dropout(h_t) + L_z z_t)))  # deep out

h_0 and c_0 come from one-layer tanh MLPs of the mean feature. Only the attention and the LSTM
update are recurrent. So the teacher-forced pass computes the word half of the LSTM input for
all steps at once before the loop, and the deep output (with the big [B*T, m] x [m, V] vocabulary
GEMM) for all steps at once after it; the features are projected for attention once per image.

The step-wise API takes either one caption per image (word_ids [B], h and c [B, n]) or K per
image (word_ids [B, K], h and c [B, K, n]: a search's beams or samples) against the image's
features and projection held once; every Dense layer acts on the last axis, so only the
attention tells the two apart (see `attention.py` for why the features are not copied K times).
"""

from __future__ import annotations

from typing import NamedTuple

import keras
from keras import layers, ops

from caption_pipeline.model.attention import SoftAttention


class DecoderState(NamedTuple):
    """What `step` carries. features and projected are fixed per image; h and c change."""

    features: object  # [B, R, D]
    projected: object  # [B, R, A], W_a a_i + b
    h: object  # [B, n], or [B, K, n] for K captions per image
    c: object  # [B, n], or [B, K, n]


@keras.saving.register_keras_serializable(package="caption_pipeline")
class AttentionDecoder(layers.Layer):
    def __init__(
        self,
        vocab_size: int,
        embed_dim: int = 512,
        attention_dim: int = 512,
        lstm_units: int = 512,
        dropout: float = 0.5,
        l2: float = 0.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.vocab_size, self.embed_dim, self.attention_dim = vocab_size, embed_dim, attention_dim
        self.lstm_units, self.dropout_rate, self.l2 = lstm_units, dropout, l2
        regularizer = keras.regularizers.L2(l2) if l2 else None

        def dense(units, name, **kwargs):
            return layers.Dense(units, kernel_regularizer=regularizer, name=name, **kwargs)

        n = lstm_units
        self.embedding = layers.Embedding(vocab_size, embed_dim, name="embedding")  # E
        self.init_h = dense(n, "init_h", activation="tanh")
        self.init_c = dense(n, "init_c", activation="tanh")
        self.attention = SoftAttention(
            attention_dim, kernel_regularizer=regularizer, name="attention"
        )
        self.gate = dense(1, "beta", activation="sigmoid")  # f_beta
        # The LSTM's input matrix W, split by input: the word part runs once for all steps.
        self.word_gates = dense(4 * n, "word_gates", bias_initializer=_forget_bias_one(n))
        self.context_gates = dense(4 * n, "context_gates", use_bias=False)
        self.hidden_gates = dense(4 * n, "hidden_gates", use_bias=False)
        self.out_hidden = dense(embed_dim, "out_hidden")  # L_h
        self.out_context = dense(embed_dim, "out_context")  # L_z
        self.out_vocab = dense(vocab_size, "out_vocab")  # L_o
        self.dropout = layers.Dropout(dropout)

    def build(self, features_shape):
        batch, regions, depth = features_shape
        n, m = self.lstm_units, self.embed_dim
        self.embedding.build((batch, None))
        for layer, width in [
            (self.init_h, depth),
            (self.init_c, depth),
            (self.gate, n),
            (self.word_gates, m),
            (self.context_gates, depth),
            (self.hidden_gates, n),
            (self.out_hidden, n),
            (self.out_context, depth),
            (self.out_vocab, m),
        ]:
            layer.build((batch, width))
        self.attention.build((batch, regions, depth), (batch, n))

    # --- the step-wise API, for decoding -------------------------------------------------------

    def init_state(self, features) -> DecoderState:
        """features [B, R, D] -> the state before the first word."""
        features = ops.cast(features, self.compute_dtype)
        mean = ops.mean(features, axis=1)
        return DecoderState(
            features, self.attention.project(features), self.init_h(mean), self.init_c(mean)
        )

    def step(self, word_ids, state: DecoderState, training=False):
        """word_ids [B] (the previous words) -> logits [B, V], alpha [B, R], the next state;
        with K captions per image, word_ids [B, K] and state.h, state.c [B, K, n] ->
        logits [B, K, V], alpha [B, K, R]."""
        embedded = self.embedding(word_ids)  # [B, m]
        h, c, context, alpha = self._advance(self.word_gates(embedded), state)
        logits = self._output(embedded, h, context, training)
        return logits, alpha, state._replace(h=h, c=c)

    # --- teacher forcing ----------------------------------------------------------------------

    def call(self, features, captions_in, training=False):
        """features [B, R, D], captions_in [B, T] -> logits [B, T, V], alpha [B, T, R]."""
        state = self.init_state(features)
        embedded = self.embedding(captions_in)  # [B, T, m]
        word_gates = self.word_gates(embedded)  # [B, T, 4n]: one GEMM for all steps
        hs, contexts, alphas = [], [], []
        # A Python loop over the static T, unrolled by the tracer. keras.ops.scan is no option
        # under TF (XLA cannot compile its gradient) and was ~7% slower under JAX (COCO size).
        # unstack, not word_gates[:, t]: the gradient of T slices is T padded full-size copies.
        for step_gates in ops.unstack(word_gates, axis=1):
            h, c, context, alpha = self._advance(step_gates, state)
            state = state._replace(h=h, c=c)
            hs.append(h), contexts.append(context), alphas.append(alpha)
        hs, contexts = ops.stack(hs, axis=1), ops.stack(contexts, axis=1)  # [B, T, n], [B, T, D]
        return self._output(embedded, hs, contexts, training), ops.stack(alphas, axis=1)

    # --- shared by both ----------------------------------------------------------------------

    def _advance(self, word_gates, state: DecoderState):
        """One step. word_gates [B, (K,) 4n] (W_e E y_{t-1} + b), state ->
        h, c [B, (K,) n], z_t [B, (K,) D] (gated), alpha [B, (K,) R]."""
        context, alpha = self.attention(state.features, state.projected, state.h)
        context = self.gate(state.h) * context  # beta_t z_t
        gates = word_gates + self.context_gates(context) + self.hidden_gates(state.h)
        i, f, o, g = ops.split(gates, 4, axis=-1)
        c = ops.sigmoid(f) * state.c + ops.sigmoid(i) * ops.tanh(g)
        h = ops.sigmoid(o) * ops.tanh(c)
        return h, c, context, alpha

    def _output(self, embedded, h, context, training):
        """Deep output layer, for one step ([B, .]) or all steps at once ([B, T, .])."""
        hidden = self.out_hidden(self.dropout(h, training=training))
        x = ops.tanh(embedded + hidden + self.out_context(context))
        return self.out_vocab(self.dropout(x, training=training))

    def get_config(self):
        return {
            **super().get_config(),
            "vocab_size": self.vocab_size,
            "embed_dim": self.embed_dim,
            "attention_dim": self.attention_dim,
            "lstm_units": self.lstm_units,
            "dropout": self.dropout_rate,
            "l2": self.l2,
        }


def _forget_bias_one(units: int):
    """Bias initializer [0, 1, 0, 0] per gate block (i, f, o, g): remember by default."""

    def init(shape, dtype=None):
        return ops.concatenate([ops.zeros((units,)), ops.ones((units,)), ops.zeros((2 * units,))])

    return init
