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
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import keras

logger = logging.getLogger(__name__)

PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
AUTO = "auto"
BFLOAT16_COMPUTE_CAPABILITY = (8, 0)  # NVIDIA Ampere: first tensor cores with bfloat16


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
    return gpus or [Device("cpu", cpu.name) for cpu in tf.config.list_physical_devices("CPU")]


def _jax_devices() -> list[Device]:
    import jax

    return [
        Device(
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
    return [Device("cpu", backend)]


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
