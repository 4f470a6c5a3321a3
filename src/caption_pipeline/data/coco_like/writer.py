"""Writing a COCO-like dataset into a folder, resumably, and the command line that does it.

Order. The plans first (sizes, blobs, captions: about 35 s at full scale), then the images,
streamed to disk as they are rendered, then the JSON files: the plans of a full-scale run hold
470 MB, 1.5 GB at the peak while the JSON files are serialised (captions_train2017.json
82 MB, dataset_coco.json 119 MB). The JSON files are compact, as COCO's own are.

Workers. Images are rendered in `workers` processes (about 80 images/s each: `pixels`), so
full scale, 123,287 images, should take about 13 minutes with 2 workers (estimated from that
rate, not timed). The files do not depend on the number of workers (`plans`).

Safety. JSON files are written to a temporary name and renamed (`atomic.py`), images too,
and the JSON files only after every image: a killed run never leaves a partial file under a
final name. A marker (MARKER_FILE) records the arguments, first with `complete: false`.
Running again with the same arguments resumes (it keeps the images already there and writes
the rest); other arguments, or a folder this generator did not make, are refused: never write
into someone else's data, such as a real COCO download.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from caption_pipeline.atomic import atomic_path, atomic_write_bytes, remove_stale_temporaries
from caption_pipeline.data.coco_like.captions import expected_vocabulary
from caption_pipeline.data.coco_like.coco2017 import COCO_TRAIN_CAPTIONS, COCO_TRAIN_IMAGES, FOLDERS
from caption_pipeline.data.coco_like.json_files import (
    GENERATOR_VERSION,
    captions_json,
    instances_json,
    karpathy_json,
)
from caption_pipeline.data.coco_like.pixels import JPEG_QUALITY, encode_jpeg, render_image
from caption_pipeline.data.coco_like.plans import ImagePlan, plan_dataset
from caption_pipeline.errors import DataError

logger = logging.getLogger(__name__)

MARKER_FILE = "coco_like.json"
# The marker's "generator", and who the refusals name: the package, whatever module writes.
GENERATOR_NAME = "caption_pipeline.data.coco_like"


def generate(
    out: str | os.PathLike,
    scale: int,
    seed: int = 0,
    workers: int | None = 1,
    quality: int = JPEG_QUALITY,
) -> dict[str, Any]:
    """Write the dataset under `out` (package doc); returns the summary also in the marker.

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
        {"generator": GENERATOR_NAME, "config": config, "complete": True, "summary": summary},
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
            f"{out}: folder exists and was not made by {GENERATOR_NAME} (no "
            f"{MARKER_FILE}); refusing to write into it: choose an empty --out"
        )
    _write_json(marker, {"generator": GENERATOR_NAME, "config": dict(config), "complete": False})
    for folder in FOLDERS.values():
        (out / folder).mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out / folder)  # images a killed run was writing
    remove_stale_temporaries(out / "annotations")


def _write_json(path: Path, obj: Any) -> None:
    # Compact, as COCO's own files are (captions_train2017.json is ~90 MB at full scale).
    atomic_write_bytes(path, json.dumps(obj, separators=(",", ":")).encode())


def _write_image(task: tuple[str, ImagePlan, int, int]) -> int:
    """Render and write one image (temporary name, then rename); its size in bytes."""
    path, plan, seed, quality = task
    data = encode_jpeg(render_image(plan, seed), quality)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return len(data)


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


def _map(function: Callable[[Any], Any], tasks: Sequence, workers: int) -> Iterator:
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
    """`python -m caption_pipeline.data.coco_like`: `generate` from the command line; prints the
    summary as one JSON line and returns it."""
    parser = argparse.ArgumentParser(
        prog="python -m caption_pipeline.data.coco_like",
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
