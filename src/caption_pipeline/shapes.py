"""The embedded "shapes" dataset: coloured shapes on textured backgrounds, in MS COCO layout.

Every image holds 1 to 3 objects (6 shapes, 6 colours, 2 sizes) on a noisy or striped
background, and gets several different captions that are true for it: colours, sizes, counts
("two red squares"), relations between objects ("left of", "above"), order and position, all
computed from the objects' box centres. A COCO `instances` file per split holds those boxes,
so evaluation can check whether attention on a shape word lands on an object of that shape.

Everything is drawn from a numpy Generator seeded by (seed, split, index), so an image does
not depend on the order of generation or on the size of the other splits, and the same
parameters give byte-identical files.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import shutil
import zlib
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from caption_pipeline.atomic import TMP_MARKER, atomic_directory
from caption_pipeline.errors import DataError

logger = logging.getLogger(__name__)

# Bump when the output for the same parameters changes: it invalidates earlier generations.
GENERATOR_VERSION = 1
MARKER_FILE = "generator.json"

SHAPES = ("circle", "square", "triangle", "star", "hexagon", "diamond")
# Saturated colours: the backgrounds are near-grey, so hue alone tells an object from them.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 170, 55),
    "blue": (35, 75, 225),
    "yellow": (240, 215, 30),
    "purple": (150, 50, 200),
    "orange": (250, 135, 20),
}
SIZES = ("small", "large")
BACKGROUNDS = ("noisy", "striped")

# Caption words. Every word that names a shape, singular or plural, maps to its category.
_SHAPE_SYNONYMS = {
    "circle": ("circle", "disc"),
    "square": ("square", "box"),
    "triangle": ("triangle",),
    "star": ("star",),
    "hexagon": ("hexagon",),
    "diamond": ("diamond",),
}


def _plural(word: str) -> str:
    return word + ("es" if word.endswith(("s", "x")) else "s")


SHAPE_WORDS: dict[str, str] = {
    form: shape
    for shape, words in _SHAPE_SYNONYMS.items()
    for word in words
    for form in (word, _plural(word))
}
SIZE_WORDS: dict[str, str] = {
    "large": "large",
    "big": "large",
    "small": "small",
    "little": "small",
    "tiny": "small",
}
_SIZE_SYNONYMS = {size: tuple(w for w, s in SIZE_WORDS.items() if s == size) for size in SIZES}
_NUMBERS = {1: "one", 2: "two", 3: "three"}
_RELATION_WORDS = {
    "left": ("to the left of", "left of"),
    "right": ("to the right of", "right of"),
    "above": ("above", "over"),
    "below": ("below", "under"),
}
# Where a single group sits in the image (see position_holds), and the words for it.
_POSITIONS = {
    "left": ("on the left side",),  # not "on the right of": that reads as a relation
    "right": ("on the right side",),
    "top": ("at the top",),
    "bottom": ("at the bottom",),
    "middle": ("in the middle", "in the centre"),
}

# Sentence templates, by family. {L}: all groups listed; {A} {rel} {B}: a relation that holds
# between group A and every other group; {be}: is/are agreeing with the next noun phrase.
TEMPLATES: dict[str, tuple[str, str]] = {
    "list": ("list", "{L}"),
    "there": ("list", "there {be} {L}"),
    "image_of": ("list", "an image of {L}"),
    "picture_with": ("list", "a picture with {L}"),
    "shows": ("list", "the image shows {L}"),
    "background": ("list", "{L} on a {bg} background"),
    "total": ("list", "{L}, {n} in total"),
    "relation": ("relation", "{A} {rel} {B}"),
    "relation_be": ("relation", "{A} {be} {rel} {B}"),
    "relation_there": ("relation", "there {be} {A} {rel} {B}"),
    "left_to_right": ("order", "from left to right, {L}"),
    "top_to_bottom": ("order", "from top to bottom, {L}"),
    "position": ("position", "{A} {pos} of the image"),
    "position_there": ("position", "there {be} {A} {pos} of the image"),
}
# Order templates list the groups along an axis, each one in this relation to the next.
_ORDER_RELATION = {"left_to_right": "left", "top_to_bottom": "above"}
# The list family always applies and its templates never give the same sentence.
MAX_CAPTIONS_PER_IMAGE = sum(family == "list" for family, _ in TEMPLATES.values())

# Geometry, as fractions of the image side.
_RADIUS = {"small": (0.07, 0.09), "large": (0.15, 0.18)}
_RELATION_MARGIN = 0.08  # centres closer than this along an axis are in no relation on it
_EDGE_MARGIN = 2.0  # pixels kept free between an object and the image border
_OBJECT_COUNT_P = (0.25, 0.4, 0.35)  # P(1, 2, 3 objects)
_DUPLICATE_P = 0.25  # an object copies the look of an earlier one: "two red squares"
_OVERLAP_P = 0.2  # objects of different colours in an image may overlap partly
_SPLIT_ID_BASE = {"train": 1_000_000, "val": 2_000_000, "test": 3_000_000}
_MAX_SPLIT_IMAGES = 999_999
_ANNOTATIONS_PER_IMAGE = 100  # annotation id = image_id * 100 + k


# ---------------------------------------------------------------------------------------------
# Parameters


@dataclass(frozen=True)
class ShapesConfig:
    """Parameters of one generation (`params:synthetic`)."""

    splits: dict[str, int]
    seed: int = 42
    image_size: int = 128
    jpeg_quality: int = 90
    captions_per_image: int = 5

    @classmethod
    def from_params(cls, params: Mapping[str, Any], key: str = "synthetic") -> ShapesConfig:
        """Validate `params:<key>`; a DataError names the bad field."""
        allowed = set(cls.__dataclass_fields__)
        unknown = sorted(set(params) - allowed)
        if unknown:
            raise DataError(
                f"parameters `{key}`: unknown field(s) {unknown}; allowed: {sorted(allowed)}"
            )
        if not isinstance(params.get("splits"), Mapping) or not params["splits"]:
            raise DataError(f"parameters `{key}.splits`: expected a mapping split -> image count")
        splits = {}
        for split, count in params["splits"].items():
            if split not in _SPLIT_ID_BASE:
                raise DataError(
                    f"parameters `{key}.splits.{split}`: split must be one of "
                    f"{list(_SPLIT_ID_BASE)}"
                )
            splits[split] = _int_field(f"{key}.splits.{split}", count, 1, _MAX_SPLIT_IMAGES)
        limits = {
            "seed": (0, 2**63 - 1),
            "image_size": (64, 1024),
            "jpeg_quality": (1, 100),
            "captions_per_image": (1, MAX_CAPTIONS_PER_IMAGE),
        }
        values = {
            name: _int_field(
                f"{key}.{name}", params.get(name, cls.__dataclass_fields__[name].default), *limit
            )
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


# ---------------------------------------------------------------------------------------------
# Scenes


@dataclass(frozen=True)
class ShapeObject:
    """One drawn object; geometry in pixels, y pointing down."""

    shape: str
    colour: str
    size: str
    cx: float
    cy: float
    radius: float
    rotation: float  # degrees

    def polygon(self) -> np.ndarray:
        """Outline vertices, shape (k, 2) as (x, y)."""
        outline = _UNIT_OUTLINES[self.shape]
        theta = np.deg2rad(self.rotation)
        rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
        return outline @ rot.T * self.radius + (self.cx, self.cy)

    def bbox(self) -> tuple[float, float, float, float]:
        """COCO box [x, y, w, h] of the outline."""
        poly = self.polygon()
        (x0, y0), (x1, y1) = poly.min(axis=0), poly.max(axis=0)
        return (
            round(float(x0), 2),
            round(float(y0), 2),
            round(float(x1 - x0), 2),
            round(float(y1 - y0), 2),
        )


@dataclass(frozen=True)
class Scene:
    """One image: objects in drawing order (later ones on top), background, captions."""

    objects: tuple[ShapeObject, ...]
    background: str
    captions: tuple[str, ...]


def _regular(n: int, start_deg: float, radius: float = 1.0) -> np.ndarray:
    angles = np.deg2rad(start_deg + 360.0 * np.arange(n) / n)
    return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _star() -> np.ndarray:
    points = _regular(10, -90.0)
    points[1::2] *= 0.45  # inner vertices
    return points * 1.1


# Outlines around (0, 0) with radius about 1, scaled so the shapes look about equally big.
_UNIT_OUTLINES: dict[str, np.ndarray] = {
    "circle": _regular(48, 0.0, 0.92),
    "square": _regular(4, 45.0, 1.05),
    "triangle": _regular(3, -90.0, 1.15),
    "star": _star(),
    "hexagon": _regular(6, 0.0, 1.0),
    "diamond": np.array([[0.0, -1.15], [0.68, 0.0], [0.0, 1.15], [-0.68, 0.0]]),
}
# A square turned by 45 degrees would read as a diamond: keep rotations small where it matters.
_MAX_ROTATION = {
    "circle": 0.0,
    "square": 12.0,
    "triangle": 12.0,
    "star": 36.0,
    "hexagon": 30.0,
    "diamond": 10.0,
}
_EXTENT = {shape: float(np.abs(outline).max()) for shape, outline in _UNIT_OUTLINES.items()}


def image_rng(seed: int, split: str, index: int) -> np.random.SeedSequence:
    """Seed of one image, independent of generation order and of the other splits."""
    return np.random.SeedSequence([seed, zlib.crc32(split.encode()), index])


def generate_image(config: ShapesConfig, split: str, index: int) -> tuple[Scene, np.ndarray]:
    """Scene and pixels, uint8 (side, side, 3), of image `index` of `split`."""
    # Separate streams, so e.g. the number of captions does not change the pixels.
    layout_seq, caption_seq, pixel_seq = image_rng(config.seed, split, index).spawn(3)
    rng = np.random.default_rng(layout_seq)
    objects = _sample_objects(rng, config.image_size)
    background = str(rng.choice(BACKGROUNDS))
    captions = make_captions(
        objects,
        background,
        config.image_size,
        config.captions_per_image,
        np.random.default_rng(caption_seq),
    )
    scene = Scene(objects=objects, background=background, captions=captions)
    return scene, render_scene(scene, config.image_size, pixel_seq)


def _sample_objects(rng: np.random.Generator, side: int) -> tuple[ShapeObject, ...]:
    while True:  # a few retries at most: three objects fit easily in the image
        count = int(rng.choice([1, 2, 3], p=_OBJECT_COUNT_P))
        looks: list[tuple[str, str, str]] = []
        for _ in range(count):
            if looks and rng.random() < _DUPLICATE_P:
                looks.append(looks[int(rng.integers(len(looks)))])
            else:
                looks.append(
                    (
                        str(rng.choice(SHAPES)),
                        str(rng.choice(list(COLOURS))),
                        str(rng.choice(SIZES)),
                    )
                )
        # Large first, so small objects are drawn on top and never hidden.
        looks.sort(key=lambda look: look[2] != "large")
        allow_overlap = rng.random() < _OVERLAP_P
        placed: list[ShapeObject] = []
        for shape, colour, size in looks:
            obj = _place(rng, side, shape, colour, size, placed, allow_overlap)
            if obj is None:
                break
            placed.append(obj)
        else:
            return tuple(placed)


def _place(
    rng: np.random.Generator,
    side: int,
    shape: str,
    colour: str,
    size: str,
    placed: list[ShapeObject],
    allow_overlap: bool,
) -> ShapeObject | None:
    radius = float(rng.uniform(*_RADIUS[size])) * side
    rotation = float(rng.uniform(-1.0, 1.0)) * _MAX_ROTATION[shape]
    extent = _EXTENT[shape] * radius
    low, high = extent + _EDGE_MARGIN, side - extent - _EDGE_MARGIN
    partners = [o for o in placed if o.colour != colour] if allow_overlap else []
    for attempt in range(50):
        if partners and attempt < 25:
            # Overlap on purpose: a centre just far enough from another object's.
            other = partners[int(rng.integers(len(partners)))]
            reach = extent + _EXTENT[other.shape] * other.radius
            angle, distance = rng.uniform(0, 2 * np.pi), rng.uniform(0.72, 0.9) * reach
            cx, cy = other.cx + distance * np.cos(angle), other.cy + distance * np.sin(angle)
            if not (low <= cx <= high and low <= cy <= high):
                continue
        else:
            cx, cy = rng.uniform(low, high, size=2)
        if all(_far_enough(cx, cy, extent, colour, other, allow_overlap) for other in placed):
            return ShapeObject(
                shape,
                colour,
                size,
                round(float(cx), 2),
                round(float(cy), 2),
                round(radius, 2),
                round(rotation, 2),
            )
    return None


def _far_enough(
    cx: float, cy: float, extent: float, colour: str, other: ShapeObject, allow_overlap: bool
) -> bool:
    reach = extent + _EXTENT[other.shape] * other.radius
    # Same-coloured objects never touch, or two of them would merge into one blob.
    needed = 0.7 * reach if allow_overlap and colour != other.colour else reach + 3.0
    return float(np.hypot(cx - other.cx, cy - other.cy)) >= needed


# ---------------------------------------------------------------------------------------------
# Captions


@dataclass(frozen=True)
class _Group:
    """Objects that look the same (shape, colour, size): described together, with a count."""

    shape: str
    colour: str
    size: str
    members: tuple[ShapeObject, ...]
    needs_size: bool  # another group has the same shape and colour


def box_centre(obj: ShapeObject) -> tuple[float, float]:
    x, y, w, h = obj.bbox()
    return x + w / 2, y + h / 2


def relation_holds(relation: str, a: ShapeObject, b: ShapeObject, side: int) -> bool:
    """Whether `a` is `relation` (left/right/above/below) of `b`, judged on box centres."""
    (ax, ay), (bx, by) = box_centre(a), box_centre(b)
    along, across = {
        "left": (bx - ax, by - ay),
        "right": (ax - bx, ay - by),
        "above": (by - ay, bx - ax),
        "below": (ay - by, ax - bx),
    }[relation]
    # Clearly apart along the axis, and not mostly apart on the other one.
    return along >= _RELATION_MARGIN * side and along >= 0.5 * abs(across)


def position_holds(position: str, obj: ShapeObject, side: int) -> bool:
    """Whether the box centre of `obj` is in that part (left/right/top/bottom/middle) of it."""
    x, y = (c / side for c in box_centre(obj))
    return {
        "left": x < 0.4,
        "right": x > 0.6,
        "top": y < 0.4,
        "bottom": y > 0.6,
        "middle": 0.4 <= x <= 0.6 and 0.4 <= y <= 0.6,
    }[position]


def _groups(objects: tuple[ShapeObject, ...]) -> list[_Group]:
    by_look: dict[tuple[str, str, str], list[ShapeObject]] = {}
    for obj in objects:
        by_look.setdefault((obj.shape, obj.colour, obj.size), []).append(obj)
    return [
        _Group(
            shape,
            colour,
            size,
            tuple(members),
            needs_size=any(s == shape and c == colour and z != size for s, c, z in by_look),
        )
        for (shape, colour, size), members in by_look.items()
    ]


def _group_relation(relation: str, a: _Group, b: _Group, side: int) -> bool:
    return all(relation_holds(relation, x, y, side) for x in a.members for y in b.members)


def _with_article(words: list[str], count: int) -> str:
    if count == 1:
        words = ["an" if words[0][0] in "aeiou" else "a", *words]
    else:
        words = [_NUMBERS[count], *words]
    return " ".join(words)


def _phrase(group: _Group, rng: np.random.Generator) -> str:
    count = len(group.members)
    words = []
    if group.needs_size or rng.random() < 0.5:
        words.append(str(rng.choice(_SIZE_SYNONYMS[group.size])))
    noun = str(rng.choice(_SHAPE_SYNONYMS[group.shape]))
    words += [group.colour, _plural(noun) if count > 1 else noun]
    return _with_article(words, count)


def _join(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _be(group: _Group) -> str:
    return "is" if len(group.members) == 1 else "are"


def _slots(
    name: str, groups: list[_Group], background: str, side: int, rng: np.random.Generator
) -> dict | None:
    """Words for template `name`, or None when it says nothing true of these groups."""
    family = TEMPLATES[name][0]
    if family == "list":
        order = [groups[i] for i in rng.permutation(len(groups))]
        total = sum(len(g.members) for g in groups)
        return {
            "L": _join([_phrase(g, rng) for g in order]),
            "be": _be(order[0]),
            "bg": background,
            "n": f"{_NUMBERS[total]} shape{'s' if total > 1 else ''}",
        }
    if family == "relation":
        # A in a relation with every other group, so "A left of B and C" is true read either way.
        options = [
            (a, relation)
            for a in groups
            for relation in _RELATION_WORDS
            if len(groups) > 1
            and all(_group_relation(relation, a, b, side) for b in groups if b is not a)
        ]
        if not options:
            return None
        a, relation = options[int(rng.integers(len(options)))]
        others = [groups[i] for i in rng.permutation(len(groups)) if groups[i] is not a]
        return {
            "A": _phrase(a, rng),
            "be": _be(a),
            "rel": str(rng.choice(_RELATION_WORDS[relation])),
            "B": _join([_phrase(b, rng) for b in others]),
        }
    if family == "order":
        before = _ORDER_RELATION[name]
        axis = 0 if before == "left" else 1
        ordered = sorted(groups, key=lambda g: np.mean([box_centre(m)[axis] for m in g.members]))
        if len(groups) < 2 or not all(
            _group_relation(before, a, b, side) for a, b in pairwise(ordered)
        ):
            return None
        return {"L": _join([_phrase(g, rng) for g in ordered])}
    if family == "position":
        if len(groups) != 1:
            return None
        places = [
            p for p in _POSITIONS if all(position_holds(p, m, side) for m in groups[0].members)
        ]
        if not places:
            return None
        place = places[int(rng.integers(len(places)))]
        return {
            "A": _phrase(groups[0], rng),
            "be": _be(groups[0]),
            "pos": str(rng.choice(_POSITIONS[place])),
        }
    raise ValueError(f"unknown template family {family!r}")


def make_captions(
    objects: tuple[ShapeObject, ...],
    background: str,
    side: int,
    count: int,
    rng: np.random.Generator,
) -> tuple[str, ...]:
    """`count` different captions, all true for the scene, spread over template families."""
    groups = _groups(objects)
    by_family: dict[str, list[str]] = {}
    for name, (family, _) in TEMPLATES.items():
        by_family.setdefault(family, []).append(name)
    # One template of each family first (spatial ones when they apply), then the rest.
    names = [str(rng.choice(by_family[f])) for f in rng.permutation(sorted(by_family))]
    rest = [n for n in TEMPLATES if n not in names]
    names += [rest[i] for i in rng.permutation(len(rest))]
    captions: list[str] = []
    for name in names:
        slots = _slots(name, groups, background, side, rng)
        if slots is None:
            continue
        text = TEMPLATES[name][1].format(**slots)
        caption = text[0].upper() + text[1:] + "."
        if caption not in captions:
            captions.append(caption)
        if len(captions) == count:
            # Written in family order, the first annotation would be spatial more often than
            # the others (48 % against 31 %), and a human-agreement figure built on one of
            # them biased: the order of the annotations is shuffled.
            return tuple(captions[i] for i in rng.permutation(count))
    # Unreachable while captions_per_image <= MAX_CAPTIONS_PER_IMAGE (checked in ShapesConfig).
    raise RuntimeError(f"only {len(captions)} different captions for {objects}")


# ---------------------------------------------------------------------------------------------
# Drawing


def render_scene(scene: Scene, side: int, seed: np.random.SeedSequence) -> np.ndarray:
    """The image of `scene`, uint8 (side, side, 3)."""
    rng = np.random.default_rng(seed)
    image = _background(rng, side, scene.background)
    for obj in scene.objects:
        alpha = _coverage(obj, side)[..., None]  # (side, side, 1) in [0, 1]
        colour = np.array(COLOURS[obj.colour], np.float32) + rng.uniform(-12, 12, size=3)
        image = image * (1.0 - alpha) + colour * alpha
    image += rng.normal(0.0, 4.0, size=image.shape)  # sensor grain over everything
    return np.clip(image + 0.5, 0, 255).astype(np.uint8)


def _background(rng: np.random.Generator, side: int, kind: str) -> np.ndarray:
    """Near-grey texture, float32 (side, side, 3)."""
    base = rng.uniform(75, 185) + rng.uniform(-12, 12, size=3)
    if kind == "noisy":
        coarse = rng.normal(0.0, 1.0, size=(6, 6)).astype(np.float32)
        blotches = np.asarray(Image.fromarray(coarse, "F").resize((side, side), Image.BICUBIC))
        texture = 16.0 * blotches + rng.normal(0.0, 9.0, size=(side, side))
    else:
        angle, period, phase = rng.uniform(0, np.pi), rng.uniform(7, 18), rng.uniform(0, 2 * np.pi)
        y, x = np.mgrid[0:side, 0:side]
        texture = 20.0 * np.sin(
            2 * np.pi * (x * np.cos(angle) + y * np.sin(angle)) / period + phase
        )
    return (base + texture[..., None]).astype(np.float32)


def _coverage(obj: ShapeObject, side: int, scale: int = 4) -> np.ndarray:
    """Anti-aliased mask, float32 (side, side): drawn `scale` times larger, box-filtered down."""
    mask = Image.new("L", (side * scale, side * scale), 0)
    # Pixel (i, j) covers [i, i+1): vertex coordinates map to corners, hence no half-pixel shift.
    ImageDraw.Draw(mask).polygon([tuple(p) for p in obj.polygon() * scale], fill=255)
    return np.asarray(mask.resize((side, side), Image.BOX), np.float32) / 255.0


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------
# Files


def _coco_header() -> dict[str, Any]:
    return {
        "info": {
            "description": "Synthetic shapes captioning dataset (caption_pipeline.shapes)",
            "version": str(GENERATOR_VERSION),
            "contributor": "caption_pipeline",
        },
        "licenses": [
            {
                "id": 1,
                "name": "CC0 1.0",
                "url": "https://creativecommons.org/publicdomain/zero/1.0/",
            }
        ],
    }


CATEGORIES = [
    {"id": i + 1, "name": shape, "supercategory": "shape"} for i, shape in enumerate(SHAPES)
]
_CATEGORY_ID = {c["name"]: c["id"] for c in CATEGORIES}


def _write_split(
    folder: Path, split: str, layout: SplitLayout, config: ShapesConfig, bar: tqdm
) -> dict[str, int]:
    images, backgrounds, captions, instances = [], [], [], []
    (folder / layout.images).mkdir(parents=True, exist_ok=True)
    for index in range(config.splits[split]):
        scene, pixels = generate_image(config, split, index)
        image_id = _SPLIT_ID_BASE[split] + index
        file_name = f"{image_id:012d}.jpg"
        (folder / layout.images / file_name).write_bytes(encode_jpeg(pixels, config.jpeg_quality))
        images.append(
            {
                "id": image_id,
                "file_name": file_name,
                "width": config.image_size,
                "height": config.image_size,
                "license": 1,
            }
        )
        backgrounds.append(scene.background)
        captions += [
            {"id": image_id * _ANNOTATIONS_PER_IMAGE + k, "image_id": image_id, "caption": caption}
            for k, caption in enumerate(scene.captions)
        ]
        instances += [
            _instance(image_id * _ANNOTATIONS_PER_IMAGE + k, image_id, obj)
            for k, obj in enumerate(scene.objects)
        ]
        bar.update()
    header = _coco_header()
    _write_json(folder / layout.captions, {**header, "images": images, "annotations": captions})
    # Instances images also say which background each image has (captions may mention it).
    instance_images = [
        {**image, "background": bg} for image, bg in zip(images, backgrounds, strict=True)
    ]
    _write_json(
        folder / layout.instances,
        {**header, "images": instance_images, "annotations": instances, "categories": CATEGORIES},
    )
    return {"images": len(images), "captions": len(captions), "objects": len(instances)}


def _instance(annotation_id: int, image_id: int, obj: ShapeObject) -> dict[str, Any]:
    """COCO instance annotation, plus the object's colour and size under `attributes`."""
    polygon = obj.polygon()
    return {
        "id": annotation_id,
        "image_id": image_id,
        "category_id": _CATEGORY_ID[obj.shape],
        "bbox": list(obj.bbox()),
        "area": round(_polygon_area(polygon), 2),
        "segmentation": [[round(float(v), 2) for v in polygon.ravel()]],
        "iscrowd": 0,
        "attributes": {"colour": obj.colour, "size": obj.size},
    }


def _polygon_area(polygon: np.ndarray) -> float:
    x, y = polygon[:, 0], polygon[:, 1]
    return float(0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _write_json(path: Path, obj: Any) -> None:
    # Inside the folder that atomic_directory renames into place: plain writes are enough.
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, separators=(",", ":")))


def ensure_generated(dataset: Mapping[str, Any], config: ShapesConfig) -> dict[str, Any]:
    """Generate the dataset into `dataset.root`, unless the same generation is already there.

    Returns {"fingerprint": str, "counts": {split: {"images", "captions", "objects"}}}.
    Refuses (DataError) to replace a non-empty folder that this generator did not make.
    """
    layout = layout_from_dataset(dataset)
    if set(layout) != set(config.splits):
        raise DataError(
            f"parameters `synthetic.splits`: splits {sorted(config.splits)} differ from "
            f"`dataset.splits` {sorted(layout)}; give an image count for each dataset split"
        )
    root = Path(dataset["root"])
    digest = fingerprint(config, layout)
    marker = _read_marker(root)
    if marker is not None:
        if marker.get("fingerprint") == digest and _complete(
            root, layout, marker.get("counts", {})
        ):
            logger.info(
                "Shapes dataset in %s is up to date (fingerprint %s): not regenerating",
                root,
                digest[:12],
            )
            return {"fingerprint": digest, "counts": marker["counts"]}
        logger.info(
            "Shapes dataset in %s has other parameters or missing files: regenerating", root
        )
    removed = _remove_stale_temporaries(root)
    if removed:
        logger.info("Removed %d unfinished generation(s) next to %s", removed, root)

    total = sum(config.splits.values())
    counts = {}
    with (
        atomic_directory(root) as folder,
        tqdm(total=total, desc="Generating shapes", unit="img") as bar,
    ):
        for split, entry in layout.items():
            counts[split] = _write_split(folder, split, entry, config, bar)
        # Written last, inside the folder renamed into place: its presence means "complete".
        marker = {
            "generator": __name__,
            "generator_version": GENERATOR_VERSION,
            "fingerprint": digest,
            "config": config.to_dict(),
            "layout": {s: asdict(e) for s, e in layout.items()},
            "counts": counts,
        }
        (folder / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
    logger.info("Generated %d shapes images into %s", total, root)
    return {"fingerprint": digest, "counts": counts}


def _read_marker(root: Path) -> dict[str, Any] | None:
    """The marker of an earlier generation in `root`; None if there is nothing to protect."""
    if not root.exists():
        return None
    if not root.is_dir():
        raise DataError(
            f"'{root}' (parameters `dataset.root`): is a file, expected a folder to generate into"
        )
    path = root / MARKER_FILE
    if not path.is_file():
        if any(root.iterdir()):
            raise DataError(
                f"'{root}' (parameters `dataset.root`): folder exists and was not made by the "
                f"shapes generator (no {MARKER_FILE}); refusing to overwrite it. Point "
                f"`dataset.root` elsewhere or set `dataset.name` to use it as your own dataset."
            )
        return None
    try:
        marker = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(
            f"{path}: unreadable generator marker ({exc}); refusing to overwrite {root}"
        ) from None
    if not isinstance(marker, dict) or marker.get("generator") != __name__:
        raise DataError(
            f"{path}: field `generator` is not {__name__!r}; refusing to overwrite {root}"
        )
    return marker


def _complete(root: Path, layout: Mapping[str, SplitLayout], counts: Mapping[str, Any]) -> bool:
    """Whether every annotation file and image of the marker's counts is still there."""
    for split, entry in layout.items():
        if not all((root / p).is_file() for p in (entry.captions, entry.instances)):
            return False
        expected = counts.get(split, {}).get("images")
        if sum(1 for _ in (root / entry.images).glob("*.jpg")) != expected:
            return False
    return True


def _remove_stale_temporaries(root: Path) -> int:
    """Delete temporary folders a killed generation left next to `root` (and only those)."""
    stale = list(root.parent.glob(f".{root.name}{TMP_MARKER}*")) if root.parent.is_dir() else []
    for path in stale:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return len(stale)
