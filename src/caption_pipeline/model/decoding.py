"""Captions for images: the compiled greedy / beam search, turned into text.

`make_decoder` compiles `caption_pipeline.model.beam_search` for the Keras backend in use
(TensorFlow: `tf.function`, with XLA by default; JAX: `jax.jit` over the model's variables), with
the encoder in the same compiled function when the inputs are images. `decode_dataset` runs it
over the batches of a tf.data dataset (or any iterable of batches) and returns, per image, the
K captions as text with their scores. TensorFlow is imported only under its backend, so this
module also serves a JAX-only machine.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
from tqdm.auto import tqdm

from caption_pipeline.data.text import Vocabulary
from caption_pipeline.errors import DataError
from caption_pipeline.model.beam_search import (
    Captions,
    beam_search,
    check_search_params,
    greedy_search,
)
from caption_pipeline.params import from_params

METHODS = ("greedy", "beam")


@dataclass(frozen=True)
class DecodeSettings:
    """How captions are searched; see `caption_pipeline.model.beam_search` for the details."""

    method: str  # greedy | beam
    beam_size: int  # captions kept per image (beam only; greedy keeps 1)
    # Decoding steps, <end> included; None: the vocabulary's max_caption_length + 1.
    max_length: int | None
    alpha: float  # GNMT length normalization, score = log p / ((5 + len) / 6) ** alpha
    jit_compile: bool  # TensorFlow backend: compile with XLA (JAX always does)
    # Let captions contain <unk>; off in conf/base: <unk> is no word for a reader, and the
    # scorers would count it as one (issue 12).
    allow_unk: bool
    # Not a parameter (the attention figures ask for it): return each caption's attention maps
    # [K, L, R].
    keep_attention: bool = False

    def __post_init__(self):
        if self.method not in METHODS:
            raise DataError(f"decoding.method must be one of {list(METHODS)}, got {self.method!r}")
        max_length = 1 if self.max_length is None else self.max_length
        check_search_params(self.beam_size, max_length, self.alpha)
        if not isinstance(self.allow_unk, bool):
            raise DataError(f"decoding.allow_unk must be true or false, got {self.allow_unk!r}")

    @classmethod
    def from_params(
        cls, params: Mapping[str, Any] | None, block: str = "evaluate.decoding"
    ) -> DecodeSettings:
        """From a parameters dict (`params.from_params`): unknown and missing keys are an error
        that names them."""
        return from_params(cls, params, block)

    def steps(self, vocabulary: Vocabulary) -> int:
        """Decoding steps: `max_length`, or room for the longest training caption and <end>."""
        return self.max_length or vocabulary.max_caption_length + 1


@dataclass(frozen=True)
class CaptionedImage:
    """One image's captions, best first."""

    image_id: int
    captions: list[str]
    log_probs: list[float]
    scores: list[float]  # what the captions are ranked by (length-normalized log_probs)
    lengths: list[int]  # generated tokens, <end> included
    finished: list[bool]  # False: cut at max_length without <end>
    attention: np.ndarray | None = None  # [K, L, R] when asked for

    @property
    def caption(self) -> str:
        return self.captions[0]


def search(model, features, settings: DecodeSettings, max_length: int) -> Captions:
    """The search `settings` asks for on features [B, R, D]; traced, to be compiled."""
    if settings.method == "greedy":
        return greedy_search(model, features, max_length, settings.alpha, settings.allow_unk)
    return beam_search(
        model, features, settings.beam_size, max_length, settings.alpha, settings.allow_unk
    )


def make_decoder(
    model: keras.Model, settings: DecodeSettings, max_length: int
) -> Callable[[Mapping[str, Any]], Captions]:
    """A compiled function: inputs {"features": [B, R, D]} or {"image": [B, S, S, 3]} ->
    `Captions` as numpy arrays. One compilation serves every batch size (TensorFlow) or one
    per batch size (JAX)."""

    def decode(inputs):
        features = model({key: inputs[key] for key in ("features", "image") if key in inputs})
        return search(model, features, settings, max_length)

    compiled = compile_function(decode, model, settings.jit_compile)

    def run(inputs):
        return Captions(*(keras.ops.convert_to_numpy(x) for x in compiled(inputs)))

    return run


def compile_function(fn: Callable, model: keras.Model, jit_compile: bool = True) -> Callable:
    """`fn(inputs)`, which calls `model`, compiled for the Keras backend in use."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        compiled = None

        def traced_once(inputs):
            # Traced on the first batch with the batch size left open: the last, smaller batch
            # of a dataset reuses the graph (XLA still compiles once per shape it meets).
            nonlocal compiled
            if compiled is None:
                signature = {
                    key: tf.TensorSpec((None, *x.shape[1:]), tf.as_dtype(x.dtype))
                    for key, x in inputs.items()
                }
                compiled = tf.function(fn, input_signature=[signature], jit_compile=jit_compile)
            return compiled(inputs)

        return traced_once
    if backend == "jax":
        import jax

        variables = model.variables

        # The variables' values are arguments, not constants baked into the program: the
        # compiled function follows the model's weights, e.g. after loading a checkpoint.
        @jax.jit
        def pure(values, inputs):
            with keras.StatelessScope(state_mapping=list(zip(variables, values, strict=True))):
                return fn(inputs)

        return lambda inputs: pure([v.value for v in variables], inputs)
    raise DataError(f"decoding needs KERAS_BACKEND=tensorflow or jax, this run uses {backend!r}")


def decode_dataset(
    model: keras.Model, vocabulary: Vocabulary, batches: Iterable, settings: DecodeSettings
) -> list[CaptionedImage]:
    """Captions for every image of `batches`: a tf.data dataset (or any iterable) of
    `({"image" | "features", "image_id"}, captions)` or of the inputs dict alone."""
    decoder = make_decoder(model, settings, settings.steps(vocabulary))
    if hasattr(batches, "as_numpy_iterator"):
        batches = batches.as_numpy_iterator()
    decoded = []
    with tqdm(desc="decode", unit="image") as bar:
        for batch in batches:
            inputs = _decoder_inputs(batch)
            image_ids = inputs.pop("image_id")
            decoded.extend(to_text(decoder(inputs), image_ids, vocabulary, settings.keep_attention))
            bar.update(len(image_ids))
    return decoded


def to_text(
    captions: Captions, image_ids, vocabulary: Vocabulary, keep_attention: bool = False
) -> list[CaptionedImage]:
    """Numpy `Captions` of B images -> B `CaptionedImage`s."""
    return [
        CaptionedImage(
            image_id=int(image_id),
            captions=[vocabulary.decode(ids) for ids in captions.ids[b]],
            log_probs=captions.log_probs[b].tolist(),
            scores=captions.scores[b].tolist(),
            lengths=captions.lengths[b].tolist(),
            finished=captions.finished[b].tolist(),
            attention=captions.attention[b] if keep_attention else None,
        )
        for b, image_id in enumerate(np.asarray(image_ids))
    ]


def _decoder_inputs(batch) -> dict[str, np.ndarray]:
    """A dataset element -> {"features" | "image", "image_id"} as numpy, or a DataError."""
    inputs = batch[0] if isinstance(batch, tuple | list) else batch
    if not isinstance(inputs, Mapping):
        raise DataError(
            f"decoding: a batch must be an inputs dict or (inputs, captions), "
            f"got {type(batch).__name__}"
        )
    keys = sorted(inputs)
    if "image_id" not in inputs or not {"image", "features"} & set(inputs):
        raise DataError(
            f"decoding: a batch needs 'image_id' and 'image' or 'features', got fields {keys}"
        )
    inputs = {
        key: np.asarray(inputs[key]) for key in ("image", "features", "image_id") if key in inputs
    }
    if "image" in inputs and not np.issubdtype(inputs["image"].dtype, np.number):
        raise DataError(
            "decoding: field 'image' holds encoded JPEG strings; "
            "read the shards with decode_images=True"
        )
    return inputs
