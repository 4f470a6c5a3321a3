"""The captions of the COCO-shaped dataset (`coco_like`): COCO 2017's captions per image and
words per caption, and words drawn from a fixed 30,000-word vocabulary with Zipf-Mandelbrot
frequencies whose exponent is solved so that `vocab.min_count: 5` at full scale keeps
`coco_like.TARGET_VOCABULARY` words, as COCO's train captions do (the original project's
10,204). `expected_vocabulary` is that count in closed form, `simulated_vocabulary` by drawing.
"""

from __future__ import annotations

import functools

import numpy as np

# Captions per image (COCO 2017: 5.003 on average).
CAPTION_COUNTS = {5: 0.9973, 6: 0.0024, 7: 0.0003}
# Words per caption -> weight: COCO's shape (annotators were asked for at least 8 words).
LENGTH_WEIGHTS = {
    6: 0.2, 7: 0.9, 8: 15.5, 9: 26.5, 10: 20.5, 11: 13.0, 12: 8.3, 13: 5.2, 14: 3.4, 15: 2.2,
    16: 1.5, 17: 1.0, 18: 0.72, 19: 0.52, 20: 0.38, 21: 0.28, 22: 0.21, 23: 0.16, 24: 0.12,
    25: 0.09, 26: 0.07, 27: 0.05, 28: 0.04, 29: 0.03, 30: 0.02,
}  # fmt: skip
CAPITALIZED_P = 0.9  # "A man ..." (the tokenizer lower-cases)
PERIOD_P = 0.6  # "... a table." (the tokenizer drops it)
VOCABULARY_SIZE = 30_000
ZIPF_OFFSET = 2.7  # Mandelbrot's q: flattens the head, so "a" is not a third of all words
ZIPF_EXPONENT = 1.5427  # solved for coco_like.TARGET_VOCABULARY at full scale (see coco_like)
# Ranks 1..100: words COCO's captions use most, roughly by frequency (an approximation).
HEAD_WORDS = (
    "a on of the in with and is man to sitting an two at standing people are next white woman "
    "street table holding large person down top some group up field small tennis near front his "
    "black plate room train dog riding red young by cat water pizza playing while her bathroom "
    "blue sign kitchen green food grass there bus side looking other out it parked several snow "
    "from three ball boy baseball bed beach toilet over road brown clock has men laying picture "
    "sits wooden through that for walking women computer city frisbee giraffe one around each "
    "player tree"
).split()
_CONSONANTS, _VOWELS = "bdfgklmnprstvz", "aeiou"
_WORDS_SEED = 20170901  # the vocabulary is fixed: the same for every --seed


def vocabulary_words() -> tuple[str, ...]:
    """The VOCABULARY_SIZE words by rank: HEAD_WORDS, then consonant-vowel tokens of 2
    syllables, then 3 (shorter words are the more frequent, as in English), in a fixed order."""
    syllables = [c + v for c in _CONSONANTS for v in _VOWELS]
    words, taken = list(HEAD_WORDS), set(HEAD_WORDS)
    rng = np.random.default_rng(_WORDS_SEED)
    for count in (2, 3):
        for code in rng.permutation(len(syllables) ** count):
            digits = np.unravel_index(code, (len(syllables),) * count)
            word = "".join(syllables[d] for d in digits)
            if word not in taken:
                words.append(word)
                taken.add(word)
            if len(words) == VOCABULARY_SIZE:
                return tuple(words)
    raise AssertionError("not enough syllable combinations for VOCABULARY_SIZE")


@functools.cache
def word_probabilities() -> np.ndarray:
    """[VOCABULARY_SIZE] p(rank) ~ (rank + ZIPF_OFFSET)^-ZIPF_EXPONENT, summing to 1."""
    ranks = np.arange(1, VOCABULARY_SIZE + 1, dtype=np.float64)
    p = (ranks + ZIPF_OFFSET) ** -ZIPF_EXPONENT
    p = p / p.sum()
    p.flags.writeable = False
    return p


@functools.cache
def _word_cdf() -> np.ndarray:
    cdf = np.cumsum(word_probabilities())
    cdf = cdf / cdf[-1]  # exactly 1 at the end: every uniform draw finds a word
    cdf.flags.writeable = False
    return cdf


def _length_table() -> tuple[np.ndarray, np.ndarray]:
    """(lengths [K], probabilities [K]) of words per caption."""
    weights = np.array(list(LENGTH_WEIGHTS.values()))
    return np.array(list(LENGTH_WEIGHTS)), weights / weights.sum()


def sample_caption_lengths(rng: np.random.Generator, count: int) -> np.ndarray:
    """[count] words per caption, from LENGTH_WEIGHTS."""
    lengths, p = _length_table()
    return rng.choice(lengths, size=count, p=p)


def sample_words(rng: np.random.Generator, count: int) -> np.ndarray:
    """[count] word ranks (0-based) drawn independently from `word_probabilities`:
    inverse-transform sampling on the cumulative table, O(log V) per word."""
    return np.minimum(
        np.searchsorted(_word_cdf(), rng.random(count), side="right"), VOCABULARY_SIZE - 1
    )


def sample_captions(rng: np.random.Generator, count: int) -> tuple[str, ...]:
    """`count` captions: words from the Zipf law, mostly capitalised, often with a period."""
    words = vocabulary_words()
    lengths = sample_caption_lengths(rng, count)
    ranks = sample_words(rng, int(lengths.sum()))
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    capitalized, period = rng.random(count) < CAPITALIZED_P, rng.random(count) < PERIOD_P
    captions = []
    for start, length, upper, dot in zip(starts, lengths, capitalized, period, strict=True):
        text = " ".join(words[r] for r in ranks[start : start + length])
        text = text[0].upper() + text[1:] if upper else text
        # A one-letter last word keeps its period in PTB ("a." is an abbreviation): none there.
        captions.append(text + "." if dot and len(words[ranks[start + length - 1]]) > 1 else text)
    return tuple(captions)


def expected_vocabulary(captions: int, min_count: int = 5, max_length: int = 20) -> float:
    """Expected number of words seen >= `min_count` times in `captions` captions cut at
    `max_length` words, as the vocab stage counts them: words are independent, so a word's
    count is Binomial(tokens, p) ~ Poisson(tokens * p), and the answer is the sum over words
    of P(Poisson >= min_count)."""
    lengths, p = _length_table()
    tokens = captions * float((np.minimum(lengths, max_length) * p).sum())
    lam = tokens * word_probabilities()  # [V]
    term = np.exp(-lam)
    below = term.copy()
    for k in range(1, min_count):
        term = term * lam / k
        below += term
    return float((1.0 - below).sum())


def simulated_vocabulary(
    captions: int, seed: int = 0, min_count: int = 5, max_length: int = 20
) -> int:
    """Words seen >= `min_count` times in `captions` sampled captions (cut at `max_length`
    words): the check of `expected_vocabulary`, by counting ranks instead of strings."""
    rng = np.random.default_rng(seed)
    tokens = int(np.minimum(sample_caption_lengths(rng, captions), max_length).sum())
    counts = np.bincount(sample_words(rng, tokens), minlength=VOCABULARY_SIZE)
    return int((counts >= min_count).sum())
