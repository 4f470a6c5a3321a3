"""Serving speed (issue 5): the HTTP server's latency and throughput at 1 and 8 concurrent
clients, and the exported SavedModel's single-image latency split into its parts.

  .venv/bin/python benchmarks/serve.py --model data/06_models/export/saved_model \
      --images data/01_raw/shapes/val

model part (in this process, the best of --repeats calls after a warm-up call: the least
disturbed by other processes, so the differences below stay meaningful on a busy machine):
  full            serving_default on one JPEG (decode + resize + encoder + search + text)
  pixels          caption_pixels on decoded pixels (encoder + search)
  encoder         encode_pixels on decoded pixels
  decoder         pixels - encoder: the beam search (LSTM + attention steps)
  preprocessing   full - pixels: JPEG decoding, resizing, caption text
for a model-size (S x S) JPEG and a 640 x 480 photo-size one.

server part: `caption-pipeline serve` in a subprocess on 127.0.0.1; --requests multipart
POSTs of the images (round robin) from 1 and from 8 client threads, after 8 warm-up
requests: p50 / p99 latency and requests/s; then again at 8 clients with micro-batching off
(--max-batch 1). Prints one JSON line with the machine description.

--overload (issue 12): the server with its default overload settings (serve.max_queue 32,
serve.max_batch 8) at 1 client (the single-request latency), at as many clients as the queue
holds (throughput at capacity: every request admitted, the model never idle), and at 64
clients (past capacity): requests/s of the 200s, the fraction shed (503 with Retry-After),
p50 / p99 of the 200s and of the 503s. The model part is skipped.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import requests  # noqa: E402
from PIL import Image  # noqa: E402

from caption_pipeline.evaluation.protocol import add_split_argument, selection_split  # noqa: E402


def machine() -> dict:
    import tensorflow as tf

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
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "load_average": os.getloadavg(),
    }


def best_ms(fn, repeats: int) -> float:
    fn()  # warm-up (first call may trace or allocate)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - start))
    return round(min(times), 2)


def model_latency(model_path: Path, image: bytes, repeats: int) -> dict:
    import tensorflow as tf

    from caption_pipeline.serving.export import (
        DEFAULT_SIGNATURE,
        ENCODER_SIGNATURE,
        PIXELS_SIGNATURE,
        ExportedCaptioner,
        decode_images,
    )

    model = ExportedCaptioner(model_path)
    signatures = model._loaded.signatures
    size = int(model.info["image_size"])
    photo = io.BytesIO()
    Image.open(io.BytesIO(image)).convert("RGB").resize((640, 480)).save(photo, "JPEG", quality=90)
    results = {}
    for name, data in (("model_size_jpeg", image), ("photo_640x480_jpeg", photo.getvalue())):
        images = tf.constant([data])
        pixels = decode_images(images, size)
        full = best_ms(lambda i=images: signatures[DEFAULT_SIGNATURE](images=i), repeats)
        searched = best_ms(lambda p=pixels: signatures[PIXELS_SIGNATURE](pixels=p), repeats)
        encoder = best_ms(lambda p=pixels: signatures[ENCODER_SIGNATURE](pixels=p), repeats)
        results[name] = {
            "full_ms": full,
            "encoder_ms": encoder,
            "decoder_ms": round(searched - encoder, 2),
            "preprocessing_ms": round(full - searched, 2),
        }
    results["beam_size"] = model.default_beam_size
    return results


def load(url: str, images: list[bytes], requests_count: int, clients: int) -> dict:
    """`requests_count` POSTs from `clients` threads: latency of the 200s, requests/s of the
    200s, and the 503s (shed) with their latency; any other status is counted as `other`."""
    local = threading.local()

    def one(i: int) -> tuple[float, int]:
        if not hasattr(local, "session"):
            local.session = requests.Session()
        start = time.perf_counter()
        answer = local.session.post(
            url, files={"image": ("i.jpg", images[i % len(images)], "image/jpeg")}, timeout=300
        )
        return 1000 * (time.perf_counter() - start), answer.status_code

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, range(8)))  # warm-up
        start = time.perf_counter()
        results = list(pool.map(one, range(requests_count)))
        wall = time.perf_counter() - start
    ok = [ms for ms, status in results if status == 200]
    shed = [ms for ms, status in results if status == 503]
    report = {
        "clients": clients,
        "requests": requests_count,
        "ok": len(ok),
        **_percentiles("", ok),
        "requests_per_s": round(len(ok) / wall, 1),
        "shed": len(shed),
        "shed_fraction": round(len(shed) / requests_count, 3),
        "other": requests_count - len(ok) - len(shed),
    }
    return {**report, **_percentiles("shed_", shed)} if shed else report


def _percentiles(prefix: str, latencies: list[float]) -> dict:
    if not latencies:
        return {}
    return {
        f"{prefix}p50_ms": round(float(np.percentile(latencies, 50)), 1),
        f"{prefix}p99_ms": round(float(np.percentile(latencies, 99)), 1),
    }


def server_runs(
    model_path: Path,
    images: list[bytes],
    requests_count: int,
    port: int,
    plan: tuple[tuple[int, tuple[int, ...]], ...] = ((8, (1, 8)), (1, (8,))),
) -> list[dict]:
    """For each (max_batch, client counts) of `plan`: a server, then `load` at each count."""
    command = str(Path(sys.executable).with_name("caption-pipeline"))
    runs = []
    for max_batch, concurrency in plan:
        process = subprocess.Popen(
            [
                command,
                "serve",
                "--model",
                str(model_path),
                "--port",
                str(port),
                "--max-batch",
                str(max_batch),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            base = f"http://127.0.0.1:{port}"
            for _ in range(600):
                try:
                    if requests.get(f"{base}/readyz", timeout=2).status_code == 200:
                        break
                except requests.ConnectionError:
                    pass
                time.sleep(0.2)
            for clients in concurrency:
                runs.append(
                    {
                        "max_batch": max_batch,
                        **load(f"{base}/v1/caption", images, requests_count, clients),
                    }
                )
        finally:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait()
    return runs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_split_argument(parser)
    parser.add_argument("--model", type=Path, default=Path("data/06_models/export/saved_model"))
    parser.add_argument(
        "--images", type=Path, default=None, help="default: data/01_raw/shapes/SPLIT"
    )
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument(
        "--overload",
        action="store_true",
        help="throughput at capacity and the fraction shed at 64 clients",
    )
    args = parser.parse_args(argv)
    args.images = args.images or Path("data/01_raw/shapes") / selection_split(args.split, "serve")
    images = [p.read_bytes() for p in sorted(args.images.glob("*.jpg"))[:32]]
    if not images:
        sys.exit(f"no .jpg images in {args.images}")
    if args.overload:
        from caption_pipeline.params import from_conf
        from caption_pipeline.serving.server import ServeSettings

        defaults = from_conf(ServeSettings, "serve")
        report = {"machine": machine(), "max_queue": defaults.max_queue}
        plan = ((defaults.max_batch, (1, defaults.max_queue, 64)),)
    else:
        report = {"machine": machine(), "model": model_latency(args.model, images[0], args.repeats)}
        plan = ((8, (1, 8)), (1, (8,)))
    report["server"] = server_runs(args.model, images, args.requests, args.port, plan)
    report["machine"]["load_average_end"] = os.getloadavg()
    print(json.dumps(report))


if __name__ == "__main__":
    main()
