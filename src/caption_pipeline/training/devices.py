"""The accelerators a run finds, and the numeric precision `train.precision: auto` picks for them.

`train.precision: auto` resolves, before anything is built or fingerprinted, to:

- `mixed_bfloat16` when every device is a GPU of compute capability 8.0 or newer (Ampere,
  Hopper, Blackwell): their tensor cores run bfloat16 products at 2x the TF32 rate and more,
  and bfloat16 has float32's exponent range, so Keras needs no loss scaling. That matters for
  exact resume: under `mixed_float16` Keras wraps the optimizer in a `LossScaleOptimizer`,
  whose `iterations` does not advance on the overflow steps it skips, and training counts the
  batches done with `iterations` (see the trustworthy-state issue);
- `float32` everywhere else: on a CPU (on a 2-core AMD EPYC with AVX-512 BF16, bfloat16 was
  0.91x to 1.25x of float32: no consistent gain; benchmarks/train_step.py --precision,
  docs/benchmarks.md), and on older GPUs, whose only fast half type is float16, which needs
  that loss scaling.

An explicit `float32`, `mixed_float16` or `mixed_bfloat16` is used as given.

On a CPU the device line names the processor and its matrix features (`cpu_matrix_features`):
AMX tiles (Intel Sapphire Rapids and newer: bfloat16 and int8 matrix units), AVX-512 BF16 and
VNNI (dot-product instructions). The float32 rule above was measured on AVX-512 BF16 without
AMX; with AMX, oneDNN's bfloat16 matmul measured 3.6x its float32 on a 2-core Xeon (issue
27), which no machine here has had to measure the train step on: the line says which case a
run is in.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import keras

logger = logging.getLogger(__name__)

PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
AUTO = "auto"
BFLOAT16_COMPUTE_CAPABILITY = (8, 0)  # NVIDIA Ampere: first tensor cores with bfloat16
# /proc/cpuinfo flags of the units that run low-precision matrix products, fastest first.
MATRIX_FLAGS = ("amx_tile", "amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni", "avx_vnni")
CPUINFO = Path("/proc/cpuinfo")


@dataclass(frozen=True)
class Device:
    """One device a backend can run on. `compute_capability`: (major, minor) of an NVIDIA GPU,
    None otherwise."""

    platform: str  # "cpu" | "gpu" | "tpu"
    name: str  # "/physical_device:GPU:0", "cuda:0", ...
    kind: str = ""  # "NVIDIA H200", "" when the backend does not say
    compute_capability: tuple[int, int] | None = None

    def describe(self) -> str:
        details = [d for d in (self.kind, self._capability()) if d]
        return f"{self.name} ({', '.join(details)})" if details else self.name

    def _capability(self) -> str:
        if self.compute_capability is None:
            return ""
        return "compute capability {}.{}".format(*self.compute_capability)


def resolve_precision(requested: str, devices: list[Device]) -> str:
    """The Keras dtype policy to train with: `requested`, or for "auto" the one the module
    docstring gives for `devices` (those the run trains on)."""
    if requested != AUTO:
        return requested
    gpus = [d for d in devices if d.platform == "gpu"]
    if (
        gpus
        and len(gpus) == len(devices)
        and all(
            d.compute_capability is not None and d.compute_capability >= BFLOAT16_COMPUTE_CAPABILITY
            for d in gpus
        )
    ):
        return "mixed_bfloat16"
    return "float32"


def _capability(value) -> tuple[int, int] | None:
    """(major, minor) from TensorFlow's tuple or JAX's "9.0" string."""
    if value is None:
        return None
    if isinstance(value, str):
        major, _, minor = value.partition(".")
        return int(major), int(minor or 0)
    return int(value[0]), int(value[1])


def cpu_matrix_features(cpuinfo: Path = CPUINFO) -> tuple[str, tuple[str, ...]]:
    """The processor's model name and which `MATRIX_FLAGS` it has, from Linux's cpuinfo of its
    first core ("", () where there is none: another OS, a container hiding it)."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return "", ()
    fields: dict[str, str] = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = set(fields.get("flags", "").split())
    return fields.get("model name", ""), tuple(f for f in MATRIX_FLAGS if f in flags)


def _cpu(name: str) -> Device:
    """A CPU device, its kind the processor and its matrix features."""
    model, features = cpu_matrix_features()
    kind = ", ".join(filter(None, [model, " ".join(features) or "no matrix features"]))
    return Device("cpu", name, kind)


def _tensorflow_devices() -> list[Device]:
    import tensorflow as tf

    gpus = []
    for gpu in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(gpu)
        gpus.append(
            Device(
                "gpu",
                gpu.name,
                details.get("device_name", ""),
                _capability(details.get("compute_capability")),
            )
        )
    return gpus or [_cpu(cpu.name) for cpu in tf.config.list_physical_devices("CPU")]


def _jax_devices() -> list[Device]:
    import jax

    return [
        _cpu(str(d))
        if d.platform == "cpu"
        else Device(
            d.platform,
            str(d),
            getattr(d, "device_kind", ""),
            _capability(getattr(d, "compute_capability", None)),
        )
        for d in jax.devices()
    ]


def training_devices() -> list[Device]:
    """The devices the Keras backend trains on: the GPUs if it sees any, else the CPU."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        return _tensorflow_devices()
    if backend == "jax":
        return _jax_devices()
    return [_cpu(backend)]


def log_devices(devices: list[Device], precision: str, requested: str, jit_compile) -> None:
    """One line that says where training runs: the check README's "Train on a GPU" names."""
    where = "GPU" if any(d.platform == "gpu" for d in devices) else "CPU"
    how = f"{precision} (train.precision: auto)" if requested == AUTO else precision
    logger.info(
        "Training on %s, Keras backend %s: %s; precision %s; jit_compile %s",
        where,
        keras.backend.backend(),
        "; ".join(d.describe() for d in devices),
        how,
        jit_compile,
    )
