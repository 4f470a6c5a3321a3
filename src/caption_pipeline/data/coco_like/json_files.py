"""The JSON files of a COCO-like dataset, built from its plans: captions and instances in
COCO 2017's schema, and Karpathy's split file (`dataset_coco.json`).

The schemas are COCO's key for key, so that ingestion (`caption_files`) and the localization
score (`coco_instances`) read these files through the same code as COCO's and a run on them
exercises that code. URLs point at `.invalid` hosts and the info and licence say so: the
images are synthetic, not COCO's, and must not pass for it.

Objects are the plans' blobs, given as COCO gives an object: a polygon (the outline of the
ellipse, clipped to the image), its bbox [x, y, w, h] and area (the polygon's, by the shoelace
formula), no crowd regions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from caption_pipeline.data.coco_like.coco2017 import CATEGORIES, FOLDERS
from caption_pipeline.data.coco_like.plans import ImagePlan

# Bump when the output for the same arguments changes: a resumed run must not mix versions.
# It is in every JSON file's info and in the marker's config (`writer`).
GENERATOR_VERSION = 1

INFO = {
    "description": "COCO-shaped rehearsal data (caption_pipeline.data.coco_like): synthetic images "
    "and captions, not MS COCO",
    "url": "https://coco-like.invalid",
    "version": str(GENERATOR_VERSION),
    "year": 2017,
    "contributor": "caption_pipeline.data.coco_like",
    "date_created": "2017/09/01",
}
LICENSES = [
    {
        "url": "https://creativecommons.org/publicdomain/zero/1.0/",
        "id": 1,
        "name": "CC0 1.0 (synthetic data)",
    }
]


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
