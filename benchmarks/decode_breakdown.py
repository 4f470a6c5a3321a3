"""Where the time of one beam search goes: its pieces compiled and timed one by one.

    python benchmarks/decode_breakdown.py                    # COCO size, batch 64, beam 3
    python benchmarks/decode_breakdown.py --batch 1
    KERAS_BACKEND=jax python benchmarks/decode_breakdown.py

The decoder of `decode.py`'s config (random weights, <end> suppressed) and random features.
Each piece is its own compiled function (`decoding.compile_function`: XLA under TensorFlow,
`jax.jit` under JAX) on inputs of the shapes it has inside the search, N = B*K rows, timed best
of `--repeats` calls with a [4096, 4096] matmul timed in the same process as the yardstick:

  whole search, T steps and 1 step  ->  per step inside the loop = (T-step - 1-step) / (T - 1),
                                        once per call = 1-step - per step
  once per call:  init_state (W_a a_i for attention, h_0, c_0); the copy of features and
                  projection per beam that the search made before issue 11
  per step:       attention scores (U_h h, v.tanh(.), softmax over R); context z = alpha a,
                  as the search does it (each image's features read once for its K beams) and
                  from per-beam copies; LSTM (f_beta and the three gate products); deep output
                  (L_h, L_z, L_o over V words); log-softmax over V, the masks and top-k of the
                  K*V candidates; the beams' gathers (h, c, captions, attention) and writes

Pieces run alone fuse and cache differently from the loop: they say where the time goes, not
to the millisecond. GFLOP/s counts the matrix products only, as `decode.py` does. Prints one
JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import ops  # noqa: E402

from caption_pipeline.model import beam_search as search  # noqa: E402
from caption_pipeline.model.decoding import compile_function  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import CONFIGS, decode_flops, machine, random_decoder  # noqa: E402
from train_step import matmul_gflops  # noqa: E402


def best_seconds(fn, inputs: dict, model, repeats: int) -> float:
    compiled = compile_function(fn, model)

    def call():
        return [ops.convert_to_numpy(x) for x in compiled(inputs)]

    call()  # traces and compiles
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="coco", choices=sorted(CONFIGS))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--beam-size", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    start_machine = machine()
    vocab, R, D, m, A, n = CONFIGS[args.config]
    B, K, T = args.batch, args.beam_size, args.max_length
    N = B * K
    decoder = random_decoder(*CONFIGS[args.config])
    rng = np.random.default_rng(0)

    def tensor(shape, dtype="float32"):
        return ops.convert_to_tensor(rng.standard_normal(shape).astype(dtype))

    features = tensor((B, R, D))
    state = decoder.init_state(features)
    inputs = {
        "features": features,
        "projected": state.projected,
        "h": tensor((B, K, n)),
        "c": tensor((B, K, n)),
        "z": tensor((B, K, D)),
        "alpha": ops.softmax(tensor((B, K, R)), axis=-1),
        "logits": tensor((N, vocab)),
        "words": ops.convert_to_tensor(rng.integers(4, vocab, (B, K)).astype("int32")),
        "parents": ops.convert_to_tensor(rng.integers(0, N, N).astype("int32")),
        "ids": ops.zeros((N, T), "int32"),
        "attention": ops.zeros((N, T, R)),
        "log_probs": ops.zeros((N,)),
        "finished": ops.zeros((N,), "bool"),
    }

    def attention_scores(x):
        query = decoder.attention.hidden_projection(x["h"])[:, :, None, :]
        scores = decoder.attention.score(ops.tanh(x["projected"][:, None] + query))
        return [ops.softmax(scores[..., 0], axis=-1)]

    def lstm(x):
        embedded = decoder.embedding(x["words"])
        gates = (
            decoder.word_gates(embedded)
            + decoder.context_gates(x["z"])
            + decoder.hidden_gates(x["h"])
        )
        i, f, o, g = ops.split(gates, 4, axis=-1)
        c = ops.sigmoid(f) * x["c"] + ops.sigmoid(i) * ops.tanh(g)
        return [ops.sigmoid(o) * ops.tanh(c), c, decoder.gate(x["h"])]

    def top_k(x):
        logp = x["log_probs"][:, None] + search._allowed_log_probs(x["logits"], x["finished"])
        return list(ops.top_k(ops.reshape(logp, (-1, K * vocab)), K))

    def bookkeeping(x):
        p, h, c = x["parents"], ops.reshape(x["h"], (N, n)), ops.reshape(x["c"], (N, n))
        ids, attention = search._write(
            3,
            ops.take(x["ids"], p, axis=0),
            ops.take(x["attention"], p, axis=0),
            ops.take(ops.reshape(x["words"], (N,)), p, axis=0),
            ops.reshape(x["alpha"], (N, R)),
            x["finished"],
        )
        return [ids, attention, ops.take(h, p, axis=0), ops.take(c, p, axis=0)]

    def per_beam_copies(x):
        return [ops.repeat(x["features"], K, axis=0), ops.repeat(x["projected"], K, axis=0)]

    def copied_context(x):  # the einsum of the search before issue 11, on per-beam copies
        alpha = ops.reshape(x["alpha"], (N, R))
        return [ops.einsum("br,brd->bd", alpha, x["copies"])]

    pieces = {  # name: (function, matrix-product FLOPs per call, per step?)
        "init_state": (
            lambda x: list(decoder.init_state(x["features"])[1:]),
            B * (2 * R * D * A + 2 * 2 * D * n),
            False,
        ),
        "per_beam_copies_before": (per_beam_copies, 0, False),
        "attention_scores": (attention_scores, N * (2 * n * A + 2 * R * A), True),
        "context": (lambda x: [ops.matmul(x["alpha"], x["features"])], N * 2 * R * D, True),
        "context_from_copies_before": (copied_context, N * 2 * R * D, True),
        "lstm": (lstm, N * (2 * n + 2 * m * 4 * n + 2 * D * 4 * n + 2 * n * 4 * n), True),
        "deep_output": (
            lambda x: [decoder._output(decoder.embedding(x["words"]), x["h"], x["z"], False)],
            N * (2 * n * m + 2 * D * m + 2 * m * vocab),
            True,
        ),
        "log_softmax_top_k": (top_k, 0, True),
        "beam_gathers_writes": (bookkeeping, 0, True),
    }
    yardstick = matmul_gflops()
    result = {
        "backend": keras.backend.backend(),
        "config": args.config,
        "batch": B,
        "beam_size": K,
        "max_length": T,
        "matmul_gflops": round(yardstick, 1),
    }

    def whole(steps):
        return best_seconds(
            lambda x: search.beam_search(decoder, x["features"], K, steps),
            {"features": features},
            decoder,
            max(3, args.repeats // 3),
        )

    full, one = whole(T), whole(1)
    step_in_loop = (full - one) / (T - 1)
    beam_step, caption = decode_flops(R, D, A, n, m, vocab, K, T)
    result["search_s"] = round(full, 4)
    result["search_fraction_of_matmul"] = round(B * caption / full / 1e9 / yardstick, 3)
    result["step_in_loop_ms"] = round(step_in_loop * 1e3, 2)
    result["once_per_call_ms"] = round((one - step_in_loop) * 1e3, 2)
    result["step_in_loop_fraction_of_matmul"] = round(
        N * beam_step / step_in_loop / 1e9 / yardstick, 3
    )
    inputs["copies"] = ops.repeat(features, K, axis=0)
    timed, sum_of_step_pieces = {}, 0.0
    for name, (fn, flops, per_step) in pieces.items():
        seconds = best_seconds(fn, inputs, decoder, args.repeats)
        timed[name] = {"ms": round(seconds * 1e3, 2)}
        if flops:
            timed[name]["fraction_of_matmul"] = round(flops / seconds / 1e9 / yardstick, 3)
        if per_step and not name.endswith("_before"):
            sum_of_step_pieces += seconds
    result["pieces"] = timed
    result["step_pieces_sum_ms"] = round(sum_of_step_pieces * 1e3, 2)
    result["matmul_gflops_end"] = round(matmul_gflops(), 1)
    result["machine"] = {**start_machine, "load_average_end": list(os.getloadavg())}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
