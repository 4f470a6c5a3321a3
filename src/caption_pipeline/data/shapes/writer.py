"""A shapes generation on disk, in MS COCO layout: per split, the JPEG images, a captions file
and an instances file (COCO's object annotations: category, bbox, polygon, area, plus each
object's colour and size), and a marker written last.

`ensure_generated` writes the whole dataset into one temporary folder renamed into place
(`atomic.atomic_directory`), and keeps an earlier generation whose fingerprint and files match.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from caption_pipeline.atomic import atomic_directory
from caption_pipeline.data.images import encode_jpeg
from caption_pipeline.data.shapes.captions import make_captions
from caption_pipeline.data.shapes.config import (
    GENERATOR_VERSION,
    SPLIT_ID_BASE,
    ShapesConfig,
    SplitLayout,
    fingerprint,
    layout_from_dataset,
)
from caption_pipeline.data.shapes.drawing import render_scene
from caption_pipeline.data.shapes.scene import (
    BACKGROUNDS,
    SHAPES,
    Scene,
    ShapeObject,
    image_rng,
    sample_objects,
)
from caption_pipeline.errors import DataError

logger = logging.getLogger(__name__)

MARKER_FILE = "generator.json"
# The marker's `generator` field: the package's name, as every earlier marker holds it.
GENERATOR = "caption_pipeline.data.shapes"
_ANNOTATIONS_PER_IMAGE = 100  # annotation id = image_id * 100 + k


def generate_image(config: ShapesConfig, split: str, index: int) -> tuple[Scene, np.ndarray]:
    """Scene and pixels, uint8 (side, side, 3), of image `index` of `split`."""
    # Separate streams, so e.g. the number of captions does not change the pixels.
    layout_seq, caption_seq, pixel_seq = image_rng(config.seed, split, index).spawn(3)
    rng = np.random.default_rng(layout_seq)
    objects = sample_objects(rng, config.image_size)
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


def _coco_header() -> dict[str, Any]:
    return {
        "info": {
            "description": "Synthetic shapes captioning dataset (caption_pipeline.data.shapes)",
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
        image_id = SPLIT_ID_BASE[split] + index
        file_name = f"{image_id:012d}.jpg"
        jpeg = encode_jpeg(Image.fromarray(pixels), None, quality=config.jpeg_quality)
        (folder / layout.images / file_name).write_bytes(jpeg)
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
            "generator": GENERATOR,
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
    if not isinstance(marker, dict) or marker.get("generator") != GENERATOR:
        raise DataError(
            f"{path}: field `generator` is not {GENERATOR!r}; refusing to overwrite {root}"
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
