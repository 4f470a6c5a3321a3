"""The parameters of a shapes generation (`params:synthetic`) and where it writes each split
(`params:dataset`), validated with a DataError that names the field; and the fingerprint of
both, which decides whether an earlier generation can be kept.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from caption_pipeline.data.shapes.captions import MAX_CAPTIONS_PER_IMAGE
from caption_pipeline.errors import DataError
from caption_pipeline.params import from_params

# Bump when the output for the same parameters changes: it invalidates earlier generations.
GENERATOR_VERSION = 1
# Image ids: a split's base plus the image's index in it, so the splits never share an id.
SPLIT_ID_BASE = {"train": 1_000_000, "val": 2_000_000, "test": 3_000_000}
_MAX_SPLIT_IMAGES = 999_999


@dataclass(frozen=True)
class ShapesConfig:
    """Parameters of one generation (`params:synthetic`)."""

    splits: dict[str, int]
    seed: int
    image_size: int
    jpeg_quality: int
    captions_per_image: int

    @classmethod
    def from_params(cls, params: Mapping[str, Any], key: str = "synthetic") -> ShapesConfig:
        """Validate `params:<key>`; a DataError names the bad field."""
        params = asdict(from_params(cls, params, key))  # unknown, missing keys
        if not isinstance(params.get("splits"), Mapping) or not params["splits"]:
            raise DataError(f"parameters `{key}.splits`: expected a mapping split -> image count")
        splits = {}
        for split, count in params["splits"].items():
            if split not in SPLIT_ID_BASE:
                raise DataError(
                    f"parameters `{key}.splits.{split}`: split must be one of {list(SPLIT_ID_BASE)}"
                )
            splits[split] = _int_field(f"{key}.splits.{split}", count, 1, _MAX_SPLIT_IMAGES)
        limits = {
            "seed": (0, 2**63 - 1),
            "image_size": (64, 1024),
            "jpeg_quality": (1, 100),
            "captions_per_image": (1, MAX_CAPTIONS_PER_IMAGE),
        }
        values = {
            name: _int_field(f"{key}.{name}", params[name], *limit)
            for name, limit in limits.items()
        }
        return cls(splits=splits, **values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _int_field(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise DataError(
            f"parameters `{name}`: expected an integer in [{low}, {high}], got {value!r}"
        )
    return value


@dataclass(frozen=True)
class SplitLayout:
    """Where a split lives under the dataset root (from the `dataset.splits` block)."""

    captions: str  # e.g. annotations/captions_train.json
    instances: str  # next to it: annotations/instances_train.json
    images: str  # e.g. train


def layout_from_dataset(dataset: Mapping[str, Any]) -> dict[str, SplitLayout]:
    """Read the COCO layout of every split from `params:dataset`; a DataError names the field."""
    if dataset.get("format") != "coco":
        raise DataError(
            f"parameters `dataset.format`: the shapes dataset is written in COCO format, "
            f"got {dataset.get('format')!r}"
        )
    if not isinstance(dataset.get("root"), str) or not dataset["root"]:
        raise DataError("parameters `dataset.root`: expected the folder to generate into")
    splits = dataset.get("splits")
    if not isinstance(splits, Mapping) or not splits:
        raise DataError(
            "parameters `dataset.splits`: expected a mapping split -> {annotations, images}"
        )
    layout = {}
    for split, entry in splits.items():
        for field in ("annotations", "images"):
            value = entry.get(field) if isinstance(entry, Mapping) else None
            # Everything is written inside `root`, never next to it.
            if not isinstance(value, str) or Path(value).is_absolute() or ".." in Path(value).parts:
                raise DataError(
                    f"parameters `dataset.splits.{split}.{field}`: expected a path inside "
                    f"`dataset.root`, got {value!r}"
                )
        captions = Path(entry["annotations"])
        layout[split] = SplitLayout(
            captions=captions.as_posix(),
            instances=captions.with_name(f"instances_{split}.json").as_posix(),
            images=entry["images"],
        )
    return layout


def fingerprint(config: ShapesConfig, layout: Mapping[str, SplitLayout]) -> str:
    """Hash of everything the generated files depend on."""
    payload = {
        "generator_version": GENERATOR_VERSION,
        "config": config.to_dict(),
        "layout": {split: asdict(entry) for split, entry in sorted(layout.items())},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
