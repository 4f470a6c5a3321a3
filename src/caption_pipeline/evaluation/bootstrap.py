"""The paired bootstrap interval of a mean difference: how much of a gain measured on the same
items (the val images, scored by two models against the same references) is more than noise;
and, as its special case against zero, the interval of one model's mean score. Pure numpy; the
champion gate (`mlflow_model.promote`) decides on the first and records the second."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# Resampled indices drawn at once (int64: 8 MB): the draws are made in blocks of this many, so
# that memory does not grow with images x samples; the blocks depend on n only, so the same
# seed gives the same interval.
_BLOCK_DRAWS = 1_000_000


@dataclass(frozen=True)
class Interval:
    """The mean paired difference `mean` over `n` items and its bootstrap interval
    [`low`, `high`] at `confidence` (two-sided), from `samples` resamples."""

    mean: float
    low: float
    high: float
    confidence: float
    n: int
    samples: int


def paired_interval(
    candidate: Sequence[float] | np.ndarray,
    baseline: Sequence[float] | np.ndarray,
    confidence: float,
    samples: int,
    seed: int,
) -> Interval:
    """The two-sided percentile bootstrap interval, at `confidence`, of the mean paired
    difference over n items scored by both (`candidate[i]` and `baseline[i]` of item i):

        d_i = candidate_i - baseline_i,   d̄ = (1/n) Σ_i d_i
        d̄*_b = (1/n) Σ_j d_{I_bj},   I_bj ~ Uniform{1..n} i.i.d.,   b = 1..samples
        interval = [q_{α/2}(d̄*), q_{1-α/2}(d̄*)],   α = 1 - confidence

    Items are resampled as pairs: what both scores of an item share (an image any model
    captions well) cancels in d_i, so only how the difference varies from item to item widens
    the interval. The draws come from a numpy Generator seeded with `seed`, so the same scores
    give the same interval (and the same promotion decision) on any run.
    """
    ours, theirs = np.asarray(candidate, np.float64), np.asarray(baseline, np.float64)
    if ours.ndim != 1 or ours.shape != theirs.shape or ours.size == 0:
        raise ValueError(
            f"paired_interval: expected two non-empty 1-D series of one length, got shapes "
            f"{ours.shape} and {theirs.shape}"
        )
    diff, n = ours - theirs, ours.size
    if not 0 < confidence < 1 or samples < 1:
        raise ValueError(f"paired_interval: confidence {confidence} in (0, 1), samples {samples}")
    rng = np.random.default_rng(seed)
    block = max(1, _BLOCK_DRAWS // n)
    means = np.concatenate(
        [
            diff[rng.integers(0, n, size=(min(block, samples - start), n))].mean(axis=1)
            for start in range(0, samples, block)
        ]
    )
    alpha = 1.0 - confidence
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return Interval(float(diff.mean()), float(low), float(high), confidence, n, samples)


def mean_interval(
    scores: Sequence[float] | np.ndarray, confidence: float, samples: int, seed: int
) -> Interval:
    """The two-sided percentile bootstrap interval of the mean of `scores` (one per item):
    `paired_interval` against a baseline of zeros, so d_i = scores_i. How far a split's mean
    score (its CIDEr-D) could move on another draw of as many images of the same kind."""
    return paired_interval(scores, np.zeros(len(scores)), confidence, samples, seed)
