"""Evaluation: caption a split with a trained model and score it as the COCO leaderboard does.

Scores are pycocoevalcap's (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D, and SPICE where it can run),
on captions and references tokenized by its own PTBTokenizer. References are the raw captions
of the caption table, never the vocabulary stage's truncated tokens. Two reference points say
what a score means on this data:

* blind baseline: a "captioner" that ignores the image and always writes the most frequent
  training caption (after PTB normalization; ties go to the alphabetically first), scored on
  the test split against all references.
* human agreement, leave one out: in round k (k = 1..m, m the fewest references of a test
  image with two or more; 5 on COCO and shapes) every image's k-th reference is the "human
  caption", scored against the image's other references, and the `human` figure is the mean
  over the rounds. Scoring one fixed reference (the COCO leaderboard's first) would let the
  order in which annotations were written bias the figure. CIDEr and BLEU depend on how many
  references there are, so the model is scored against the SAME reduced reference sets of every
  round and averaged the same way (`test_vs_human_refs`): `headline.cider_vs_human` is the ratio
  of those two, the fair comparison; `test` is the model against all references.

Every figure is of one split, named in `details.splits`: val is what choices are made on,
test is decoded and scored once per run and only reported.

The scorers, and the Java they run on, are `coco_scorer.py`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from caption_pipeline.data.shards.reader import make_image_dataset
from caption_pipeline.data.shards.shard_set import MANIFEST, ShardSet
from caption_pipeline.data.text import Vocabulary, tokenize
from caption_pipeline.errors import DataError
from caption_pipeline.evaluation.coco_scorer import CocoScorer
from caption_pipeline.model.decoding import CaptionedImage, DecodeSettings, decode_dataset
from caption_pipeline.params import from_params
from caption_pipeline.training.features import feature_encoder_problem, stored_encoder

if TYPE_CHECKING:
    from caption_pipeline.model import Captioner

logger = logging.getLogger(__name__)

SCORED_SPLITS = ("val", "test")  # captioned and scored; test also gets attention maps
TABLE_COLUMNS = ("image_id", "split", "annotation_id", "caption")


# --- settings -------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvaluateSettings:
    """`params:evaluate`; see conf/base/parameters_evaluate.yml."""

    batch_size: int
    decoding: DecodeSettings
    attention_samples: int

    def __post_init__(self):
        for key, low in (("batch_size", 1), ("attention_samples", 0)):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise DataError(
                    f"parameters evaluate.{key}: expected a whole number >= {low}, got {value!r}"
                )

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> EvaluateSettings:
        """From a parameters dict (`params.from_params`): unknown, missing keys and bad values
        are a DataError naming them."""
        return from_params(cls, params, "evaluate")


# --- captioning -----------------------------------------------------------------------------


def caption_split(
    model,
    vocabulary: Vocabulary,
    source: ShardSet,
    split: str,
    settings: EvaluateSettings,
    keep_attention: bool = False,
) -> list[CaptionedImage]:
    """Every image of `split` through the model, then the search: from the images of an image
    shard set (through the model's encoder), or from the region features of a feature shard
    set (`decoding_source`: those of the model's own frozen encoder)."""
    batches = make_image_dataset(
        source, split, batch_size=settings.batch_size, image_size=model.config.image_size
    )
    decoding = dataclasses.replace(settings.decoding, keep_attention=keep_attention)
    logger.info(
        "Captioning the %s split (%d images, from %s)", split, source.num_images(split), source.kind
    )
    return decode_dataset(model, vocabulary, batches, decoding)


def decoding_source(model: Captioner, shards: ShardSet, model_inputs: ShardSet) -> ShardSet:
    """What evaluate decodes: the stored features of `model_inputs` when `model`'s encoder is
    the frozen encoder that computed them (running it again over the val and test images would
    only recompute them: docs/benchmarks.md, "Evaluate from the stored features"), else the
    image shards. Logs which, and why."""
    problem = stored_features_problem(model, shards, model_inputs)
    if problem is None:
        logger.info(
            "Decoding the stored features in %s: the captioner's encoder (%s) is the frozen "
            "encoder that computed them, so it does not run",
            model_inputs.root,
            model.config.encoder,
        )
        return model_inputs
    logger.info(
        "Decoding the images in %s through the captioner's encoder (%s): %s",
        shards.root,
        model.config.encoder,
        problem,
    )
    return shards


def stored_features_problem(
    model: Captioner, shards: ShardSet, model_inputs: ShardSet
) -> str | None:
    """Why `model` cannot decode the feature shards `model_inputs` in place of the images of
    `shards`, or None: features stand for images only when they are of the same image shards
    and `model`'s encoder has the architecture and the very weights that computed them (a
    fine-tuned encoder, or another model's, does not)."""
    if model_inputs.kind != "features":
        return "no features are stored (the model inputs are the image shards)"
    where = model_inputs.root / MANIFEST
    if model_inputs.manifest["params"]["source_fingerprint"] != shards.manifest["fingerprint"]:
        return f"{where}: the stored features are of other image shards than {shards.root}"
    if model.encoder is None:
        return "the captioner has no encoder to compare with the one of the stored features"
    problem = feature_encoder_problem(model_inputs, model.config)
    if problem:
        return problem
    stored = stored_encoder(model_inputs, model.config).get_weights()
    own = model.encoder.get_weights()
    if len(own) != len(stored) or not all(map(np.array_equal, own, stored)):
        return (
            f"the captioner's encoder has other weights than the frozen encoder that computed "
            f"the stored features ({where}): fine-tuned, or another model's"
        )
    return None


def coco_results(decoded: Iterable[CaptionedImage]) -> list[dict[str, Any]]:
    """The official COCO results format: [{"image_id": int, "caption": str}], by image id."""
    return [
        {"image_id": d.image_id, "caption": d.caption}
        for d in sorted(decoded, key=lambda d: d.image_id)
    ]


def decoding_summary(settings: DecodeSettings, vocabulary: Vocabulary) -> dict[str, Any]:
    """What `metrics.json` says about the search that wrote the captions."""
    return {
        "method": settings.method,
        "beam_size": settings.beam_size if settings.method == "beam" else 1,
        "alpha": settings.alpha,
        "max_length": settings.steps(vocabulary),  # decoding steps, <end> included
    }


# --- inputs ---------------------------------------------------------------------------------


def references_by_image(
    caption_table: pd.DataFrame, split: str, name: str = "caption_table"
) -> dict[int, list[str]]:
    """Raw reference captions of each image of `split`, in annotation id order."""
    missing = [c for c in TABLE_COLUMNS if c not in caption_table.columns]
    if missing:
        raise DataError(f"{name}: missing column(s) {missing}")
    rows = caption_table.loc[caption_table["split"] == split]
    if rows.empty:
        raise DataError(f"{name}: no captions of split {split!r}")
    not_text = rows.loc[~rows["caption"].map(lambda c: isinstance(c, str)), "annotation_id"]
    if len(not_text):
        raise DataError(
            f"{name}: column 'caption' is not text, e.g. annotation_id {not_text.iloc[0]}"
        )
    rows = rows.sort_values(["image_id", "annotation_id"], kind="stable")
    return {int(i): list(group) for i, group in rows.groupby("image_id", sort=True)["caption"]}


def captions_from_results(results: Any, name: str) -> dict[int, str]:
    """A COCO results list -> {image_id: caption}; a DataError names the entry that is wrong."""
    if not isinstance(results, list):
        raise DataError(f"{name}: expected a list of {{image_id, caption}} objects")
    captions: dict[int, str] = {}
    for index, entry in enumerate(results):
        image_id = entry.get("image_id") if isinstance(entry, dict) else None
        caption = entry.get("caption") if isinstance(entry, dict) else None
        if not isinstance(image_id, int) or isinstance(image_id, bool):
            raise DataError(f"{name}: entry {index}: field 'image_id' must be an integer")
        if not isinstance(caption, str):
            raise DataError(f"{name}: entry {index}: field 'caption' must be a string")
        if image_id in captions:
            raise DataError(f"{name}: entry {index}: image_id {image_id} is listed twice")
        captions[image_id] = caption
    return captions


# --- scoring --------------------------------------------------------------------------------


def most_frequent_caption(captions: Iterable[str]) -> tuple[str, int]:
    """The most frequent caption after PTB normalization (lower case, no punctuation), with its
    count; ties go to the alphabetically first. What the blind baseline always writes."""
    counts = Counter(text for text in (" ".join(tokenize(c)) for c in captions) if text)
    if not counts:
        raise DataError("caption_table: no train caption has a word: no blind baseline")
    caption = min(counts, key=lambda text: (-counts[text], text))
    return caption, counts[caption]


# The sections scored on the test split besides `test` itself.
REFERENCE_POINTS = ("blind_baseline", "human", "test_vs_human_refs", "headline")

HumanRound = tuple[dict[int, str], dict[int, list[str]]]  # (human captions, reduced refs)


def leave_one_out_rounds(references: Mapping[int, Sequence[str]]) -> list[HumanRound]:
    """Round k = 0..m-1 over the images with 2+ references (m: the fewest such an image has):
    every image's k-th reference as its "human caption", and its other references."""
    several = {i: list(refs) for i, refs in references.items() if len(refs) >= 2}
    rounds = min((len(refs) for refs in several.values()), default=0)
    return [
        (
            {i: refs[k] for i, refs in several.items()},
            {i: refs[:k] + refs[k + 1 :] for i, refs in several.items()},
        )
        for k in range(rounds)
    ]


def mean_scores(rounds: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Metric by metric, the mean of the rounds' overall scores."""
    return {name: sum(r[name] for r in rounds) / len(rounds) for name in rounds[0]}


def score_splits(
    results: Mapping[str, Any], caption_table: pd.DataFrame, scorer: CocoScorer
) -> tuple[dict[str, Any], pd.DataFrame]:
    """Score each split's COCO results against the raw captions of the caption table, with the
    blind baseline and human agreement when a split is "test".

    Returns the metric sections of metrics.json (one per split, then test_vs_human_refs, human,
    blind_baseline, and their `details`) and the per-image table (image_id, split, caption,
    one column per metric).
    """
    generated, references, details = {}, {}, {"images": {}}
    for split, split_results in results.items():
        generated[split] = captions_from_results(split_results, f"caption_results_{split}")
        references[split] = _captioned_references(caption_table, split, generated[split], details)
    sections: dict[str, Any] = {}
    rows = []
    for split in results:
        # Captions and references in separate tokenizer runs, as COCOEvalCap does (the
        # tokenizer's rules look across line ends in rare cases).
        captions = {
            i: c[0]
            for i, c in scorer.tokenize(
                {i: [generated[split][i]] for i in sorted(generated[split])}
            ).items()
        }
        refs = scorer.tokenize(references[split])
        scores = scorer.score(captions, refs)
        sections[split] = scores.overall
        rows += [
            {"image_id": i, "split": split, "caption": generated[split][i], **scores.per_image[i]}
            for i in sorted(captions)
        ]
        if split == "test":
            train = caption_table.loc[caption_table["split"] == "train", "caption"]
            sections.update(
                _reference_points(
                    captions, refs, train, scorer, details, test_cider=scores.overall["CIDEr"]
                )
            )
    details["spice"] = scorer.spice
    details["splits"] = {
        section: "test" if section in REFERENCE_POINTS else section for section in sections
    }
    sections["details"] = details
    table = pd.DataFrame(rows, columns=["image_id", "split", "caption", *scorer.metrics])
    return sections, table


def _captioned_references(
    caption_table: pd.DataFrame, split: str, captions: Mapping[int, str], details: dict[str, Any]
) -> dict[int, list[str]]:
    """The references of the captioned images of `split`; every caption needs some."""
    references = references_by_image(caption_table, split)
    unknown = sorted(set(captions) - set(references))
    if unknown:
        raise DataError(
            f"caption_results_{split}: image_id {unknown[0]} has no reference "
            f"caption of split {split!r} in caption_table"
        )
    uncaptioned = len(references) - len(captions)
    if uncaptioned:  # images the shard writer could not load (listed in the shard manifest)
        logger.warning(
            "%d %s images of caption_table have no generated caption", uncaptioned, split
        )
    details["images"][split] = {"scored": len(captions), "without_caption": uncaptioned}
    return {i: references[i] for i in captions}


def _reference_points(
    test: Mapping[int, str],
    references: Mapping[int, Sequence[str]],
    train_captions: Iterable[str],
    scorer: CocoScorer,
    details: dict[str, Any],
    test_cider: float,
) -> dict[str, Any]:
    """blind_baseline, human, test_vs_human_refs and headline sections, on tokenized test
    captions; `test_cider`: the model's against all references."""
    blind, count = most_frequent_caption(train_captions)
    details["blind_baseline"] = {
        "caption": blind,
        "train_count": count,
        "split": "test",
        "protocol": "the most frequent train caption after PTB normalization, for every image",
    }
    blind = scorer.tokenize({0: [blind]})[0][0]
    sections = {"blind_baseline": scorer.score(dict.fromkeys(test, blind), references).overall}
    rounds = leave_one_out_rounds(references)
    if not rounds:
        sections["human"] = sections["test_vs_human_refs"] = sections["headline"] = None
        details["human"] = {"reason": "no test image has two or more reference captions"}
        return sections
    humans = [scorer.score(human, others).overall for human, others in rounds]
    models = [scorer.score({i: test[i] for i in human}, others).overall for human, others in rounds]
    sections["human"], sections["test_vs_human_refs"] = mean_scores(humans), mean_scores(models)
    blind_cider = sections["blind_baseline"]["CIDEr"]
    sections["headline"] = {
        "cider_vs_human": _ratio(
            sections["test_vs_human_refs"]["CIDEr"], sections["human"]["CIDEr"]
        ),
        "cider_vs_blind": _ratio(test_cider, blind_cider),
    }
    details["human"] = {
        "images": len(rounds[0][0]),
        "rounds": len(rounds),
        "cider_per_round": [
            {"left_out": k + 1, "human": h["CIDEr"], "model": m["CIDEr"]}
            for k, (h, m) in enumerate(zip(humans, models, strict=True))
        ],
        "protocol": "leave one out: in round k every test image's k-th reference (annotation "
        "id order) is scored against its other references; human is the mean over "
        "the rounds, test_vs_human_refs the model against the same reduced "
        "references, averaged the same way",
    }
    details["headline"] = {
        "cider_vs_human": "test_vs_human_refs.CIDEr / human.CIDEr (both leave-one-out means)",
        "cider_vs_blind": "test.CIDEr / blind_baseline.CIDEr (all references)",
    }
    return sections


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator else None


def metrics_report(
    scores: Mapping[str, Any],
    localization: Mapping[str, Any],
    model_source: Mapping[str, str],
    settings: EvaluateSettings,
    vocabulary: Vocabulary,
) -> dict[str, Any]:
    """metrics.json: the score sections, the decoding settings, attention localization (None
    with a reason where the data has no boxes) and the details of each, with `model_source`:
    `model`, the file(s) the evaluated model was read from, and `model_weights`, the digest of
    its weights, which export checks (`EvaluatedModel.require_scored`)."""
    sections = {key: value for key, value in scores.items() if key != "details"}
    splits = {**scores["details"]["splits"], "attention_localization": "test"}
    for section, split in splits.items():
        figures = (
            localization["score"] if section == "attention_localization" else sections[section]
        )
        if isinstance(figures, Mapping):
            figures = ", ".join(
                f"{name} {value:.4g}" for name, value in figures.items() if value is not None
            )
        logger.info("%s (split %s): %s", section, split, figures)
    return {
        **sections,
        "decoding": decoding_summary(settings.decoding, vocabulary),
        "attention_localization": localization["score"],
        "attention_localization_uniform": localization["uniform"],
        "details": {
            **scores["details"],
            "attention_localization": {
                k: v for k, v in localization.items() if k not in ("score", "uniform")
            },
            "model": model_source["model"],
            "model_weights": model_source["model_weights"],
            "splits": splits,
        },
    }
