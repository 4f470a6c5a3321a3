"""CIDEr-D in process, with document frequencies fixed once: the reward of SCST.

The definition is pycocoevalcap's `CiderScorer` (Vedantam et al. 2015, the "-D" variant that
the COCO server reports), term for term:

    g_n(s)   = tf(ngram, s) * (log |D| - log max(1, df(ngram)))   for the n-grams of s, n = 1..4
    sim_n    = sum_ngram min(g_n(c), g_n(r)) * g_n(r) / (|g_n(c)| |g_n(r)|)   (clipped counts)
               * exp(-(l_c - l_r)^2 / (2 sigma^2)),   sigma = 6
    CIDEr-D  = 10 / (4 |R|) * sum_{r in R} sum_n sim_n(c, r)

with df the number of images whose references contain the n-gram and |D| the number of
images. As in pycocoevalcap, the length l of a sentence is its count of bigrams (its `n == 1`
term), and a norm of 0 leaves the dot product undivided.

What differs from pycocoevalcap's scorer is only where df comes from: it counts over the set it
is scoring, which in SCST would make a batch's rewards depend on the batch. Here df comes from
a reference corpus given once (the train split's references), and each corpus image's
reference vectors are computed once too, so a training step only builds the candidates'
vectors: `CiderD.score` then costs a few sparse dot products per (candidate, reference) pair.
test_cider checks it against pycocoevalcap to 1e-6 with the same document frequencies.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence

import numpy as np

Tokens = Sequence[str]


def ngram_counts(tokens: Tokens, n: int = 4) -> Counter:
    """Counts of every 1..n-gram of `tokens` (tuples), as pycocoevalcap's `precook`."""
    counts: Counter = Counter()
    for k in range(1, n + 1):
        for i in range(len(tokens) - k + 1):
            counts[tuple(tokens[i : i + k])] += 1
    return counts


class _Vector:
    """The tf-idf vector of one sentence: per order n a dict ngram -> g, its norms, its length."""

    __slots__ = ("grams", "norms", "length")

    def __init__(self, counts: Counter, idf, ref_len: float, n: int):
        self.grams: list[dict[tuple, float]] = [{} for _ in range(n)]
        norms = [0.0] * n
        self.length = 0
        for gram, tf in counts.items():
            order = len(gram) - 1
            g = float(tf) * (ref_len - idf(gram))
            self.grams[order][gram] = g
            norms[order] += g * g
            if order == 1:
                self.length += tf
        self.norms = [math.sqrt(x) for x in norms]


class CiderD:
    """CIDEr-D with the document frequencies of `references` (image key -> token lists)."""

    def __init__(
        self, references: Mapping[Hashable, Sequence[Tokens]], n: int = 4, sigma: float = 6.0
    ):
        if not references:
            raise ValueError(
                "CiderD needs a non-empty reference corpus for its document frequencies"
            )
        self.n, self.sigma = n, sigma
        self.document_frequency: Counter = Counter()
        for refs in references.values():
            self.document_frequency.update({gram for ref in refs for gram in ngram_counts(ref, n)})
        self.ref_len = math.log(float(len(references)))
        self._log_df = {
            gram: math.log(max(1.0, df)) for gram, df in self.document_frequency.items()
        }
        self._cache: dict[tuple[tuple[str, ...], ...], list[_Vector]] = {}

    def _idf(self, gram: tuple) -> float:
        return self._log_df.get(gram, 0.0)  # log max(1, 0) = 0 for an unseen n-gram

    def vector(self, tokens: Tokens) -> _Vector:
        return _Vector(ngram_counts(tokens, self.n), self._idf, self.ref_len, self.n)

    def _reference_vectors(self, refs: Sequence[Tokens]) -> list[_Vector]:
        key = tuple(tuple(r) for r in refs)
        vectors = self._cache.get(key)
        if vectors is None:
            vectors = self._cache[key] = [self.vector(r) for r in refs]
        return vectors

    def _similarity(self, hyp: _Vector, ref: _Vector) -> float:
        delta = float(hyp.length - ref.length)
        penalty = math.exp(-(delta * delta) / (2 * self.sigma**2))
        total = 0.0
        for order in range(self.n):
            ref_grams = ref.grams[order]
            val = 0.0
            for gram, g in hyp.grams[order].items():
                r = ref_grams.get(gram)
                if r is not None:
                    val += min(g, r) * r
            if hyp.norms[order] != 0 and ref.norms[order] != 0:
                val /= hyp.norms[order] * ref.norms[order]
            total += val * penalty
        return total

    def score(
        self, candidates: Sequence[Tokens], references: Sequence[Sequence[Tokens]]
    ) -> np.ndarray:
        """CIDEr-D of each candidate against its own references: [N] float64."""
        if len(candidates) != len(references):
            raise ValueError(f"{len(candidates)} candidates but {len(references)} reference lists")
        scores = np.zeros(len(candidates))
        for i, (candidate, refs) in enumerate(zip(candidates, references, strict=True)):
            if not refs:
                raise ValueError(f"candidate {i} has no reference")
            hyp = self.vector(candidate)
            total = sum(self._similarity(hyp, ref) for ref in self._reference_vectors(refs))
            scores[i] = total / self.n / len(refs) * 10.0
        return scores
