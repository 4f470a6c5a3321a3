"""dvc.yaml in a temporary git repository: reproduce on the smoke environment, re-run only what a
changed training parameter affects, metrics and plots, then push to a local remote and pull the
outputs back byte for byte. MLflow runs of the stages carry the git commit and the data hash."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import PROJECT_ROOT

BIN = Path(sys.executable).parent
GIT_ENV = {
    "GIT_AUTHOR_NAME": "test",
    "GIT_AUTHOR_EMAIL": "test@example.com",
    "GIT_COMMITTER_NAME": "test",
    "GIT_COMMITTER_EMAIL": "test@example.com",
}


def _run(repo: Path, *args: str, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        args, cwd=repo, capture_output=True, text=True, timeout=1200,
        env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
             "KEDRO_DISABLE_TELEMETRY": "1", "TF_CPP_MIN_LOG_LEVEL": "2", **GIT_ENV,
             **(env or {})},
    )
    assert result.returncode == 0, f"{args}:\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}"
    return result.stdout + result.stderr


def dvc(repo: Path, *args: str) -> str:
    return _run(repo, str(BIN / "dvc"), *args, env={"KEDRO_ENV": "smoke"})


def clone_working_tree(dest: Path) -> Path:
    """A git repository holding the working tree as a fresh clone would (committed or not,
    never what .gitignore keeps out: no data, no mlflow.db, no DVC cache)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, check=True,
    ).stdout.split("\0")
    for name in filter(None, listed):
        source = PROJECT_ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    _run(dest, "git", "init", "-q")
    _run(dest, "git", "add", "-A")
    _run(dest, "git", "commit", "-q", "-m", "clone")
    return dest


def downstream_of(stages: dict, start: str) -> set[str]:
    """`start` and every stage that depends, directly or not, on its outputs (from dvc.yaml)."""

    def outs(stage: dict) -> list[str]:
        paths = []
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind, []):
                paths.append(next(iter(entry)) if isinstance(entry, dict) else entry)
        return paths

    affected, changed = {start}, True
    while changed:
        changed = False
        produced = [path for name in affected for path in outs(stages[name])]
        for name, stage in stages.items():
            deps = stage.get("deps", [])
            if name not in affected and any(
                dep == out or dep.startswith(out.rstrip("/") + "/") for dep in deps for out in produced
            ):
                affected.add(name)
                changed = True
    return affected


def cached_outs(repo: Path) -> list[Path]:
    """The outputs of dvc.lock that DVC caches (not those declared `cache: false`)."""
    uncached = {
        next(iter(entry))
        for stage in yaml.safe_load((repo / "dvc.yaml").read_text())["stages"].values()
        for kind in ("outs", "metrics", "plots")
        for entry in stage.get(kind, [])
        if isinstance(entry, dict) and next(iter(entry.values())).get("cache") is False
    }
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    return [
        repo / out["path"]
        for stage in lock.values()
        for out in stage.get("outs", [])
        if out["path"] not in uncached
    ]


def cached_files(repo: Path) -> dict[str, str]:
    """sha256 of every file under the cached outputs."""
    digests = {}
    for path in cached_outs(repo):
        for file in [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()):
            digests[file.relative_to(repo).as_posix()] = hashlib.sha256(file.read_bytes()).hexdigest()
    return digests


@pytest.mark.slow
def test_dvc_repro_rerun_metrics_plots_push_pull(tmp_path):
    import mlflow

    repo = clone_working_tree(tmp_path / "clone")
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]

    # 1. A fresh clone reproduces everything, one Kedro pipeline per stage.
    first = dvc(repo, "repro")
    for name in stages:
        assert f"Running stage '{name}'" in first
    assert set(yaml.safe_load((repo / "dvc.lock").read_text())["stages"]) == set(stages)
    assert "up to date" in dvc(repo, "status").lower()

    # 2. A training parameter changes: only train and what follows it run again.
    params = repo / "conf/base/parameters_train.yml"
    text = params.read_text()
    assert "  learning_rate: 2.0e-3" in text
    params.write_text(text.replace("  learning_rate: 2.0e-3", "  learning_rate: 1.0e-3"))
    second = dvc(repo, "repro")
    rerun = {name for name in stages if f"Running stage '{name}'" in second}
    assert rerun == downstream_of(stages, "train"), second[-3000:]
    for name in set(stages) - rerun:
        assert f"Stage '{name}' didn't change, skipping" in second

    # 3. Metrics and plots.
    metrics = json.loads(dvc(repo, "metrics", "show", "--json"))
    shown = json.dumps(metrics)
    assert "data/08_reporting/metrics.json" in shown and "CIDEr" in shown
    dvc(repo, "plots", "show", "-o", str(tmp_path / "plots"))
    page = (tmp_path / "plots" / "index.html").read_text()
    assert "val_xent" in page and ".png" in page
    assert list((tmp_path / "plots").rglob("*.png"))  # the attention figures

    # 4. Each stage was an MLflow run tagged with the commit and the raw data's DVC hash.
    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("caption-pipeline")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    assert [run.info.run_name for run in runs] == list(stages) + sorted(
        rerun, key=list(stages).index
    )
    head = _run(repo, "git", "rev-parse", "HEAD").strip()
    raw_md5 = next(
        out["md5"]
        for out in yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["synthetic"]["outs"]
        if out["path"] == "data/01_raw/shapes"
    )
    trains = [run for run in runs if run.info.run_name == "train"]
    assert [run.data.params["train.learning_rate"] for run in trains] == ["0.002", "0.001"]
    for run in trains:
        assert run.info.status == "FINISHED"
        assert run.data.tags["git_commit"] == head
        assert run.data.tags["dvc_data_hash"] == raw_md5
        assert run.data.tags["dvc_data_source"] == "dvc.lock:synthetic"

    # 5. Push to a local remote, lose the outputs and the cache, pull them back byte for byte.
    before = cached_files(repo)
    assert any(path.startswith("data/06_models/") for path in before)
    dvc(repo, "remote", "add", "--local", "-f", "-d", "store", str(tmp_path / "store"))
    dvc(repo, "push")
    for path in cached_outs(repo):
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    shutil.rmtree(repo / ".dvc" / "cache")
    dvc(repo, "pull")
    assert cached_files(repo) == before
    assert "up to date" in dvc(repo, "status").lower()
