"""Batched sampling of captions, for self-critical sequence training (SCST).

The same machinery as `beam_search`: one `keras.ops.while_loop` over decoding steps over the
Captioner's step-wise API, the K samples of every image folded into the batch ([B*K, ...],
image b's samples at rows b*K .. b*K+K-1; the image's features and their projection held
once, as there), so it compiles the same way (`tf.function` + XLA, or `jax.jit`, through
`caption_pipeline.model.decoding.compile_function`) and runs under TensorFlow and JAX.

At step t, each running caption n draws its next word from the policy

    pi_t(w) = p_t(w) / Z_t  for w allowed, 0 otherwise,   Z_t = sum_{v allowed} p_t(v)

the model's distribution p_t = softmax(logits) with <pad>, <start> and (unless `allow_unk`)
<unk> excluded, as in the searches (`beam_search.banned_tokens`), and renormalised. That is
what SCST differentiates too (`self_critical.policy_log_probs`): REINFORCE's gradient is
unbiased only for the distribution the tokens were drawn from. Under the full softmax instead,
grad log p = grad log pi + grad log Z, and E[(r - b) grad log Z] is a bias that grows with the
mass of the excluded tokens (<unk> takes a few percent of it on COCO). The draw is by inverse
transform sampling:

    w_t = min { w : sum_{v <= w} pi_t(v) >= u_nt },   u_nt ~ U(0, 1)

The uniforms u [B, K, L] are an input, drawn by the caller (e.g. numpy's generator seeded with
the training step): the compiled function stays pure, a seed is an ordinary tensor and not a
retrace, and a resumed run draws exactly the samples an uninterrupted one would. (Keras'
stateful `SeedGenerator` would have to be updated inside the loop, which `jax.jit` cannot do.)
Scaling u by the total keeps float32 rounding of the cumulative sum from ever choosing a word
of probability 0.

A sample that has emitted <end> is finished: its later tokens are <pad>, contribute log pi = 0
and no entropy. `log_probs` is the sum of log pi_t(w_t) over the generated tokens, <end>
included: what `self_critical.sequence_log_probs` gives for the teacher-forced logits of the
same captions (test_sampling checks it), and `entropy` is the mean entropy
-sum_w pi_t(w) log pi_t(w) of the distributions the running tokens were drawn from: it shows
whether SCST collapses the policy.
"""

from __future__ import annotations

from typing import NamedTuple

from keras import ops

from caption_pipeline.model.beam_search import (
    END_ID,
    _allowed_log_probs,
    _initial_loop,
    _running,
    _step,
    _write,
)


class Samples(NamedTuple):
    """K sampled captions per image."""

    ids: object  # [B, K, L] int32: words, then <end> if reached, then <pad>
    lengths: object  # [B, K] int32: generated tokens, <end> included
    log_probs: object  # [B, K] float32: sum of log p of those tokens
    finished: object  # [B, K] bool: emitted <end> (else stopped at L = max_length)
    entropy: object  # [] float32: mean entropy (nats) of the distributions sampled from


def sample_captions(model, features, uniforms, allow_unk: bool = False) -> Samples:
    """K captions per image drawn from the model.

    model: a Captioner (or anything with `init_state` / `step`, whose step takes K captions per
    image as [B, K, ...], see `beam_search.beam_search`); features [B, R, D];
    uniforms [B, K, L] in (0, 1): K samples per image, L = max_length decoding steps;
    allow_unk: let <unk> be drawn (by default it never is: SCST would otherwise reward a
    caption for an <unk> that happens to match a reference's rare word).
    """
    k, max_length = uniforms.shape[1], uniforms.shape[2]
    state = model.init_state(features)  # per image; h and c are per sample in the loop
    uniforms = ops.reshape(ops.cast(uniforms, "float32"), (-1, max_length))  # [B*K, L]
    t0, words, h, c, ids, attention, log_probs, lengths, finished = _initial_loop(
        state, k, max_length, initial_log_probs=0.0
    )
    zero = ops.zeros((), "float32")
    loop = (t0, words, h, c, ids, attention, log_probs, lengths, finished, zero, zero)

    def body(t, words, h, c, ids, attention, log_probs, lengths, finished, entropy, tokens):
        logits, alpha_t, h, c = _step(model, state, k, words, h, c)
        logp = _allowed_log_probs(logits, finished, allow_unk)  # [N, V], -inf where banned
        logp = logp - ops.logsumexp(logp, axis=-1, keepdims=True)  # log pi: renormalised
        p = ops.exp(logp)
        cumulative = ops.cumsum(p, axis=-1)
        u = ops.take(uniforms, t, axis=1) * cumulative[:, -1]  # [N]
        words = ops.cast(ops.sum(ops.cast(cumulative < u[:, None], "int32"), axis=-1), "int32")
        words = ops.minimum(words, logp.shape[-1] - 1)
        log_probs = log_probs + ops.take_along_axis(logp, words[:, None], axis=1)[:, 0]
        running = ops.cast(ops.logical_not(finished), "float32")
        step_entropy = -ops.sum(ops.where(p > 0, p * logp, 0.0), axis=-1)  # [N]
        entropy = entropy + ops.sum(step_entropy * running)
        tokens = tokens + ops.sum(running)
        lengths = ops.where(finished, lengths, t + 1)
        ids, attention = _write(t, ids, attention, words, alpha_t, finished)
        finished = ops.logical_or(finished, ops.equal(words, END_ID))
        return (t + 1, words, h, c, ids, attention, log_probs, lengths, finished, entropy, tokens)

    base = _running(max_length)
    out = ops.while_loop(lambda *v: base(*v[:9]), body, loop)
    _, _, _, _, ids, _, log_probs, lengths, finished, entropy, tokens = out

    def per_image(x):
        return ops.reshape(x, (-1, k, *x.shape[1:]))

    return Samples(
        per_image(ids),
        per_image(lengths),
        per_image(log_probs),
        per_image(finished),
        entropy / ops.maximum(tokens, 1.0),
    )
