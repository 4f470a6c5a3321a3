"""COCO 2017 rehearsed: the real `coco` configuration, stage by stage, on a generated
COCO-shaped dataset, at two sizes, to show what each stage costs and what grows with N.

    .venv/bin/python benchmarks/coco_rehearsal.py --images 400 --scales 1 5 --out /tmp/rehearsal

No machine here can download COCO or ImageNet, so per scale the script:

1. generates a COCO-shaped dataset (`caption_pipeline.data.coco_like`: photo-like 640 x 480-ish
   JPEGs, the 2017 JSON schema, COCO's caption lengths over a Zipf vocabulary) of
   `images x scale` train images;
2. writes NASNetLarge's weights (random, seeded) to a local `.weights.h5` file and points
   `model.encoder_weights` at it: the path an offline user takes with the real ImageNet file;
3. runs `kedro run --env coco --pipelines=<stage>` for ingest, vocab, shard, features, train,
   evaluate and export in a copy of the project (`caption_pipeline.project.copy_project`), each
   stage in its own process, so that its wall time and peak RSS (`os.wait4`: the stage's process
   and the workers it waited for) are its own;
4. times the exported model and the HTTP server on CPU with `benchmarks/serve.py`.

The configuration is conf/coco's, with only what a rehearsal must change given on the command
line (`--params`): the dataset root, the weights file, and the number of training steps
(`--train-steps` cross-entropy steps of 64 images x 5 captions, `--scst-steps` SCST steps), the
same at every scale, so that the train stage's time per step is comparable. Per stage it reports
wall seconds, items per second (images, captions or steps), peak RSS and the bytes the stage
added under `data/`, per train image; then the ratio of each figure from the first scale to the
last. Prints one JSON line; `--markdown` also prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from caption_pipeline.project import copy_project

PYTHON = sys.executable
KEDRO = str(Path(PYTHON).with_name("kedro"))
HERE = Path(__file__).resolve().parent
STAGES = ("synthetic", "ingest", "vocab", "shard", "features", "train", "evaluate", "export")
BATCH = 64  # conf/coco train.batch_size


def run_stage(command: list[str], cwd: Path, log: Path) -> dict:
    """`command` in `cwd`: wall seconds and peak RSS (GB) of its process tree's largest
    member; its output goes to `log`. Raises with the log's tail when it fails."""
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    start = time.perf_counter()
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        tail = log.read_text()[-4000:]
        raise SystemExit(f"{' '.join(command[:6])} failed (log {log}):\n{tail}")
    return {"seconds": round(seconds, 1), "peak_rss_gb": round(usage.ru_maxrss / 2**20, 2)}


def disk_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def write_nasnet_weights(path: Path, seed: int) -> None:
    """NASNetLarge without its classifier, random weights: the file an offline user gives."""
    import keras

    keras.utils.set_random_seed(seed)
    backbone = keras.applications.NASNetLarge(
        include_top=False, weights=None, input_shape=(331, 331, 3)
    )
    partial = path.with_name(f"partial-{path.name}")  # a killed run leaves no half file
    backbone.save_weights(partial)
    os.replace(partial, path)


def rehearse(out: Path, train_images: int, args) -> dict:
    """Every stage of one scale; returns the rows and the sizes."""
    out.mkdir(parents=True, exist_ok=True)
    raw = out / "coco"
    rows = {
        "generate": run_stage(
            [
                PYTHON,
                "-m",
                "caption_pipeline.data.coco_like",
                "--out",
                str(raw),
                "--scale",
                str(train_images),
                "--seed",
                str(args.seed),
            ],
            out,
            out / "generate.log",
        )
    }
    weights = out.parent / "nasnet_large_random.weights.h5"  # one file for every scale
    if not weights.exists():
        # In a child: this process stays free of TensorFlow, so that it adds nothing to the
        # stages' peak RSS (a forked child's ru_maxrss starts at its parent's size).
        rows["weights"] = run_stage(
            [
                PYTHON,
                __file__,
                "--write-weights",
                str(weights),
                "--seed",
                str(args.seed),
                "--out",
                str(out),
            ],
            out,
            out / "weights.log",
        )
    project = copy_project(out / "project")
    params = ",".join(
        [
            f"dataset.root={raw}",
            f"model.encoder_weights={weights}",
            "train.epochs=1",
            f"train.max_steps_per_epoch={args.train_steps}",
            "self_critical.epochs=1",
            f"self_critical.max_steps_per_epoch={args.scst_steps}",
        ]
    )
    for stage in STAGES:
        before = disk_bytes(project / "data")
        rows[stage] = run_stage(
            [KEDRO, "run", "--env", "coco", f"--pipelines={stage}", f"--params={params}"],
            project,
            out / f"{stage}.log",
        )
        rows[stage]["data_bytes_added"] = disk_bytes(project / "data") - before
    sizes = dataset_sizes(project)
    rows["scst"] = scst_steps(project, rows["train"])
    rows["serve"] = serve_latency(project, raw, out)
    for stage, row in rows.items():
        row.update(throughput(stage, row, sizes, args))
        if "data_bytes_added" in row:
            row["bytes_per_train_image"] = round(row["data_bytes_added"] / sizes["train_images"])
    return {"sizes": sizes, "stages": rows}


def scst_steps(project: Path, train: dict) -> dict:
    """The SCST phase of the train stage, from the steps it logged (`self_critical_steps`):
    seconds per step after the first (which compiles the sampler and the update), the host-side
    CIDEr-D reward's share of those seconds, and images and samples per step. Its peak RSS is
    the train stage's (both phases run in that one process)."""
    import pandas as pd
    import yaml

    steps = pd.read_csv(project / "data/08_reporting/self_critical_steps.csv")
    conf = yaml.safe_load((project / "conf/coco/parameters_train.yml").read_text())
    scst = conf["self_critical"]
    timed = steps.iloc[1:] if len(steps) > 1 else steps
    step_s = float(timed["step_seconds"].median())
    return {
        "steps": len(steps),
        "first_step_seconds": round(float(steps["step_seconds"].iloc[0]), 2),
        "seconds_per_step": round(step_s, 3),
        "images_per_s": round(int(scst["batch_size"]) / step_s, 2),
        "reward_share": round(
            float(timed["reward_seconds"].sum() / timed["step_seconds"].sum()), 4
        ),
        "reward_seconds_per_step": round(float(timed["reward_seconds"].median()), 4),
        "images_per_step": int(scst["batch_size"]),
        "samples_per_image": int(scst["samples"]),
        "peak_rss_gb": train["peak_rss_gb"],
    }


def dataset_sizes(project: Path) -> dict:
    import pandas as pd

    table = pd.read_parquet(project / "data/02_intermediate/captions.parquet")
    per_split = table.groupby("split")["image_id"].nunique().to_dict()
    vocabulary = json.loads(next((project / "data/03_primary").glob("vocabulary.json")).read_text())
    return {
        "images": {split: int(count) for split, count in per_split.items()},
        "train_images": int(per_split["train"]),
        "captions": len(table),
        "vocabulary": len(vocabulary["tokens"]),
    }


def throughput(stage: str, row: dict, sizes: dict, args) -> dict:
    """What the stage processed per second, in its own unit."""
    images = sum(sizes["images"].values())
    per = {
        "generate": ("images", images),
        "ingest": ("captions", sizes["captions"]),
        "vocab": ("captions", sizes["captions"]),
        "shard": ("images", images),
        "features": ("images", images),
        "train": ("steps", args.train_steps + args.scst_steps),
        "evaluate": ("images", images - sizes["train_images"]),
    }  # the two halves of val
    if stage not in per:
        return {}
    unit, count = per[stage]
    return {f"{unit}_per_s": round(count / row["seconds"], 2)}


def serve_latency(project: Path, raw: Path, out: Path) -> dict:
    """benchmarks/serve.py on the export, with photo-size val JPEGs."""
    log = out / "serve.log"
    row = run_stage(
        [
            PYTHON,
            str(HERE / "serve.py"),
            "--model",
            str(project / "data/06_models/export/saved_model"),
            "--images",
            str(raw / "val2017"),
            "--requests",
            "16",
            "--repeats",
            "3",
        ],
        project,
        log,
    )
    lines = [line for line in log.read_text().splitlines() if line.startswith("{")]
    return {**row, "result": json.loads(lines[-1]) if lines else None}


def machine() -> dict:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in open("/proc/cpuinfo")
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "load_average": os.getloadavg(),
    }


def growth(results: list[dict]) -> dict:
    """Last scale / first scale, per stage: wall time and peak RSS."""
    first, last = results[0]["stages"], results[-1]["stages"]
    return {
        stage: {
            key: round(last[stage][key] / first[stage][key], 2)
            for key in ("seconds", "peak_rss_gb")
            if first[stage].get(key)
        }
        for stage in first
        if stage in last
    }


def markdown(results: list[dict], scales: list[int]) -> str:
    lines = [
        "| stage | "
        + " | ".join(f"{s}x: s, items/s, peak RSS GB, bytes/train image" for s in scales)
        + " | RSS growth |",
        "|---|" + "---|" * (len(scales) + 1),
    ]
    grown = growth(results)
    for stage in results[0]["stages"]:
        cells = []
        for result in results:
            row = result["stages"].get(stage, {})
            rate = next(
                (
                    f"{v} {k.removesuffix('_per_s')}/s"
                    for k, v in row.items()
                    if k.endswith("_per_s")
                ),
                "",
            )
            cells.append(
                f"{row.get('seconds', '')} s, {rate}, {row.get('peak_rss_gb', '')}, "
                f"{row.get('bytes_per_train_image', '')}"
            )
        lines.append(
            f"| {stage} | " + " | ".join(cells) + f" | "
            f"{grown.get(stage, {}).get('peak_rss_gb', '')}x |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=400, help="train images at scale 1")
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--train-steps", type=int, default=200)
    parser.add_argument("--scst-steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--write-weights", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.write_weights:
        write_nasnet_weights(args.write_weights, args.seed)
        return
    started = machine()
    results = [
        rehearse(args.out / f"scale{scale}", args.images * scale, args) for scale in args.scales
    ]
    report = {
        "benchmark": "coco_rehearsal",
        "args": {k: str(v) for k, v in vars(args).items()},
        "scales": args.scales,
        "results": results,
        "growth": growth(results),
        "machine": {**started, "load_average_end": os.getloadavg()},
    }
    print(json.dumps(report))
    if args.markdown:
        print(markdown(results, args.scales))


if __name__ == "__main__":
    main()
