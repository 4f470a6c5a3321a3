"""The trainable captioner: encoder + attention decoder, and its loss.

Keras passes the captions to `compute_loss` only, not to `call`, so the forward pass is split:
`call` maps the inputs to region features (precomputed ones pass through, images go through
the encoder), and `compute_loss` runs the teacher-forced decoder on them. `fit` therefore takes
the reader's batches as they are, `({"image": [B, S, S, 3]} or {"features": [B, R, D]},
captions [B, T])`, with the same code under TensorFlow and JAX.

A Captioner trained on precomputed features has no encoder (`feature_shape=(R, D)`): a frozen
NASNetLarge is 85 M parameters, 340 MB in every checkpoint, that such training never runs. What
evaluates, serves and exports it is the decoder joined with the encoder the features came from,
`with_encoder(weights)`: a Captioner from images, with the same decoder weights.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import keras
from keras import ops

from caption_pipeline.errors import DataError
from caption_pipeline.model.decoder import AttentionDecoder
from caption_pipeline.model.encoder import (
    BATCHNORM,
    ENCODERS,
    EncoderConfig,
    compact_blocks,
    freeze_batchnorm,
)
from caption_pipeline.params import from_params

PAD_ID = 0


@dataclass(frozen=True)
class ModelConfig:
    """`params:model` (conf/base/parameters_train.yml says what each key means, and holds the
    defaults) and the vocabulary's size, which is no parameter: the vocabulary has it. The
    encoder's keys are flat in conf/; `encoder_config` is them as an `EncoderConfig`."""

    vocab_size: int
    encoder: str  # compact | nasnet_mobile | nasnet_large
    image_size: int  # side of the images the model is given
    encoder_weights: str | None  # "imagenet" (NASNet), a local .h5 file, or None (random)
    # None: train the compact CNN end to end, freeze NASNet (its features are then precomputed
    # once per image); conf/base freezes the compact CNN too, after its pretraining.
    encoder_trainable: bool | None
    # A trained encoder's BatchNormalization: train (batch statistics) | frozen (inference mode,
    # moving statistics and scales fixed; what fine-tuning a pretrained encoder uses)
    encoder_batchnorm: str
    compact_filters: tuple[int | tuple[int, ...], ...]  # a width, or the widths of a block
    compact_pool_last: bool  # false: the compact CNN's grid is twice as fine
    compact_context: tuple[int, ...]  # dilations of its residual context blocks; () none
    compact_strided_stem: bool  # the first block pools by its conv's stride 2
    # K: the encoder's region features projected to K numbers by a fixed linear map fitted on
    # the train images (`caption_pipeline.training.projection`); None: the encoder's own D.
    feature_projection: int | None
    embed_dim: int
    attention_dim: int
    lstm_units: int
    dropout: float
    l2: float  # on every Dense kernel of the decoder
    attention_lambda: float  # doubly stochastic attention regularisation

    def __post_init__(self):
        if self.encoder not in ENCODERS:
            raise DataError(
                f"model.encoder: unknown encoder {self.encoder!r}; expected one of {ENCODERS}"
            )
        if self.encoder_batchnorm not in BATCHNORM:
            raise DataError(
                f"model.encoder_batchnorm: {self.encoder_batchnorm!r}; expected one of {BATCHNORM}"
            )
        blocks = compact_blocks(self.compact_filters)
        object.__setattr__(
            self,
            "compact_filters",
            tuple(
                b[0] if isinstance(f, int) else b
                for f, b in zip(self.compact_filters, blocks, strict=True)
            ),
        )
        object.__setattr__(self, "compact_context", tuple(self.compact_context))
        if not all(isinstance(d, int) and d >= 1 for d in self.compact_context):
            raise DataError(
                f"model.compact_context: dilation rates >= 1, got {list(self.compact_context)}"
            )

    @property
    def encoder_config(self) -> EncoderConfig:
        return EncoderConfig(
            self.encoder,
            self.image_size,
            self.encoder_weights,
            self.encoder_trainable,
            self.encoder_batchnorm,
            self.compact_filters,
            self.compact_pool_last,
            self.compact_context,
            self.compact_strided_stem,
            self.feature_projection,
        )

    @property
    def trains_encoder(self) -> bool:
        return self.encoder_config.trains

    def build_encoder(self, weights: str | None) -> keras.Model:
        """This config's encoder architecture, with `weights` (see `build_encoder`)."""
        return self.encoder_config.build(weights)

    @classmethod
    def from_dict(cls, params: dict) -> ModelConfig:
        """From a `params:model` dict with `vocab_size` (`params.from_params`)."""
        return from_params(cls, params, "model")

    @classmethod
    def from_saved(cls, config: dict) -> ModelConfig:
        """From the config a saved Captioner holds (`Captioner.get_config`). A file saved
        before an architecture key existed was built without what the key adds: it gets
        `ADDED_SINCE`'s value, not conf/base's, so that it loads as the model it was."""
        return cls.from_dict({**ADDED_SINCE, **config})

    @classmethod
    def for_encoder(cls, params: dict) -> ModelConfig:
        """From a `params:model` dict alone, for what only needs the encoder (features,
        encoder pretraining): the vocabulary's size is no matter to it."""
        return cls.from_dict({**params, "vocab_size": 1})


# Architecture keys added to `model` after captioners were first saved, with the value that
# means "as before" (the architecture of a file saved without them).
ADDED_SINCE = {"compact_context": [], "compact_strided_stem": False}


def replicas_in_sync() -> int:
    """Replicas whose gradients tf.distribute sums each step (1 outside it, and under JAX):
    each divides its loss by their count, so that the sum is the gradient of the mean loss,
    as Keras does with its own losses (its trainer multiplies the logs back)."""
    if keras.backend.backend() != "tensorflow":
        return 1
    import tensorflow as tf

    return tf.distribute.get_strategy().num_replicas_in_sync


def _workers_in_sync() -> int:
    """Worker processes of the MultiWorkerMirroredStrategy the step runs under (else 1): its
    cluster's "chief" task, if any, and its "worker" tasks, which all train (TF_CONFIG's other
    kinds, "ps" and "evaluator", take no part in the all-reduce)."""
    if keras.backend.backend() != "tensorflow":
        return 1
    import tensorflow as tf

    strategy = tf.distribute.get_strategy()
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return 1
    cluster = strategy.cluster_resolver.cluster_spec().as_dict()
    return max(1, len(cluster.get("chief", [])) + len(cluster.get("worker", [])))


def caption_losses(logits, alpha, targets):
    """Masked token cross-entropy and the doubly stochastic attention term.

    logits [B, T, V], alpha [B, T, R], targets [B, T] (pad = 0) -> (xent, attention), scalars.
    xent is the mean over real (non-pad) target tokens; attention is the paper's
    sum_i (1 - sum_t alpha_ti)^2 over non-padded steps t, divided by R (as the most used
    implementation does, so that lambda does not scale with the grid size) and averaged over
    the captions that have any token (all-pad rows pad a group of captions per image).
    """
    logits, alpha = ops.cast(logits, "float32"), ops.cast(alpha, "float32")  # mixed precision
    mask = ops.cast(ops.not_equal(targets, PAD_ID), "float32")  # [B, T]
    token_xent = ops.sparse_categorical_crossentropy(targets, logits, from_logits=True)
    xent = ops.sum(token_xent * mask) / ops.maximum(ops.sum(mask), 1.0)
    attention_total = ops.sum(alpha * mask[:, :, None], axis=1)  # [B, R]
    per_caption = ops.mean(ops.square(1.0 - attention_total), axis=-1)  # [B]
    real = ops.cast(ops.any(mask > 0, axis=-1), "float32")  # [B]
    attention = ops.sum(per_caption * real) / ops.maximum(ops.sum(real), 1.0)
    return xent, attention


@keras.saving.register_keras_serializable(package="caption_pipeline")
class Captioner(keras.Model):
    """`config`'s encoder + attention decoder; with `feature_shape` (R, D), the decoder alone,
    for precomputed features [B, R, D] of a frozen encoder (see the module docstring)."""

    def __init__(
        self, config: ModelConfig | dict, feature_shape: tuple[int, int] | None = None, **kwargs
    ):
        super().__init__(**kwargs)
        self.config = config if isinstance(config, ModelConfig) else ModelConfig.from_saved(config)
        c = self.config
        if feature_shape is None:
            self.encoder = c.build_encoder(c.encoder_weights)
            self.encoder.trainable = c.trains_encoder
            if c.trains_encoder and c.encoder_batchnorm == "frozen":
                freeze_batchnorm(self.encoder)  # before any optimizer sees the trainable ones
            _, self.regions, self.feature_dim = self.encoder.output_shape
        else:
            if c.trains_encoder:
                raise DataError(
                    f"model.encoder_trainable: a Captioner on precomputed features "
                    f"cannot train its encoder ({c.encoder})"
                )
            self.encoder = None
            self.regions, self.feature_dim = (int(n) for n in feature_shape)
        self.decoder = AttentionDecoder(
            c.vocab_size,
            c.embed_dim,
            c.attention_dim,
            c.lstm_units,
            c.dropout,
            c.l2,
            name="decoder",
        )
        # Built now, not on a first call: the decoder runs in compute_loss, which Keras never
        # traces to build a model, and loading weights needs every variable to exist.
        self.decoder.build((None, self.regions, self.feature_dim))
        self.xent_tracker = keras.metrics.Mean(name="xent")
        self.attention_tracker = keras.metrics.Mean(name="attention_reg")
        self.built = True

    def call(self, inputs, training=False):
        """{"features": [B, R, D]} (precomputed, any float dtype) or {"image": [B, S, S, 3] 0..255}
        -> region features [B, R, D] float32."""
        if "features" in inputs:
            return ops.cast(inputs["features"], self.compute_dtype)
        if "image" not in inputs:
            raise DataError(f"Captioner inputs need 'features' or 'image'; got {sorted(inputs)}")
        if self.encoder is None:
            raise DataError(
                "this Captioner was trained on precomputed features and has no "
                "encoder: join it with the features' encoder (with_encoder) to "
                "caption images"
            )
        images = ops.cast(inputs["image"], self.compute_dtype)
        if self.config.trains_encoder:
            return self.encoder(images, training=training)
        return ops.stop_gradient(self.encoder(images, training=False))

    def teacher_forced(self, features, captions, training=False):
        """features [B, R, D], captions [B, T+1] (<start> ... <end> <pad>...) ->
        logits [B, T, V] for captions[:, 1:], alpha [B, T, R]."""
        return self.decoder(features, captions[:, :-1], training=training)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """Masked cross-entropy + lambda * attention term + L2; y_pred is `call`'s features."""
        if sample_weight is not None:
            raise DataError(
                "Captioner.fit: sample weights are not supported; padding is masked by pad id 0"
            )
        captions = ops.cast(y, "int32")
        features = y_pred
        if len(captions.shape) == 3:
            # Grouped: captions [B, C, T+1] share their image's features [B, R, D], so the
            # encoder ran once for C captions; the decoder sees B*C rows.
            per_image, length = captions.shape[1], captions.shape[2]
            features = ops.repeat(features, per_image, axis=0)
            captions = ops.reshape(captions, (-1, length))
        logits, alpha = self.teacher_forced(features, captions, training=training)
        xent, attention = caption_losses(logits, alpha, captions[:, 1:])
        self.xent_tracker.update_state(xent)
        self.attention_tracker.update_state(attention)
        loss = xent + self.config.attention_lambda * attention
        if self.losses:  # L2
            loss = loss + ops.sum(ops.stack(self.losses))
        replicas = replicas_in_sync()
        return loss * (1.0 / replicas) if replicas > 1 else loss

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        """The step's logs; across several workers, each as [1], not a scalar []: Keras 3.15
        averages them over the workers with `strategy.reduce("MEAN", log, axis=0)`, which
        needs a dimension 0 (a ValueError on a scalar), and gives the scalar back."""
        logs = super().compute_metrics(x, y, y_pred, sample_weight)
        if _workers_in_sync() > 1:
            logs = {name: ops.reshape(value, (1,)) for name, value in logs.items()}
        return logs

    # The step-wise API, for batched greedy / beam search in one compiled function.
    def init_state(self, features):
        return self.decoder.init_state(features)

    def step(self, word_ids, state):
        return self.decoder.step(word_ids, state, training=False)

    def with_encoder(self, encoder_weights: list) -> Captioner:
        """This decoder joined with the frozen encoder of `encoder_weights` (the one that
        computed its features): a Captioner from images, never fetching pretrained weights."""
        joined = Captioner(dataclasses.replace(self.config, encoder_weights=None))
        joined.encoder.set_weights(encoder_weights)
        if (joined.regions, joined.feature_dim) != (self.regions, self.feature_dim):
            raise DataError(
                f"the encoder gives {joined.regions} x {joined.feature_dim} "
                f"regions, the decoder was trained on {self.regions} x "
                f"{self.feature_dim}"
            )
        joined.decoder.set_weights(self.decoder.get_weights())
        return joined

    def rebuilt(self, *, decoder_alone: bool = False) -> Captioner:
        """A copy with the same weights, its layers in the dtype policy in force now (a loaded
        Captioner's are in the one of the process that loaded it); with `decoder_alone`, its
        decoder alone, on precomputed features of its frozen encoder: the very Captioner a
        phase on features trains (`with_encoder` joins it back)."""
        config = dataclasses.replace(self.config, encoder_weights=None)
        if not decoder_alone:
            whole = Captioner(config)
            whole.set_weights(self.get_weights())
            return whole
        alone = Captioner(config, feature_shape=(self.regions, self.feature_dim))
        alone.decoder.set_weights(self.decoder.get_weights())
        return alone

    def get_config(self):
        # A saved model holds its encoder's weights: loading it must not fetch or read the
        # weights it was first built from (ImageNet, a file that may be gone).
        config = {**dataclasses.asdict(self.config), "encoder_weights": None}
        shape = None if self.encoder is not None else [self.regions, self.feature_dim]
        return {**super().get_config(), "config": config, "feature_shape": shape}
