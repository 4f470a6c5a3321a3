"""Plans: everything about a COCO-like image but its pixels (ids, size, objects, captions).

Planning is split from rendering so that the JSON files, which need every image's size, objects
and captions, never need pixels, and so that the pixels can be drawn in worker processes from a
plan alone (`pixels.render_image`).

- Sizes. The longer side is 640 px, the shorter 480 (4:3) for 42 %, 425-428 (3:2) for 34 %,
  360 (16:9) for 5 %, 640 (square) for 3 %, anything in 361..639 for the rest; a quarter of
  the non-square ones are portrait; 0.2 % are grayscale (COCO has a few hundred). These shares
  approximate COCO's; they were not measured from it. Mean size 594 x 507.
- Objects. Every blob is an object of one of COCO's 80 categories (person 30 %), with its
  bbox, polygon and area in instances_val2017.json (no crowd regions), which the attention
  localization score reads for conf/coco's val and test splits (`coco_instances`). Blobs and
  captions are drawn independently, so the captions' words for COCO's categories (its head
  words hold "man", "dog", "pizza", ...) say nothing of the blobs: a score on this data only
  shows that the files are read, it measures nothing. Radii are log-uniform: many small
  objects, few large ones.
- Ids. Image ids are drawn without replacement from COCO's range (1..581,929), caption ids
  from 1..830,000 (both larger when the scale needs it), so they are sparse, as in COCO.

Determinism. An image's size, blobs and captions come from a generator seeded by (seed,
split, index) and PLAN_STREAM, its pixels from another (PIXEL_STREAM), so an image does not
depend on the others or on the number of worker processes; ids depend on (seed, scale)
(ID_STREAM), drawn for the whole dataset at once because they must be distinct across it.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from caption_pipeline.data.coco_like.captions import CAPTION_COUNTS, sample_captions
from caption_pipeline.data.coco_like.coco2017 import (
    CATEGORIES,
    COCO_MAX_CAPTION_ID,
    COCO_MAX_IMAGE_ID,
    COCO_TRAIN_IMAGES,
    COCO_VAL_IMAGES,
    KARPATHY_RESTVAL_P,
    MIN_VAL_IMAGES,
)
from caption_pipeline.errors import DataError

_SPLIT_CODE = {"train": 0, "val": 1}  # part of every per-image seed
# The last element of an `image_rng` seed: which of an image's random streams it is.
PLAN_STREAM, PIXEL_STREAM, ID_STREAM = 0, 1, 2

LONG_SIDE = 640
# Shorter side -> share of images; the rest (UNIFORM_SHORT_P) is uniform in 361..639.
SHORT_SIDES = {480: 0.42, 427: 0.25, 426: 0.04, 425: 0.03, 428: 0.02, 360: 0.05, 640: 0.03}
UNIFORM_SHORT_P = 1.0 - sum(SHORT_SIDES.values())
PORTRAIT_P = 0.25  # of the non-square images
GRAYSCALE_P = 0.002
_MAX_BLOBS = 8
_POLYGON_POINTS = 16
PERSON_P = 0.3  # of objects; the other categories share the rest equally
_CAPTURE_START, _CAPTURE_SECONDS = datetime(2013, 1, 1), 365 * 24 * 3600


@dataclass(frozen=True)
class Blob:
    """An elliptic blob, in image pixels: it is drawn and it is the image's object."""

    cx: float
    cy: float
    rx: float  # semi-axes
    ry: float
    angle: float  # radians, of the rx axis from the x axis
    colour: tuple[int, int, int]
    sharpness: float  # edge steepness: the soft edge is about radius / sharpness wide
    category_id: int

    def polygon(self, width: int, height: int) -> np.ndarray:
        """[_POLYGON_POINTS, 2] points (x, y) of the outline, clipped to the image."""
        t = np.linspace(0.0, 2 * np.pi, _POLYGON_POINTS, endpoint=False)
        cos, sin = math.cos(self.angle), math.sin(self.angle)
        x = self.cx + self.rx * np.cos(t) * cos - self.ry * np.sin(t) * sin
        y = self.cy + self.rx * np.cos(t) * sin + self.ry * np.sin(t) * cos
        return np.stack([np.clip(x, 0, width), np.clip(y, 0, height)], axis=1)


@dataclass(frozen=True)
class ImagePlan:
    """One image: its ids, size, objects and captions (its pixels come from `render_image`)."""

    split: str  # train | val
    index: int  # position in its split: with the seed, what its content is drawn from
    image_id: int
    width: int
    height: int
    grayscale: bool
    blobs: tuple[Blob, ...]
    captions: tuple[str, ...]
    caption_ids: tuple[int, ...]
    date_captured: str
    karpathy_split: str  # train | restval | val | test

    @property
    def file_name(self) -> str:
        return f"{self.image_id:012d}.jpg"


def split_sizes(scale: int) -> dict[str, int]:
    """Images per split: `scale` train images, val in COCO's proportion (at least 32)."""
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise DataError(f"coco_like: scale must be an integer >= 1, got {scale!r}")
    return {
        "train": scale,
        "val": max(MIN_VAL_IMAGES, round(scale * COCO_VAL_IMAGES / COCO_TRAIN_IMAGES)),
    }


def image_rng(seed: int, split: str, index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, _SPLIT_CODE[split], index, stream])


def sample_image_size(rng: np.random.Generator) -> tuple[int, int]:
    """(width, height): longer side 640, shorter side and orientation as COCO's (module doc)."""
    sides = np.array([*SHORT_SIDES, 0])
    short = int(rng.choice(sides, p=[*SHORT_SIDES.values(), UNIFORM_SHORT_P]))
    if short == 0:
        short = int(rng.integers(361, LONG_SIDE))
    portrait = short != LONG_SIDE and rng.random() < PORTRAIT_P
    return (short, LONG_SIDE) if portrait else (LONG_SIDE, short)


def sample_blobs(rng: np.random.Generator, width: int, height: int) -> tuple[Blob, ...]:
    """1 to 8 blobs, radii from 2 % to 30 % of the width, log-uniform (many small, few large)."""
    others = [c["id"] for c in CATEGORIES if c["name"] != "person"]
    blobs = []
    for _ in range(int(rng.integers(1, _MAX_BLOBS + 1))):
        rx = width * math.exp(rng.uniform(math.log(0.02), math.log(0.3)))
        category = 1 if rng.random() < PERSON_P else int(rng.choice(others))  # 1: person
        blobs.append(Blob(
            cx=float(rng.uniform(0, width)), cy=float(rng.uniform(0, height)),
            rx=rx, ry=rx * math.exp(rng.uniform(-0.7, 0.7)), angle=float(rng.uniform(0, np.pi)),
            colour=tuple(int(v) for v in rng.integers(0, 256, 3)),
            sharpness=float(rng.uniform(2.0, 10.0)), category_id=category,
        ))  # fmt: skip
    return tuple(blobs)


@functools.cache
def _plan_content(seed: int, split: str, index: int) -> dict[str, Any]:
    """An image's own content: size, blobs, captions, date, Karpathy split."""
    rng = image_rng(seed, split, index, PLAN_STREAM)
    width, height = sample_image_size(rng)
    counts, p = list(CAPTION_COUNTS), list(CAPTION_COUNTS.values())
    captured = _CAPTURE_START + timedelta(seconds=int(rng.integers(_CAPTURE_SECONDS)))
    if split == "train":
        karpathy = "restval" if rng.random() < KARPATHY_RESTVAL_P else "train"
    else:
        karpathy = "val" if rng.random() < 0.5 else "test"
    return {
        "width": width, "height": height, "grayscale": bool(rng.random() < GRAYSCALE_P),
        "blobs": sample_blobs(rng, width, height),
        "captions": sample_captions(rng, int(rng.choice(counts, p=p))),
        "date_captured": captured.strftime("%Y-%m-%d %H:%M:%S"), "karpathy_split": karpathy,
    }  # fmt: skip


def plan_dataset(scale: int, seed: int) -> dict[str, list[ImagePlan]]:
    """Every image of both splits, without pixels: ids drawn for the whole dataset at once."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise DataError(f"coco_like: seed must be an integer >= 0, got {seed!r}")
    sizes = split_sizes(scale)
    total_images = sum(sizes.values())
    contents: dict[str, list[dict[str, Any]]] = {split: [] for split in sizes}
    with tqdm(total=total_images, desc="Planning COCO-like images", unit="img") as bar:
        for split, count in sizes.items():
            for index in range(count):
                contents[split].append(_plan_content(seed, split, index))
                bar.update()
    total_captions = sum(len(c["captions"]) for cs in contents.values() for c in cs)
    rng = np.random.default_rng([seed, ID_STREAM, scale])
    image_ids = iter(_sparse_ids(rng, total_images, COCO_MAX_IMAGE_ID))
    caption_ids = iter(_sparse_ids(rng, total_captions, COCO_MAX_CAPTION_ID))
    return {
        split: [
            ImagePlan(
                split=split,
                index=i,
                image_id=next(image_ids),
                caption_ids=tuple(next(caption_ids) for _ in c["captions"]),
                **c,
            )
            for i, c in enumerate(cs)
        ]
        for split, cs in contents.items()
    }


def _sparse_ids(rng: np.random.Generator, count: int, coco_max: int) -> list[int]:
    """`count` distinct ids from 1..max(coco_max, 2 * count), in random order."""
    return [int(i) + 1 for i in rng.choice(max(coco_max, 2 * count), count, replace=False)]
