"""COCO-format captions and their images -> the caption table and the ingestion report.

Sources, chosen by the `dataset` parameter block (see conf/base/parameters.yml):
- `format: coco`: one COCO captions JSON per split (COCO 2014, 2017, the embedded shapes
  data or your own), read through pycocotools' COCO API after a structural check, since
  pycocotools itself fails on bad files with bare asserts and KeyErrors;
- `format: karpathy`: Karpathy's split file (dataset_coco.json), its splits mapped onto
  train/val/test (`restval` to `ingest.karpathy_restval`).

Bad structure stops the run with one DataError naming the file, the field and the entry
index. Bad content (a broken image, an empty caption...) is skipped and counted in the
report, unless too many of a split's images are bad. Splits are always checked disjoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import unicodedata
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd
from pycocotools.coco import COCO

from caption_pipeline.data.caption_files import (
    CaptionFile,
    Tally,
    describe,
    read_captions,
)
from caption_pipeline.data.images import ImageCheck, check_images
from caption_pipeline.errors import DataError
from caption_pipeline.params import from_params

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
FORMATS = ("coco", "karpathy")
# What the `synthetic` stage adds to the `dataset` block it records as `raw_dataset`.
DATASET_RECORD_KEYS = ("generated", "fingerprint", "counts")
# Columns of the caption table (contract 2), in order, with their dtypes.
TABLE_DTYPES = {
    "image_id": "int64",
    "split": "str",
    "file_path": "str",
    "annotation_id": "int64",
    "caption": "str",
    "width": "int64",
    "height": "int64",
}
# Extension -> the content format Pillow reports for it; another content is a format note.
_EXTENSION_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG"}
_LETTER_OR_DIGIT = re.compile(r"[^\W_]")


@dataclass(frozen=True)
class IngestParams:
    """The `ingest` parameter block."""

    workers: int | None  # image-decoding processes; None = all cores
    chunk_size: int  # images per task sent to a worker
    max_pixels: int
    max_caption_chars: int
    max_bad_image_fraction: float
    karpathy_restval: str  # train | val | test | drop
    max_examples: int  # examples kept per reason in the report

    @classmethod
    def from_dict(cls, params: Mapping[str, Any]) -> IngestParams:
        p = from_params(cls, params, "ingest")
        checks = {
            "workers": p.workers is None or _is_int(p.workers, 1),
            "chunk_size": _is_int(p.chunk_size, 1),
            "max_pixels": _is_int(p.max_pixels, 1),
            "max_caption_chars": _is_int(p.max_caption_chars, 1),
            "max_bad_image_fraction": isinstance(p.max_bad_image_fraction, int | float)
            and 0 <= p.max_bad_image_fraction <= 1,
            "karpathy_restval": p.karpathy_restval in (*SPLITS, "drop"),
            "max_examples": _is_int(p.max_examples, 0),
        }
        for key, ok in checks.items():
            if not ok:
                raise DataError(f"parameters ingest: {key} is invalid: {getattr(p, key)!r}")
        return p


@dataclass(frozen=True)
class SplitSource:
    """Where one split's captions and images are."""

    split: str
    annotations: Path  # captions JSON (or Karpathy file), root joined
    images: Path  # folder that the file names are relative to, root joined
    select: tuple[float, float] | None  # fraction range of the file's images, hash ordered


@dataclass(frozen=True)
class DatasetSpec:
    """The `dataset` parameter block, as carried by `raw_dataset` (contract 1)."""

    name: str
    format: str
    root: str
    splits: tuple[SplitSource, ...]

    @classmethod
    def from_dict(cls, dataset: Mapping[str, Any]) -> DatasetSpec:
        where = "raw_dataset (the `dataset` parameters block)"
        if not isinstance(dataset, Mapping):
            raise DataError(f"{where}: must be an object, got {describe(dataset)}")
        for key in ("name", "format", "root"):
            if not isinstance(dataset.get(key), str) or not dataset[key]:
                raise DataError(f"{where}: dataset.{key} must be a non-empty string")
        if dataset["format"] not in FORMATS:
            raise DataError(
                f"{where}: dataset.format must be one of {FORMATS}, got {dataset['format']!r}"
            )
        splits = dataset.get("splits")
        if not isinstance(splits, Mapping) or not splits or set(splits) - set(SPLITS):
            raise DataError(f"{where}: dataset.splits must map some of {SPLITS} to sources")
        root = Path(dataset["root"])
        sources = tuple(
            _split_source(name, splits[name], root, where) for name in SPLITS if name in splits
        )
        return cls(dataset["name"], dataset["format"], dataset["root"], sources)


@dataclass
class SplitStats:
    """What one split listed, kept and skipped."""

    annotation_file: str
    images_listed: int = 0
    images_kept: int = 0
    images_skipped: int = 0
    captions_kept: int = 0
    captions_skipped: int = 0
    skipped_reasons: Counter[str] = field(default_factory=Counter)  # image ImageError reasons


class _Candidate(NamedTuple):
    """An image with usable captions, before its pixels are checked."""

    split: str
    image_id: int
    file_path: str  # as written in the table: root / images / file_name
    captions: list[tuple[int, str]]  # (annotation id, clean caption)


def check_recorded(raw_dataset: Mapping[str, Any], dataset: Mapping[str, Any]) -> None:
    """A DataError unless `raw_dataset`, the `dataset` block the `synthetic` stage recorded,
    is the `dataset` block of this run's parameters: otherwise ingest would silently read
    whatever an earlier run (say, the shapes data) recorded, not the data now configured."""
    keys = {*dataset, *raw_dataset} - set(DATASET_RECORD_KEYS)
    # Compared as JSON values: the record went through a JSON file.
    changed = sorted(
        key for key in keys if json.loads(json.dumps(dataset.get(key))) != raw_dataset.get(key)
    )
    if changed:
        raise DataError(
            f"raw_dataset records dataset {raw_dataset.get('name')!r} at "
            f"{raw_dataset.get('root')!r}, but the parameters now say {dataset.get('name')!r} "
            f"at {dataset.get('root')!r} (dataset.{', dataset.'.join(changed)} changed): run "
            "`kedro run --pipelines=synthetic` first, with the same parameters (it records "
            "the dataset block, and generates the shapes data)"
        )


def ingest(dataset: Mapping[str, Any], params: Mapping[str, Any]) -> tuple[pd.DataFrame, dict]:
    """Caption table and ingestion report of the dataset a `dataset` block describes."""
    spec = DatasetSpec.from_dict(dataset)
    settings = IngestParams.from_dict(params)
    skipped, notes = Tally(settings.max_examples), Tally(settings.max_examples)
    stats = {source.split: SplitStats(str(source.annotations)) for source in spec.splits}

    files = _read_files(spec, skipped)
    image_ids = {
        s.split: split_image_ids(files[s.annotations], s, settings.karpathy_restval)
        for s in spec.splits
    }
    check_disjoint(image_ids, {s.split: str(s.annotations) for s in spec.splits})

    candidates = []
    for source in spec.splits:
        stats[source.split].images_listed = len(image_ids[source.split])
        coco = files[source.annotations].coco
        for image_id in image_ids[source.split]:
            captions = _clean_captions(coco, image_id, source, settings, skipped, stats)
            if captions:
                path = (source.images / coco.imgs[image_id]["file_name"]).as_posix()
                candidates.append(_Candidate(source.split, image_id, path, captions))
            else:
                skipped.add("image_without_captions", f"{source.annotations}: image id={image_id}")
                stats[source.split].images_skipped += 1

    checks = check_images(
        [str(Path(c.file_path).absolute()) for c in candidates],  # workers may have another cwd
        max_pixels=settings.max_pixels,
        workers=settings.workers,
        chunk_size=settings.chunk_size,
    )
    table = _caption_table(candidates, checks, skipped, notes, stats)
    for source in spec.splits:
        _check_split_usable(source, stats[source.split], skipped, settings.max_bad_image_fraction)

    logger.info(
        "Ingested %d captions of %d images (%s); skipped: %s",
        len(table),
        table["image_id"].nunique(),
        ", ".join(f"{split}: {st.images_kept}" for split, st in stats.items()),
        dict(skipped.counts) or "nothing",
    )
    return table, _report(spec, stats, skipped, notes, len(table))


def split_image_ids(file: CaptionFile, source: SplitSource, restval: str = "train") -> list[int]:
    """Image ids of one split: the file's (or its Karpathy split's) images, then `select`."""
    if file.karpathy_split is None:
        ids = sorted(file.coco.imgs)
    else:
        wanted = {source.split, "restval"} if restval == source.split else {source.split}
        ids = sorted(i for i, split in file.karpathy_split.items() if split in wanted)
    if source.select is not None:
        ids = sorted(select_fraction(ids, *source.select))
    if not ids:
        raise DataError(f"{file.path}: no images for split '{source.split}'")
    return ids


def select_fraction(image_ids: Sequence[int], start: float, end: float) -> list[int]:
    """The [start, end) fraction of image ids in a fixed pseudo-random order.

    The order is a hash of the id, the same on every machine, so ranges of one file
    ([0, 0.5] and [0.5, 1]) are disjoint and together hold every image.
    """
    ranked = sorted(image_ids, key=lambda i: (_id_hash(i), i))
    return ranked[round(start * len(ranked)) : round(end * len(ranked))]


def check_disjoint(split_ids: Mapping[str, Sequence[int]], origins: Mapping[str, str]) -> None:
    """Raise DataError if an image id is in two splits (naming how many, and some)."""
    overlaps = []
    for a, b in combinations(split_ids, 2):
        common = sorted(set(split_ids[a]) & set(split_ids[b]))
        if common:
            overlaps.append(
                f"{len(common)} image id(s) are in both '{a}' ({origins[a]}) and "
                f"'{b}' ({origins[b]}), e.g. {common[:5]}"
            )
    if overlaps:
        raise DataError(
            "dataset splits overlap: "
            + "; ".join(overlaps)
            + ". Each image must be in one split only (COCO 2014 and 2017 share image ids: "
            "never mix one's training split with the other's evaluation split)."
        )


def clean_caption(text: str, max_chars: int) -> tuple[str | None, str | None]:
    """The NFC-normalised, stripped caption, or None and the reason it is skipped."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates from "\ud83d"-style JSON escapes
        return None, "caption_invalid_unicode"
    caption = unicodedata.normalize("NFC", text).strip()
    if not caption:
        return None, "caption_empty"
    if len(caption) > max_chars:
        return None, "caption_too_long"
    if not _LETTER_OR_DIGIT.search(caption):
        return None, "caption_no_words"
    return caption, None


def _split_source(name: str, entry: Any, root: Path, where: str) -> SplitSource:
    field_name = f"dataset.splits.{name}"
    if not isinstance(entry, Mapping) or not isinstance(entry.get("annotations"), str):
        raise DataError(f"{where}: {field_name}.annotations must be a file path string")
    if unknown := sorted(set(entry) - {"annotations", "images", "select"}):
        raise DataError(f"{where}: {field_name} has unknown key(s) {unknown}")
    images = entry.get("images") or ""
    if not isinstance(images, str):
        raise DataError(f"{where}: {field_name}.images must be a folder path string")
    select = entry.get("select")
    if select is not None:
        valid = (
            isinstance(select, Sequence)
            and len(select) == 2
            and all(isinstance(x, int | float) and not isinstance(x, bool) for x in select)
            and 0 <= select[0] < select[1] <= 1
        )
        if not valid:
            raise DataError(
                f"{where}: {field_name}.select must be [start, end] fractions with "
                f"0 <= start < end <= 1, got {select!r}"
            )
        select = (float(select[0]), float(select[1]))
    return SplitSource(name, root / entry["annotations"], root / images, select)


def _read_files(spec: DatasetSpec, skipped: Tally) -> dict[Path, CaptionFile]:
    """Each annotation file once: val and test may be halves of one file."""
    files: dict[Path, CaptionFile] = {}
    for source in spec.splits:
        if source.annotations not in files:
            files[source.annotations] = read_captions(source.annotations, spec.format, skipped)
    return files


def _caption_table(
    candidates: Sequence[_Candidate],
    checks: Sequence[ImageCheck],
    skipped: Tally,
    notes: Tally,
    stats: dict[str, SplitStats],
) -> pd.DataFrame:
    """One row per caption of every image that decoded; the others are counted."""
    rows: dict[str, list] = {column: [] for column in TABLE_DTYPES}
    for candidate, check in zip(candidates, checks, strict=True):
        split = stats[candidate.split]
        if not check.ok:
            skipped.add(f"image_{check.reason}", f"{candidate.file_path}: {check.detail}")
            split.images_skipped += 1
            split.skipped_reasons[check.reason] += 1
            split.captions_skipped += len(candidate.captions)
            continue
        _note_format(notes, candidate.file_path, check)
        split.images_kept += 1
        split.captions_kept += len(candidate.captions)
        for annotation_id, caption in candidate.captions:
            row = (candidate.image_id, candidate.split, candidate.file_path, annotation_id, caption)
            for column, value in zip(TABLE_DTYPES, (*row, *check.size), strict=True):
                rows[column].append(value)
    return pd.DataFrame(rows).astype(TABLE_DTYPES)


def _clean_captions(
    coco: COCO,
    image_id: int,
    source: SplitSource,
    settings: IngestParams,
    skipped: Tally,
    stats: dict[str, SplitStats],
) -> list[tuple[int, str]]:
    """(annotation id, clean caption) of one image; bad captions are counted and dropped."""
    captions = []
    for annotation in sorted(coco.imgToAnns[image_id], key=lambda a: a["id"]):
        caption, reason = clean_caption(annotation["caption"], settings.max_caption_chars)
        if reason is None:
            captions.append((annotation["id"], caption))
        else:
            text = annotation["caption"].encode("utf-8", "backslashreplace").decode()
            example = f"{source.annotations}: annotation id={annotation['id']}: {text[:60]!r}"
            skipped.add(reason, example)
            stats[source.split].captions_skipped += 1
    return captions


def _note_format(notes: Tally, path: str, check: ImageCheck) -> None:
    expected = _EXTENSION_FORMATS.get(Path(path).suffix.lower())
    if expected is not None and check.format != expected:
        notes.add(f"format_{check.format.lower()}_not_{expected.lower()}", path)
    if check.mode != "RGB":
        notes.add(f"mode_{check.mode}", path)
    if check.orientation != 1:
        notes.add("exif_rotated", f"{path}: orientation {check.orientation}")


def _check_split_usable(
    source: SplitSource, stats: SplitStats, skipped: Tally, limit: float
) -> None:
    """Stop when a split is left empty, or when too many of its images are broken."""
    if stats.images_kept == 0:
        raise DataError(
            f"split '{source.split}': none of the {stats.images_listed} images of "
            f"{source.annotations} is usable (see the skip reasons: {dict(skipped.counts)})"
        )
    bad = sum(stats.skipped_reasons.values())
    decoded = stats.images_kept + bad
    if decoded and bad / decoded > limit:
        reasons = ", ".join(f"{r}: {n}" for r, n in stats.skipped_reasons.most_common())
        examples = skipped.examples.get(f"image_{stats.skipped_reasons.most_common(1)[0][0]}")
        example = f"; e.g. {examples[0]}" if examples else ""
        raise DataError(
            f"split '{source.split}': {bad} of {decoded} images ({bad / decoded:.1%}) under "
            f"{source.images} cannot be used ({reasons}{example}), more than "
            f"ingest.max_bad_image_fraction = {limit:.1%}: check dataset.root and "
            f"dataset.splits.{source.split}.images"
        )


def _report(
    spec: DatasetSpec,
    stats: dict[str, SplitStats],
    skipped: Tally,
    notes: Tally,
    captions: int,
) -> dict:
    splits = {
        split: {key: value for key, value in asdict(st).items() if key != "skipped_reasons"}
        for split, st in stats.items()
    }
    return {
        "dataset": {"name": spec.name, "format": spec.format, "root": spec.root},
        "splits": splits,
        "totals": {"images": sum(st.images_kept for st in stats.values()), "captions": captions},
        "skipped": skipped.to_dict(),
        "format_notes": notes.to_dict(),
    }


def _id_hash(image_id: int) -> bytes:
    return hashlib.blake2b(str(image_id).encode(), digest_size=8).digest()


def _is_int(value: Any, minimum: int) -> bool:
    return type(value) is int and value >= minimum
