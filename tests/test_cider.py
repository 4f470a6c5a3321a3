"""The in-process CIDEr-D against pycocoevalcap's scorer, with the same document frequencies."""

from __future__ import annotations

import numpy as np
import pytest
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.cider.cider_scorer import CiderScorer

from caption_pipeline.training.cider import CiderD

WORDS = (
    "a an the red blue green small large circle square star triangle left of right above".split()
)


def corpus(images: int, seed: int) -> tuple[dict[int, list[list[str]]], dict[int, list[str]]]:
    """References (5 per image) and one candidate per image: repeated words (clipping), short
    and long candidates (the length penalty), copies of a reference and an empty one."""
    rng = np.random.default_rng(seed)

    def sentence(low=3, high=12):
        return [str(w) for w in rng.choice(WORDS[:12], rng.integers(low, high))]

    refs = {i: [sentence() for _ in range(5)] for i in range(images)}
    candidates = {i: sentence(1, 16) for i in range(images)}
    candidates[0] = ["red"] * 6 + ["circle"] * 3
    candidates[1] = list(refs[1][2])
    candidates[2] = []
    candidates[3] = ["square"]
    return refs, candidates


def as_strings(tokens):
    return " ".join(tokens)


def test_equals_pycocoevalcap_when_scoring_its_own_reference_set():
    refs, candidates = corpus(30, 0)
    gts = {i: [as_strings(r) for r in rs] for i, rs in refs.items()}
    res = {i: [as_strings(c)] for i, c in candidates.items()}
    expected_mean, expected = Cider().compute_score(gts, res)
    ids = sorted(refs)
    ours = CiderD(refs).score([candidates[i] for i in ids], [refs[i] for i in ids])
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-6)
    assert abs(ours.mean() - expected_mean) < 1e-6


def test_equals_pycocoevalcap_with_document_frequencies_of_another_corpus():
    """SCST's case: df from the train references, candidates scored against other images'."""
    train, _ = corpus(40, 1)
    scored_refs, candidates = corpus(12, 2)
    scorer = CiderScorer(n=4, sigma=6.0)
    for rs in train.values():  # df and |D| of the train corpus, pycocoevalcap's own code
        scorer.cook_append(None, [as_strings(r) for r in rs])
    scorer.compute_doc_freq()
    document_frequency = scorer.document_frequency
    scorer = CiderScorer(n=4, sigma=6.0)
    for i in sorted(scored_refs):
        scorer.cook_append(as_strings(candidates[i]), [as_strings(r) for r in scored_refs[i]])
    scorer.document_frequency = document_frequency
    # compute_cider takes log |D| from len(crefs): pad with copies of the first pair to the
    # train corpus' size (each pair's score depends only on itself and df), keep the first 12
    pad = len(train) - len(scorer.crefs)
    scorer.crefs = list(scorer.crefs) + [scorer.crefs[0]] * pad
    scorer.ctest = list(scorer.ctest) + [scorer.ctest[0]] * pad
    expected = scorer.compute_cider()[: len(scored_refs)]
    ids = sorted(scored_refs)
    ours = CiderD(train).score([candidates[i] for i in ids], [scored_refs[i] for i in ids])
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-6)


def test_copies_score_higher_than_random_and_empty_scores_zero():
    refs, candidates = corpus(30, 3)
    scorer = CiderD(refs)
    copy, empty = scorer.score([refs[5][0], []], [refs[5], refs[5]])
    random = scorer.score([candidates[6]], [refs[5]])[0]
    assert copy > random >= 0 and empty == 0.0
    again = scorer.score([refs[5][0]], [refs[5]])[0]
    assert again == copy  # deterministic, and the cached reference vectors change nothing


def test_bad_calls_name_the_problem():
    with pytest.raises(ValueError, match="non-empty"):
        CiderD({})
    scorer = CiderD({0: [["a", "b"]]})
    with pytest.raises(ValueError, match="reference lists"):
        scorer.score([["a"]], [])
    with pytest.raises(ValueError, match="no reference"):
        scorer.score([["a"]], [[]])
