"""Throughput of the tf.data reader of COCO-size feature shards (121 x 4032 float16) on this CPU.

    python benchmarks/reader_throughput.py                      # 2,000 images in 8 shards (~2 GB)
    python benchmarks/reader_throughput.py --variants raw,parse,default --images 500

Options: --images 2000  --shards 8  --batch 64  --batches 60 (timed, after a warm-up)
         --shuffle-buffer 1024  --variants all|NAME,NAME,...  --tmpdir DIR  --matmul-size 4096

It writes the shards itself into a temporary folder with the project's writer path (random
features; `feature_example` records through `write_shard_set` and `commit_shard`, as
`features.write_features` does, so the manifest is a real "features" one and the reader
gets static [121, 4032] shapes), then times, one after the other, in this process:

  raw                 tf.data.TFRecordDataset over the files, one after the other: file read
                      + record framing (CRC) only, the floor of any reader
  raw_interleave      the same through make_caption_dataset's parallel interleave (8 files)
  parse               parse_feature_example on records held in memory (no I/O): the parse
  read_parse          interleave + parse, nothing after: make_caption_dataset's first stages
  default             make_caption_dataset(caption_mode="grouped", captions_per_image=5,
                      shuffle=True, seed=0, shuffle_buffer=1024, batch_size=64,
                      options=ReaderOptions(repeat=True)): the COCO training reader
                      (conf/coco: seeded, so deterministic order)
  unseeded            the same with seed=None (parallel reads may finish out of order)
  cycle_length_1      the same as default, one file at a time (no parallel interleave)
  no_shuffle          the same as default, shuffle=False
  cached              the same stages with .cache() in memory after the parse, timed from the
                      second epoch (make_caption_dataset has no cache option: COCO's 118k train
                      images are 115 GB of features, more than this machine's memory)
  raw_cold, default_cold   raw and one full epoch of default after evicting the shard files
                      from the page cache (posix_fadvise DONTNEED; the disk, not memory)

The shards are read right after being written, so all but the *_cold variants read them from
the page cache (the output reports the kernel's "Cached" memory before and after eviction).
Batched variants are timed over --batches batches after a warm-up that fills the shuffle
buffer; per-record variants (raw*, parse, read_parse) over one pass, in the graph
(`Dataset.reduce`, no Python per record). AUTOTUNE parallelism is the core count, as in
training (`without_autotune_model`). Per variant: images/s, captions/s (5 per image, grouped),
MB/s of parsed features (10^6 bytes; 975,744 per image), CPU seconds per image (all
threads: times the image rate needed gives the cores needed) and the 1-minute load average.

Prints one JSON line, with the rate of a [4096, 4096] float32 matmul timed in the same process
(the yardstick of benchmarks/train_step.py) and what the GPU step needs: 972 captions/s (one
H200, JAX, batch 64, grouped: 5 captions per image) is 194 images/s, so about 190 MB/s.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from caption_pipeline.data.shards.reader import (  # noqa: E402
    ReaderOptions,
    _grouped_captions,
    make_caption_dataset,
    without_autotune_model,
)
from caption_pipeline.data.shards.records import (  # noqa: E402
    feature_example,
    parse_feature_example,
    serialize_example,
)
from caption_pipeline.data.shards.shard_set import (  # noqa: E402
    FEATURE_FORMAT,
    ShardTask,
    commit_shard,
    load_shard_set,
    write_shard_set,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import matmul_gflops  # noqa: E402

REGIONS, FEATURE_DIM = 121, 4032  # NASNetLarge at 331 px: 11 x 11 regions of 4032 channels
FEATURE_BYTES = REGIONS * FEATURE_DIM * 2  # float16
CAPTIONS_PER_IMAGE = 5
GPU_CAPTIONS_PER_S = 972  # COCO train step, one H200 (JAX), batch 64 (docs/benchmarks.md)
SPLIT = "train"
VARIANTS = (
    "raw",
    "raw_interleave",
    "parse",
    "read_parse",
    "default",
    "unseeded",
    "cycle_length_1",
    "no_shuffle",
    "cached",
    "raw_cold",
    "default_cold",
)
MB = 1e6


# --- the shards ------------------------------------------------------------------------------


def write_feature_shards(folder: Path, images: int, shards: int, seed: int = 0) -> dict:
    """COCO-size feature shards of random float16 features, 5 captions of ~12 ids per image,
    with the project's record format, atomic shard commit and manifest."""
    rng = np.random.default_rng(seed)
    parts = np.array_split(np.arange(images), min(shards, images))
    tasks = [
        ShardTask(
            f"{SPLIT}-{i:05d}-of-{len(parts):05d}.tfrecord",
            SPLIT,
            len(part),
            f"bench-{seed}-{i}-{len(part)}",
        )
        for i, part in enumerate(parts)
    ]

    def fill(part: np.ndarray, tmp: Path) -> dict:
        captions = 0
        with tf.io.TFRecordWriter(str(tmp)) as writer:
            for image_id in part.tolist():
                ids = [
                    [1, *rng.integers(4, 10204, int(rng.integers(8, 15))).tolist(), 2]
                    for _ in range(CAPTIONS_PER_IMAGE)
                ]
                record = serialize_example(image_id, f"{image_id:012d}.jpg", b"", (640, 480), ids)
                features = rng.standard_normal((REGIONS, FEATURE_DIM), dtype=np.float32)
                writer.write(feature_example(record, features.astype(np.float16)))
                captions += len(ids)
        return {
            "records": len(part),
            "captions": captions,
            "skipped": 0,
            "skipped_examples": [],
            "feature_shape": [REGIONS, FEATURE_DIM],
        }

    def write_missing(missing, bar):
        for task, part in zip(tasks, parts, strict=False):
            if task in missing:
                yield commit_shard(folder, task, lambda tmp, part=part: fill(part, tmp))

    start = time.perf_counter()
    summary = write_shard_set(
        folder,
        tasks,
        write_missing,
        header={
            "format": FEATURE_FORMAT,
            "kind": "features",
            "params": {"benchmark": "reader_throughput", "seed": seed, "dtype": "float16"},
        },
        finish=lambda body: {"regions": REGIONS, "feature_dim": FEATURE_DIM},
        progress=False,
    )
    seconds = time.perf_counter() - start
    totals = summary.manifest["totals"]
    return {
        "images": totals["records"],
        "captions": totals["captions"],
        "shards": totals["shards"],
        "bytes": totals["bytes"],
        "bytes_per_record": round(totals["bytes"] / totals["records"]),
        "feature_bytes_per_image": FEATURE_BYTES,
        "write_s": round(seconds, 1),
    }


def page_cached_mb() -> float:
    """The kernel's page cache ("Cached" in /proc/meminfo), in MB."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("Cached:"):
            return int(line.split()[1]) * 1024 / MB
    return float("nan")


def evict(files: list[str]) -> None:
    """Drop the (clean: fsynced by the writer) pages of `files` from the page cache."""
    for name in files:
        fd = os.open(name, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# --- timing ----------------------------------------------------------------------------------


class Timer:
    """Wall time, CPU time of all this process's threads, and the load average at the end."""

    def __enter__(self) -> Timer:
        self._cpu, self._wall = _cpu_s(), time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self._wall
        self.cpu_seconds = _cpu_s() - self._cpu
        self.load = round(os.getloadavg()[0], 2)


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def rates(images: int, timer: Timer, *, file_bytes: float | None = None) -> dict:
    out = {
        "images": images,
        "seconds": round(timer.seconds, 3),
        "images_per_s": round(images / timer.seconds, 1),
        "captions_per_s": round(CAPTIONS_PER_IMAGE * images / timer.seconds, 1),
        "feature_mb_per_s": round(images * FEATURE_BYTES / timer.seconds / MB, 1),
        "cpu_ms_per_image": round(1000 * timer.cpu_seconds / images, 2),
        "load_average_1m": timer.load,
    }
    if file_bytes is not None:
        out["file_mb_per_s"] = round(file_bytes / timer.seconds / MB, 1)
    return out


def count_records(ds: tf.data.Dataset) -> int:
    """Iterate `ds` inside the graph (no Python per element); the number of elements."""
    return int(ds.reduce(np.int64(0), lambda n, _: n + 1))


def timed_pass(ds: tf.data.Dataset, images: int, file_bytes: float | None = None) -> dict:
    with Timer() as timer:
        count = count_records(without_autotune_model(ds))
    assert count == images, (count, images)
    return rates(count, timer, file_bytes=file_bytes)


def timed_batches(ds: tf.data.Dataset, warmup: int, batches: int) -> dict:
    """`batches` batches after `warmup` ones, iterated from Python as training does."""
    iterator = iter(ds)
    for _ in range(warmup):
        next(iterator)
    images = 0
    with Timer() as timer:
        for _ in range(batches):
            x, captions = next(iterator)
            images += int(x["features"].shape[0])
    assert x["features"].shape[1:] == (REGIONS, FEATURE_DIM), x["features"].shape
    assert x["features"].dtype == tf.float16 and captions.shape[1] == CAPTIONS_PER_IMAGE
    return {**rates(images, timer), "warmup_batches": warmup, "batches": batches}


def timed_epoch(ds: tf.data.Dataset, expected: int) -> dict:
    """One whole epoch, from a fresh iterator (its shuffle-buffer fill included)."""
    images = 0
    with Timer() as timer:
        for x, _ in ds:
            images += int(x["features"].shape[0])
    assert images == expected, (images, expected)
    return rates(images, timer)


def cached_dataset(shard_set, args) -> tf.data.Dataset:
    """make_caption_dataset's stages for "default", with .cache() after the parse."""
    autotune = tf.data.AUTOTUNE
    parse = lambda record: parse_feature_example(record, shard_set.feature_shape)  # noqa: E731
    ds = tf.data.Dataset.from_tensor_slices(shard_set.files(SPLIT)).interleave(
        tf.data.TFRecordDataset,
        cycle_length=min(8, len(shard_set.files(SPLIT))),
        num_parallel_calls=autotune,
        deterministic=True,
    )
    ds = ds.map(parse, num_parallel_calls=autotune, deterministic=True).cache().repeat()
    ds = ds.map(
        lambda r: _grouped_captions(r, "features", CAPTIONS_PER_IMAGE),
        num_parallel_calls=autotune,
        deterministic=True,
    )
    ds = ds.shuffle(args.shuffle_buffer, seed=0, reshuffle_each_iteration=True)
    ds = ds.map(lambda x, c: (x, tf.cast(c, tf.int32)), num_parallel_calls=autotune)
    return without_autotune_model(ds.padded_batch(args.batch).prefetch(autotune))


def run_variants(folder: Path, args) -> dict:
    shard_set = load_shard_set(folder, kind="features")
    files = shard_set.files(SPLIT)
    images = shard_set.num_images(SPLIT)
    file_bytes = sum(os.path.getsize(f) for f in files)
    cycle = min(8, len(files))
    per_epoch = math.ceil(images / args.batch)
    # Fill the shuffle buffer, then a few more: the timed batches are the steady state.
    warmup = min(math.ceil(args.shuffle_buffer / args.batch) + 2, per_epoch)

    def reader(
        repeat: bool = True, cycle_length: int = ReaderOptions.cycle_length, **overrides
    ) -> tf.data.Dataset:
        settings = dict(
            batch_size=args.batch,
            caption_mode="grouped",
            captions_per_image=CAPTIONS_PER_IMAGE,
            shuffle=True,
            seed=0,
            shuffle_buffer=args.shuffle_buffer,
        )
        return make_caption_dataset(
            shard_set,
            SPLIT,
            **{**settings, **overrides},
            options=ReaderOptions(repeat=repeat, cycle_length=cycle_length),
        )

    def parse(record):
        return parse_feature_example(record, shard_set.feature_shape)

    def interleaved() -> tf.data.Dataset:
        return tf.data.Dataset.from_tensor_slices(files).interleave(
            tf.data.TFRecordDataset,
            cycle_length=cycle,
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )

    results = {}
    for name in args.variants:
        if name == "raw":
            results[name] = timed_pass(tf.data.TFRecordDataset(files), images, file_bytes)
        elif name == "raw_interleave":
            results[name] = timed_pass(interleaved(), images, file_bytes)
        elif name == "parse":
            records = without_autotune_model(tf.data.TFRecordDataset(files).cache())
            count_records(records)  # fills the in-memory cache of serialized records
            results[name] = timed_pass(
                records.map(parse, num_parallel_calls=tf.data.AUTOTUNE), images
            )
            del records
        elif name == "read_parse":
            results[name] = timed_pass(
                interleaved().map(parse, num_parallel_calls=tf.data.AUTOTUNE), images
            )
        elif name in ("default", "unseeded", "cycle_length_1", "no_shuffle"):
            overrides = {
                "unseeded": {"seed": None},
                "cycle_length_1": {"cycle_length": 1},
                "no_shuffle": {"shuffle": False},
            }.get(name, {})
            results[name] = timed_batches(reader(**overrides), warmup, args.batches)
        elif name == "cached":
            # Warm-up: one whole epoch (fills the cache) plus the shuffle buffer's worth.
            results[name] = timed_batches(
                cached_dataset(shard_set, args), per_epoch + warmup, args.batches
            )
        elif name in ("raw_cold", "default_cold"):
            before = page_cached_mb()
            evict(files)
            after = page_cached_mb()
            if name == "raw_cold":
                results[name] = timed_pass(tf.data.TFRecordDataset(files), images, file_bytes)
            else:
                results[name] = timed_epoch(reader(repeat=False), images)
            results[name]["page_cache_mb_before_after_eviction"] = [round(before), round(after)]
        else:
            raise SystemExit(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
    return results


def machine() -> dict:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cores_available": len(os.sched_getaffinity(0)),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "tensorflow": importlib.metadata.version("tensorflow"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--batch", type=int, default=64, help="images per batch (grouped)")
    parser.add_argument("--batches", type=int, default=60, help="timed batches per variant")
    parser.add_argument("--shuffle-buffer", type=int, default=1024, help="conf/coco's")
    parser.add_argument("--variants", default="all", help=f"all, or some of {','.join(VARIANTS)}")
    parser.add_argument("--tmpdir", default=None, help="where to write the shards")
    parser.add_argument("--matmul-size", type=int, default=4096, help="the yardstick's side")
    args = parser.parse_args()
    args.variants = list(VARIANTS) if args.variants == "all" else args.variants.split(",")
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")

    record = {
        "benchmark": "reader_throughput",
        "command": " ".join(sys.argv),
        "machine": machine(),
        "matmul_size": args.matmul_size,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    start = time.perf_counter()
    record["matmul_gflops_at_start"] = round(matmul_gflops(args.matmul_size), 1)
    with tempfile.TemporaryDirectory(prefix="bench-reader-", dir=args.tmpdir) as tmp:
        record["shards"] = write_feature_shards(Path(tmp), args.images, args.shards)
        record["page_cache"] = (
            "shards just written: every variant but *_cold reads them from "
            "the page cache (memory), *_cold after evicting them (the disk)"
        )
        record["batch_size"], record["shuffle_buffer"] = args.batch, args.shuffle_buffer
        record["variants"] = run_variants(Path(tmp), args)
    record["matmul_gflops_at_end"] = round(matmul_gflops(args.matmul_size), 1)

    images_needed = GPU_CAPTIONS_PER_S / CAPTIONS_PER_IMAGE
    need = {
        "gpu_captions_per_s": GPU_CAPTIONS_PER_S,
        "needed_images_per_s_for_972_captions_s": round(images_needed, 1),
        "needed_mb_s_for_972_captions_s": round(images_needed * FEATURE_BYTES / MB, 1),
        "needed_mb_s_for_5x_step": round(5 * images_needed * FEATURE_BYTES / MB, 1),
    }
    for name in ("default", "default_cold"):
        if name in record["variants"]:
            result = record["variants"][name]
            ratio = result["images_per_s"] / images_needed
            need[f"{name}_reader_over_gpu_need"] = round(ratio, 2)
            need[f"{name}_bounds_epoch"] = "gpu_step" if ratio >= 1 else "reader"
            need[f"{name}_cores_for_972_captions_s"] = round(
                images_needed * result["cpu_ms_per_image"] / 1000, 2
            )
    record["gpu_need"] = need
    record["total_seconds"] = round(time.perf_counter() - start, 1)
    record["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(record))


if __name__ == "__main__":
    main()
