"""Batched greedy decoding and beam search over the Captioner's step-wise API.

Both are one `keras.ops.while_loop` over decoding steps, with the beams of every image folded
into the batch dimension ([B*K, ...], image b's beams at rows b*K .. b*K+K-1): the whole batch
moves one word per iteration, and the loop stops as soon as every beam has emitted <end>, or
after `max_length` steps. Only `keras.ops`, so the same code runs under TensorFlow and JAX.
What is per beam is only what differs between beams: words, h, c and the captions so far. The
image's features [B, R, D] and their attention projection W_a a [B, R, A] are computed once and
held once; each step hands the model the K beams of an image together ([B, K, ...], see
`decoder.py`), so no step copies or re-reads the features per beam.
The functions here are not compiled: the caller compiles them (`caption_pipeline.model.decoding`
wraps them in `tf.function` or `jax.jit`); run eagerly they work too, one Python pass a step.

Conventions:

* `max_length` counts decoding steps, <end> included: a caption of N words needs N + 1.
* <pad> and <start> are never chosen for a caption that is still running, nor is <unk>
  unless `allow_unk=True` (issue 12): it stands for every rare word at once, so a caption
  with it is not one a reader can use, and the scorers would count it as a word. Banned
  tokens get log p = -inf after the softmax, the same as masking their logits for the choice;
  the remaining words keep the model's own log-probabilities, so scores stay comparable with
  teacher forcing (`Captioner.teacher_forced`). A beam that has emitted <end> is finished:
  its score is frozen, its later tokens are <pad> and its later attention rows are zero.
* `lengths` counts the tokens a beam generated, its <end> included (`max_length` when it never
  ended); `log_probs` is the sum of the log-probabilities of exactly those tokens.
* Length normalization is GNMT's (Wu et al. 2016, eq. 14): score = log_prob / lp with
  lp = ((5 + length) / 6) ** alpha; alpha = 0 ranks by the plain sum. Beams are ranked by this
  score at every step (a running beam with its current length), so a finished beam competes
  with the running ones on the same footing, and with K = 1 beam search is greedy decoding.
* A beam size larger than the number of possible captions leaves beams that never lived:
  their log_probs and scores are -inf.
"""

from __future__ import annotations

from typing import NamedTuple

from keras import ops

from caption_pipeline.data.text import Vocabulary
from caption_pipeline.errors import DataError

PAD_ID, START_ID, END_ID = Vocabulary.pad_id, Vocabulary.start_id, Vocabulary.end_id
UNK_ID = Vocabulary.unk_id
NEG_INF = float("-inf")


class Captions(NamedTuple):
    """Decoded captions of B images, K per image, best first."""

    ids: object  # [B, K, L] int32: words, then <end> if reached, then <pad>
    lengths: object  # [B, K] int32: generated tokens, <end> included
    log_probs: object  # [B, K] float32: sum of the log-probabilities of those tokens
    scores: object  # [B, K] float32: log_probs / lp(lengths), what the beams are ranked by
    finished: object  # [B, K] bool: emitted <end> (else stopped at max_length)
    attention: object  # [B, K, L, R] float32: alpha of every generated token; 0 after <end>


def length_penalty(lengths, alpha: float):
    """GNMT's lp = ((5 + length) / 6) ** alpha, float32 with the shape of `lengths`."""
    return ops.power((5.0 + ops.cast(lengths, "float32")) / 6.0, alpha)


def greedy_search(
    model, features, max_length: int, alpha: float = 0.0, allow_unk: bool = False
) -> Captions:
    """The most likely next word at every step: `Captions` with K = 1.

    model: a Captioner (or anything with `init_state` / `step`); features [B, R, D];
    allow_unk: let <unk> be generated (by default it never is).
    """
    check_search_params(1, max_length, alpha)
    state = model.init_state(features)
    loop = _initial_loop(state, 1, max_length, initial_log_probs=0.0)

    def body(t, words, h, c, ids, attention, log_probs, lengths, finished):
        logits, alpha_t, h_next, c_next = _step(model, state, 1, words, h, c)
        logp = _allowed_log_probs(logits, finished, allow_unk)  # [B, V]
        words = ops.cast(ops.argmax(logp, axis=-1), "int32")  # [B]
        log_probs = log_probs + ops.take_along_axis(logp, words[:, None], axis=1)[:, 0]
        lengths = ops.where(finished, lengths, t + 1)
        ids, attention = _write(t, ids, attention, words, alpha_t, finished)
        finished = ops.logical_or(finished, ops.equal(words, END_ID))
        return t + 1, words, h_next, c_next, ids, attention, log_probs, lengths, finished

    return _captions(ops.while_loop(_running(max_length), body, loop), 1, alpha)


def beam_search(
    model, features, beam_size: int, max_length: int, alpha: float = 0.0, allow_unk: bool = False
) -> Captions:
    """The `beam_size` best-scoring captions per image (`Captions` with K = beam_size).

    model: a Captioner (or anything with `init_state` / `step`, whose step takes the K beams of
    each image as words [B, K] and h, c [B, K, n], as `AttentionDecoder.step` does);
    features [B, R, D]; allow_unk: let <unk> be generated (by default it never is).
    """
    check_search_params(beam_size, max_length, alpha)
    k = beam_size
    batch = ops.shape(features)[0]
    # Each image's state, projection included, is computed once; only h and c are copied to its
    # K beams. features and projected never change and are shared by the beams of an image, so
    # they are never copied or reordered.
    state = model.init_state(features)
    # Only beam 0 of each image is alive at first: the K copies are the same caption.
    first = ops.tile(ops.array([0.0] + [NEG_INF] * (k - 1), "float32"), [batch])
    loop = _initial_loop(state, k, max_length, initial_log_probs=first)
    offsets = ops.repeat(ops.arange(batch, dtype="int32") * k, k)  # [B*K]: first row of the image

    def body(t, words, h, c, ids, attention, log_probs, lengths, finished):
        logits, alpha_t, h_next, c_next = _step(model, state, k, words, h, c)
        vocab = logits.shape[-1]
        # Every (beam, word) candidate: its sum, length and score; [B*K, V].
        candidate_logp = log_probs[:, None] + _allowed_log_probs(logits, finished, allow_unk)
        candidate_length = ops.where(finished, lengths, t + 1)
        score = candidate_logp / length_penalty(candidate_length, alpha)[:, None]
        # The K best of each image's K*V candidates; top_k sorts them best first.
        _, best = ops.top_k(ops.reshape(score, (-1, k * vocab)), k)  # [B, K]
        best = ops.reshape(best, (-1,))  # [B*K]
        parents = offsets + best // vocab  # rows of the beams that are extended
        words = ops.cast(best % vocab, "int32")
        log_probs = ops.take(ops.reshape(candidate_logp, (-1,)), parents * vocab + words)
        lengths = ops.take(candidate_length, parents, axis=0)
        was_finished = ops.take(finished, parents, axis=0)
        ids, attention = _write(
            t,
            ops.take(ids, parents, axis=0),
            ops.take(attention, parents, axis=0),
            words,
            ops.take(alpha_t, parents, axis=0),
            was_finished,
        )
        finished = ops.logical_or(was_finished, ops.equal(words, END_ID))
        h, c = ops.take(h_next, parents, axis=0), ops.take(c_next, parents, axis=0)
        return t + 1, words, h, c, ids, attention, log_probs, lengths, finished

    return _captions(ops.while_loop(_running(max_length), body, loop), k, alpha)


def check_search_params(beam_size: int, max_length: int, alpha: float) -> None:
    """DataError naming the parameter when a search setting is out of range."""
    for name, value in (("beam_size", beam_size), ("max_length", max_length)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise DataError(f"decoding.{name} must be an integer >= 1, got {value!r}")
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or not alpha >= 0:
        raise DataError(f"decoding.alpha must be a number >= 0, got {alpha!r}")


# --- shared by both ---------------------------------------------------------------------------


def _initial_loop(state, k: int, max_length: int, initial_log_probs):
    """The loop variables before the first step, for k captions per image of `state` (the
    model's `init_state` of B images), N = B*k rows, image b's at b*k .. b*k+k-1:
    (t, words, h, c, ids, attention, log_probs, lengths, finished)."""
    h, c = state.h, state.c
    if k > 1:  # only h and c are per caption; features and projected stay per image
        h, c = ops.repeat(h, k, axis=0), ops.repeat(c, k, axis=0)  # [N, n]
    rows, regions = ops.shape(h)[0], state.features.shape[1]
    return (
        ops.convert_to_tensor(0, "int32"),
        ops.full((rows,), START_ID, "int32"),
        h,
        c,
        ops.full((rows, max_length), PAD_ID, "int32"),
        ops.zeros((rows, max_length, regions), "float32"),
        ops.zeros((rows,), "float32") + initial_log_probs,
        ops.zeros((rows,), "int32"),
        ops.zeros((rows,), "bool"),
    )


def _step(model, state, k: int, words, h, c):
    """One decoding step of the N = B*k rows, k per image of `state`: words [N], h, c [N, n] ->
    logits [N, V], alpha [N, R], the next h, c [N, n].

    With k > 1 the rows go to the model as [B, k, ...], so that the attention reads each image's
    features and projection once for its k captions instead of from k copies (reshapes only,
    no copy). With k = 1 the model sees [B, ...] rows as it does in training: greedy search and
    beam search with K = 1 run the very same step.
    """
    if k == 1:
        logits, alpha, new = model.step(words, state._replace(h=h, c=c))
        return logits, alpha, new.h, new.c

    def per_image(x):  # [N, ...] -> [B, k, ...]
        return ops.reshape(x, (-1, k, *x.shape[1:]))

    def rows(x):  # [B, k, ...] -> [N, ...]
        return ops.reshape(x, (-1, *x.shape[2:]))

    logits, alpha, new = model.step(
        per_image(words), state._replace(h=per_image(h), c=per_image(c))
    )
    return rows(logits), rows(alpha), rows(new.h), rows(new.c)


def _running(max_length: int):
    """The loop condition: steps left and a beam still running (so early ends stop early)."""

    def cond(t, words, h, c, ids, attention, log_probs, lengths, finished):
        # A beam at -inf was never alive (K larger than the number of possible captions).
        running = ops.logical_not(ops.logical_or(finished, ops.equal(log_probs, NEG_INF)))
        return ops.logical_and(t < max_length, ops.any(running))

    return cond


def _allowed_log_probs(logits, finished, allow_unk: bool = False):
    """logits [N, V], finished [N] -> log p [N, V], -inf where a word may not come next.

    A running caption may not continue with <pad> or <start>, nor with <unk> unless
    `allow_unk`; a finished one continues with <pad> only, at log p = 0, so that its sum stays
    as it was.
    """
    logp = ops.log_softmax(ops.cast(logits, "float32"), axis=-1)
    running = ops.where(banned_tokens(logp.shape[-1], allow_unk), NEG_INF, logp)
    done = ops.where(ops.equal(ops.arange(logp.shape[-1]), PAD_ID), 0.0, NEG_INF)[None, :]
    return ops.where(finished[:, None], done, running)


def banned_tokens(vocab_size: int, allow_unk: bool = False):
    """[1, V] bool: the tokens a running caption may not continue with: <pad>, <start>, and
    <unk> unless `allow_unk`."""
    token = ops.arange(vocab_size)[None, :]
    banned = ops.logical_or(ops.equal(token, PAD_ID), ops.equal(token, START_ID))
    if not allow_unk:
        banned = ops.logical_or(banned, ops.equal(token, UNK_ID))
    return banned


def _write(t, ids, attention, words, alpha, finished):
    """Put step t's words [N] and attention [N, R] in column t of ids [N, L] and attention
    [N, L, R]; a beam finished before step t gets a zero attention row.

    A select on a one-hot column rather than a dynamic slice update: the same code works in
    TensorFlow graphs with and without XLA, and in JAX.
    """
    column = ops.equal(ops.arange(ids.shape[1]), t)  # [L]
    ids = ops.where(column[None, :], words[:, None], ids)
    alpha = ops.where(finished[:, None], 0.0, ops.cast(alpha, "float32"))
    attention = ops.where(column[None, :, None], alpha[:, None, :], attention)
    return ids, attention


def _captions(out, k: int, alpha: float) -> Captions:
    """The loop's final variables -> `Captions` with [B, K, ...] shapes."""
    _, _, _, _, ids, attention, log_probs, lengths, finished = out

    def per_image(x):
        return ops.reshape(x, (-1, k, *x.shape[1:]))

    scores = log_probs / length_penalty(lengths, alpha)
    return Captions(
        per_image(ids),
        per_image(lengths),
        per_image(log_probs),
        per_image(scores),
        per_image(finished),
        per_image(attention),
    )
