"""A COCO-shaped dataset generator, for rehearsing runs at COCO's scale (never the default data).

`python -m caption_pipeline.coco_like --out DIR --scale N --seed S` writes, under DIR, what
`kedro run --env coco` expects under `data/01_raw/coco` (conf/coco/parameters.yml), with COCO
2017's file layout, JSON schemas, image sizes, file sizes, caption counts, caption lengths and
word statistics, so a run of the whole pipeline at full scale (118,287 train images) can be
timed, sized and broken before the real 19 GB are downloaded:

    DIR/train2017/000000xxxxxx.jpg            N images
    DIR/val2017/000000xxxxxx.jpg              N * 5,000 / 118,287 images (at least 32)
    DIR/annotations/captions_train2017.json   info, licenses, images, annotations (captions)
    DIR/annotations/captions_val2017.json
    DIR/annotations/instances_val2017.json    + categories (COCO's 80) and object boxes
    DIR/dataset_coco.json                     the same captions as Karpathy's split file
    DIR/coco_like.json                        this generator's marker: parameters, summary

What is modelled, and the numbers (measured on this project's 2-core CPU machine):

- Images. The longer side is 640 px, the shorter 480 (4:3) for 42 %, 425-428 (3:2) for 34 %,
  360 (16:9) for 5 %, 640 (square) for 3 %, anything in 361..639 for the rest; a quarter of the
  non-square ones are portrait; 0.2 % are grayscale (COCO has a few hundred). These shares
  approximate COCO's; they were not measured from it. Mean size 594 x 507. Pixels are a
  smooth colour gradient with a cloudy texture and 1-8 blurred elliptic blobs, drawn at 1/8
  of the size and upsampled (bicubic), plus luminance grain at full size. At JPEG quality 90
  the smooth picture alone is 33 kB (20-55); the grain, log-normal around 22 grey levels,
  brings the mean file to 161 kB (sd 32, 84-313 kB over 400 images), COCO's ~160 kB
  (train2017: 18 GB / 118,287 files). Rendering plus encoding runs at about 80 images/s per
  core (numpy at 1/8 size, Pillow's resize and encoder), so full scale, 123,287 images,
  should take about 13 minutes with 2 workers (estimated from that rate, not timed), after
  35 s of planning (sizes, blobs, captions). Images are streamed to disk; the plans of a
  full-scale run hold 470 MB, 1.5 GB at the peak while the JSON files are serialised
  (captions_train2017.json 82 MB, dataset_coco.json 119 MB).
- Captions. 5 per image, rarely 6 or 7 (COCO 2017: 591,753 captions for 118,287 images,
  5.003 each). Words per caption: a table shaped like COCO's (8 to 12 words for 84 %, 1 %
  under 8, 1 % over 20, up to 30), mean 10.53. Words are drawn independently from a
  Zipf-Mandelbrot law p(r) ~ (r + 2.7)^-1.5427 over 30,000 ranks: about COCO's 100 most
  frequent words first (the offset 2.7 keeps "a" at 13.7 % of all words, where plain Zipf at
  this exponent gives it over a third), then pronounceable consonant-vowel tokens ("nomu",
  "pofele"), which the PTB tokenizer keeps whole (tests/test_coco_like.py checks all 30,000).
  The exponent was solved for so that the vocab stage (`min_count: 5`, captions cut at 20
  words) finds 10,204 words in a full-scale train split, as the original project did on
  COCO. `expected_vocabulary` is that number under the model, exactly: the sum over words of
  P(Poisson(expected count) >= 5), 10,203 at 591,753 captions; `simulated_vocabulary`
  (counting sampled words) gives 10,203 on average over 32 seeds (sd 40), and the captions of
  a full-scale generation (seed 0) gave 10,186 words to `text.Vocabulary.build`, out of 25,546
  distinct words. Smaller scales have smaller vocabularies (expected: 1,310 words at 5,000
  train images, 3,223 at 20,000, 5,839 at 50,000).
- Objects. Every blob is an object of one of COCO's 80 categories (person 30 %), with its
  bbox, polygon and area in instances_val2017.json (no crowd regions), which the attention
  localization score reads for conf/coco's val and test splits (`coco_instances`). Blobs and
  captions are drawn independently, so the captions' words for COCO's categories (its head
  words hold "man", "dog", "pizza", ...) say nothing of the blobs: a score on this data only
  shows that the files are read, it measures nothing.
- Ids. Image ids are drawn without replacement from COCO's range (1..581,929), caption ids
  from 1..830,000 (both larger when the scale needs it), so they are sparse, as in COCO.
  URLs point at `.invalid` hosts: the images are synthetic, not COCO's.

Determinism. An image's size, blobs and captions come from a generator seeded by (seed,
split, index), its pixels from another, so an image does not depend on the others or on the
number of worker processes; ids depend on (seed, scale). The same arguments give
byte-identical files.

Safety. JSON files are written to a temporary name and renamed (`atomic.py`), images too,
and the JSON files only after every image: a killed run never leaves a partial file under a
final name. Running again with the same arguments resumes (it keeps the images already there
and writes the rest); other arguments, or a folder this generator did not make, are refused.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import logging
import math
import multiprocessing
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from caption_pipeline.atomic import atomic_path, atomic_write_bytes, remove_stale_temporaries
from caption_pipeline.coco_like_captions import CAPTION_COUNTS, expected_vocabulary, sample_captions
from caption_pipeline.errors import DataError

logger = logging.getLogger(__name__)

# Bump when the output for the same arguments changes: a resumed run must not mix versions.
GENERATOR_VERSION = 1
MARKER_FILE = "coco_like.json"

# MS COCO 2017, for proportions.
COCO_TRAIN_IMAGES = 118_287
COCO_VAL_IMAGES = 5_000
COCO_TRAIN_CAPTIONS = 591_753
COCO_MAX_IMAGE_ID = 581_929
COCO_MAX_CAPTION_ID = 830_000  # about where COCO 2017's caption ids end
MIN_VAL_IMAGES = 32  # so that the val and test halves hold a few images each at tiny scales
TARGET_VOCABULARY = 10_204  # words seen >= 5 times in COCO train (the original project)

FOLDERS = {"train": "train2017", "val": "val2017"}
_SPLIT_CODE = {"train": 0, "val": 1}  # part of every per-image seed
_PLAN_STREAM, _PIXEL_STREAM, _ID_STREAM = 0, 1, 2

# --- image geometry -------------------------------------------------------------------------

LONG_SIDE = 640
# Shorter side -> share of images; the rest (UNIFORM_SHORT_P) is uniform in 361..639.
SHORT_SIDES = {480: 0.42, 427: 0.25, 426: 0.04, 425: 0.03, 428: 0.02, 360: 0.05, 640: 0.03}
UNIFORM_SHORT_P = 1.0 - sum(SHORT_SIDES.values())
PORTRAIT_P = 0.25  # of the non-square images
GRAYSCALE_P = 0.002
JPEG_QUALITY = 90
_LOW_RES = 8  # gradient, texture and blobs are drawn at 1/8 of the size, then upsampled
_GRAIN_MEDIAN, _GRAIN_SPREAD, _GRAIN_RANGE = 22.0, 0.45, (6.0, 64.0)  # grey levels, log-normal
_MAX_BLOBS = 8
_POLYGON_POINTS = 16

# --- objects --------------------------------------------------------------------------------

# COCO's 80 categories by supercategory: "id name" (ids with COCO's gaps).
_CATEGORY_TABLE = {
    "person": "1 person",
    "vehicle": "2 bicycle|3 car|4 motorcycle|5 airplane|6 bus|7 train|8 truck|9 boat",
    "outdoor": "10 traffic light|11 fire hydrant|13 stop sign|14 parking meter|15 bench",
    "animal": "16 bird|17 cat|18 dog|19 horse|20 sheep|21 cow|22 elephant|23 bear|24 zebra|"
    "25 giraffe",
    "accessory": "27 backpack|28 umbrella|31 handbag|32 tie|33 suitcase",
    "sports": "34 frisbee|35 skis|36 snowboard|37 sports ball|38 kite|39 baseball bat|"
    "40 baseball glove|41 skateboard|42 surfboard|43 tennis racket",
    "kitchen": "44 bottle|46 wine glass|47 cup|48 fork|49 knife|50 spoon|51 bowl",
    "food": "52 banana|53 apple|54 sandwich|55 orange|56 broccoli|57 carrot|58 hot dog|59 pizza|"
    "60 donut|61 cake",
    "furniture": "62 chair|63 couch|64 potted plant|65 bed|67 dining table|70 toilet",
    "electronic": "72 tv|73 laptop|74 mouse|75 remote|76 keyboard|77 cell phone",
    "appliance": "78 microwave|79 oven|80 toaster|81 sink|82 refrigerator",
    "indoor": "84 book|85 clock|86 vase|87 scissors|88 teddy bear|89 hair drier|90 toothbrush",
}
CATEGORIES = tuple(
    {
        "supercategory": supercategory,
        "id": int(entry.split(" ", 1)[0]),
        "name": entry.split(" ", 1)[1],
    }
    for supercategory, entries in _CATEGORY_TABLE.items()
    for entry in entries.split("|")
)
PERSON_P = 0.3  # of objects; the other categories share the rest equally

# --- JSON headers ---------------------------------------------------------------------------

INFO = {
    "description": "COCO-shaped rehearsal data (caption_pipeline.coco_like): synthetic images "
    "and captions, not MS COCO",
    "url": "https://coco-like.invalid",
    "version": str(GENERATOR_VERSION),
    "year": 2017,
    "contributor": "caption_pipeline.coco_like",
    "date_created": "2017/09/01",
}
LICENSES = [
    {
        "url": "https://creativecommons.org/publicdomain/zero/1.0/",
        "id": 1,
        "name": "CC0 1.0 (synthetic data)",
    }
]
KARPATHY_RESTVAL_P = 30_504 / 113_287  # Karpathy's restval share of the training images
_CAPTURE_START, _CAPTURE_SECONDS = datetime(2013, 1, 1), 365 * 24 * 3600


# ---------------------------------------------------------------------------------------------
# Plans: everything about an image but its pixels


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
    rng = image_rng(seed, split, index, _PLAN_STREAM)
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
    rng = np.random.default_rng([seed, _ID_STREAM, scale])
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


# ---------------------------------------------------------------------------------------------
# Pixels


def render_image(plan: ImagePlan, seed: int) -> np.ndarray:
    """The image's pixels, [H, W, 3] uint8 (or [H, W] when grayscale)."""
    rng = image_rng(seed, plan.split, plan.index, _PIXEL_STREAM)
    w, h = plan.width, plan.height
    lw, lh = -(-w // _LOW_RES), -(-h // _LOW_RES)
    # Low-resolution pixel centres, in image pixels: [1, lw, 1] and [lh, 1, 1].
    xs = ((np.arange(lw) + 0.5) * _LOW_RES)[None, :, None]
    ys = ((np.arange(lh) + 0.5) * _LOW_RES)[:, None, None]
    low = (
        rng.uniform(40, 215, 3)
        + rng.uniform(-90, 90, 3) * xs / w
        + rng.uniform(-90, 90, 3) * ys / h
    )  # [lh, lw, 3] gradient
    low = low + rng.normal(0.0, rng.uniform(4, 16), (lh, lw, 3))  # cloudy texture
    for blob in plan.blobs:
        cos, sin = math.cos(blob.angle), math.sin(blob.angle)
        dx, dy = xs[..., 0] - blob.cx, ys[..., 0] - blob.cy  # [1, lw], [lh, 1]
        d = np.hypot((dx * cos + dy * sin) / blob.rx, (dy * cos - dx * sin) / blob.ry)
        edge = np.minimum((d - 1.0) * blob.sharpness, 50.0)  # exp overflows past ~700
        inside = (1.0 / (1.0 + np.exp(edge)))[..., None]  # [lh, lw, 1]
        low = low * (1.0 - inside) + np.array(blob.colour) * inside
    small = Image.fromarray(np.clip(low, 0, 255).astype(np.uint8))
    smooth = np.asarray(small.resize((w, h), Image.Resampling.BICUBIC), np.float32)  # [h, w, 3]
    if plan.grayscale:
        smooth = smooth @ np.array([0.299, 0.587, 0.114], np.float32)  # [h, w]
    sigma = np.clip(_GRAIN_MEDIAN * math.exp(rng.normal(0.0, _GRAIN_SPREAD)), *_GRAIN_RANGE)
    grain = rng.standard_normal((h, w), dtype=np.float32) * np.float32(sigma)
    pixels = smooth + (grain if plan.grayscale else grain[..., None])
    return np.clip(pixels, 0, 255).astype(np.uint8)


def encode_jpeg(pixels: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _write_image(task: tuple[str, ImagePlan, int, int]) -> int:
    """Render and write one image (temporary name, then rename); its size in bytes."""
    path, plan, seed, quality = task
    data = encode_jpeg(render_image(plan, seed), quality)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return len(data)


# ---------------------------------------------------------------------------------------------
# JSON files


def _image_entry(plan: ImagePlan) -> dict[str, Any]:
    folder = FOLDERS[plan.split]
    return {
        "license": 1, "file_name": plan.file_name,
        "coco_url": f"http://images.coco-like.invalid/{folder}/{plan.file_name}",
        "height": plan.height, "width": plan.width, "date_captured": plan.date_captured,
        "flickr_url": f"http://farm{plan.image_id % 9 + 1}.coco-like.invalid/{plan.image_id}.jpg",
        "id": plan.image_id,
    }  # fmt: skip


def captions_json(plans: Sequence[ImagePlan]) -> dict[str, Any]:
    """captions_{split}2017.json: COCO's schema, key for key."""
    annotations = [
        {"image_id": plan.image_id, "id": caption_id, "caption": caption}
        for plan in plans
        for caption_id, caption in zip(plan.caption_ids, plan.captions, strict=True)
    ]
    images = [_image_entry(plan) for plan in plans]
    return {"info": INFO, "licenses": LICENSES, "images": images, "annotations": annotations}


def instances_json(plans: Sequence[ImagePlan]) -> dict[str, Any]:
    """instances_{split}2017.json: the blobs as COCO object annotations, ids from 1."""
    annotations = []
    for plan in plans:
        for blob in plan.blobs:
            polygon = blob.polygon(plan.width, plan.height)  # [P, 2]
            low, high = polygon.min(axis=0), polygon.max(axis=0)
            x, y = polygon[:, 0], polygon[:, 1]
            area = 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))
            annotations.append({
                "segmentation": [[round(float(v), 2) for v in polygon.ravel()]],
                "area": round(area, 4), "iscrowd": 0, "image_id": plan.image_id,
                "bbox": [round(float(v), 2) for v in (*low, *(high - low))],
                "category_id": blob.category_id, "id": len(annotations) + 1,
            })  # fmt: skip
    return {
        "info": INFO,
        "licenses": LICENSES,
        "images": [_image_entry(p) for p in plans],
        "annotations": annotations,
        "categories": list(CATEGORIES),
    }


def karpathy_json(plans: Mapping[str, Sequence[ImagePlan]]) -> dict[str, Any]:
    """dataset_coco.json: Karpathy's split file of the same images and captions; imgid and
    sentid count from 0 over the file, tokens are the lower-cased words without the period."""
    images, sentid = [], 0
    for imgid, plan in enumerate(p for split in FOLDERS for p in plans[split]):
        sentences = [
            {
                "tokens": caption.lower().rstrip(".").split(),
                "raw": caption,
                "imgid": imgid,
                "sentid": sentid + k,
            }
            for k, caption in enumerate(plan.captions)
        ]
        images.append({
            "filepath": FOLDERS[plan.split], "sentids": [s["sentid"] for s in sentences],
            "filename": plan.file_name, "imgid": imgid, "split": plan.karpathy_split,
            "sentences": sentences, "cocoid": plan.image_id,
        })  # fmt: skip
        sentid += len(sentences)
    return {"images": images, "dataset": "coco"}


def _write_json(path: Path, obj: Any) -> None:
    # Compact, as COCO's own files are (captions_train2017.json is ~90 MB at full scale).
    atomic_write_bytes(path, json.dumps(obj, separators=(",", ":")).encode())


# ---------------------------------------------------------------------------------------------
# The whole dataset


def generate(
    out: str | os.PathLike,
    scale: int,
    seed: int = 0,
    workers: int | None = 1,
    quality: int = JPEG_QUALITY,
) -> dict[str, Any]:
    """Write the dataset under `out` (module doc); returns the summary also in the marker.

    `workers`: processes rendering images (None: every core); the files do not depend on it.
    """
    out = Path(out)
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
        raise DataError(f"coco_like: quality must be an integer in 1..100, got {quality!r}")
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise DataError(f"coco_like: workers must be an integer >= 1 or None, got {workers!r}")
    config = {
        "generator_version": GENERATOR_VERSION,
        "scale": scale,
        "seed": seed,
        "quality": quality,
    }
    _claim(out, config)
    plans = plan_dataset(scale, seed)
    started = time.perf_counter()
    written, sizes = _write_images(out, plans, seed, quality, workers)
    image_seconds = time.perf_counter() - started
    _write_json(out / "annotations/captions_train2017.json", captions_json(plans["train"]))
    _write_json(out / "annotations/captions_val2017.json", captions_json(plans["val"]))
    _write_json(out / "annotations/instances_val2017.json", instances_json(plans["val"]))
    _write_json(out / "dataset_coco.json", karpathy_json(plans))
    summary = _summary(plans, sizes, written, image_seconds)
    _write_json(
        out / MARKER_FILE,
        {"generator": __name__, "config": config, "complete": True, "summary": summary},
    )
    logger.info("COCO-like dataset in %s: %s", out, summary)
    return summary


def _claim(out: Path, config: Mapping[str, Any]) -> None:
    """Make `out` this generation's folder, or refuse: never write into someone else's data."""
    marker = out / MARKER_FILE
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: is a file, expected a folder to generate into")
    if marker.is_file():
        try:
            previous = json.loads(marker.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise DataError(f"{marker}: unreadable marker ({error}); refusing to write") from None
        if not isinstance(previous, dict) or previous.get("config") != dict(config):
            raise DataError(
                f"{out}: holds a COCO-like generation with other arguments "
                f"({previous.get('config') if isinstance(previous, dict) else previous!r}, "
                f"now {dict(config)}); delete it or choose another --out"
            )
        logger.info("Resuming the COCO-like generation in %s", out)
    elif out.is_dir() and any(out.iterdir()):
        raise DataError(
            f"{out}: folder exists and was not made by {__name__} (no "
            f"{MARKER_FILE}); refusing to write into it: choose an empty --out"
        )
    _write_json(marker, {"generator": __name__, "config": dict(config), "complete": False})
    for folder in FOLDERS.values():
        (out / folder).mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out / folder)  # images a killed run was writing
    remove_stale_temporaries(out / "annotations")


def _write_images(
    out: Path,
    plans: Mapping[str, Sequence[ImagePlan]],
    seed: int,
    quality: int,
    workers: int | None,
) -> tuple[int, list[int]]:
    """Every image not already there (a resumed run); (images written, every file's bytes)."""
    tasks, sizes = [], []
    for split, split_plans in plans.items():
        for plan in split_plans:
            path = out / FOLDERS[split] / plan.file_name
            if path.is_file():  # written whole by an earlier run: renamed into place
                sizes.append(path.stat().st_size)
            else:
                tasks.append((str(path), plan, seed, quality))
    workers = min(workers or os.cpu_count() or 1, max(len(tasks), 1))
    with tqdm(total=len(tasks), desc="Writing COCO-like images", unit="img") as bar:
        for size in _map(_write_image, tasks, workers):
            sizes.append(size)
            bar.update()
    return len(tasks), sizes


def _map(function, tasks: Sequence, workers: int) -> Iterator:
    if workers == 1:
        yield from map(function, tasks)
        return
    # spawn: the parent has threads (tqdm's monitor), which fork must not copy.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        yield from pool.map(function, tasks, chunksize=16)


def _summary(
    plans: Mapping[str, Sequence[ImagePlan]], sizes: Sequence[int], written: int, seconds: float
) -> dict[str, Any]:
    all_plans = [p for split in plans.values() for p in split]
    lengths = [len(c.split()) for p in all_plans for c in p.captions]
    train_captions = sum(len(p.captions) for p in plans["train"])
    return {
        "images": {split: len(p) for split, p in plans.items()},
        "captions": {split: sum(len(p.captions) for p in ps) for split, ps in plans.items()},
        "objects_val": sum(len(p.blobs) for p in plans["val"]),
        "images_written": written,
        "image_seconds": round(seconds, 2),
        "images_per_second": round(written / seconds, 1) if written and seconds > 0 else None,
        "mean_jpeg_kb": round(float(np.mean(sizes)) / 1000, 1),
        "mean_caption_words": round(float(np.mean(lengths)), 3),
        "expected_vocabulary_min_count_5": round(expected_vocabulary(train_captions)),
        "expected_vocabulary_full_scale": round(expected_vocabulary(COCO_TRAIN_CAPTIONS)),
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="python -m caption_pipeline.coco_like",
        description="Write a COCO-2017-shaped synthetic dataset (rehearsal data, not COCO).",
    )
    parser.add_argument("--out", required=True, help="folder to write (new, or this generator's)")
    parser.add_argument(
        "--scale",
        type=int,
        required=True,
        help=f"train images (COCO 2017: {COCO_TRAIN_IMAGES}); val in proportion",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=None, help="processes (default: cores)")
    parser.add_argument("--quality", type=int, default=JPEG_QUALITY, help="JPEG quality")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        summary = generate(args.out, args.scale, args.seed, args.workers, args.quality)
    except DataError as error:
        parser.exit(2, f"error: {error}\n")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
