"""The pixels of a shapes scene: a near-grey noisy or striped background, each object
anti-aliased over it in its colour (a little varied), sensor grain over everything.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from caption_pipeline.data.shapes.scene import COLOURS, Scene, ShapeObject


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
