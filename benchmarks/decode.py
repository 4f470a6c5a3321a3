"""Captions/s of compiled greedy decoding and beam search, at batch 1 and batch 64.

    python benchmarks/decode.py                      # TensorFlow (XLA)
    KERAS_BACKEND=jax python benchmarks/decode.py    # JAX; TensorFlow is never imported

Two random-weight decoders fed random region features (the encoder is not timed):

* "shapes": the ModelConfig defaults, i.e. the embedded data set's model: compact encoder at
  128 px -> 8x8 = 64 regions x 128 features, vocabulary 66, embed/attention 128, LSTM 256.
* "coco": NASNetLarge features, 11x11 = 121 regions x 4032, vocabulary 10,204, dims 512.

Every caption runs the full `--max-length` steps: the output bias of <end> is set to -1e4, so
no beam ends early (a random model would end some, at random lengths; the output reports the
fraction that ended, 0). The time of a call includes moving the features in and the
captions, scores and attention maps back to numpy. Prints one JSON line: per config, method
and batch size the compile time, best and median call time, captions/s (images/s: one caption
per image, the best beam), GFLOP per caption and achieved GFLOP/s (best call), the rate of a
[4096, 4096] float32 matmul timed in the same process (`train_step.matmul_gflops`) and the
fraction of it the decoder reaches, and the batch-64 / batch-1 throughput ratio; then the
machine (CPU, cores, load average before and after, accelerator) and the versions.

The calls of a case run in `--min-repeats` rounds, each after its own matmul: on a shared
machine other jobs slow both alike, so the fraction is taken per round (its best call against
its matmul, median over rounds); the rates are the best seen.

FLOPs are counted as train_step.py counts them: the matrix products the decoder needs, a
multiply-add = 2 FLOPs, element-wise work (tanh, softmax, log-softmax, top-k, the beams'
gathers) left out. With R regions, D feature width, A attention, n LSTM units, m embedding,
V vocab, K beams (1 for greedy), T steps:

  once per image:          W_a a_i: 2RDA;  h_0, c_0 from the mean feature: 2 * 2Dn
  per step, per beam:      U_h h: 2nA;  v.tanh(.): 2RA;  z = sum alpha a: 2RD;  f_beta: 2n;
                           LSTM: 2m*4n (word) + 2D*4n (context) + 2n*4n (hidden);
                           deep output: 2nm (L_h) + 2Dm (L_z) + 2mV (L_o)
  one caption:             once per image + (1 + (T - 1) K) beam-steps

(the first step extends one caption: the K beams of an image start as copies of it). At COCO
size (R = 121, D = 4032, A = n = m = 512, V = 10,204) that is 508 MFLOP per image and 37.4 MFLOP
per beam-step, of which the context's gates (2D*4n) are 16.5 and the vocabulary (2mV) 10.4: a
beam-3 caption of 20 steps is 2.68 GFLOP, a greedy one 1.26. What a beam needs per step is the
attention, the LSTM and the output layer; the features' projection W_a a_i is not in it, as it
is computed once per image.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import ops  # noqa: E402

from caption_pipeline.model import AttentionDecoder  # noqa: E402
from caption_pipeline.model.beam_search import END_ID, Captions  # noqa: E402
from caption_pipeline.model.decoding import DecodeSettings, compile_function, search  # noqa: E402
from caption_pipeline.params import from_conf  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import matmul_gflops  # noqa: E402

CONFIGS = {
    # name: (vocab, regions, feature width, embed, attention, LSTM units)
    "shapes": (66, 64, 128, 128, 128, 256),
    "coco": (10204, 121, 4032, 512, 512, 512),
}


def random_decoder(vocab, regions, depth, embed, attention, units) -> AttentionDecoder:
    decoder = AttentionDecoder(vocab, embed, attention, units, dropout=0.0, name="decoder")
    decoder.build((None, regions, depth))
    bias = np.array(ops.convert_to_numpy(decoder.out_vocab.bias))
    bias[END_ID] = -1e4  # no caption ends: every call runs all max_length steps
    decoder.out_vocab.bias.assign(bias)
    return decoder


def decode_flops(R, D, A, n, m, V, K, T) -> tuple[float, float]:
    """FLOPs of one beam-step and of one caption (see the module docstring)."""
    per_image = 2 * R * D * A + 2 * 2 * D * n
    beam_step = (
        2 * n * A
        + 2 * R * A
        + 2 * R * D
        + 2 * n
        + 2 * m * 4 * n
        + 2 * D * 4 * n
        + 2 * n * 4 * n
        + 2 * n * m
        + 2 * D * m
        + 2 * m * V
    )
    return beam_step, per_image + (1 + (T - 1) * K) * beam_step


def time_calls(decode, features, caption_flops: float, min_seconds: float, rounds: int) -> dict:
    """Compiles, then times calls in `rounds` rounds of min_seconds / rounds or more, each
    after a matmul timed just before it (see the module docstring)."""
    start = time.perf_counter()
    captions = decode(features)  # traces and compiles
    compile_s = time.perf_counter() - start
    batch = features.shape[0]
    times, fractions, matmul_rates = [], [], []
    for _ in range(rounds):
        matmul_rates.append(matmul_gflops())
        round_times = []
        while not round_times or sum(round_times) < min_seconds / rounds:
            start = time.perf_counter()
            captions = decode(features)
            round_times.append(time.perf_counter() - start)
        times += round_times
        fractions.append(batch * caption_flops / min(round_times) / 1e9 / matmul_rates[-1])
    best = min(times)  # best of: the machine may be shared
    return {
        "compile_s": round(compile_s, 2),
        "calls": len(times),
        "best_s": round(best, 5),
        "median_s": round(float(np.median(times)), 5),
        "captions_per_s": round(batch / best, 1),
        "median_captions_per_s": round(batch / float(np.median(times)), 1),
        "gflops": round(batch * caption_flops / best / 1e9, 1),
        "matmul_gflops": round(max(matmul_rates), 1),
        "fraction_of_matmul": round(float(np.median(fractions)), 3),
        "ended_fraction": round(float(np.mean(captions.finished)), 4),
    }


def bench(name: str, methods: list[str], batches: list[int], args) -> dict:
    decoder = random_decoder(*CONFIGS[name])
    vocab, regions, depth, embed, attention, units = CONFIGS[name]
    rng = np.random.default_rng(0)
    beam_step, _ = decode_flops(regions, depth, attention, units, embed, vocab, 1, 1)
    result = {
        "vocab": decoder.vocab_size,
        "regions": regions,
        "feature_dim": depth,
        "dims": [decoder.embed_dim, decoder.attention_dim, decoder.lstm_units],
        "params": decoder.count_params(),
        "mflop_per_beam_step": round(beam_step / 1e6, 2),
    }
    for method in methods:
        settings = from_conf(
            DecodeSettings,
            "evaluate.decoding",
            method=method,
            beam_size=args.beam_size,
            jit_compile=args.jit_compile == "true",
        )

        def decode_features(inputs, settings=settings):
            return search(decoder, inputs["features"], settings, args.max_length)

        compiled = compile_function(decode_features, decoder, settings.jit_compile)

        def decode(features, compiled=compiled):
            return Captions(*(ops.convert_to_numpy(x) for x in compiled({"features": features})))

        key = "greedy" if method == "greedy" else f"beam{args.beam_size}"
        beams = 1 if method == "greedy" else args.beam_size
        _, caption_flops = decode_flops(
            regions, depth, attention, units, embed, vocab, beams, args.max_length
        )
        runs = {}
        for batch in batches:
            features = ops.convert_to_tensor(
                rng.standard_normal((batch, regions, depth)).astype("float32")
            )
            runs[batch] = time_calls(
                decode, features, caption_flops, args.min_seconds, args.min_repeats
            )
        result[key] = {
            "gflop_per_caption": round(caption_flops / 1e9, 3),
            **{f"batch{b}": r for b, r in runs.items()},
        }
        if len(batches) > 1:
            small, large = min(batches), max(batches)
            result[key][f"throughput_ratio_{large}_vs_{small}"] = round(
                runs[large]["captions_per_s"] / runs[small]["captions_per_s"], 2
            )
    return result


def machine() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "load_average": list(os.getloadavg())}
    if keras.backend.backend() == "jax":
        import jax

        info["devices"] = [d.device_kind for d in jax.devices()]
    elif keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        info["devices"] = [d.name for d in tf.config.list_logical_devices()]
    return info


def versions() -> dict:
    found = {"python": platform.python_version()}
    for package in ("keras", "tensorflow", "jax", "jaxlib", "numpy"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default="shapes,coco")
    parser.add_argument("--methods", default="greedy,beam")
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--beam-size", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=20)
    parser.add_argument("--min-seconds", type=float, default=2.0, help="timed per case")
    parser.add_argument(
        "--min-repeats", type=int, default=3, help="rounds per case, each after its own matmul"
    )
    parser.add_argument(
        "--jit-compile",
        default="true",
        choices=["true", "false"],
        help="TensorFlow backend only; JAX always compiles",
    )
    args = parser.parse_args()
    start_machine = machine()
    result = {
        "backend": keras.backend.backend(),
        "max_length": args.max_length,
        "beam_size": args.beam_size,
        "jit_compile": args.jit_compile,
    }
    batches = [int(b) for b in args.batches.split(",")]
    for name in args.configs.split(","):
        result[name] = bench(name, args.methods.split(","), batches, args)
    result["machine"] = {**start_machine, "load_average_end": list(os.getloadavg())}
    result["versions"] = versions()
    result["tensorflow_imported"] = "tensorflow" in sys.modules
    print(json.dumps(result))


if __name__ == "__main__":
    main()
