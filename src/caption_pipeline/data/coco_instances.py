"""COCO `instances` files: where a split's is, and the object boxes in it.

A split's instances file is found next to its captions file (the `dataset` block's
`annotations`), by the data set's own naming: the captions file's name with "captions" turned
into "instances", as MS COCO names its files (captions_val2017.json -> instances_val2017.json,
conf/coco) and as the shapes generator writes them (captions_test.json ->
instances_test.json); failing that, instances_<split>.json in the same folder. conf/coco's
test split is half of val2017, so its file is instances_val2017.json, which holds every val
image: readers keep the images they need.

An object's region is its `bbox` [x, y, w, h]; an annotation without one has the box of its
polygon `segmentation` (COCO's crowd regions are run-length masks and always have a box).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from caption_pipeline.errors import DataError

Box = tuple[float, float, float, float]  # [x, y, w, h] in pixels, COCO's bbox


@dataclass(frozen=True)
class ImageObjects:
    """An image's size and its objects' boxes [x, y, w, h] by category name."""

    width: int
    height: int
    boxes: dict[str, list[Box]]


@dataclass(frozen=True)
class Instances:
    """What an instances file says: its category names (in the file's order) and, by image
    id, each image's objects."""

    categories: tuple[str, ...]
    images: dict[int, ImageObjects]


def instances_candidates(dataset: Mapping[str, Any], split: str) -> list[Path]:
    """Where `split`'s instances file would be (module doc), in the order looked at; empty
    for a data set that is not in COCO format or names no captions file for `split`."""
    splits = dataset.get("splits")
    entry = splits.get(split) if isinstance(splits, Mapping) else None
    annotations = entry.get("annotations") if isinstance(entry, Mapping) else None
    if dataset.get("format") != "coco" or not isinstance(annotations, str):
        return []
    if not isinstance(dataset.get("root"), str):
        return []
    captions = Path(dataset["root"]) / annotations
    names = [f"instances_{split}.json"]
    if captions.name.startswith("captions"):
        names.insert(0, "instances" + captions.name.removeprefix("captions"))
    return [captions.with_name(name) for name in dict.fromkeys(names)]


def instances_file(dataset: Mapping[str, Any], split: str) -> Path | None:
    """The COCO instances file of `split` (module doc), or None when the data set has none."""
    return next((path for path in instances_candidates(dataset, split) if path.is_file()), None)


def load_instances(path: str | Path) -> Instances:
    """The categories and objects of a COCO instances JSON; a DataError names the file and
    field."""
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
    boxes: dict[int, dict[str, list[Box]]] = {i: {} for i in images}
    for index, annotation in enumerate(data["annotations"]):
        where = f"{path}: annotations[{index}]"
        try:
            image_id, category = int(annotation["image_id"]), annotation["category_id"]
        except (KeyError, TypeError, ValueError) as error:
            raise DataError(f"{where}: missing or bad field {error}") from None
        if image_id not in boxes or category not in names:
            raise DataError(
                f"{where}: image_id {image_id} or category_id {category} is "
                f"not listed in 'images' / 'categories'"
            )
        boxes[image_id].setdefault(names[category], []).append(_box(annotation, where))
    return Instances(
        tuple(dict.fromkeys(names.values())),
        {i: ImageObjects(*images[i], boxes[i]) for i in images},
    )


def _box(annotation: Mapping[str, Any], where: str) -> Box:
    """The annotation's bbox, or the box around its polygons."""
    try:
        if "bbox" in annotation:
            box = tuple(float(v) for v in annotation["bbox"])
        else:
            xs, ys = _polygon_points(annotation["segmentation"])
            box = (min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys))
    except (KeyError, TypeError, ValueError):
        raise DataError(
            f"{where}: needs field 'bbox' [x, y, width, height] or a polygon 'segmentation'"
        ) from None
    if len(box) != 4 or box[2] < 0 or box[3] < 0:
        raise DataError(f"{where}: field 'bbox' must be [x, y, width, height]")
    return box  # type: ignore[return-value]


def _polygon_points(segmentation: Any) -> tuple[list[float], list[float]]:
    """x and y of every vertex of a COCO polygon segmentation [[x1, y1, x2, y2, ...], ...]."""
    if not isinstance(segmentation, list):  # a run-length mask: no vertices to read
        raise TypeError("not a polygon")
    values = [[float(v) for v in polygon] for polygon in segmentation]
    if not values or any(len(v) < 6 or len(v) % 2 for v in values):
        raise ValueError("not a polygon")
    return [x for v in values for x in v[0::2]], [y for v in values for y in v[1::2]]
