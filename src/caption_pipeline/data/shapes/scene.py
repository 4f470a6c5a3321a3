"""A shapes scene: the objects of one image (shape, colour, size, where, turned by how much)
and its background, drawn at random so that objects stay inside the image, same-coloured ones
never touch and others overlap only sometimes.

Geometry is in pixels, y pointing down; an object is its outline polygon around (cx, cy).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

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

# Geometry, as fractions of the image side.
_RADIUS = {"small": (0.07, 0.09), "large": (0.15, 0.18)}
_EDGE_MARGIN = 2.0  # pixels kept free between an object and the image border
_OBJECT_COUNT_P = (0.25, 0.4, 0.35)  # P(1, 2, 3 objects)
_DUPLICATE_P = 0.25  # an object copies the look of an earlier one: "two red squares"
_OVERLAP_P = 0.2  # objects of different colours in an image may overlap partly


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


def sample_objects(rng: np.random.Generator, side: int) -> tuple[ShapeObject, ...]:
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


def box_centre(obj: ShapeObject) -> tuple[float, float]:
    x, y, w, h = obj.bbox()
    return x + w / 2, y + h / 2
