"""benchmarks/reader_throughput.py runs at tiny scale and prints its one JSON line."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "reader_throughput.py"


def test_reader_benchmark_prints_every_variant_and_the_gpu_need(monkeypatch, capsys, tmp_path):
    spec = importlib.util.spec_from_file_location("reader_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # in this process: no second TensorFlow import
    monkeypatch.setattr(
        sys,
        "argv",
        [
            str(SCRIPT),
            "--images",
            "12",
            "--shards",
            "2",
            "--batch",
            "4",
            "--batches",
            "2",
            "--shuffle-buffer",
            "8",
            "--matmul-size",
            "128",
            "--tmpdir",
            str(tmp_path),
        ],
    )
    module.main()
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    assert record["shards"]["images"] == 12 and record["shards"]["shards"] == 2
    assert record["shards"]["feature_bytes_per_image"] == 121 * 4032 * 2
    assert set(record["variants"]) == set(module.VARIANTS)
    for name, result in record["variants"].items():
        assert result["images_per_s"] > 0 and result["feature_mb_per_s"] > 0, name
        assert {"captions_per_s", "cpu_ms_per_image", "load_average_1m"} <= set(result), name
    assert record["variants"]["raw"]["images"] == 12
    need = record["gpu_need"]
    assert need["needed_images_per_s_for_972_captions_s"] == 194.4
    assert need["needed_mb_s_for_972_captions_s"] == 189.7
    assert need["default_bounds_epoch"] in ("reader", "gpu_step")
    assert record["matmul_gflops_at_start"] > 0 and len(record["load_average_at_end"]) == 3
    assert not list(tmp_path.iterdir())  # the shards are removed
