"""Captions/s and GFLOP/s of one training step (forward + backward + Adam), synthetic inputs.

    python benchmarks/train_step.py                      # TensorFlow (default backend)
    KERAS_BACKEND=jax python benchmarks/train_step.py    # imports no TensorFlow

Options: --configs shapes,coco  --batch 64  --repeats 5  --jit-compile best|true|false|auto
         --precision float32,mixed_bfloat16 (Keras dtype policies, each measured in this process)

Three configs: "shapes" (the embedded default: compact CNN trained end to end on 128 px
images), "coco" (precomputed NASNetLarge features, 121 x 4032, vocab 10,204, dims 512) and
"coco_projected" (the same features projected to 121 x 512, model.feature_projection). Prints
one JSON line with, per config, captions/s and achieved GFLOP/s (best step), the rate of a
[4096, 4096] float32 matmul timed in the same process, and the fraction of it the step reaches
(each step paired with a matmul timed just before it: the machine may be shared).

FLOPs are counted analytically, as the matrix products the model needs (a multiply-add = 2
FLOPs; element-wise ops, softmax and the optimizer update are left out). Per caption, with
R regions, D feature width, A attention, n LSTM units, m embedding, V vocab, T steps:

  forward, once per image:  W_a a_i: 2RDA;  h_0, c_0 from the mean feature: 2 * 2Dn
  forward, per step:        U_h h: 2nA;  v.tanh(.): 2RA;  z = sum alpha a: 2RD;  f_beta: 2n;
                            LSTM: 2m*4n (word) + 2D*4n (context) + 2n*4n (hidden);
                            deep output: 2nm (L_h) + 2Dm (L_z) + 2mV (L_o)
  backward: every product x.W costs twice its forward FLOPs (dx and dW), except where x is
  data that needs no gradient, which costs once (dW only): with precomputed features (coco),
  W_a a_i and the init MLPs on the features, and z = sum alpha a (only d alpha).
  Compact encoder (shapes config, trained end to end): each conv is 2 H W k^2 Cin Cout
  forward, twice that backward, once for the first conv (its input is the image); a separable
  conv (NASNet, fine_tune_step.py) is its depthwise 2 H W k^2 Cin and pointwise 2 H W Cin Cout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import layers, ops  # noqa: E402

from caption_pipeline.model import Captioner, ModelConfig  # noqa: E402
from caption_pipeline.params import from_conf  # noqa: E402

# XLA for TensorFlow, by config, as measured on the 2-core CPU: it speeds up the COCO decoder
# (34 vs 27 captions/s) but slows the compact CNN's convolutions (37 vs 62). (Keras's "auto"
# turns XLA off for TensorFlow on CPU-only machines; JAX always compiles.)
TF_XLA = {"shapes": False, "coco": True, "coco_projected": True}
CONFIGS = {
    # name: (ModelConfig kwargs, steps T, input)
    # (the compact CNN trained end to end, pooled last, as measured in docs/benchmarks.md)
    "shapes": (
        dict(
            vocab_size=80,
            encoder="compact",
            image_size=128,
            encoder_trainable=None,
            compact_pool_last=True,
            attention_dim=128,
        ),
        16,
        "image",
    ),
    "coco": (
        dict(
            vocab_size=10204,
            encoder="nasnet_large",
            image_size=331,
            embed_dim=512,
            attention_dim=512,
            lstm_units=512,
        ),
        24,
        "features",
    ),
    # The same, on features projected to 512 per region (model.feature_projection).
    "coco_projected": (
        dict(
            vocab_size=10204,
            encoder="nasnet_large",
            image_size=331,
            embed_dim=512,
            attention_dim=512,
            lstm_units=512,
            feature_projection=512,
        ),
        24,
        "features",
    ),
}
# Precomputed features [R, D]: training builds the decoder alone (`Captioner(feature_shape=)`),
# as the train pipeline does; NASNetLarge at 331 px gives 11 x 11 regions of 4032.
FEATURE_SHAPES = {"coco": (121, 4032), "coco_projected": (121, 512)}


def decoder_flops(R, D, A, n, m, V, T, features_need_grad: bool) -> float:
    """Training FLOPs of the decoder per caption (see the module docstring)."""
    on_features = 3 if features_need_grad else 2  # forward + dW (+ dx)
    per_image = (2 * R * D * A + 2 * 2 * D * n) * on_features
    per_step = (
        2 * n * A
        + 2 * R * A
        + 2 * n
        + 2 * m * 4 * n
        + 2 * D * 4 * n
        + 2 * n * 4 * n
        + 2 * n * m
        + 2 * D * m
        + 2 * m * V
    ) * 3 + 2 * R * D * on_features
    return per_image + T * per_step


CONVOLUTIONS = (layers.Conv2D, layers.SeparableConv2D, layers.DepthwiseConv2D)


def encoder_flops(encoder: keras.Model) -> float:
    """Training FLOPs of the encoder's convolutions per image (0 if it is frozen): Conv2D, and
    (NASNet) the depthwise and pointwise products of SeparableConv2D and DepthwiseConv2D, each
    at its output's resolution."""
    total = 0.0
    convs = [layer for layer in _walk(encoder) if isinstance(layer, CONVOLUTIONS)]
    for index, conv in enumerate(convs):
        _, height, width, _ = conv.output.shape
        if isinstance(conv, layers.Conv2D):
            k_h, k_w, c_in, c_out = conv.kernel.shape
            macs = k_h * k_w * c_in * c_out
        else:  # depthwise [k_h, k_w, c_in, multiplier]; pointwise [1, 1, c_in * mult, c_out]
            depthwise = conv.depthwise_kernel if hasattr(conv, "depthwise_kernel") else conv.kernel
            k_h, k_w, c_in, multiplier = depthwise.shape
            macs = k_h * k_w * c_in * multiplier
            if isinstance(conv, layers.SeparableConv2D):
                macs += conv.pointwise_kernel.shape[2] * conv.pointwise_kernel.shape[3]
        total += 2 * height * width * macs * (2 if index == 0 else 3)
    return total


def _walk(model):
    for layer in model.layers:
        yield from _walk(layer) if isinstance(layer, keras.Model) else (layer,)


def matmul_gflops(size: int = 4096, repeats: int = 2) -> float:
    """Best rate of a float32 [size, size] x [size, size] product, in GFLOP/s."""
    a = ops.convert_to_tensor(np.random.default_rng(0).standard_normal((size, size)), "float32")
    ops.convert_to_numpy(ops.matmul(a, a)[0, 0])  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        ops.convert_to_numpy(ops.matmul(a, a)[0, 0])
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def synthetic_batch(model: Captioner, batch: int, steps: int, source: str, seed: int = 0):
    rng = np.random.default_rng(seed)
    c = model.config
    if source == "image":
        x = {"image": rng.uniform(0, 255, (batch, c.image_size, c.image_size, 3)).astype("float32")}
    else:  # precomputed features, stored as float16 by the features pipeline
        x = {
            "features": rng.standard_normal((batch, model.regions, model.feature_dim)).astype(
                "float16"
            )
        }
    captions = rng.integers(4, c.vocab_size, (batch, steps + 1)).astype("int32")
    captions[:, 0] = 1  # <start>
    captions[:, -1] = 2  # <end>; no padding: every step counts
    return x, captions


def bench(name: str, batch: int, repeats: int, jit_compile, precision: str = "float32") -> dict:
    """Times `repeats` training steps, each paired with a matmul timed just before it.

    On a shared machine other jobs slow both alike, so the fraction of the matmul's rate is
    taken per pair (median over pairs); the rates are the best seen.
    """
    kwargs, steps, source = CONFIGS[name]
    keras.mixed_precision.set_global_policy(precision)
    model = Captioner(
        from_conf(ModelConfig, "model", **kwargs), feature_shape=FEATURE_SHAPES.get(name)
    )
    # Under mixed_float16, compile wraps Adam in a LossScaleOptimizer, as training does.
    model.compile(optimizer=keras.optimizers.Adam(1e-4), jit_compile=jit_compile)
    x, y = synthetic_batch(model, batch, steps, source)
    start = time.perf_counter()
    model.train_on_batch(x, y)  # traces and compiles
    compile_s = time.perf_counter() - start
    model.train_on_batch(x, y)
    c = model.config
    end_to_end = source == "image" and c.trains_encoder
    flops = batch * decoder_flops(
        model.regions,
        model.feature_dim,
        c.attention_dim,
        c.lstm_units,
        c.embed_dim,
        c.vocab_size,
        steps,
        end_to_end,
    )
    if end_to_end:
        flops += batch * encoder_flops(model.encoder)
    step_times, matmul_rates = [], []
    for _ in range(repeats):
        matmul_rates.append(matmul_gflops())
        start = time.perf_counter()
        model.train_on_batch(x, y)  # returns the loss as a Python float: synchronised
        step_times.append(time.perf_counter() - start)
    fractions = [flops / t / 1e9 / rate for t, rate in zip(step_times, matmul_rates, strict=False)]
    best = min(step_times)
    return {
        "precision": precision,
        "batch": batch,
        "steps": steps,
        "input": source,
        "regions": model.regions,
        "feature_dim": model.feature_dim,
        "vocab": c.vocab_size,
        "dims": [c.embed_dim, c.attention_dim, c.lstm_units],
        "params": model.count_params(),
        "compile_s": round(compile_s, 1),
        "step_s": round(best, 4),
        "median_step_s": round(float(np.median(step_times)), 4),
        "captions_per_s": round(batch / best, 1),
        "gflop_per_caption": round(flops / batch / 1e9, 3),
        "gflops": round(flops / best / 1e9, 1),
        "matmul_gflops": round(max(matmul_rates), 1),
        "fraction_of_matmul": round(float(np.median(fractions)), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default="shapes,coco")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--jit-compile",
        default="best",
        choices=["best", "true", "false", "auto"],
        help="best: TF_XLA's choice under TensorFlow, compiled under JAX",
    )
    parser.add_argument(
        "--precision",
        default="float32",
        help="comma-separated: float32, mixed_bfloat16, mixed_float16",
    )
    args = parser.parse_args()
    result = {"backend": keras.backend.backend()}
    for name in args.configs.split(","):
        jit = {"auto": "auto", "true": True, "false": False}.get(args.jit_compile)
        if jit is None:  # best
            jit = TF_XLA[name] if keras.backend.backend() == "tensorflow" else True
        precisions = args.precision.split(",")
        runs = {
            p: {"jit_compile": jit, **bench(name, args.batch, args.repeats, jit, p)}
            for p in precisions
        }
        # One precision: the config's result as before; several: one result per precision.
        result[name] = runs[precisions[0]] if len(precisions) == 1 else runs
    result["tensorflow_imported"] = "tensorflow" in sys.modules
    print(json.dumps(result))


if __name__ == "__main__":
    main()
