"""dvc.yaml in a temporary git repository, on the smoke environment: a plain `kedro run` leaves
DVC up to date (hooks.DvcLockHooks), a `dvc exp run -S` of a training parameter re-runs only what
it affects and shows its metrics, metrics and plots, then push to a local remote and pull the
outputs back byte for byte. MLflow runs carry the git commit, the data hash and the experiment."""

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

from caption_pipeline.project import PROJECT_ROOT
from tests.helpers import GIT_ENV, clone_working_tree

BIN = Path(sys.executable).parent


def _run(repo: Path, *args: str, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        args,
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=1200,
        env={
            **os.environ,
            "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
            "KEDRO_DISABLE_TELEMETRY": "1",
            "TF_CPP_MIN_LOG_LEVEL": "2",
            **GIT_ENV,
            **(env or {}),
        },
    )
    assert result.returncode == 0, f"{args}:\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}"
    return result.stdout + result.stderr


def dvc(repo: Path, *args: str) -> str:
    return _run(repo, str(BIN / "dvc"), *args, env={"KEDRO_ENV": "smoke"})


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
                dep == out or dep.startswith(out.rstrip("/") + "/")
                for dep in deps
                for out in produced
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
            digests[file.relative_to(repo).as_posix()] = hashlib.sha256(
                file.read_bytes()
            ).hexdigest()
    return digests


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_kedro_run_then_dvc_experiment_metrics_plots_push_pull(tmp_path):
    import mlflow

    repo = clone_working_tree(tmp_path / "clone")
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]

    # 1. A fresh clone's `kedro run` (what `make run` runs) records every stage in dvc.lock:
    # DVC sees it all up to date, and `dvc repro` runs nothing.
    _run(repo, str(BIN / "kedro"), "run", "--env", "smoke")
    assert list(yaml.safe_load((repo / "dvc.lock").read_text())["stages"]) == list(stages)
    assert "up to date" in dvc(repo, "status").lower()
    idle = dvc(repo, "repro")
    for name in stages:
        assert f"Stage '{name}' didn't change, skipping" in idle
    hook_lines = [
        line
        for line in (repo / "info.log").read_text().splitlines()
        if "caption_pipeline.mlops.hooks" in line
    ]
    assert len(hook_lines) == 1, hook_lines
    assert f"INFO - DVC: recorded {', '.join(stages)} in dvc.lock (" in hook_lines[0]

    # 2. An experiment on a training parameter: only train and what follows it run, and Kedro
    # inside DVC's stages leaves dvc.lock to DVC (the hook logs nothing more).
    changed = "conf/base/parameters_train.yml:train.learning_rate=1.0e-3"
    experiment = dvc(repo, "exp", "run", "-n", "lower-lr", "-S", changed)
    rerun = {name for name in stages if f"Running stage '{name}'" in experiment}
    assert rerun == downstream_of(stages, "train"), experiment[-3000:]
    for name in set(stages) - rerun:
        assert f"Stage '{name}' didn't change, skipping" in experiment
    params = yaml.safe_load((repo / "conf/base/parameters_train.yml").read_text())
    assert params["train"]["learning_rate"] == 1.0e-3
    assert [
        line
        for line in (repo / "info.log").read_text().splitlines()
        if "caption_pipeline.mlops.hooks" in line
    ] == hook_lines
    assert "up to date" in dvc(repo, "status").lower()

    # 3. The experiment with its metrics, then metrics and plots of the workspace.
    rows = json.loads(dvc(repo, "exp", "show", "--json"))
    exp_metrics = next(
        rev["data"]["metrics"]
        for row in rows
        for exp in row.get("experiments") or []
        for rev in exp["revs"]
        if rev.get("name") == "lower-lr"
    )
    assert "CIDEr" in exp_metrics["data/08_reporting/metrics.json"]["data"]["test"]
    metrics = json.loads(dvc(repo, "metrics", "show", "--json"))
    shown = json.dumps(metrics)
    assert "data/08_reporting/metrics.json" in shown and "CIDEr" in shown
    dvc(repo, "plots", "show", "-o", str(tmp_path / "plots"))
    page = (tmp_path / "plots" / "index.html").read_text()
    assert "val_xent" in page and ".png" in page
    assert list((tmp_path / "plots").rglob("*.png"))  # the attention figures

    # 4. MLflow: the whole run, then one run per stage of the experiment, named after it, with
    # the commit and the raw data's DVC hash.
    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("caption-pipeline")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    assert [run.info.run_name for run in runs] == ["all stages · smoke"] + [
        f"exp lower-lr · {name} · smoke" for name in stages if name in rerun
    ]
    head = _run(repo, "git", "rev-parse", "HEAD").strip()
    raw_md5 = next(
        out["md5"]
        for out in yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["synthetic"]["outs"]
        if out["path"] == "data/01_raw/shapes"
    )
    whole, train = runs[0], next(run for run in runs if run.data.tags.get("dvc_experiment"))
    assert [run.data.params["train.learning_rate"] for run in (whole, train)] == ["0.002", "0.001"]
    for run in whole, train:
        assert run.info.status == "FINISHED"
        assert run.data.tags["git_commit"] == head
    assert whole.data.tags["dvc_data_hash"] == "untracked"  # dvc.lock is written after the run
    assert train.data.tags["dvc_data_hash"] == raw_md5
    assert train.data.tags["dvc_data_source"] == "dvc.lock:synthetic"

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


# --- `kedro run` records its stages in dvc.lock (hooks.DvcLockHooks) ---------------------------


class _Params:
    """The two parameters the hook reads, as Kedro's catalog gives them."""

    def __init__(self, **params):
        self.params = {f"params:{key}": value for key, value in params.items()}

    def __contains__(self, name):
        return name in self.params

    def load(self, name):
        return self.params[name]


def _override(file: Path, values: dict) -> None:
    """Set `values` (nested blocks merged key by key) in one YAML file of a project copy."""
    tree = yaml.safe_load(file.read_text()) or {}

    def merge(into: dict, update: dict) -> None:
        for key, value in update.items():
            if isinstance(value, dict) and isinstance(into.get(key), dict):
                merge(into[key], value)
            else:
                into[key] = value

    merge(tree, values)
    file.write_text(yaml.safe_dump(tree, sort_keys=False))


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_dvc_repro_on_coco_data_tracked_by_dvc_add(tmp_path):
    """Issue 26: `dvc repro` reproduces the `coco` environment on raw data that `dvc add`
    tracks, here a tiny COCO-shaped set (`coco_like`), with a frozen encoder from a local
    weights file (as an offline user gives NASNetLarge's; a small CNN's, random, here), and
    `dvc status` is clean after it and after a `kedro run --env coco` (DvcLockHooks)."""
    import keras

    from caption_pipeline.data import coco_like
    from caption_pipeline.mlops.dvc_render import generate, generated_env
    from caption_pipeline.mlops.dvc_stages import load_project
    from caption_pipeline.model.encoder import build_encoder

    repo = clone_working_tree(tmp_path / "clone")
    weights = tmp_path / "encoder.weights.h5"
    keras.utils.set_random_seed(0)
    build_encoder("compact", 64, None, (16, 32), compact_pool_last=True).save_weights(weights)
    coco = repo / "conf" / "coco"
    _override(coco / "globals.yml", {"image_size": 64})
    tiny = {"max_steps_per_epoch": 2, "checkpoint_every_steps": 1, "shuffle_buffer": 16}
    small = {"embed_dim": 32, "attention_dim": 32, "lstm_units": 64}
    encoder = {"compact_filters": [16, 32], "compact_pool_last": True, "encoder_trainable": False}
    _override(
        coco / "parameters_train.yml",
        {
            "model": {"encoder": "compact", "encoder_weights": str(weights), **encoder, **small},
            "train": {"epochs": 1, "batch_size": 8, "jit_compile": False, **tiny},
            "self_critical": {"epochs": 1, "batch_size": 8, "samples": 2, **tiny},
        },
    )
    # One in-process shard writer, as in the smoke run (a worker process would spend longer
    # importing TensorFlow than writing).
    shards = {"num_shards": {"train": 2, "val": 1, "test": 1}, "workers": 1}
    _override(coco / "parameters_shard.yml", {"shard": shards})
    raw = repo / "data" / "01_raw" / "coco"
    coco_like.generate(raw, 40, seed=3, workers=1)

    (repo / "dvc.yaml").write_text(generate(load_project(repo, "coco")))
    assert generated_env((repo / "dvc.yaml").read_text()) == "coco"
    dvc(repo, "add", "data/01_raw/coco")
    assert (repo / "data" / "01_raw" / "coco.dvc").is_file()
    _run(repo, "git", "add", "-A")
    _run(repo, "git", "commit", "-q", "-m", "coco")

    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    assert "data/01_raw/coco" in stages["ingest"]["deps"]
    assert "data/01_raw/coco" not in stages["synthetic"].get("outs", [])
    reproduced = _run(repo, str(BIN / "dvc"), "repro", env={"KEDRO_ENV": "coco"})
    for name in stages:
        assert f"Running stage '{name}'" in reproduced, reproduced[-3000:]
    assert "up to date" in _run(repo, str(BIN / "dvc"), "status").lower()
    raw_dataset = json.loads((repo / "data/01_raw/raw_dataset.json").read_text())
    assert (raw_dataset["name"], raw_dataset["generated"]) == ("coco2017", False)
    assert "CIDEr" in json.loads((repo / "data/08_reporting/metrics.json").read_text())["val"]

    # A plain `kedro run --env coco` of a stage records it (DvcLockHooks): still clean.
    log = _run(repo, str(BIN / "kedro"), "run", "--env", "coco", "--pipelines=vocab")
    assert "DVC: recorded vocab in dvc.lock" in log, log[-3000:]
    assert "up to date" in _run(repo, str(BIN / "dvc"), "status").lower()


def _after_run(
    tmp_path,
    monkeypatch,
    pipeline,
    returncode=0,
    data_root="data/01_raw/shapes/",
    strategy="default",
    dvc_yaml=None,
    **run_params,
):
    """DvcLockHooks after a run of `pipeline` in a DVC project at tmp_path (dvc.yaml: the
    checkout's, or this text): the dvc commands it ran (none run for real)."""
    from caption_pipeline.mlops.hooks import DvcLockHooks

    (tmp_path / ".dvc").mkdir(exist_ok=True)
    (tmp_path / "dvc.yaml").write_text(dvc_yaml or (PROJECT_ROOT / "dvc.yaml").read_text())
    calls = []

    def run(command, **kwargs):
        calls.append(command[command.index("dvc") + 1 :])
        return subprocess.CompletedProcess(command, returncode, "", "ERROR: lock is busy\n")

    monkeypatch.setattr(subprocess, "run", run)
    catalog = _Params(dataset={"root": data_root}, train={"strategy": strategy})
    DvcLockHooks().after_pipeline_run(
        run_params={"project_path": str(tmp_path), **run_params}, pipeline=pipeline, catalog=catalog
    )
    return calls


def test_kedro_run_commits_the_stages_whose_nodes_all_ran(tmp_path, monkeypatch):
    import logging

    from kedro.framework.project import configure_project, pipelines

    configure_project("caption_pipeline")  # (Kedro's logging config: pytest's caplog is off)
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    monkeypatch.setattr(logging.getLogger("caption_pipeline.mlops.hooks"), "handlers", [handler])
    monkeypatch.delenv("DVC_STAGE", raising=False)
    order = list(yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())["stages"])
    commit = ["commit", "--force"]
    default = pipelines["__default__"]
    assert _after_run(tmp_path, monkeypatch, default) == [commit + order]
    assert _after_run(tmp_path, monkeypatch, pipelines["train"]) == [commit + ["train"]]
    # A partial run records only the stages it ran whole: not train, one of whose nodes it
    # skipped.
    partial = default - pipelines["train"].filter(node_names=[pipelines["train"].nodes[0].name])
    assert _after_run(tmp_path, monkeypatch, partial) == [
        commit + [name for name in order if name != "train"]
    ]

    # Outputs that are not what conf/ gives are not recorded.
    messages.clear()
    assert _after_run(tmp_path, monkeypatch, default, runtime_params={"train": {"epochs": 3}}) == []
    assert messages == [f"DVC: {', '.join(order)} not recorded in dvc.lock (a run with --params)"]
    assert _after_run(tmp_path, monkeypatch, default, data_root="data/01_raw/coco") == []
    not_tracked = "is no dvc.yaml output nor a dep tracked by `dvc add`)"
    assert messages[-1].endswith(f"(its raw data, data/01_raw/coco, {not_tracked}")
    assert _after_run(tmp_path, monkeypatch, default, strategy="multi_worker") == []

    # A dvc.yaml generated for conf/coco records runs in that environment, on the raw data
    # that `dvc add` tracks.
    from caption_pipeline.mlops.dvc_render import generate
    from caption_pipeline.mlops.dvc_stages import load_project

    coco = {"dvc_yaml": generate(load_project(PROJECT_ROOT, "coco")), "env": "coco"}
    root = "data/01_raw/coco"
    assert _after_run(tmp_path, monkeypatch, default, data_root=root, **coco) == []
    assert messages[-1].endswith(f"(its raw data, {root}, {not_tracked}")
    (tmp_path / f"{root}.dvc").parent.mkdir(parents=True)
    (tmp_path / f"{root}.dvc").write_text("outs:\n- path: coco\n")
    assert _after_run(tmp_path, monkeypatch, default, data_root=root, **coco) == [commit + order]
    assert _after_run(tmp_path, monkeypatch, default, data_root=root, **{**coco, "env": None}) == []
    assert messages[-1].endswith("(dvc.yaml is generated for --env coco)")

    # A failing DVC leaves the run successful, with one line saying what to run.
    messages.clear()
    _after_run(tmp_path, monkeypatch, pipelines["train"], returncode=1)
    assert messages == [
        "DVC did not record this run (ERROR: lock is busy): run `dvc commit --force train`"
    ]

    # Inside a DVC stage (`dvc repro`, `dvc exp run`), DVC records the stage itself.
    monkeypatch.setenv("DVC_STAGE", "train")
    assert _after_run(tmp_path, monkeypatch, default) == []


def test_a_queued_experiment_tracks_to_the_repository_it_was_queued_in(tmp_path, monkeypatch):
    """`dvc exp run --queue` runs the stages in a temporary copy under .dvc/tmp/exps, deleted
    afterwards: the MLflow store is the one of DVC_ROOT, the repository DVC names there."""
    from caption_pipeline.tracking.runs import MlflowRunHooks

    class Context:
        project_path = tmp_path / ".dvc" / "tmp" / "exps" / "tmpabc123"
        params: dict = {}
        config_loader = {
            "mlflow": {
                "server": {"mlflow_tracking_uri": "sqlite:///mlflow.db"},
                "tracking": {
                    "experiment": {"create_experiment_kwargs": {"artifact_location": "mlartifacts"}}
                },
            }
        }

    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")  # the hook's default
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    MlflowRunHooks().after_context_created(Context())
    conf = Context.config_loader["mlflow"]
    assert conf["server"]["mlflow_tracking_uri"] == f"sqlite:///{tmp_path.as_posix()}/mlflow.db"
    kwargs = conf["tracking"]["experiment"]["create_experiment_kwargs"]
    assert kwargs["artifact_location"] == (tmp_path / "mlartifacts").as_uri()
