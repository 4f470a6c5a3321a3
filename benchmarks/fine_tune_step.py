"""Seconds per step and peak memory of encoder fine-tuning (issue 10), by batch size.

    python benchmarks/fine_tune_step.py                              # NASNetLarge, 331 px
    python benchmarks/fine_tune_step.py --encoder nasnet_mobile --image-size 224
    python benchmarks/fine_tune_step.py --batch 4                    # one size, this process

The step is the fine-tuning phase's, built by the project's own code from conf/coco's parameters
(Kedro's config loader, env `--env`): `fine_tuning.fine_tuned_config` (encoder trainable,
`fine_tune.batchnorm: frozen`), `FineTuneConfig.train_config` over `train`, and
`training.build_captioner` with `TwoRateAdam` (the encoder's variables at
encoder_learning_rate / learning_rate), exponential decay and clipnorm, as
`fine_tune_captioner` makes it; `train.jit_compile` unless `--jit-compile` says otherwise.
Precision float32, encoder weights random (no ImageNet download: the same time and memory).
A batch is what the grouped reader gives: B images [B, S, S, 3] in 0..255 and B x 5 captions
of vocab.max_caption_length + 2 ids (no padding), vocabulary `--vocab` (COCO's: 10,204).

Each batch size runs in a fresh subprocess, so that its peak RSS (getrusage) is its own. Per
size: RSS once built (weights, Adam's moments, TensorFlow), peak RSS, compile (first step),
seconds per step (best and median of `--repeats` after `--warmup` steps), images/s, GFLOP per
image (train_step.py's counts: the encoder's convolutions, separable ones included, and the
decoder on features that need a gradient) and the fraction of a [4096, 4096] float32 matmul
timed just before each step. Sizes stop when a step takes over `--max-step-s`, or when the
next size's peak, extrapolated from the last two, would not fit in the memory available.
Then the least-squares line of peak RSS against batch: its slope is the memory per image (the
activations kept for the backward pass), and the batch that would fit in each `--memory`: on
this CPU, (total - intercept) / slope; on a GPU, (memory - 4 x params x 4 bytes: weights,
gradients, Adam's two moments) / slope. An estimate: it assumes activations linear in batch
and a GPU's activations as large as the CPU's (XLA or cuDNN workspaces not counted).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import decoder_flops, encoder_flops, matmul_gflops, synthetic_batch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30
# name=GiB: the machines whose batch is estimated; "cpu" is this machine's total memory.
MEMORY = "cpu,h200=140,a100_40gb=40"


def coco_parameters(env: str) -> dict:
    """`params:` of the Kedro env `env` (base overridden key by key), as `kedro run` sees them."""
    from kedro.config import OmegaConfigLoader

    from caption_pipeline.settings import CONFIG_LOADER_ARGS

    return OmegaConfigLoader(str(ROOT / "conf"), env=env, **CONFIG_LOADER_ARGS)["parameters"]


def build_fine_tuning(args):
    """The fine-tuning phase's compiled Captioner, its TrainConfig and FineTuneConfig."""
    from caption_pipeline.model import ModelConfig
    from caption_pipeline.model.encoder import NASNETS
    from caption_pipeline.training.cross_entropy import TrainConfig, build_captioner
    from caption_pipeline.training.fine_tuning import (
        FineTuneConfig,
        fine_tuned_config,
        two_rate_optimizer,
    )

    params = coco_parameters(args.env)
    model = {**params["model"], "vocab_size": args.vocab, "encoder_weights": None}
    if args.encoder:  # at its native size unless --image-size says otherwise
        model.update(encoder=args.encoder, image_size=NASNETS.get(args.encoder, (0, 128))[1])
    if args.image_size:
        model["image_size"] = args.image_size
    tuning = FineTuneConfig.from_dict(params["fine_tune"])
    train = tuning.train_config(TrainConfig.from_dict(params["train"]))
    jit = {"config": train.jit_compile, "true": True, "false": False}[args.jit_compile]
    train = dataclasses.replace(train, precision="float32", jit_compile=jit)
    optimizer = two_rate_optimizer(tuning.encoder_learning_rate / tuning.learning_rate)

    config = fine_tuned_config(ModelConfig.from_dict(model), tuning)
    size = config.image_size
    sample = {"image": np.zeros((1, size, size, 3), "float32")}
    captioner = build_captioner(config, train, 1000, sample, optimizer=optimizer)
    caption_length = params["vocab"]["max_caption_length"] + 2
    return captioner, train, tuning, caption_length


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


def measure(args, batch: int) -> dict:
    """One batch size in this process: build, compile, time; memory of this process."""
    keras.utils.set_random_seed(0)
    start = time.perf_counter()
    model, train, tuning, length = build_fine_tuning(args)
    build_s = time.perf_counter() - start
    built_rss = rss_bytes()
    c = model.config
    per_image = train.captions_per_image
    images, _ = synthetic_batch(model, batch, length - 1, "image")
    _, captions = synthetic_batch(model, batch * per_image, length - 1, "features")
    captions = captions.reshape(batch, per_image, length)  # grouped: [B, C, T+1]
    flops_image = encoder_flops(model.encoder) + per_image * decoder_flops(
        model.regions,
        model.feature_dim,
        c.attention_dim,
        c.lstm_units,
        c.embed_dim,
        c.vocab_size,
        length - 1,
        features_need_grad=True,
    )
    start = time.perf_counter()
    model.train_on_batch(images, captions)  # traces and compiles
    compile_s = time.perf_counter() - start
    for _ in range(args.warmup):
        model.train_on_batch(images, captions)
    step_times, fractions, rates = [], [], []
    for _ in range(args.repeats):
        rates.append(matmul_gflops(args.matmul_size))
        start = time.perf_counter()
        model.train_on_batch(images, captions)  # returns the loss as a float: synchronised
        step_times.append(time.perf_counter() - start)
        fractions.append(batch * flops_image / step_times[-1] / 1e9 / rates[-1])
    best = min(step_times)
    encoder_params = sum(int(np.prod(v.shape)) for v in model.encoder.trainable_variables)
    return {
        "batch": batch,
        "captions": batch * per_image,
        "encoder": c.encoder,
        "image_size": c.image_size,
        "regions": model.regions,
        "feature_dim": model.feature_dim,
        "steps": length - 1,
        "vocab": c.vocab_size,
        "batchnorm": c.encoder_batchnorm,
        "jit_compile": train.jit_compile,
        "precision": train.precision,
        "optimizer": type(model.optimizer).__name__,
        "encoder_lr_ratio": model.optimizer.ratio,
        "scaled_variables": len(model.optimizer.scaled),
        "params": model.count_params(),
        "trainable_params": sum(int(np.prod(v.shape)) for v in model.trainable_variables),
        "encoder_trainable_params": encoder_params,
        "build_s": round(build_s, 1),
        "compile_s": round(compile_s, 1),
        "step_s": round(best, 3),
        "median_step_s": round(float(np.median(step_times)), 3),
        "s_per_image": round(best / batch, 3),
        "images_per_s": round(batch / best, 3),
        "gflop_per_image": round(flops_image / 1e9, 2),
        "gflops": round(batch * flops_image / best / 1e9, 1),
        "matmul_gflops": round(max(rates), 1),
        "fraction_of_matmul": round(float(np.median(fractions)), 3),
        "built_rss_mib": round(built_rss / 2**20),
        # Linux: kilobytes
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def child_command(args, batch: int) -> list[str]:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--batch",
        str(batch),
        "--env",
        args.env,
        "--vocab",
        str(args.vocab),
        "--warmup",
        str(args.warmup),
        "--repeats",
        str(args.repeats),
        "--matmul-size",
        str(args.matmul_size),
        "--jit-compile",
        args.jit_compile,
    ]
    if args.encoder:
        command += ["--encoder", args.encoder]
    if args.image_size:
        command += ["--image-size", str(args.image_size)]
    return command


def available_bytes() -> int:
    with open("/proc/meminfo") as meminfo:
        fields = dict(line.split(":", 1) for line in meminfo)
    return int(fields["MemAvailable"].split()[0]) * 1024


def total_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def sweep(args) -> dict:
    """Each size in a fresh subprocess; stops on time or memory (see the module docstring)."""
    runs, stopped = [], None
    for batch in (int(b) for b in args.batches.split(",")):
        if len(runs) >= 2:  # the next size's peak, from the line through the last two
            (b0, m0), (b1, m1) = [(r["batch"], r["peak_rss_mib"] * 2**20) for r in runs[-2:]]
            predicted = m1 + (m1 - m0) / (b1 - b0) * (batch - b1)
            if predicted > 0.9 * available_bytes():
                stopped = f"batch {batch}: predicted {predicted / GIB:.1f} GiB > 90% available"
                break
        started = time.perf_counter()
        done = subprocess.run(child_command(args, batch), capture_output=True, text=True, cwd=ROOT)
        if done.returncode != 0:
            stopped = f"batch {batch}: exit {done.returncode}: {done.stderr.strip()[-500:]}"
            break
        runs.append(
            {
                **json.loads(done.stdout.strip().splitlines()[-1]),
                "process_wall_s": round(time.perf_counter() - started, 1),
            }
        )
        if runs[-1]["step_s"] > args.max_step_s:
            stopped = f"batch {batch}: step {runs[-1]['step_s']} s > --max-step-s"
            break
    return {"runs": runs, "stopped": stopped, "memory": memory_fit(runs, args.memory)}


def memory_fit(runs: list[dict], machines: str) -> dict | None:
    """Peak RSS = intercept + slope x batch (least squares), and the batch each machine holds."""
    if len(runs) < 2:
        return None
    batches = np.array([r["batch"] for r in runs], float)
    peaks = np.array([r["peak_rss_mib"] for r in runs], float) * 2**20
    slope, intercept = np.polyfit(batches, peaks, 1)
    fixed_gpu = 4 * runs[0]["trainable_params"] * 4  # weights, gradients, Adam's m and v
    fits = {}
    for entry in machines.split(","):
        name, _, gib = entry.partition("=")
        memory = total_bytes() if name == "cpu" else float(gib) * GIB
        fixed = intercept if name == "cpu" else fixed_gpu
        fits[name] = {
            "memory_gib": round(memory / GIB, 1),
            "fixed_gib": round(fixed / GIB, 2),
            "max_batch": int((memory - fixed) // slope) if slope > 0 else None,
        }
    residual = peaks - (intercept + slope * batches)
    return {
        "mib_per_image": round(slope / 2**20),
        "intercept_mib": round(intercept / 2**20),
        "max_residual_mib": round(float(np.abs(residual).max()) / 2**20),
        "estimated_max_batch": fits,
    }


def machine() -> dict:
    import tensorflow as tf

    with open("/proc/cpuinfo") as cpuinfo:
        cpu = next(
            (line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")),
            platform.processor(),
        )
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(total_bytes() / GIB, 1),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "backend": keras.backend.backend(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", default="1,2,4,8,16", help="sizes, one subprocess each")
    parser.add_argument("--batch", type=int, help="one size, measured in this process")
    parser.add_argument("--env", default="coco", help="the Kedro env whose parameters to use")
    parser.add_argument("--encoder", help="instead of model.encoder (e.g. nasnet_mobile)")
    parser.add_argument("--image-size", type=int, help="instead of model.image_size")
    parser.add_argument("--vocab", type=int, default=10204, help="COCO's vocabulary size")
    parser.add_argument("--warmup", type=int, default=1, help="steps after the compiling one")
    parser.add_argument("--repeats", type=int, default=2, help="timed steps")
    parser.add_argument(
        "--jit-compile",
        default="config",
        choices=["config", "true", "false"],
        help="config: train.jit_compile of the env",
    )
    parser.add_argument("--matmul-size", type=int, default=4096)
    parser.add_argument(
        "--max-step-s", type=float, default=60.0, help="no larger size after a step this long"
    )
    parser.add_argument(
        "--memory",
        default=MEMORY,
        help="name=GiB,...: the batch each would hold (cpu: this machine)",
    )
    args = parser.parse_args()
    if args.batch is not None:
        print(json.dumps(measure(args, args.batch)))
        return
    start, load = time.time(), os.getloadavg()
    result = sweep(args)
    print(
        json.dumps(
            {
                **result,
                "command": " ".join(sys.argv),
                "machine": machine(),
                "date": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(start)),
                "wall_s": round(time.time() - start, 1),
                "load_average_at_start": [round(x, 2) for x in load],
                "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
            }
        )
    )


if __name__ == "__main__":
    main()
