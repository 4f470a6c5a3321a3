"""Where the captioner looks: word-by-word attention figures, and an attention localization
score on data with object boxes (the embedded shapes data).

Geometry. The decoder attends over the encoder's output grid: R = G*G regions, row-major
(region r = row * G + col, row 0 at the top). The encoder sees the image stretched to a square,
so cell (row, col) covers rows [row/G, (row+1)/G) and columns [col/G, (col+1)/G) of the
original image's height and width, whatever its aspect ratio. `upsample_attention` turns one
step's weights [R] into a smooth map over the image's pixels: at each pixel centre, the
Gaussian-weighted average of the cells' weights (sigma = half a cell, Nadaraya-Watson), so
uniform attention stays uniform and nothing darkens at the borders.

Attention localization. For each generated word that names a shape (`shapes.SHAPE_WORDS`), the
peak of that decoding step's attention is the pixel of the upsampled map with the largest value
(the first in row-major order on ties). It is a hit when that pixel's centre (x + 0.5, y + 0.5)
lies in the bbox [bx, by, bw, bh] of an object of the named shape in the image
(bx <= x + 0.5 < bx + bw, the same for y). Score = hits / shape words. The uniform-attention
baseline is the expected hit rate of a peak at a uniformly random pixel: the fraction of pixel
centres inside the union of the boxes of that shape, averaged over the same words. A word that
names a shape the image does not contain is a miss for both.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from caption_pipeline.decoding import DecodedImage
from caption_pipeline.errors import DataError
from caption_pipeline.shapes import SHAPE_WORDS, layout_from_dataset

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


# --- object boxes ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageObjects:
    """An image's size and its objects' boxes [x, y, w, h] by category name."""

    width: int
    height: int
    boxes: dict[str, list[tuple[float, float, float, float]]]


def instances_file(dataset: Mapping[str, Any], split: str) -> Path | None:
    """The COCO instances file of `split` next to its captions file (the shapes layout:
    annotations/instances_{split}.json), or None when the dataset has none."""
    try:
        layout = layout_from_dataset(dataset)
    except DataError:  # not a COCO-layout dataset under `root`: no instances to look for
        return None
    if split not in layout:
        return None
    path = Path(dataset["root"]) / layout[split].instances
    return path if path.is_file() else None


def load_instances(path: str | Path) -> dict[int, ImageObjects]:
    """{image_id: ImageObjects} from a COCO instances JSON; a DataError names the file and field."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise DataError(f"{path}: not a readable JSON file ({error})") from None
    for key in ("images", "annotations", "categories"):
        if not isinstance(data, dict) or not isinstance(data.get(key), list):
            raise DataError(f"{path}: field '{key}' must be a list")
    try:
        names = {c["id"]: str(c["name"]) for c in data["categories"]}
        images = {int(i["id"]): (int(i["width"]), int(i["height"])) for i in data["images"]}
    except (KeyError, TypeError, ValueError) as error:
        raise DataError(f"{path}: a category or image lacks field {error}") from None
    boxes: dict[int, dict[str, list]] = {i: {} for i in images}
    for index, annotation in enumerate(data["annotations"]):
        where = f"{path}: annotations[{index}]"
        try:
            image_id, category = int(annotation["image_id"]), annotation["category_id"]
            box = tuple(float(v) for v in annotation["bbox"])
        except (KeyError, TypeError, ValueError) as error:
            raise DataError(f"{where}: missing or bad field {error}") from None
        if image_id not in boxes or category not in names:
            raise DataError(f"{where}: image_id {image_id} or category_id {category} is "
                            f"not listed in 'images' / 'categories'")
        if len(box) != 4 or box[2] < 0 or box[3] < 0:
            raise DataError(f"{where}: field 'bbox' must be [x, y, width, height]")
        boxes[image_id].setdefault(names[category], []).append(box)
    return {i: ImageObjects(*images[i], boxes[i]) for i in images}


# --- captions and their attention -----------------------------------------------------------


def word_attention(decoded: DecodedImage) -> list[tuple[str, np.ndarray]]:
    """The best caption's words, each with its decoding step's attention [R]."""
    if decoded.attention is None:
        raise ValueError(f"image {decoded.image_id}: decoded without keep_attention")
    # The vocabulary joins tokens with single spaces (a PTB token may hold a no-break space).
    words = decoded.caption.split(" ") if decoded.caption else []
    rows = decoded.attention[0]  # [L, R]: the best caption's steps; step t wrote word t
    return [(word, rows[t]) for t, word in enumerate(words)]


def localization_score(decoded: Iterable[DecodedImage],
                       objects: Mapping[int, ImageObjects]) -> dict[str, Any]:
    """Attention localization of shape words, and the uniform-attention baseline (module doc).

    Images missing from `objects` are left out. Score and baseline are None without shape words.
    """
    hits, uniform, words, absent, images = 0, 0.0, 0, 0, 0
    for image in decoded:
        if image.image_id not in objects:
            continue
        scene = objects[image.image_id]
        images += 1
        for word, alpha in word_attention(image):
            shape = SHAPE_WORDS.get(word)
            if shape is None:
                continue
            boxes = scene.boxes.get(shape, [])
            words += 1
            absent += not boxes
            x, y = attention_peak(upsample_attention(alpha, scene.height, scene.width))
            hits += any(inside_box(x, y, box) for box in boxes)
            uniform += box_union_fraction(boxes, scene.height, scene.width)
    return {
        "score": hits / words if words else None,
        "uniform": uniform / words if words else None,
        "shape_words": words,
        "hits": hits,
        "words_naming_an_absent_shape": absent,
        "images": images,
    }


def attention_localization(decoded: list[DecodedImage], dataset: Mapping[str, Any],
                           split: str) -> dict[str, Any]:
    """`localization_score` on `split` when the dataset has object boxes for it, else
    {"score": None, "uniform": None, "reason": ...}."""
    path = instances_file(dataset, split)
    if path is None:
        return {"score": None, "uniform": None,
                "reason": f"dataset {dataset.get('name')!r} has no COCO instances file with "
                          f"object boxes for split {split!r} next to its captions file"}
    result = localization_score(decoded, load_instances(path))
    if result["score"] is None:
        result["reason"] = f"no generated {split} caption names a shape"
    return {**result, "split": split, "instances": str(path)}


# --- figures --------------------------------------------------------------------------------


def attention_figure(image, decoded: DecodedImage):
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
    figure.suptitle(f"image {decoded.image_id}: {decoded.caption or '(empty caption)'}",
                    fontsize=10, wrap=True)
    return figure
