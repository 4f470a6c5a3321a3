"""Benchmarks of the TFRecord shard writer and the tf.data reader. Self-contained.

Each subcommand generates its own 128 px images (noise and shapes) in a temporary folder,
then prints ONE JSON line: the results and the exact machine.

    python benchmarks/data_benchmarks.py shard    # writer images/s, 1 and 2 worker processes
    python benchmarks/data_benchmarks.py read     # reader examples/s, with and without decoding
    python benchmarks/data_benchmarks.py memory   # writer peak RSS at 1x and 10x images
    python benchmarks/data_benchmarks.py atomic   # atomic writes into one folder of N files

"1x" is 3,600 images (the default shapes dataset); see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import itertools
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
from PIL import Image, ImageDraw

from caption_pipeline.data.images import available_cpus
from caption_pipeline.data.shards.image_writer import write_shards
from caption_pipeline.data.shards.plan import ImageCaptions, build_shard_plan
from caption_pipeline.data.shards.shard_set import load_shard_set

ONE_X = 3600
CAPTIONS_PER_IMAGE = 5


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
        "cores_available": available_cpus(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "tensorflow": importlib.metadata.version("tensorflow"),
        "pillow": importlib.metadata.version("pillow"),
    }


def make_image_files(folder: Path, count: int, size: int, distinct: int = ONE_X) -> list[str]:
    """`count` JPEG paths; past `distinct` they are hard links to the first ones (same bytes,
    own names: the writer does the same work per image, and the disk holds only `distinct`)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        path = folder / f"{i:012d}.jpg"
        if i < distinct:
            image = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
            draw = ImageDraw.Draw(image)
            for _ in range(rng.integers(1, 4)):
                x, y = rng.integers(0, size * 3 // 4, 2)
                box = [int(x), int(y), int(x + size // 4), int(y + size // 4)]
                colour = tuple(int(c) for c in rng.integers(0, 256, 3))
                (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
            image.save(path, quality=90)
        else:
            os.link(paths[i % distinct], path)
        paths.append(str(path))
    return paths


def captioned(paths: list[str], seed: int = 0) -> list[ImageCaptions]:
    """Five captions of 8 to 16 token ids per image, <start>=1 ... <end>=2."""
    rng = np.random.default_rng(seed)
    return [
        ImageCaptions(
            "train",
            i,
            path,
            [
                [1, *rng.integers(4, 1000, rng.integers(6, 15)).tolist(), 2]
                for _ in range(CAPTIONS_PER_IMAGE)
            ],
        )
        for i, path in enumerate(paths)
    ]


def timed_write(images: list[ImageCaptions], out: Path, *, shards: int, workers: int) -> float:
    plan = build_shard_plan(images, num_shards={"train": shards}, seed=0, image_size=128)
    start = time.perf_counter()
    summary = write_shards(plan, out, workers=workers, progress=False)
    assert len(summary.written) == min(shards, len(images)), summary
    return time.perf_counter() - start


def bench_shard(args: argparse.Namespace, tmp: Path) -> dict:
    import tensorflow  # noqa: F401  (in this process already: the 1-worker run writes in-process)

    images = captioned(make_image_files(tmp / "images", args.images, args.size))
    results = {"images": len(images), "shards": args.shards, "image_size": args.size}
    for workers in args.workers:
        # Process start (spawn + TensorFlow import) measured alone on a 1-image-per-worker plan.
        startup = timed_write(
            images[:workers], tmp / f"warm-{workers}", shards=workers, workers=workers
        )
        seconds = timed_write(images, tmp / f"out-{workers}", shards=args.shards, workers=workers)
        results[f"workers_{workers}"] = {
            "seconds": round(seconds, 2),
            "images_per_s": round(len(images) / seconds, 1),
            "startup_s": round(startup, 2) if workers > 1 else 0.0,
            "images_per_s_after_startup": round(
                len(images) / max(seconds - startup * (workers > 1), 1e-9), 1
            ),
        }
    if 1 in args.workers and 2 in args.workers:
        one, two = results["workers_1"], results["workers_2"]
        results["ratio_2_vs_1"] = round(two["images_per_s"] / one["images_per_s"], 2)
        results["ratio_2_vs_1_after_startup"] = round(
            two["images_per_s_after_startup"] / one["images_per_s_after_startup"], 2
        )
    return results


def bench_read(args: argparse.Namespace, tmp: Path) -> dict:
    from caption_pipeline.data.shards.reader import ReaderOptions, make_caption_dataset

    images = captioned(make_image_files(tmp / "images", args.images, args.size))
    timed_write(images, tmp / "shards", shards=args.shards, workers=max(args.workers))
    shard_set = load_shard_set(tmp / "shards")
    results = {
        "images": len(images),
        "shards": args.shards,
        "batch_size": args.batch_size,
        "epochs": args.epochs,
    }
    for name, options in {
        "sample_decoded": ("sample", True),
        "sample_jpeg_bytes": ("sample", False),
        "all_captions_decoded": ("all", True),
    }.items():
        caption_mode, decode_images = options
        ds = make_caption_dataset(
            shard_set,
            "train",
            batch_size=args.batch_size,
            shuffle=True,
            seed=0,
            caption_mode=caption_mode,
            options=ReaderOptions(decode_images=decode_images),
        )
        for _ in ds:  # warm-up epoch: graph tracing, autotuning, page cache
            pass
        count, start = 0, time.perf_counter()
        for _ in range(args.epochs):
            for x, _ in ds:
                count += int(x["image_id"].shape[0])
        seconds = time.perf_counter() - start
        results[name] = {
            "examples": count,
            "seconds": round(seconds, 2),
            "examples_per_s": round(count / seconds, 1),
        }
    return results


class PeakMemory:
    """Samples the summed RSS and PSS of this process and all its descendants.

    RSS counts the shared libraries (TensorFlow's are large) once per process; PSS splits
    shared pages between the processes that map them, so its sum is the real footprint.
    """

    def __init__(self, interval: float = 0.1) -> None:
        self.rss = self.pss = 0
        self._interval, self._stop = interval, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            rss = pss = 0
            for process in [me, *me.children(recursive=True)]:
                try:
                    info = process.memory_full_info()
                except psutil.Error:  # a worker that just exited
                    continue
                rss, pss = rss + info.rss, pss + info.pss
            self.rss, self.pss = max(self.rss, rss), max(self.pss, pss)
            time.sleep(self._interval)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def memory_child(args: argparse.Namespace) -> None:
    """In a fresh process: plan and write the shards of the images in args.folder."""
    import resource

    paths = sorted(str(p) for p in Path(args.folder).glob("*.jpg"))[: args.images]
    with PeakMemory() as peak:
        timed_write(captioned(paths), Path(args.out), shards=args.shards, workers=max(args.workers))
    mib = 2**20
    print(
        json.dumps(
            {
                "images": len(paths),
                "peak_rss_sum_mib": round(peak.rss / mib),
                "peak_pss_sum_mib": round(peak.pss / mib),
                "parent_max_rss_mib": round(
                    resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                ),
                "largest_child_max_rss_mib": round(
                    resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
                ),
            }
        )
    )


def bench_memory(args: argparse.Namespace, tmp: Path) -> dict:
    make_image_files(tmp / "images", max(args.scales) * args.images, args.size)
    results = {"workers": max(args.workers), "shards": args.shards}
    for scale in args.scales:
        command = [
            sys.executable,
            __file__,
            "_memory_child",
            "--folder",
            str(tmp / "images"),
            "--out",
            str(tmp / f"out-{scale}x"),
            "--images",
            str(scale * args.images),
            "--shards",
            str(args.shards),
            "--workers",
            str(max(args.workers)),
        ]
        start = time.perf_counter()
        child = subprocess.run(command, check=True, capture_output=True, text=True)
        results[f"{scale}x"] = {
            **json.loads(child.stdout.splitlines()[-1]),
            "seconds": round(time.perf_counter() - start, 1),
        }
    first, last = results[f"{min(args.scales)}x"], results[f"{max(args.scales)}x"]
    for key in ("peak_rss_sum_mib", "peak_pss_sum_mib"):
        results[f"{key}_ratio"] = round(last[key] / first[key], 2)
    return results


def bench_atomic(args: argparse.Namespace, tmp: Path) -> dict:
    """`atomic_write_bytes` of `--files` small files into one folder (a COCO image folder
    holds 118,287), against a plain write + fsync + rename in the same loop: whether a write's
    cost grows with the files already there."""
    from caption_pipeline.atomic import atomic_write_bytes

    def plain(path: Path, data: bytes) -> None:
        tmp_path = path.with_name(f".{path.name}.tmp")
        with open(tmp_path, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())  # as atomic_write_bytes does
        os.replace(tmp_path, path)

    data = b"x" * 4096
    sizes = sorted(args.files)
    bounds = list(itertools.pairwise([0, *sizes]))  # stretches of files: [0, n1), [n1, n2), ...
    stretches = [f"us_per_write_files_{lo}_to_{hi}" for lo, hi in bounds]
    results = {}
    for name, write in {"atomic": atomic_write_bytes, "plain_rename": plain}.items():
        folder = tmp / name
        folder.mkdir()
        laps, start = [0.0], time.perf_counter()
        for index in range(sizes[-1]):
            write(folder / f"{index:012d}.jpg", data)
            if index + 1 in sizes:
                laps.append(time.perf_counter() - start)
        per_write = [  # microseconds per write within each stretch
            (laps[k + 1] - laps[k]) / (hi - lo) * 1e6 for k, (lo, hi) in enumerate(bounds)
        ]
        results[name] = {key: round(us, 1) for key, us in zip(stretches, per_write, strict=True)}
        results[name]["growth_last_vs_first"] = round(per_write[-1] / per_write[0], 2)
    results["atomic_vs_plain_last"] = round(
        results["atomic"][stretches[-1]] / results["plain_rename"][stretches[-1]], 2
    )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("benchmark", choices=["shard", "read", "memory", "atomic", "_memory_child"])
    parser.add_argument(
        "--images", type=int, default=ONE_X, help="images at 1x (default: %(default)s)"
    )
    parser.add_argument("--size", type=int, default=128, help="side of the generated images")
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument(
        "--scales", type=int, nargs="+", default=[1, 10], help="memory: dataset multiples"
    )
    parser.add_argument(
        "--files", type=int, nargs="+", default=[1000, 10000, 20000], help="atomic: laps"
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--epochs", type=int, default=3, help="read: timed epochs after a warm-up one"
    )
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.benchmark == "_memory_child":
        return memory_child(args)
    run = {
        "shard": bench_shard,
        "read": bench_read,
        "memory": bench_memory,
        "atomic": bench_atomic,
    }[args.benchmark]
    with tempfile.TemporaryDirectory(prefix=f"bench-{args.benchmark}-") as tmp:
        record = {"benchmark": args.benchmark, "command": " ".join(sys.argv), "machine": machine()}
        start = time.perf_counter()
        record["results"] = run(args, Path(tmp))
        record["total_seconds"] = round(time.perf_counter() - start, 1)
        record["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(record))


if __name__ == "__main__":
    main()
