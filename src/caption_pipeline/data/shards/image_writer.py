"""The image writer: execute a `ShardPlan` into JPEG image shards, on a pool of processes.

Each worker process writes whole shards: for every image of its shard it loads the source
(`images.load_rgb_image`: EXIF orientation applied, RGB), encodes it as an image_size square
JPEG (`images.encode_jpeg`) and writes its record (`records.serialize_example`); the shard is
then committed by `shard_set.commit_shard` (atomic rename, then its receipt). Reuse, resume and
the manifest are `shard_set.write_shard_set`'s.

An image that fails to load is skipped and counted, with the first MAX_SKIPPED_EXAMPLES of a
shard named in its manifest entry; more than `plan.max_bad_fraction` of a split skipped
refuses the whole set (no manifest is written).
"""

from __future__ import annotations

import concurrent.futures
import functools
import multiprocessing
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tensorflow as tf
from tqdm.auto import tqdm

from caption_pipeline.data.images import ImageError, available_cpus, encode_jpeg, load_rgb_image
from caption_pipeline.data.shards.plan import ShardPlan, ShardSpec, shard_fingerprint
from caption_pipeline.data.shards.records import serialize_example
from caption_pipeline.data.shards.shard_set import (
    IMAGE_FORMAT,
    ShardTask,
    WriteSummary,
    commit_shard,
    skipped_examples,
    write_shard_set,
)
from caption_pipeline.errors import DataError

MAX_SKIPPED_EXAMPLES = 20  # failed images named per shard in the manifest


@dataclass(frozen=True)
class _ShardJob:
    """What a worker process needs to write one image shard (picklable)."""

    task: ShardTask
    spec: ShardSpec
    folder: str
    image_size: int
    jpeg_quality: int


def _write_shard(job: _ShardJob) -> dict[str, Any]:
    """Write one image shard (in a worker process), then its receipt."""
    return commit_shard(Path(job.folder), job.task, functools.partial(_fill_image_shard, job))


def _fill_image_shard(job: _ShardJob, tmp: Path) -> dict[str, Any]:
    """Decode, resize and encode the shard's images into `tmp`, one image at a time."""
    records = captions = 0
    skipped: list[dict[str, Any]] = []
    with tf.io.TFRecordWriter(str(tmp)) as writer:
        for _, image_id, file_path, ids in job.spec.entries():
            try:
                image = load_rgb_image(file_path)
            except ImageError as exc:
                skipped.append({"image_id": image_id, "file_path": file_path, "error": str(exc)})
                continue
            jpeg = encode_jpeg(image, job.image_size, quality=job.jpeg_quality)
            writer.write(serialize_example(image_id, file_path, jpeg, image.size, ids))
            records += 1
            captions += len(ids)
    return {
        "records": records,
        "captions": captions,
        "skipped": len(skipped),
        "skipped_examples": skipped[:MAX_SKIPPED_EXAMPLES],
    }


def _run_jobs(jobs: list[_ShardJob], workers: int, bar: tqdm) -> Iterator[dict[str, Any]]:
    if workers <= 1:
        for job in jobs:
            receipt = _write_shard(job)
            bar.update(len(job.spec))
            yield receipt
        return
    # spawn: a fresh interpreter per worker; forking a process that may hold TF state is unsafe
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        futures = {pool.submit(_write_shard, job): job for job in jobs}
        try:
            for future in concurrent.futures.as_completed(futures):
                receipt = future.result()
                bar.update(len(futures[future].spec))
                yield receipt
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise


def _check_bad_fraction(plan: ShardPlan, folder: Path, manifest: Mapping[str, Any]) -> None:
    for name, split in manifest["splits"].items():
        seen = split["records"] + split["skipped"]
        if split["skipped"] > plan.max_bad_fraction * seen:
            example = skipped_examples(manifest, name)[0]["error"]
            raise DataError(
                f"{folder}: {split['skipped']} of {seen} {name} images failed to load, more than "
                f"shard.max_bad_fraction={plan.max_bad_fraction}; e.g. {example}"
            )


def write_shards(
    plan: ShardPlan, folder: str | os.PathLike, *, workers: int | None = None, progress: bool = True
) -> WriteSummary:
    """Execute `plan` into `folder`: parallel, atomic, resumable; the manifest is written last.

    `workers` (default `plan.workers`; 0 or None = all cores) processes each write whole shards.
    A complete manifest of the same fingerprint whose files verify makes this a no-op.
    """
    folder = Path(folder)
    specs = {spec.filename: spec for spec in plan.shards}
    tasks = [
        ShardTask(spec.filename, spec.split, len(spec), shard_fingerprint(plan, spec))
        for spec in plan.shards
    ]

    def write_missing(missing: list[ShardTask], bar: tqdm) -> Iterator[dict[str, Any]]:
        count = min(workers or plan.workers or available_cpus(), len(missing))
        bar.set_description(f"Writing shards (workers={count})")
        jobs = [
            _ShardJob(task, specs[task.filename], str(folder), plan.image_size, plan.jpeg_quality)
            for task in missing
        ]
        return _run_jobs(jobs, count, bar)

    return write_shard_set(
        folder,
        tasks,
        write_missing,
        header={"format": IMAGE_FORMAT, "kind": "images", "params": plan.params},
        finish=functools.partial(_check_bad_fraction, plan, folder),
        progress=progress,
    )
