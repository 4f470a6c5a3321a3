"""Caption text: the tokenizer that training and evaluation share, and the vocabulary.

`tokenize` gives the tokens coco-caption scores (PTB tokenization, lower case, punctuation
dropped), so what the model learns to write is what BLEU/METEOR/CIDEr compare. `Vocabulary`
maps those tokens to ids: <pad>=0, <start>=1, <end>=2, <unk>=3, then words by descending
training count. The rest of this module is the `vocab` stage's reporting: length limits,
statistics and the caption-length histogram.
"""

from __future__ import annotations

import unicodedata
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm

from caption_pipeline.data.ptb_tokenizer import ptb_tokens
from caption_pipeline.errors import DataError
from caption_pipeline.params import from_params

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# Tokens pycocoevalcap's PTBTokenizer drops after tokenizing. It compares them with its
# lower-cased output, so its own "-LRB-" ... never match and "-lrb-" survives there: these are
# dropped here on purpose (with -lsb- -rsb-), since brackets are punctuation, not words.
PUNCTUATION = frozenset(
    ["''", "'", "``", "`", "-lrb-", "-rrb-", "-lcb-", "-rcb-", "-lsb-", "-rsb-",
     ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)  # fmt: skip
SPECIAL_TOKENS = {"pad": "<pad>", "start": "<start>", "end": "<end>", "unk": "<unk>"}
LONG_CAPTION_POLICIES = ("truncate", "drop")
PERCENTILES = (50, 90, 95, 99)


def tokenize(caption: str) -> list[str]:
    """Lower-case PTB tokens of `caption` without punctuation, as coco-caption scores them."""
    # NFC so "e" + combining accent and "é" are one word; pycocoevalcap joins captions with
    # newlines after replacing "\n" by a space, so a caption is always one line.
    text = unicodedata.normalize("NFC", caption).replace("\n", " ")
    return [t for t in (token.lower() for token in ptb_tokens(text)) if t not in PUNCTUATION]


def tokenize_all(captions: Iterable[str], total: int | None = None) -> list[list[str]]:
    """`tokenize` over many captions, with a progress bar."""
    return [tokenize(c) for c in tqdm(captions, total=total, desc="tokenize", unit="caption")]


@dataclass(frozen=True)
class VocabSettings:
    """The `vocab` parameters, checked."""

    min_count: int  # words seen fewer times in the train split become <unk>
    max_caption_length: int  # tokens, without <start>/<end>
    long_captions: str  # what happens to longer captions: truncate | drop

    @classmethod
    def from_params(cls, params: Mapping[str, Any], name: str = "params:vocab") -> VocabSettings:
        settings = from_params(cls, params, "vocab")
        for field in ("min_count", "max_caption_length"):
            value = getattr(settings, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise DataError(f"{name}.{field} must be an integer >= 1, got {value!r}")
        if settings.long_captions not in LONG_CAPTION_POLICIES:
            raise DataError(
                f"{name}.long_captions must be one of {list(LONG_CAPTION_POLICIES)}, "
                f"got {settings.long_captions!r}"
            )
        return settings

    def limit(self, tokens: Sequence[str]) -> list[str] | None:
        """`tokens` within `max_caption_length`: cut ("truncate") or None ("drop") when longer."""
        if len(tokens) <= self.max_caption_length:
            return list(tokens)
        return list(tokens[: self.max_caption_length]) if self.long_captions == "truncate" else None

    def caption_counts(self, lengths: Sequence[int]) -> dict[str, int]:
        """What the length rules do to captions of these lengths (tokens, before the limit)."""
        lengths = np.asarray(lengths, dtype=np.int64)
        empty = int((lengths == 0).sum())
        long = int((lengths > self.max_caption_length).sum())
        dropped = long if self.long_captions == "drop" else 0
        return {
            "captions": int(lengths.size),
            "empty_dropped": empty,
            "truncated": long - dropped,
            "long_dropped": dropped,
            "kept": int(lengths.size) - empty - dropped,
        }


@dataclass(frozen=True)
class Vocabulary:
    """Token <-> id mapping: the special tokens at ids 0..3, then words by descending count."""

    tokens: tuple[str, ...]
    counts: Mapping[str, int]  # training count of every word (not special) in `tokens`
    min_count: int
    max_caption_length: int  # tokens per caption, without <start>/<end>

    pad_id = 0
    start_id = 1
    end_id = 2
    unk_id = 3

    def __post_init__(self) -> None:
        # Not a dataclass field: a lookup table derived from `tokens`.
        object.__setattr__(self, "_ids", {token: i for i, token in enumerate(self.tokens)})

    @classmethod
    def build(
        cls, captions: Iterable[Sequence[str]], min_count: int, max_caption_length: int
    ) -> Vocabulary:
        """The words seen at least `min_count` times in `captions` (the training split)."""
        counter = Counter(token for tokens in captions for token in tokens)
        clash = sorted(set(SPECIAL_TOKENS.values()) & counter.keys())
        if clash:
            raise DataError(f"captions contain the special token(s) {clash} as words")
        # Most frequent first; ties in code-point order, so every run gives the same ids.
        words = sorted(
            (w for w, n in counter.items() if n >= min_count), key=lambda w: (-counter[w], w)
        )
        return cls(
            tokens=(*SPECIAL_TOKENS.values(), *words),
            counts={w: counter[w] for w in words},
            min_count=min_count,
            max_caption_length=max_caption_length,
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "vocabulary") -> Vocabulary:
        """The vocabulary saved by `to_dict`; `source` names the file in error messages."""
        if not isinstance(data, Mapping):
            raise DataError(f"{source}: expected a JSON object, got {type(data).__name__}")
        fields = ("tokens", "counts", "min_count", "max_caption_length")
        missing = [field for field in fields if field not in data]
        if missing:
            raise DataError(f"{source}: missing field(s) {missing}")
        tokens = data["tokens"]
        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
            raise DataError(f"{source}: field 'tokens' must be a list of strings")
        specials = list(SPECIAL_TOKENS.values())
        if tokens[:4] != specials or data.get("special_tokens", SPECIAL_TOKENS) != SPECIAL_TOKENS:
            raise DataError(f"{source}: field 'tokens' must start with {specials} (ids 0..3)")
        if len(set(tokens)) != len(tokens):
            raise DataError(f"{source}: field 'tokens' has duplicates")
        counts = data["counts"]
        if (
            not isinstance(counts, Mapping)
            or set(counts) != set(tokens[4:])
            or not all(isinstance(n, int) and n >= 1 for n in counts.values())
        ):
            raise DataError(f"{source}: field 'counts' needs a count >= 1 per word of 'tokens'")
        for field in ("min_count", "max_caption_length"):
            if not isinstance(data[field], int) or isinstance(data[field], bool) or data[field] < 1:
                raise DataError(
                    f"{source}: field {field!r} must be an integer >= 1, got {data[field]!r}"
                )
        return cls(tuple(tokens), dict(counts), data["min_count"], data["max_caption_length"])

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (contract 3): tokens in id order, counts, settings, special tokens."""
        return {
            "tokens": list(self.tokens),
            "counts": dict(self.counts),
            "min_count": self.min_count,
            "max_caption_length": self.max_caption_length,
            "special_tokens": dict(SPECIAL_TOKENS),
        }

    @property
    def size(self) -> int:
        """Number of ids, special tokens included."""
        return len(self.tokens)

    def token_id(self, token: str) -> int:
        """The id of `token`; <unk>'s id when it is not in the vocabulary."""
        return self._ids.get(token, self.unk_id)

    def encode(self, tokens: Iterable[str]) -> list[int]:
        """[<start>, ids of `tokens` (unknown ones -> <unk>), <end>]."""
        return [self.start_id, *(self.token_id(t) for t in tokens), self.end_id]

    def decode(self, ids: Iterable[int]) -> str:
        """The words of `ids` joined by spaces: stops at <end>, skips <start> and <pad>."""
        words = []
        for i in ids:
            i = int(i)
            if i == self.end_id:
                break
            if not 0 <= i < self.size:
                raise ValueError(f"id {i} is outside this vocabulary (size {self.size})")
            if i not in (self.start_id, self.pad_id):
                words.append(self.tokens[i])
        return " ".join(words)


# --- vocab stage reporting --------------------------------------------------------------------


def length_summary(lengths: Sequence[int]) -> dict[str, float | int]:
    """Count, mean, min, max and percentiles of caption lengths (in tokens).

    Percentile p is the smallest length that at least p% of captions do not exceed.
    """
    if not len(lengths):
        return {"captions": 0}
    values = np.asarray(lengths)
    return {
        "captions": int(values.size),
        "mean": round(float(values.mean()), 3),
        "min": int(values.min()),
        **{f"p{p}": int(np.percentile(values, p, method="inverted_cdf")) for p in PERCENTILES},
        "max": int(values.max()),
    }


def coverage(vocab: Vocabulary, captions: Iterable[Sequence[str]]) -> dict[str, float | int]:
    """How many of the tokens in `captions` the vocabulary knows (the rest become <unk>)."""
    counter = Counter(token for tokens in captions for token in tokens)
    tokens = sum(counter.values())
    known = sum(n for word, n in counter.items() if word in vocab.counts)
    return {
        "tokens": tokens,
        "word_types": len(counter),
        "coverage": round(known / tokens, 6) if tokens else 1.0,
        "oov_rate": round(1 - known / tokens, 6) if tokens else 0.0,
    }


def vocabulary_stats(
    vocab: Vocabulary,
    settings: VocabSettings,
    lengths: Mapping[str, Sequence[int]],
    kept: Mapping[str, Sequence[Sequence[str]]],
    empty_examples: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """The `vocabulary_stats` report.

    `lengths`: per split, every caption's token count before the length limit (0 = empty);
    `kept`: per split, the token lists that survived it; `empty_examples`: a few of the
    captions that tokenized to nothing.
    """
    coverage_by_split = {split: coverage(vocab, captions) for split, captions in kept.items()}
    train_types = coverage_by_split.get("train", {}).get("word_types", 0)
    words = vocab.size - len(SPECIAL_TOKENS)
    return {
        "vocabulary_size": vocab.size,
        "words": words,
        "settings": asdict(settings),
        "train_word_types": train_types,
        "train_words_below_min_count": train_types - words,
        "coverage": coverage_by_split,
        "captions": {split: settings.caption_counts(values) for split, values in lengths.items()},
        "caption_length": {
            split: length_summary([n for n in values if n > 0]) for split, values in lengths.items()
        },
        "empty_caption_examples": [dict(e) for e in empty_examples],
    }


def caption_length_figure(lengths: Mapping[str, Sequence[int]], max_length: int) -> Figure:
    """Histogram of caption lengths per split, as fractions of each split, with the cut marked."""
    # Imported here: the CLI and server use this module for `tokenize` and need no plotting.
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(9, 4.8), layout="constrained")
    ax = fig.add_subplot()
    longest = max((max(v) for v in lengths.values() if len(v)), default=max_length)
    bins = np.arange(0.5, max(longest, max_length) + 1.5)  # one bar per whole length
    for split, values in lengths.items():
        if len(values):
            longer = 100 * np.mean(np.asarray(values) > max_length)
            label = f"{split}: {len(values):,} captions, {longer:.1f}% longer than {max_length}"
            ax.hist(values, bins=bins, density=True, histtype="step", linewidth=1.8, label=label)
    ax.axvline(max_length + 0.5, color="black", linestyle="--", linewidth=1,
               label=f"max_caption_length = {max_length}")  # fmt: skip
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("caption length (tokens, without <start>/<end>)")
    ax.set_ylabel("fraction of the split's captions")
    ax.set_title("Caption lengths after PTB tokenization")
    ax.legend(loc="best", fontsize=9)
    ax.grid(alpha=0.3)
    return fig
