"""benchmarks/fine_tune_step.py runs at tiny scale (compact encoder, 32 px, conf/coco's phase)
and prints its one JSON line; its memory fit gives each machine's largest batch."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "fine_tune_step.py"


@pytest.fixture(scope="module")
def module():
    spec = importlib.util.spec_from_file_location("fine_tune_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fine_tune_benchmark_measures_a_batch_in_a_subprocess(module, monkeypatch, capsys):
    # --max-step-s 0: the sweep stops after its first size (one subprocess, to stay quick)
    monkeypatch.setattr(
        sys,
        "argv",
        [
            str(SCRIPT),
            "--encoder",
            "compact",
            "--image-size",
            "32",
            "--vocab",
            "40",
            "--batches",
            "2,4",
            "--warmup",
            "0",
            "--repeats",
            "1",
            "--matmul-size",
            "128",
            "--jit-compile",
            "false",
            "--max-step-s",
            "0",
        ],
    )
    module.main()
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    assert [r["batch"] for r in record["runs"]] == [2] and "--max-step-s" in record["stopped"]
    run = record["runs"][0]
    # the fine-tuning phase's model: encoder trained at a tenth of the decoder's rate
    # (conf/coco: 1e-5 / 1e-4), BatchNorm frozen, 5 captions of 22 ids per image
    assert run["optimizer"] == "TwoRateAdam" and run["encoder_lr_ratio"] == 0.1
    assert run["batchnorm"] == "frozen" and run["scaled_variables"] > 0
    assert run["captions"] == 10 and run["steps"] == 21 and run["precision"] == "float32"
    assert run["encoder_trainable_params"] > 0 and run["step_s"] > 0
    assert run["gflop_per_image"] > 0 and run["fraction_of_matmul"] > 0
    assert run["peak_rss_mib"] >= run["built_rss_mib"] > 0
    assert record["memory"] is None  # one size: no line
    assert record["machine"]["cores"] >= 1 and len(record["load_average_at_end"]) == 3


def test_memory_fit_gives_the_slope_and_each_machines_batch(module):
    runs = [
        {"batch": b, "peak_rss_mib": 4000 + 750 * b, "trainable_params": 2**30 // 16}
        for b in (1, 4, 8)
    ]
    fit = module.memory_fit(runs, "h200=140,small=2")
    assert fit["mib_per_image"] == 750 and fit["intercept_mib"] == 4000
    # GPU: memory less 4 x params x 4 bytes (1 GiB here), over the slope
    assert fit["estimated_max_batch"]["h200"] == {
        "memory_gib": 140.0,
        "fixed_gib": 1.0,
        "max_batch": int(139 * 1024 // 750),
    }
    assert fit["estimated_max_batch"]["small"]["max_batch"] == 1
