"""Caption files, read and checked: a COCO captions JSON or Karpathy's split file, each
indexed by pycocotools' COCO API after a structural check (pycocotools itself fails on a bad
file with bare asserts and KeyErrors). Bad structure is a DataError naming the file, the field
and the entry index (`get_field`, `require_type`); duplicate and orphan annotations are
skipped and counted in a `Tally`."""

from __future__ import annotations

import contextlib
import io
import json
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pycocotools.coco import COCO

from caption_pipeline.errors import DataError

KARPATHY_SPLITS = ("train", "restval", "val", "test")
_JSON_TYPES = {str: "a string", int: "an integer", list: "an array", dict: "an object"}


class Tally:
    """Counts per reason, with the first few examples of each."""

    def __init__(self, max_examples: int) -> None:
        self.max_examples = max_examples
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = defaultdict(list)

    def add(self, reason: str, example: str) -> None:
        self.counts[reason] += 1
        if len(self.examples[reason]) < self.max_examples:
            self.examples[reason].append(example)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {
            reason: {"count": self.counts[reason], "examples": self.examples[reason]}
            for reason in sorted(self.counts)
        }


@dataclass
class CaptionFile:
    """One annotation file, indexed by pycocotools."""

    path: Path
    coco: COCO
    karpathy_split: dict[int, str] | None = None  # image id -> Karpathy's split


def read_captions(path: Path, fmt: str, skipped: Tally) -> CaptionFile:
    """Read and index one annotation file of the given format ("coco" or "karpathy")."""
    if fmt == "karpathy":
        return read_karpathy_split(path, skipped)
    return read_coco_captions(path, skipped)


def read_coco_captions(path: Path, skipped: Tally) -> CaptionFile:
    """A COCO captions JSON, structurally checked, then indexed by pycocotools."""
    data = load_json_object(path, ("images", "annotations"))
    for i, image in enumerate(data["images"]):
        where = f"images[{i}]"
        require_type(image, dict, path, where)
        require_type(get_field(image, "id", path, where), int, path, f"{where}.id")
        require_name(get_field(image, "file_name", path, where), path, f"{where}.file_name")
    for i, annotation in enumerate(data["annotations"]):
        where = f"annotations[{i}]"
        require_type(annotation, dict, path, where)
        for key, kind in (("id", int), ("image_id", int), ("caption", str)):
            require_type(get_field(annotation, key, path, where), kind, path, f"{where}.{key}")
    return CaptionFile(path, _index(path, data["images"], data["annotations"], skipped))


def read_karpathy_split(path: Path, skipped: Tally) -> CaptionFile:
    """Karpathy's split file, turned into COCO captions and indexed by pycocotools."""
    data = load_json_object(path, ("images",))
    images, annotations, karpathy_split = [], [], {}
    for i, item in enumerate(data["images"]):
        where = f"images[{i}]"
        require_type(item, dict, path, where)
        id_key = "cocoid" if "cocoid" in item else "imgid"
        image_id = require_type(
            get_field(item, id_key, path, where), int, path, f"{where}.{id_key}"
        )
        name = require_name(get_field(item, "filename", path, where), path, f"{where}.filename")
        folder = require_type(item.get("filepath", ""), str, path, f"{where}.filepath")
        split = require_type(get_field(item, "split", path, where), str, path, f"{where}.split")
        if split not in KARPATHY_SPLITS:
            raise DataError(f"{path}: {where}.split must be in {KARPATHY_SPLITS}, got {split!r}")
        sentences = require_type(
            get_field(item, "sentences", path, where), list, path, f"{where}.sentences"
        )
        for j, sentence in enumerate(sentences):
            at = f"{where}.sentences[{j}]"
            require_type(sentence, dict, path, at)
            sentence_id = require_type(
                get_field(sentence, "sentid", path, at), int, path, f"{at}.sentid"
            )
            raw = require_type(get_field(sentence, "raw", path, at), str, path, f"{at}.raw")
            annotations.append({"id": sentence_id, "image_id": image_id, "caption": raw})
        images.append({"id": image_id, "file_name": f"{folder}/{name}" if folder else name})
        karpathy_split[image_id] = split
    return CaptionFile(path, _index(path, images, annotations, skipped), karpathy_split)


def load_json_object(path: Path, keys: Sequence[str]) -> dict:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(
            f"{path}: annotation file not found (check dataset.root and dataset.splits)"
        ) from None
    except OSError as exc:
        raise DataError(f"{path}: annotation file cannot be read: {exc.strerror or exc}") from None
    try:
        data = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (bad byte at offset {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path}: not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}"
        ) from None
    if not isinstance(data, dict):
        raise DataError(
            f"{path}: top level must be a JSON object with keys {list(keys)}, got {describe(data)}"
        )
    for key in keys:
        require_type(get_field(data, key, path, ""), list, path, key)
    return data


def _index(path: Path, images: list[dict], annotations: list[dict], skipped: Tally) -> COCO:
    """pycocotools' index of checked entries; duplicates and orphans are dropped and counted."""
    image_ids: set[int] = set()
    for i, image in enumerate(images):
        if image["id"] in image_ids:
            raise DataError(f"{path}: images[{i}].id {image['id']} is a duplicate image id")
        image_ids.add(image["id"])
    kept, annotation_ids = [], set()
    for i, annotation in enumerate(annotations):
        ids = f"id={annotation['id']}, image_id={annotation['image_id']}"
        example = f"{path}: annotations[{i}] {ids}"
        if annotation["id"] in annotation_ids:
            skipped.add("annotation_duplicate_id", example)
        elif annotation["image_id"] not in image_ids:
            skipped.add("annotation_unknown_image", example)
        else:
            annotation_ids.add(annotation["id"])
            kept.append(annotation)
    coco = COCO()
    coco.dataset = {"images": images, "annotations": kept}
    with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress lines
        coco.createIndex()
    return coco


def get_field(entry: dict, key: str, path: Path, where: str) -> Any:
    if key not in entry:
        raise DataError(f"{path}: {where + '.' if where else ''}{key} is missing")
    return entry[key]


def require_type(value: Any, kind: type, path: Path, where: str) -> Any:
    ok = type(value) is int if kind is int else isinstance(value, kind)  # True is no id
    if not ok:
        raise DataError(f"{path}: {where} must be {_JSON_TYPES[kind]}, got {describe(value)}")
    return value


def require_name(value: Any, path: Path, where: str) -> str:
    if not require_type(value, str, path, where).strip():
        raise DataError(f"{path}: {where} must be a non-empty file name")
    return value


def describe(value: Any) -> str:
    names = {bool: "a boolean", float: "a number", type(None): "null", **_JSON_TYPES}
    shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
    return f"{names.get(type(value), type(value).__name__)} {shown}"
