"""The paired bootstrap interval the champion gate decides on (`bootstrap.paired_interval`)."""

from __future__ import annotations

import numpy as np
import pytest

from caption_pipeline.evaluation.bootstrap import mean_interval, paired_interval


def _pairs(n: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    baseline = rng.gamma(2.0, 0.5, n)
    return baseline + 0.05 + rng.normal(0, 0.4, n), baseline


def test_the_interval_is_the_same_for_a_seed_and_holds_the_mean():
    candidate, baseline = _pairs(300)
    first = paired_interval(candidate, baseline, 0.95, 2000, seed=0)
    assert first == paired_interval(candidate, baseline, 0.95, 2000, seed=0)
    assert first != paired_interval(candidate, baseline, 0.95, 2000, seed=1)
    assert first.mean == pytest.approx(candidate.mean() - baseline.mean())
    assert first.low < first.mean < first.high
    assert (first.n, first.samples, first.confidence) == (300, 2000, 0.95)
    wider = paired_interval(candidate, baseline, 0.99, 2000, seed=0)
    assert wider.low < first.low and wider.high > first.high


def test_the_interval_shrinks_with_the_number_of_images():
    """About as 1/sqrt(n): 16 times the images, a quarter of the width."""
    widths = {}
    for n in (100, 1600):
        interval = paired_interval(*_pairs(n), 0.95, 2000, seed=0)
        widths[n] = interval.high - interval.low
    assert 0.15 < widths[1600] / widths[100] < 0.35, widths


def test_pairing_cancels_what_both_scores_share():
    """Scores that vary a lot from image to image but differ by a constant: a zero-width
    interval at that constant (unpaired, the spread of the scores would swamp it)."""
    baseline = np.random.default_rng(3).gamma(2.0, 1.0, 200)
    interval = paired_interval(baseline + 0.01, baseline, 0.95, 1000, seed=0)
    assert interval.low == pytest.approx(0.01) and interval.high == pytest.approx(0.01)
    same = paired_interval(baseline, baseline, 0.95, 1000, seed=0)
    assert same.low == same.high == same.mean == 0.0


def test_many_images_are_resampled_in_blocks(monkeypatch):
    """Resampled in blocks of bounded memory (the last one partial): the interval of one
    block."""
    import caption_pipeline.evaluation.bootstrap as bootstrap

    candidate, baseline = _pairs(500)
    whole = paired_interval(candidate, baseline, 0.95, 300, seed=4)
    monkeypatch.setattr(bootstrap, "_BLOCK_DRAWS", 500 * 7)  # blocks of 7 resamples
    blocks = paired_interval(candidate, baseline, 0.95, 300, seed=4)
    assert blocks.low == pytest.approx(whole.low, abs=0.02)


def test_unpaired_or_empty_series_are_refused():
    with pytest.raises(ValueError, match="one length"):
        paired_interval([1.0, 2.0], [1.0], 0.95, 10, seed=0)
    with pytest.raises(ValueError, match="one length"):
        paired_interval([], [], 0.95, 10, seed=0)
    with pytest.raises(ValueError, match="confidence"):
        paired_interval([1.0], [1.0], 1.0, 10, seed=0)


def test_the_interval_of_a_mean_holds_it_and_narrows_with_less_spread():
    """`mean_interval`: the interval of one series' mean (the version's own val score)."""
    rng = np.random.default_rng(3)
    wide, narrow = rng.gamma(2.0, 0.5, 200), rng.normal(1.0, 0.05, 200)
    a, b = (mean_interval(s, 0.95, 4000, seed=0) for s in (wide, narrow))
    assert a.low < wide.mean() < a.high and a.mean == pytest.approx(wide.mean())
    assert b.low < narrow.mean() < b.high and (b.high - b.low) < (a.high - a.low) / 5
    assert a == mean_interval(list(wide), 0.95, 4000, seed=0)
