"""The evaluation protocol: choices are made on val, the test split is only reported.

A sweep or benchmark that scores the test split to pick a setting turns test into a second
validation set; these tests fail when a script in benchmarks/ reads the test split, and when
the evaluate pipeline decodes test in more than one node.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from caption_pipeline.pipelines.evaluate import create_pipeline

ROOT = Path(__file__).resolve().parents[1]
# "test" as a split name, or a COCO-style per-split file of the test split
TEST_SPLIT = re.compile(r"^test$|(instances|captions)_test(2017)?\.json|/test/?$")


def split_test_strings(path: Path) -> list[str]:
    """String constants of `path` that name the test split (docstrings included)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    return [
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and TEST_SPLIT.search(node.value)
    ]


def test_no_benchmark_or_sweep_reads_the_test_split():
    scripts = sorted((ROOT / "benchmarks").glob("*.py"))
    assert any(p.name == "encoder_pretraining_sweep.py" for p in scripts)
    found = {p.name: split_test_strings(p) for p in scripts}
    assert not {name: hits for name, hits in found.items() if hits}


def test_the_checker_finds_a_test_split_selection(tmp_path):
    script = tmp_path / "sweep.py"
    script.write_text(
        'scores = score_splits({"test": results}, table, scorer)\n'
        'objects = load("annotations/instances_test.json")\n'
    )
    assert sorted(split_test_strings(script)) == ["annotations/instances_test.json", "test"]


def test_training_code_never_reads_the_test_split():
    """Training and its phases (cross-entropy, SCST) choose epochs on val only."""
    for name in ("training.py", "scst.py", "encoder_pretraining.py"):
        assert not split_test_strings(ROOT / "src" / "caption_pipeline" / name), name
    for path in (ROOT / "src/caption_pipeline/pipelines/train").glob("*.py"):
        assert not split_test_strings(path), path.name


def test_evaluate_decodes_the_test_split_in_one_node_only():
    pipeline = create_pipeline()
    decoding = [node for node in pipeline.nodes if "caption_results_test" in node.outputs]
    assert len(decoding) == 1
    # ... and nothing downstream of the scores feeds back into a choice of the model
    assert not any(o.startswith("captioner") for node in pipeline.nodes for o in node.outputs)
