"""Self-critical sequence training (Rennie et al. 2017): the policy-gradient loss.

For a caption w^s = (w_1 .. w_T) sampled from the model for image I, with reward r(w^s) (its
CIDEr-D against I's references) and a baseline b that does not depend on w^s, REINFORCE gives

    grad L = -(r(w^s) - b) * grad sum_t log p(w_t | w_<t, I)

so the loss of N sampled captions is

    L = -(1/N) sum_n (r_n - b_n) * sum_t m_nt log p(w_nt | w_n,<t, I_n)

with m the mask of real tokens (<end> included, <pad> excluded). Rennie's baseline is the
reward of the greedy caption of the same image; Luo (2020) uses the mean reward of the image's
other K - 1 samples. Both are computed outside the gradient (caption_pipeline.training.scst):
here they arrive as the advantage r - b per caption.

`SelfCriticalTrainer` wraps a Captioner so that Keras' own `train_step` (TensorFlow or JAX,
with the optimizer's clipping and loss scaling) trains it with this loss: its inputs are the
Captioner's ({"features": [B, R, D]} or {"image": [B, S, S, 3]}), its targets
{"captions": [B, K, T+1] (<start> w_1 .. <end> <pad>..), "advantage": [B, K]} and, optionally,
"weight": [B, K], each caption's weight in the global batch's mean, 1 / (B_global K). Under
tf.distribute each replica gets a share of the global batch and Keras sums the replicas'
gradients, so a replica's loss must be its share of the global mean, the sum of its captions'
terms over B_global K (exact also when the shares differ in size); the logged `policy_loss` is
multiplied back by the replicas, and Keras averages it over them: the global batch's loss.
Without "weight" the loss is the mean over the batch given. The log-probabilities are those
of the policy the captions were sampled from (`model.sampling`), exactly:

* the teacher-forced decoder runs WITHOUT dropout, as the sampler's step-wise API does; with
  dropout in one and not the other the gradient would be of another policy;
* p(w_t | ..) is pi_t, the softmax over the allowed tokens only (`policy_log_probs`: <pad>,
  <start> and, unless `allow_unk`, <unk> masked before the softmax), not the full softmax: the
  sampler never draws the excluded tokens, and differentiating log p = log pi + log Z would add
  E[(r - b) grad log Z] to the gradient, a bias as large as the excluded mass
  (tests/test_sampling.py measures it on a toy policy).
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from caption_pipeline.model.beam_search import banned_tokens
from caption_pipeline.model.captioner import PAD_ID, replicas_in_sync

MASKED = -1e9  # a banned token's logit: exp() is 0 in float32, and 0 * MASKED is 0, not NaN


def policy_log_probs(logits, allow_unk: bool = False):
    """logits [..., V] -> log pi [..., V] float32: the log-softmax over the tokens the sampler
    may draw (`beam_search.banned_tokens` masked), the policy SCST samples from."""
    logits = ops.cast(logits, "float32")
    banned = ops.reshape(banned_tokens(logits.shape[-1], allow_unk), (logits.shape[-1],))
    return ops.log_softmax(ops.where(banned, MASKED, logits), axis=-1)


def sequence_log_probs(logits, targets, allow_unk: bool = False):
    """logits [N, T, V], targets [N, T] (pad = 0) -> sum_t m_t log pi(target_t) [N] float32."""
    logp = policy_log_probs(logits, allow_unk)
    token = ops.take_along_axis(logp, ops.cast(targets, "int32")[..., None], axis=-1)[..., 0]
    return ops.sum(ops.where(ops.not_equal(targets, PAD_ID), token, 0.0), axis=-1)


def self_critical_loss(logits, targets, advantage, allow_unk: bool = False, weight=None):
    """The SCST loss: -mean_n advantage_n * sum_t m_nt log pi(w_nt); advantage [N]. With
    `weight` [N] the weighted sum instead of the mean (weight_n = 1 / N_global: the share of a
    global batch's mean)."""
    advantage = ops.stop_gradient(ops.cast(advantage, "float32"))
    terms = advantage * sequence_log_probs(logits, targets, allow_unk)
    if weight is None:
        return -ops.mean(terms)
    return -ops.sum(ops.cast(weight, "float32") * terms)


def advantages(
    rewards: np.ndarray, baseline: str, greedy_rewards: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """rewards [B, K] -> (baseline [B, K], advantage r - b [B, K])."""
    if baseline == "greedy":
        base = np.repeat(greedy_rewards[:, None], rewards.shape[1], axis=1)
    else:  # the mean of the image's other samples
        k = rewards.shape[1]
        base = (rewards.sum(axis=1, keepdims=True) - rewards) / (k - 1)
    return base, rewards - base


class SelfCriticalTrainer(keras.Model):
    """Trains `captioner`'s variables with the SCST loss through `fit` / `train_on_batch`."""

    def __init__(self, captioner, allow_unk: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.captioner = captioner
        self.allow_unk = allow_unk  # as the sampler was told: the same policy
        self.policy_loss_tracker = keras.metrics.Mean(name="policy_loss")
        self.built = True  # its only variables are the (built) captioner's

    def call(self, inputs, training=False):
        return self.captioner(inputs, training=training)  # region features [B, R, D]

    def train_step(self, *args, **kwargs):
        """Keras' step; under tf.distribute its logs are [1], not []: Keras 3.15 averages the
        replicas' logs of `train_on_batch` under MultiWorkerMirroredStrategy with
        `strategy.reduce("MEAN", value, axis=0)`, which a scalar fails ("Invalid reduction
        dimension 0 for input with 0 dimensions")."""
        logs = super().train_step(*args, **kwargs)
        if replicas_in_sync() == 1:
            return logs
        return {name: ops.reshape(value, (1,)) for name, value in logs.items()}

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        captions = ops.cast(y["captions"], "int32")  # [B, K, T+1]
        samples, length = captions.shape[1], captions.shape[2]
        features = ops.repeat(y_pred, samples, axis=0)  # image b's features for its K samples
        captions = ops.reshape(captions, (-1, length))
        logits, _ = self.captioner.teacher_forced(features, captions, training=False)
        advantage = ops.reshape(y["advantage"], (-1,))
        weight = ops.reshape(y["weight"], (-1,)) if "weight" in y else None
        loss = self_critical_loss(logits, captions[:, 1:], advantage, self.allow_unk, weight)
        replicas = replicas_in_sync()
        self.policy_loss_tracker.update_state(loss * replicas if replicas > 1 else loss)
        return loss
