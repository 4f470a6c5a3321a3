"""Where the captioner looks: word-by-word attention figures, and an attention localization
score on data with object boxes (a COCO instances file: the shapes data, MS COCO).

Geometry. The decoder attends over the encoder's output grid: R = G*G regions, row-major
(region r = row * G + col, row 0 at the top). The encoder sees the image stretched to a square,
so cell (row, col) covers rows [row/G, (row+1)/G) and columns [col/G, (col+1)/G) of the
original image's height and width, whatever its aspect ratio. `upsample_attention` turns one
step's weights [R] into a smooth map over the image's pixels: at each pixel centre, the
Gaussian-weighted average of the cells' weights (sigma = half a cell, Nadaraya-Watson), so
uniform attention stays uniform and nothing darkens at the borders.

Attention localization (a pointing game). An object word is a generated word that names a
category of the instances file (`category_words`: its word list, looked up by the category's
name; a phrase such as "teddy bear" counts once, at its last word). For each object word, the
peak of that decoding step's attention is the pixel of the upsampled map with the largest
value (the first in row-major order on ties). It is a hit when that pixel's centre
(x + 0.5, y + 0.5) lies in the bbox [bx, by, bw, bh] of an object of the named category in the
image (bx <= x + 0.5 < bx + bw, the same for y). Score = hits / object words. The
uniform-attention baseline is the expected hit rate of a peak at a uniformly random pixel: the
fraction of pixel centres inside the union of the boxes of that category, averaged over the
same words. A word that names a category the image does not contain is a miss for both.
Categories of the file without a word list are not scored: no word can name them; their
objects in the scored images are counted (`categories_without_words`).

What it measures: whether the single most attended point of the step that writes an object's
word falls in that object's box; not how much of the attention mass is on it, and not the
object's mask (a box holds background too, more so for thin or hollow objects). On the shapes
data it is reported with each run (docs/benchmarks.md). It runs unchanged on MS COCO
(`instances_val2017.json`, COCO's 80 categories), but no COCO-scale figure exists in this
project: it has not been run on real COCO, and on `coco_like` data (random blobs that its
random captions do not describe) a score only shows that the files are read. The COCO word
lists were written by hand (`category_words`), not validated on COCO's captions.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from caption_pipeline.data.coco_instances import (
    Instances,
    instances_candidates,
    instances_file,
    load_instances,
)
from caption_pipeline.errors import DataError
from caption_pipeline.evaluation.category_words import CATEGORY_WORDS, CategoryWords
from caption_pipeline.model.decoding import CaptionedImage

SIGMA_CELLS = 0.5  # Gaussian width of the upsampling, in grid cells
FIGURE_COLUMNS = 5


# --- geometry -------------------------------------------------------------------------------


def grid_side(regions: int) -> int:
    """G for R = G * G regions; a DataError when R is not a square."""
    side = math.isqrt(regions)
    if side * side != regions:
        raise DataError(f"attention over {regions} regions: not a square grid of the encoder")
    return side


@functools.lru_cache(maxsize=64)
def _smoothing(pixels: int, cells: int) -> np.ndarray:
    """[pixels, cells] weights of each cell at each pixel centre; rows sum to 1. Cached: the
    images of a data set share a few sizes (read-only, so the cache can't be changed)."""
    centres = (np.arange(pixels) + 0.5) * cells / pixels  # pixel centres, in cell units
    distance = centres[:, None] - (np.arange(cells) + 0.5)[None, :]
    weights = np.exp(-0.5 * (distance / SIGMA_CELLS) ** 2)
    weights /= weights.sum(axis=1, keepdims=True)
    weights.flags.writeable = False
    return weights


def upsample_attention(alpha: np.ndarray, height: int, width: int) -> np.ndarray:
    """One step's attention [R] -> a smooth map [height, width] over the image's pixels."""
    side = grid_side(alpha.shape[-1])
    grid = np.asarray(alpha, np.float64).reshape(side, side)
    # Separable: rows then columns; [H, G] @ [G, G] @ [G, W].
    return _smoothing(height, side) @ grid @ _smoothing(width, side).T


def attention_peak(heatmap: np.ndarray) -> tuple[float, float]:
    """(x, y) of the centre of the pixel where `heatmap` [H, W] is largest (first if tied)."""
    row, col = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    return col + 0.5, row + 0.5


def inside_box(x: float, y: float, box: Iterable[float]) -> bool:
    bx, by, bw, bh = box
    return bx <= x < bx + bw and by <= y < by + bh


def box_union_fraction(boxes: Iterable[Iterable[float]], height: int, width: int) -> float:
    """Fraction of the pixel centres of a height x width image inside any of `boxes`."""
    ys, xs = np.arange(height) + 0.5, np.arange(width) + 0.5
    covered = np.zeros((height, width), bool)
    for bx, by, bw, bh in boxes:
        covered |= ((ys >= by) & (ys < by + bh))[:, None] & ((xs >= bx) & (xs < bx + bw))[None]
    return float(covered.mean())


# --- captions and their attention -----------------------------------------------------------


def word_attention(decoded: CaptionedImage) -> list[tuple[str, np.ndarray]]:
    """The best caption's words, each with its decoding step's attention [R]."""
    if decoded.attention is None:
        raise ValueError(f"image {decoded.image_id}: decoded without keep_attention")
    # The vocabulary joins tokens with single spaces (a PTB token may hold a no-break space).
    words = decoded.caption.split(" ") if decoded.caption else []
    rows = decoded.attention[0]  # [L, R]: the best caption's steps; step t wrote word t
    return [(word, rows[t]) for t, word in enumerate(words)]


def localization_score(
    decoded: Iterable[CaptionedImage],
    instances: Instances,
    category_words: Mapping[str, Iterable[str]] = CATEGORY_WORDS,
) -> dict[str, Any]:
    """Attention localization of object words, and the uniform-attention baseline (module doc).

    `category_words`: category name -> the words that name it, for the categories of
    `instances` it holds. Images missing from `instances` are left out. Score and baseline are
    None without object words.
    """
    words_of = CategoryWords(
        {name: category_words[name] for name in instances.categories if name in category_words}
    )
    without_words = {name: 0 for name in instances.categories if name not in words_of.categories}
    hits, uniform, words, absent, images = 0, 0.0, 0, 0, 0
    for image in decoded:
        scene = instances.images.get(image.image_id)
        if scene is None:
            continue
        images += 1
        for name in without_words.keys() & scene.boxes.keys():
            without_words[name] += len(scene.boxes[name])
        steps = word_attention(image)
        for step, category in words_of.mentions([word for word, _ in steps]):
            boxes = scene.boxes.get(category, [])
            words += 1
            absent += not boxes
            x, y = attention_peak(upsample_attention(steps[step][1], scene.height, scene.width))
            hits += any(inside_box(x, y, box) for box in boxes)
            uniform += box_union_fraction(boxes, scene.height, scene.width)
    return {
        "score": hits / words if words else None,
        "uniform": uniform / words if words else None,
        "object_words": words,
        "hits": hits,
        "words_naming_an_absent_object": absent,
        "images": images,
        "categories": len(words_of.categories),
        # Objects in the scored images whose category no word names, by category.
        "categories_without_words": without_words,
    }


def attention_localization(
    decoded: list[CaptionedImage], dataset: Mapping[str, Any], split: str
) -> dict[str, Any]:
    """`localization_score` on `split` when the dataset has a COCO instances file for it,
    else {"score": None, "uniform": None, "reason": ...}."""
    path = instances_file(dataset, split)
    if path is None:
        looked = [str(p) for p in instances_candidates(dataset, split)]
        return {
            "score": None,
            "uniform": None,
            "reason": f"dataset {dataset.get('name')!r} has no COCO instances file with "
            f"object boxes for split {split!r} next to its captions file"
            + (f" (looked for {', '.join(looked)})" if looked else ""),
        }
    result = localization_score(decoded, load_instances(path))
    if result["score"] is None:
        result["reason"] = (
            f"no generated {split} caption names an object category of the instances file"
        )
    return {**result, "split": split, "instances": str(path)}


# --- figures --------------------------------------------------------------------------------


def attention_figure(image, decoded: CaptionedImage):
    """The image, then one panel per generated word: its attention map upsampled over the
    image (bright = attended most), the word as the panel's title. `image`: a PIL RGB image."""
    from matplotlib.figure import Figure

    pixels = np.asarray(image)
    height, width = pixels.shape[:2]
    steps = word_attention(decoded)
    columns = min(FIGURE_COLUMNS, len(steps) + 1)
    rows = math.ceil((len(steps) + 1) / columns)
    figure = Figure(figsize=(2.2 * columns, 2.4 * rows + 0.4), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    axes[0].imshow(pixels)
    axes[0].set_title("image", fontsize=10)
    for ax, (word, alpha) in zip(axes[1:], steps, strict=False):
        heatmap = upsample_attention(alpha, height, width)
        ax.imshow(pixels)
        # Scaled from 0 to the word's peak: a focused word lights up one spot, attention spread
        # evenly lights up (fades) the whole image. Min-max scaling would show noise as a focus.
        ax.imshow(heatmap, cmap="gray", vmin=0.0, vmax=max(heatmap.max(), 1e-12), alpha=0.6)
        ax.set_title(word, fontsize=11)
    for ax in axes:
        ax.set_axis_off()
    figure.suptitle(
        f"image {decoded.image_id}: {decoded.caption or '(empty caption)'}", fontsize=10, wrap=True
    )
    return figure
