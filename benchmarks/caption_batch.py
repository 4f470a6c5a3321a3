"""Batch captioning (issue 28): `kedro run --pipelines=caption_batch` on local[2] against
`caption-pipeline caption` on the same images, with the same registered model and beam size,
in one run.

  .venv/bin/python benchmarks/caption_batch.py --project . --images 500

The images are the first --images JPEGs of --split (train or val) of the project's shapes
data, repeated when the split holds fewer (hard links: the same bytes, other names). Each
side runs as a subprocess from the project folder, on --model (default the registry's
champion): wall time, images/s, time to the first caption (CLI: its first output line;
Spark: the output is committed as a whole at the job's end, so its first caption is visible
at the end; the JVM start and the job's own time, `job_s`, are given apart), and peak
memory: PSS summed over the process tree every 0.5 s (shared TensorFlow pages split between
the processes that map them; the JVM and Spark's Python workers included). Prints one JSON
line with the machine description.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import psutil  # noqa: E402

from caption_pipeline.evaluation.protocol import add_split_argument, selection_split  # noqa: E402

BIN = Path(sys.executable).parent


def copy_images(source: Path, folder: Path, count: int) -> int:
    """`count` hard links in `folder` to the JPEGs of `source`, cycling through them."""
    jpegs = sorted(source.glob("*.jpg"))
    if not jpegs:
        raise SystemExit(f"no JPEGs in {source}: run `kedro run --pipelines=synthetic` first")
    folder.mkdir(parents=True)
    for i in range(count):
        os.link(jpegs[i % len(jpegs)], folder / f"{i:06d}.jpg")
    return count


class PeakMemory(threading.Thread):
    """The largest PSS sum over `pid` and its descendants, sampled every 0.5 s."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.root, self.peak, self.done = psutil.Process(pid), 0, threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.5):
            total = 0
            for process in [self.root, *self._children()]:
                try:
                    total += process.memory_full_info().pss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
            self.peak = max(self.peak, total)

    def _children(self) -> list:
        try:
            return self.root.children(recursive=True)
        except psutil.NoSuchProcess:
            return []


def timed(args: list[str], cwd: Path, first_marker: str, ok: tuple[int, ...] = (0,)) -> dict:
    """Run `args`; wall seconds, seconds to the first output line holding `first_marker`,
    peak PSS in MB, and the exit code, which must be one of `ok`."""
    start = time.perf_counter()
    process = subprocess.Popen(
        args,
        cwd=cwd,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},  # each line when it is written
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    memory = PeakMemory(process.pid)
    memory.start()
    first, tail = None, []
    for line in process.stdout:
        if first is None and first_marker in line:
            first = time.perf_counter() - start
        tail = [*tail[-20:], line]
    code = process.wait()
    wall = time.perf_counter() - start
    memory.done.set()
    memory.join()
    if code not in ok:
        raise SystemExit(f"{args[0]} failed ({code}):\n{''.join(tail)}")
    return {
        "wall_s": round(wall, 2),
        "first_s": None if first is None else round(first, 2),
        "peak_pss_mb": round(memory.peak / 2**20),
    }


def per_second(images: int, result: dict) -> dict:
    return {**result, "images_per_s": round(images / result["wall_s"], 2)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="caption_batch.py", description=__doc__.split("\n")[0])
    parser.add_argument("--project", type=Path, default=Path("."))
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--model", default="models:/image-captioner@champion")
    parser.add_argument("--beam-size", type=int, default=3)
    parser.add_argument("--master", default="local[2]")
    add_split_argument(parser)
    args = parser.parse_args(argv)
    split = selection_split(args.split)
    project = args.project.resolve()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        count = copy_images(project / "data/01_raw/shapes" / split, folder, args.images)
        cli = timed(
            [str(BIN / "caption-pipeline"), "caption", str(folder), "--model", args.model]
            + ["--beam-size", str(args.beam_size)],
            project,
            '"caption"',  # its first JSON line
            ok=(0, 1),  # 1: the CLI refused some files
        )
        params = f"caption_batch.input={folder},caption_batch.output={tmp}/batch.parquet"
        params += f",caption_batch.model={args.model},caption_batch.beam_size={args.beam_size}"
        spark_conf = project / "conf/local/spark.yml"
        if spark_conf.exists():
            raise SystemExit(f"{spark_conf} exists: move it away (this sets --master there)")
        spark_conf.write_text(f"spark.master: {args.master}\n")
        try:
            spark = timed(
                [str(BIN / "kedro"), "run", "--pipelines=caption_batch", f"--params={params}"],
                project,
                "Spark session on",
            )
        finally:
            spark_conf.unlink()
        spark["jvm_started_s"], spark["first_s"] = spark["first_s"], spark["wall_s"]
        # The job alone (model loads, captioning, Parquet commit), as the pipeline timed it.
        summary = project / "data/08_reporting/caption_batch_summary.json"
        spark["job_s"] = json.loads(summary.read_text())["seconds"]
    from serve import machine  # benchmarks/serve.py's description of this machine

    print(
        json.dumps(
            {
                "images": count,
                "split": split,
                "model": args.model,
                "beam_size": args.beam_size,
                "cli": per_second(count, cli),
                "spark": {"master": args.master, **per_second(count, spark)},
                "machine": machine(),
            }
        )
    )


if __name__ == "__main__":
    main()
