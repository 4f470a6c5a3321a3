"""The evaluation protocol: choices are made on val, the test split is only reported.

A sweep or benchmark that scores the test split to pick a setting turns test into a second
validation set. Two guards, each shown to catch a planted leak:

* at run time, every script in benchmarks/ that reads or generates a split of a data set takes
  it through `caption_pipeline.evaluation.protocol.selection_split` (`--split`, default val):
  each is called here with `--split test` and must refuse it, and a split name computed at run
  time is refused by the same function;
* statically, no benchmark, sweep or training module names the test split, nor anything derived
  from it: the `caption_results_test` dataset, or the test-only sections of metrics.json
  (`headline`, `human`, `test_vs_human_refs`, `attention_localization`).

And the evaluate pipeline decodes test in one node only.
"""

from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path

import pytest

from caption_pipeline.errors import DataError
from caption_pipeline.evaluation.protocol import SELECTION_SPLITS, selection_split
from caption_pipeline.pipelines.evaluate import create_pipeline

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
# "test" as a split name, a COCO-style per-split file or folder of the test split, or a name
# derived from it (caption_results_test, test_vs_human_refs, captions_test2017.json)
TEST_SPLIT = re.compile(
    r"^test(2014|2017)?$|(instances|captions)_test(2014|2017)?\.json|/test(2014|2017)?/?$"
    r"|^[a-z0-9_]*_test(2014|2017)?$|^test_vs_"
)
# metrics.json's sections that are of the test split only (evaluation.py)
TEST_ONLY_SECTIONS = {"headline", "human", "test_vs_human_refs", "attention_localization"}

# The scripts that read or generate a split of a data set: each takes `--split` through the
# guard. The others measure speed or memory on data they make themselves, choose nothing, and
# name no split; a new script must be added to one of the two lists.
SPLIT_READERS = {
    "encoder_pretraining_sweep.py": ["--out", "{tmp}"],
    "scst_sweep.py": ["--model", "{tmp}/m.keras", "--out", "{tmp}"],
    "train_sweep.py": ["--out", "{tmp}"],
    "encoder_choice.py": [],
    "serve.py": [],
    "caption_batch.py": ["--project", "{tmp}"],
}
COST_ONLY = {
    "cider_reward.py",
    "coco_rehearsal.py",
    "data_benchmarks.py",
    "decode.py",
    "decode_breakdown.py",
    "fine_tune_step.py",
    "reader_throughput.py",
    "train_step.py",
}


def split_test_strings(path: Path) -> list[str]:
    """String constants of `path` that name the test split or a figure derived from it
    (docstrings included)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    return [
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and (TEST_SPLIT.search(node.value) or node.value in TEST_ONLY_SECTIONS)
    ]


def load_script(path: Path):
    spec = importlib.util.spec_from_file_location(f"benchmark_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def refusal(path: Path, split: str, tmp_path: Path, capsys) -> str:
    """What `path`'s entry point says to `--split SPLIT`: it must exit 2 before any work."""
    args = [a.format(tmp=tmp_path) for a in SPLIT_READERS.get(path.name, [])]
    with pytest.raises(SystemExit) as exited:
        load_script(path).main(["--split", split, *args])
    assert exited.value.code == 2, path.name
    return capsys.readouterr().err


def test_every_benchmark_is_a_guarded_split_reader_or_cost_only():
    scripts = {p.name for p in BENCHMARKS.glob("*.py")}
    assert scripts == set(SPLIT_READERS) | COST_ONLY
    for name in SPLIT_READERS:
        tree = ast.parse((BENCHMARKS / name).read_text())
        called = {
            getattr(node.func, "id", getattr(node.func, "attr", None))
            for node in ast.walk(tree)
            if isinstance(node, ast.Call)
        }
        assert {"add_split_argument", "selection_split"} <= called, name


@pytest.mark.parametrize("name", sorted(SPLIT_READERS))
@pytest.mark.parametrize("split", ["test", "test2017", "validation"])
def test_each_split_reader_refuses_any_split_but_train_and_val(name, split, tmp_path, capsys):
    said = refusal(BENCHMARKS / name, split, tmp_path, capsys)
    assert f"split {split!r} refused" in said and "only reported" in said, said


def test_the_guard_refuses_a_split_name_computed_at_run_time():
    assert [selection_split(s) for s in SELECTION_SPLITS] == ["train", "val"]
    computed = "".join(["te", "st"])  # what no static check sees
    with pytest.raises(DataError, match="split 'test' refused"):
        selection_split(computed, "a sweep")


def test_a_planted_test_selection_in_a_benchmark_is_caught(tmp_path, capsys):
    """scst_sweep.py with its held-out split changed to test, twice: as a default (the run-time
    guard refuses it before any work) and as a literal (the static check names it)."""
    source = (BENCHMARKS / "scst_sweep.py").read_text()
    planted = tmp_path / "scst_sweep.py"
    planted.write_text(
        source.replace("add_split_argument(parser)", 'add_split_argument(parser, "test")')
    )
    with pytest.raises(SystemExit) as exited:
        load_script(planted).main(["--model", "m.keras", "--out", str(tmp_path)])
    assert exited.value.code == 2 and "split 'test' refused" in capsys.readouterr().err
    planted.write_text(source + '\nresults = outputs["caption_results_test"]\n')
    assert split_test_strings(planted) == ["caption_results_test"]


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
        'decoded = catalog.load("caption_results_test")\n'
        'ratio = metrics["headline"]["cider_vs_human"]\n'
        'refs = metrics["test_vs_human_refs"]\n'
        'where = metrics["attention_localization"], metrics["human"]\n'
        'images = Path("data/01_raw/coco/test2017/")\n'
    )
    assert sorted(split_test_strings(script)) == [
        "annotations/instances_test.json",
        "attention_localization",
        "caption_results_test",
        "data/01_raw/coco/test2017/",
        "headline",
        "human",
        "test",
        "test_vs_human_refs",
    ]
    script.write_text('"""Scored on val, never on the test split (tests/test_x.py)."""\nval = 1\n')
    assert split_test_strings(script) == []  # prose about the rule is not a leak


def test_training_code_never_reads_the_test_split():
    """Training and its phases (cross-entropy, SCST) choose epochs on val only."""
    for path in (ROOT / "src/caption_pipeline/training").glob("*.py"):
        assert not split_test_strings(path), path.name
    for path in (ROOT / "src/caption_pipeline/pipelines/train").glob("*.py"):
        assert not split_test_strings(path), path.name


def test_evaluate_decodes_the_test_split_in_one_node_only():
    pipeline = create_pipeline()
    decoding = [node for node in pipeline.nodes if "caption_results_test" in node.outputs]
    assert len(decoding) == 1
    # ... and nothing downstream of the scores feeds back into a choice of the model
    assert not any(o.startswith("captioner") for node in pipeline.nodes for o in node.outputs)
