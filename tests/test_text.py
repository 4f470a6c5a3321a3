"""caption_pipeline.data.text: the tokenizer against coco-caption's own PTBTokenizer; the
vocabulary."""

from __future__ import annotations

import json
import unicodedata

import pytest
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from caption_pipeline.data.text import (
    SPECIAL_TOKENS,
    VocabSettings,
    Vocabulary,
    coverage,
    length_summary,
    tokenize,
)
from caption_pipeline.errors import DataError
from caption_pipeline.params import defaults, from_conf

# Tricky COCO-like captions: contractions, possessives, quotes, hyphens, dashes, numbers,
# money, abbreviations, acronyms, ellipses, brackets, symbols, unicode, emoji, URLs.
CORPUS = [
    # plain COCO-style captions
    "A man riding a wave on top of a surfboard.",
    "Two dogs playing with a frisbee in the park",
    "A kitchen with a stove, a sink and a refrigerator.",
    "a bowl of soup  and a sandwich on a plate .",
    "   A group of people standing around a table.   ",
    "THE BUS IS PARKED ON THE SIDE OF THE ROAD.",
    "An elephant walking through tall grass; a baby follows.",
    "A plate with broccoli: carrots, rice and chicken!",
    "Is this a cat or a dog?",
    'A street sign that says "STOP" at an intersection.',
    # contractions and possessives
    "A dog's bone lying next to the cat's bowl.",
    "The kids' toys are scattered on the floor.",
    "A man who doesn't look happy holding a phone.",
    "It's a cat that can't get off the roof.",
    "They're eating pizza and we're watching.",
    "I'm sure you'll love this view, she'd say.",
    "Two people who've finished their meal.",
    "A sign that reads DON'T WALK on a pole.",
    "A woman won't let go of her umbrella.",
    "The dog ain't moving from the couch.",
    "A man cannot reach the top shelf.",
    "A boy is gonna throw the ball, wanna see?",
    "James's car is parked by St. Mary's church.",
    "A clock reads 10 o'clock on the tower.",
    "Y'all see the rock 'n' roll band on stage?",
    "A photo from the '90s of a family.",
    "Kids playing in the 1990s style living room.",
    "The 90's style diner with neon lights.",
    "O'Neill's pub sign above the door.",
    # curly quotes and apostrophes
    "A dog\u2019s toy and a child\u2019s shoe.",
    "A sign that says \u201cfresh fish\u201d at the market.",
    "A cat that doesn\u2019t care about the \u2018rules\u2019.",
    "\u00abBienvenue\u00bb is written on the door mat.",
    "A 'vintage' car parked on the street.",
    "A man holding a sign reading 'free hugs'.",
    # hyphens and dashes
    "A black-and-white photo of a 10-year-old boy.",
    "A man in a t-shirt riding a mountain-bike.",
    "A well-known mother-in-law joke on a t-shirt sign.",
    "A self-driving car - with no driver - on the road.",
    "A man -- maybe a chef -- cooking dinner.",
    "A woman \u2014 wearing a hat \u2014 walks by.",
    "Pages 10\u201320 of a book are open.",
    "A co-op grocery store with anti-theft gates.",
    "An x-ray of a hand on a light box.",
    "A double-decker bus on a two-way street.",
    # numbers, money, times, units
    "Two pizzas cost $5.50 each at the shop.",
    "A clock that reads 10:30 on a wall.",
    "A sign for 1,000 free tickets.",
    "A 3.5 inch screen on a phone.",
    "A cup of 1/2 coffee and 3 1/2 cookies.",
    "A price tag of \u00a35 next to a \u20ac10 note.",
    "A store open 24/7 with a 50% off sale.",
    "A jersey with #23 on the back.",
    "A train at 5pm on the 2nd platform.",
    "A 4x4 truck on a dirt road in 3D.",
    "The temperature is 90\u00b0 outside.",
    "A sign with the number 1-800-555-1234 on it.",
    "Room 12B on the 3rd floor.",
    "A speed limit of 25 mph and a -5 degree day.",
    # abbreviations and acronyms
    "Mr. Smith walking his dog on Main St. today.",
    "A photo of Dr. Jones at the U.S. border.",
    "A bus in Washington D.C. at 8 a.m. in the morning.",
    "Buses, trains, cars, etc. on a busy street.",
    "A Mt. Everest poster on the wall.",
    "A sign saying No. 5 on the door.",
    "A jar labeled e.g. salt and i.e. sugar.",
    "A NYC taxi near the U.N. headquarters.",
    "A baseball game between the Sox vs. the Yankees.",
    "A bag from Apple Inc. on a desk.",
    # ellipses and repeated punctuation
    "A cat sleeping on a laptop...",
    "A dog waiting . . . for its owner.",
    "A surprised look on his face!!",
    "What is this animal?!",
    "A bird on a branch\u2026 looking around.",
    "A plate of food;;; and a fork.",
    # brackets and symbols (brackets themselves are dropped)
    "A man (wearing a hat) riding a horse.",
    "A [blurry] photo of a train.",
    "A sign with {curly} braces.",
    "A laptop & a mouse on a desk.",
    "A sign for AT&T on a building.",
    "Salt + pepper on the table.",
    "A heart \u2665 drawn on a foggy window.",
    "A box with a \u2713 mark.",
    "A smiley :) drawn in the sand.",
    "A sign reading @home and #1 fan.",
    "An arrow \u2192 pointing left.",
    "A t-shirt that says I \u2764 NY.",
    # unicode words and emoji
    "A caf\u00e9 with na\u00efve art on the walls.",
    "A cafe\u0301 sign in decomposed form.",
    "A street sign for Stra\u00dfe in Germany.",
    "A menu in \u65e5\u672c\u8a9e and English.",
    "A dog \U0001f436 sitting next to a cat \U0001f431.",
    "A birthday cake \U0001f382 with candles.",
    "A sign in \u03a3\u039f\u03a6\u0399\u0391 letters.",
    "\u00dcber-cool skateboarder doing a trick.",
    "A r\u00e9sum\u00e9 on a desk near a pen.",
    "A full-width \uff21\uff22\uff23 sign.",
    "A non\u00a0breaking space and a tab\tinside.",
    # web-like and misc
    "A screen showing www.google.com in a browser.",
    "A poster with http://example.com/page on it.",
    "An email foo@bar.com written on a board.",
    "A file named photo.jpg on a screen.",
    "A c++ book next to a C# manual.",
    "A sign that says and/or above the door.",
    "A kid with a yo-yo and a pogo-stick.",
]

BRACKETS = {"-lrb-", "-rrb-", "-lcb-", "-rcb-", "-lsb-", "-rsb-"}


@pytest.fixture(scope="module")
def coco_caption_tokens() -> list[str]:
    """CORPUS as pycocoevalcap scores it: Stanford PTBTokenizer 3.4.1 (Java), lower case."""
    result = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(CORPUS)})
    return [result[i][0] for i in range(len(CORPUS))]


def test_tokenizer_agrees_with_coco_caption_on_every_corpus_caption(coco_caption_tokens):
    assert len(CORPUS) >= 100
    mismatches = []
    for caption, reference in zip(CORPUS, coco_caption_tokens, strict=False):
        # The two deliberate differences (see the next tests): brackets are dropped here, and
        # text is NFC-normalized first.
        expected = unicodedata.normalize("NFC", reference).split(" ")
        expected = [t for t in expected if t not in BRACKETS]
        if tokenize(caption) != expected:
            mismatches.append((caption, expected, tokenize(caption)))
    assert mismatches == []


def test_brackets_are_dropped_although_coco_caption_keeps_them(coco_caption_tokens):
    # pycocoevalcap means to drop -LRB- etc. but compares them with lower-cased tokens.
    caption = "A man (wearing a hat) riding a horse."
    assert coco_caption_tokens[CORPUS.index(caption)].split(" ") == [
        "a", "man", "-lrb-", "wearing", "a", "hat", "-rrb-", "riding", "a", "horse",
    ]  # fmt: skip
    assert tokenize(caption) == ["a", "man", "wearing", "a", "hat", "riding", "a", "horse"]


def test_decomposed_accents_are_composed_unlike_coco_caption(coco_caption_tokens):
    caption = "A cafe\u0301 sign in decomposed form."
    assert coco_caption_tokens[CORPUS.index(caption)].split(" ")[1] == "cafe\u0301"
    assert tokenize(caption)[1] == "caf\u00e9" == unicodedata.normalize("NFC", "cafe\u0301")


@pytest.mark.parametrize(
    ("caption", "tokens"),
    [
        ("A dog's bone.", ["a", "dog", "'s", "bone"]),
        ("They DON'T know.", ["they", "do", "n't", "know"]),
        ("The kids' toys", ["the", "kids", "toys"]),
        ("A black-and-white t-shirt -- nice!", ["a", "black-and-white", "t-shirt", "nice"]),
        ("It costs $5.50, ok?", ["it", "costs", "$", "5.50", "ok"]),
        ("Dr. Who in the U.S. at 5 p.m.", ["dr.", "who", "in", "the", "u.s.", "at", "5", "p.m."]),
        ("a dog\non the\tgrass", ["a", "dog", "on", "the", "grass"]),
        ("\U0001f600 \U0001f436", []),
        ("", []),
        (" ... -- ; ' \" ", []),
    ],
)
def test_tokenize_examples(caption, tokens):
    assert tokenize(caption) == tokens


def test_tokenize_handles_any_unicode_without_crashing():
    text = "".join(chr(c) for c in range(0x20, 0x3000, 7)) + "\U0001f600\U0010ffff\ud800"
    tokens = tokenize(text)
    assert tokens and all(t and " " not in t and t == t.lower() for t in tokens)


# --- vocabulary ----------------------------------------------------------------------------

TRAIN = [
    ["a", "dog", "on", "a", "sofa"],
    ["a", "cat", "on", "a", "mat"],
    ["the", "dog", "and", "the", "cat"],
    ["a", "dog", "runs"],
    ["zebra", "and", "dog"],
]


def test_vocabulary_keeps_frequent_train_words_by_count_then_alphabetically():
    vocab = Vocabulary.build(TRAIN, min_count=2, max_caption_length=16)
    # counts: a 5, dog 4, and 2, cat 2, on 2, the 2; once: mat runs sofa zebra
    specials = ("<pad>", "<start>", "<end>", "<unk>")
    assert vocab.tokens == (*specials, "a", "dog", "and", "cat", "on", "the")
    assert vocab.counts == {"a": 5, "dog": 4, "and": 2, "cat": 2, "on": 2, "the": 2}
    assert (vocab.pad_id, vocab.start_id, vocab.end_id, vocab.unk_id) == (0, 1, 2, 3)
    assert vocab.size == 10
    assert [vocab.token_id(t) for t in ("a", "the", "zebra")] == [4, 9, 3]


def test_vocabulary_min_count_one_keeps_every_word_and_default_cut_keeps_few():
    assert Vocabulary.build(TRAIN, 1, 16).size == 4 + 10
    assert Vocabulary.build(TRAIN, 5, 16).tokens[4:] == ("a",)


def test_vocabulary_round_trips_through_json_and_matches_the_contract():
    vocab = Vocabulary.build(TRAIN, min_count=2, max_caption_length=16)
    data = json.loads(json.dumps(vocab.to_dict()))
    assert data["special_tokens"] == {
        "pad": "<pad>", "start": "<start>", "end": "<end>", "unk": "<unk>",
    }  # fmt: skip
    assert data["min_count"] == 2 and data["max_caption_length"] == 16
    assert Vocabulary.from_dict(data) == vocab


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.pop("tokens"), "missing field(s) ['tokens']"),
        (lambda d: d.update(tokens=["a", *d["tokens"]]), "must start with"),
        (lambda d: d["tokens"].append("a"), "duplicates"),
        (lambda d: d["counts"].pop("dog"), "field 'counts'"),
        (lambda d: d.update(min_count=0), "field 'min_count' must be an integer >= 1"),
        (lambda d: d.update(special_tokens={"pad": "PAD"}), "must start with"),
    ],
)
def test_vocabulary_from_bad_dict_names_the_file_and_field(change, message):
    data = Vocabulary.build(TRAIN, 2, 16).to_dict()
    change(data)
    with pytest.raises(DataError, match="^data/vocab.json: ") as error:
        Vocabulary.from_dict(data, source="data/vocab.json")
    assert message in str(error.value)


def test_special_tokens_in_captions_are_refused():
    with pytest.raises(DataError, match="<unk>"):
        Vocabulary.build([["a", "<unk>"]], 1, 16)


def test_encode_wraps_in_start_end_and_maps_unknown_words_to_unk():
    vocab = Vocabulary.build(TRAIN, 2, 16)
    assert vocab.encode(["a", "dog", "on", "zebra"]) == [1, 4, 5, 8, 3, 2]
    assert vocab.encode([]) == [1, 2]


def test_decode_round_trips_known_words_and_stops_at_end():
    vocab = Vocabulary.build(TRAIN, 2, 16)
    tokens = ["the", "cat", "and", "a", "dog"]
    assert vocab.decode(vocab.encode(tokens)) == "the cat and a dog"
    assert vocab.decode(vocab.encode(["a", "zebra"])) == "a <unk>"
    assert vocab.decode([1, 4, 5, 2, 7, 9, 0, 0]) == "a dog"  # nothing after <end>
    assert vocab.decode([4, 0, 5]) == "a dog"  # no <start>, padding skipped
    with pytest.raises(ValueError, match="id 10 is outside"):
        vocab.decode([1, 10, 2])


# --- settings and summaries ----------------------------------------------------------------------


def test_truncate_cuts_long_captions_and_drop_removes_them():
    tokens = ["a", "b", "c", "d", "e"]
    truncate = from_conf(VocabSettings, "vocab", max_caption_length=3, long_captions="truncate")
    drop = from_conf(VocabSettings, "vocab", max_caption_length=3, long_captions="drop")
    assert truncate.limit(tokens) == ["a", "b", "c"]
    assert drop.limit(tokens) is None
    assert truncate.limit(tokens[:3]) == drop.limit(tokens[:3]) == ["a", "b", "c"]
    lengths = [0, 2, 3, 4, 9]
    assert truncate.caption_counts(lengths) == {
        "captions": 5, "empty_dropped": 1, "truncated": 2, "long_dropped": 0, "kept": 4,
    }  # fmt: skip
    assert drop.caption_counts(lengths) == {
        "captions": 5, "empty_dropped": 1, "truncated": 0, "long_dropped": 2, "kept": 2,
    }  # fmt: skip


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"min_count": 0}, r"params:vocab\.min_count must be an integer >= 1, got 0"),
        ({"max_caption_length": "20"}, r"params:vocab\.max_caption_length must be an integer"),
        ({"long_captions": "cut"}, r"long_captions must be one of \['truncate', 'drop'\]"),
        ({"min_cuont": 3}, r"parameters vocab\.min_cuont \(.*\): unknown key"),
    ],
)
def test_bad_settings_are_clear_errors(params, message):
    with pytest.raises(DataError, match=message):
        VocabSettings.from_params({**defaults("vocab"), **params})


def test_length_summary_percentiles_are_lengths_that_many_captions_do_not_exceed():
    lengths = [1] * 50 + [2] * 40 + [3] * 5 + [4] * 4 + [10]
    assert length_summary(lengths) == {
        "captions": 100, "mean": 1.71, "min": 1, "p50": 1, "p90": 2, "p95": 3, "p99": 4, "max": 10,
    }  # fmt: skip
    assert length_summary([]) == {"captions": 0}


def test_coverage_counts_tokens_the_vocabulary_knows():
    vocab = Vocabulary.build(TRAIN, 2, 16)
    assert coverage(vocab, [["a", "dog", "zebra", "yak"], ["the"]]) == {
        "tokens": 5, "word_types": 5, "coverage": 0.6, "oov_rate": 0.4,
    }  # fmt: skip
    assert set(SPECIAL_TOKENS.values()) == set(vocab.tokens[:4])
