"""GPU set-up: the precision `train.precision: auto` picks per device, the device log line
README tells users to look for, and the `gpu` / `jax-gpu` extras that `make run EXTRAS=`
installs."""

from __future__ import annotations

import logging
import re
import subprocess
import tomllib
from pathlib import Path

import keras
import numpy as np
import pytest

from caption_pipeline.errors import DataError
from caption_pipeline.model import Captioner, ModelConfig
from caption_pipeline.params import from_conf
from caption_pipeline.training.cross_entropy import (
    TrainConfig,
    run_fingerprint,
    with_device_defaults,
)
from caption_pipeline.training.devices import (
    Device,
    _capability,
    cpu_matrix_features,
    log_devices,
    resolve_precision,
    training_devices,
)

ROOT = Path(__file__).resolve().parents[1]
CPU = Device("cpu", "/physical_device:CPU:0")
H200 = Device("gpu", "/physical_device:GPU:0", "NVIDIA H200", (9, 0))
A100 = Device("gpu", "/physical_device:GPU:1", "NVIDIA A100-SXM4-80GB", (8, 0))
V100 = Device("gpu", "/physical_device:GPU:0", "Tesla V100-SXM2-16GB", (7, 0))


@pytest.mark.parametrize(
    "devices, expected",
    [
        ([CPU], "float32"),
        ([H200], "mixed_bfloat16"),
        ([H200, A100], "mixed_bfloat16"),
        ([V100], "float32"),  # float16 only: loss scaling, which breaks step counting on resume
        ([H200, V100], "float32"),  # one policy for all replicas: the weakest decides
        ([Device("gpu", "gpu:0")], "float32"),  # capability unknown: no guess
    ],
)
def test_auto_precision_per_device(devices, expected):
    assert resolve_precision("auto", devices) == expected


@pytest.mark.parametrize("explicit", ["float32", "mixed_float16", "mixed_bfloat16"])
def test_an_explicit_precision_is_used_as_given(explicit):
    assert resolve_precision(explicit, [H200]) == explicit
    assert resolve_precision(explicit, [CPU]) == explicit


def test_compute_capability_from_either_backend():
    assert _capability((8, 6)) == (8, 6)  # TensorFlow's get_device_details
    assert _capability("9.0") == (9, 0)  # JAX's Device.compute_capability
    assert _capability(None) is None


def test_an_unknown_precision_names_the_parameter():
    with pytest.raises(DataError, match=r"train\.precision.*'fp16'"):
        from_conf(TrainConfig, "train", precision="fp16")


def test_this_machine_trains_in_float32_and_says_so(caplog):
    assert [d.platform for d in training_devices()] == ["cpu"]
    with caplog.at_level(logging.INFO, logger="caption_pipeline.training.devices"):
        config = with_device_defaults(from_conf(TrainConfig, "train", precision="auto"))
    assert config.precision == "float32"
    assert "Training on CPU, Keras backend tensorflow" in caplog.text
    assert "precision float32 (train.precision: auto)" in caplog.text


def test_the_cpu_line_names_the_processor_and_its_matrix_units(tmp_path):
    """Issue 27: the device line says whether the CPU has AMX, AVX-512 BF16 or VNNI units."""
    xeon, epyc, none = tmp_path / "xeon", tmp_path / "epyc", tmp_path / "none"
    core = "processor\t: {n}\nmodel name\t: {model}\nflags\t\t: {flags}\n"
    xeon.write_text(
        "\n".join(
            core.format(
                n=n,
                model="Intel(R) Xeon(R) Processor",
                flags="fpu avx512f amx_bf16 amx_tile amx_int8 avx512_bf16 avx512_vnni avx_vnni",
            )
            for n in range(2)
        )
    )
    epyc.write_text(core.format(n=0, model="AMD EPYC", flags="fpu avx2 avx512_bf16 avx_vnni"))
    none.write_text(core.format(n=0, model="Intel(R) Core(TM) i7", flags="fpu sse2 avx2"))
    assert cpu_matrix_features(xeon) == (
        "Intel(R) Xeon(R) Processor",
        ("amx_tile", "amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni", "avx_vnni"),
    )
    assert cpu_matrix_features(epyc) == ("AMD EPYC", ("avx512_bf16", "avx_vnni"))
    assert cpu_matrix_features(none) == ("Intel(R) Core(TM) i7", ())
    assert cpu_matrix_features(tmp_path / "missing") == ("", ())
    model, features = cpu_matrix_features()
    (cpu,) = training_devices()
    assert cpu.platform == "cpu" and model in cpu.kind
    assert cpu.kind.endswith(" ".join(features) or "no matrix features")


def test_auto_resumes_checkpoints_of_an_explicit_float32_run():
    """The fingerprint is of the resolved policy: on a CPU, runs checkpointed before `auto`
    became the default (precision float32) are resumed, not restarted."""
    model = from_conf(ModelConfig, "model", vocab_size=20)
    auto = with_device_defaults(from_conf(TrainConfig, "train", precision="auto"))
    assert run_fingerprint(model, auto, {}) == run_fingerprint(
        model, from_conf(TrainConfig, "train", precision="float32"), {}
    )


def test_the_default_configuration_asks_for_auto():
    assert from_conf(TrainConfig, "train").precision == "auto"
    text = (ROOT / "conf/base/parameters_train.yml").read_text()
    assert re.search(r"^  precision: auto\b", text, re.M)


def test_readme_shows_the_line_a_gpu_run_logs(caplog):
    with caplog.at_level(logging.INFO, logger="caption_pipeline.training.devices"):
        log_devices([H200], resolve_precision("auto", [H200]), "auto", "auto")
    line = caplog.records[-1].getMessage()
    assert line.startswith("Training on GPU, Keras backend ")
    assert line in (ROOT / "README.md").read_text()


def test_a_step_in_mixed_bfloat16_trains_with_float32_weights():
    """The policy `auto` picks on recent GPUs runs the real model (here on the CPU): bfloat16
    compute, float32 variables, a finite loss that falls, and no loss-scale wrapper (so the
    optimizer's iterations count every step)."""
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        keras.utils.set_random_seed(0)
        model = Captioner(
            from_conf(
                ModelConfig,
                "model",
                vocab_size=12,
                compact_filters=(8, 8, 8, 8),
                image_size=32,
                embed_dim=16,
                attention_dim=8,
                lstm_units=16,
            )
        )
        model.compile(optimizer=keras.optimizers.Adam(1e-2))
        rng = np.random.default_rng(0)
        x = {"image": rng.uniform(0, 255, (4, 32, 32, 3)).astype("float32")}
        y = np.concatenate(
            [np.ones((4, 1)), rng.integers(3, 12, (4, 6)), 2 * np.ones((4, 1))], axis=1
        ).astype("int32")
        losses = [model.train_on_batch(x, y) for _ in range(8)]
        assert model.compute_dtype == "bfloat16"
        assert {v.dtype for v in model.trainable_variables} == {"float32"}
        assert not isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        assert int(model.optimizer.iterations) == 8
        assert np.isfinite(losses).all() and losses[-1] < losses[0]
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_gpu_extras_pin_the_project_versions():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    tensorflow = next(d for d in project["dependencies"] if d.startswith("tensorflow"))
    extras = project["optional-dependencies"]
    # nvidia-ml-py: MLflow's system metrics of the GPU.
    assert extras["gpu"] == [
        tensorflow.replace("tensorflow", "tensorflow[and-cuda]", 1),
        "nvidia-ml-py>=12",
    ]
    jax_cpu = next(d for d in extras["test"] if d.startswith("jax[cpu]"))
    assert extras["jax-gpu"] == [jax_cpu.replace("jax[cpu]", "jax[cuda12]", 1), "nvidia-ml-py>=12"]


@pytest.mark.parametrize(
    "target, extras, install",
    [
        ("run", "gpu", '-e ".[gpu]"'),
        ("run", "jax-gpu", '-e ".[jax-gpu]"'),
        ("test", "gpu", '-e ".[test,gpu]"'),
        ("run", "", '-e "."'),
    ],
)
def test_make_installs_the_extras_asked_for(tmp_path, target, extras, install):
    """`make -n` prints the commands a fresh clone's `make run EXTRAS=...` would run."""
    plan = subprocess.run(
        ["make", "-n", "-C", str(ROOT), target, f"EXTRAS={extras}", f"VENV={tmp_path}/venv"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert f"{tmp_path}/venv/bin/python -m pip install -q {install}" in plan
