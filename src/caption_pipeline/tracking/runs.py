"""MLflow tracking around kedro-mlflow: metric series for its datasets, run tags, failed runs.

kedro-mlflow opens one MLflow run per `kedro run`, logs the parameters that nodes read and the
datasets the catalog declares as `kedro_mlflow.io.*`. This module adds what it does not do:

- `training_metric_series` (of the cross-entropy and the fine-tuning phases, prefixed `xent.`
  and `fine_tune.` by the catalog), `self_critical_metric_series` (`scst.`) and
  `evaluation_metric_values`: reshape the training histories and metrics.json into the
  {name: [{step, value}, ...]} form that `MlflowMetricsHistoryDataset` logs (one point per
  epoch, per logged step, or a single value);
- `MlflowRunHooks`: anchor a relative `sqlite:///` tracking URI at the project root; name the
  run so that a person can tell runs apart (`run_name`: stages, environment, the parameters
  given on the command line, the DVC experiment) and describe it with its command line; tag
  it with the git commit, the DVC hash of the raw data and every parameter that differs from
  conf/base; log each split of the caption table as an MLflow dataset input
  (`caption_inputs`); turn on MLflow's system metrics (CPU, memory, GPU where present); and
  record the error of a failed run.
"""

from __future__ import annotations

import hashlib
import math
import os
import subprocess
import sys
import traceback
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import yaml
from kedro.config import MissingConfigException
from kedro.framework.hooks import hook_impl

from caption_pipeline.conf_loader import CONFIG_LOADER_ARGS
from caption_pipeline.training.cluster import non_chief_worker

MetricSeries = dict[str, list[dict[str, float]]]

_SQLITE = "sqlite:///"
_MAX_TAG_CHARS = 5000  # MLflow accepts 8000; the full traceback goes to error.txt
# Seconds between two samples of CPU, memory (and GPU) use; MLflow's default is 10.
SYSTEM_METRICS_INTERVAL = 5
# The stages' names for the pipeline `kedro run` runs without --pipelines.
_DEFAULT_PIPELINE = "__default__"
# MLflow contexts of the caption table's splits, as the UI's dataset column shows them.
_SPLIT_CONTEXT = {"train": "training", "val": "validation", "test": "test"}


# --- metric series ------------------------------------------------------------------------------


def _points(x: pd.Series, y: pd.Series) -> list[dict[str, float]]:
    return [
        {"step": int(s), "value": float(v)}
        for s, v in zip(x, y, strict=True)
        if v is not None and not math.isnan(float(v))
    ]


def training_metric_series(history: pd.DataFrame, steps: pd.DataFrame) -> MetricSeries:
    """Every numeric column of the training history as a series over `epoch`, and the sampled
    per-step loss of `steps` (columns step, loss) as `loss` over the global step."""
    series = {
        column: _points(history["epoch"], history[column])
        for column in history.columns
        if column not in ("epoch", "step") and pd.api.types.is_numeric_dtype(history[column])
    }
    if not steps.empty:
        series["loss"] = _points(steps["step"], steps["loss"])
    return {name: points for name, points in series.items() if points}


def self_critical_metric_series(history: pd.DataFrame, steps: pd.DataFrame) -> MetricSeries:
    """SCST's per-step reward, baseline, advantage, entropy and policy loss over the SCST step,
    and its val CIDEr-D per epoch (epoch 0: the cross-entropy model) as `val_cider`."""
    series = {}
    if not steps.empty:
        series = {
            column: _points(steps["step"], steps[column])
            for column in steps.columns
            if column != "step" and pd.api.types.is_numeric_dtype(steps[column])
        }
    if not history.empty:
        series["val_cider"] = _points(history["epoch"], history["val_cider"])
    return {name: points for name, points in series.items() if points}


def evaluation_metric_values(
    metrics: Mapping[str, Any], skip: tuple[str, ...] = ("details", "decoding")
) -> MetricSeries:
    """The numeric leaves of metrics.json, flattened with dots (`test.CIDEr`,
    `blind_baseline.BLEU_4`, `attention_localization`), each one point at step 0."""
    flat: MetricSeries = {}

    def visit(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for key, item in value.items():
                visit(f"{prefix}.{key}" if prefix else str(key), item)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            if not math.isnan(value):
                flat[prefix] = [{"step": 0, "value": float(value)}]

    for key, value in metrics.items():
        if key not in skip:
            visit(str(key), value)
    return flat


# --- run tags -----------------------------------------------------------------------------------


def git_commit(project_path: Path) -> tuple[str, bool] | None:
    """(HEAD commit, whether the work tree has uncommitted changes), or None outside git."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=project_path, capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit, dirty


def _project_relative(path: str | Path, project_path: Path) -> str:
    """`path` (relative to the project, or absolute) as a POSIX path relative to the project
    when it lies inside it."""
    path = Path(path)
    if path.is_absolute():
        try:
            path = path.resolve().relative_to(project_path.resolve())
        except ValueError:
            pass
    return path.as_posix().rstrip("/")


def dvc_data_hash(project_path: Path, data_root: str | Path) -> tuple[str, str] | None:
    """(md5, where DVC recorded it) for the raw data folder `data_root`, read from DVC's own
    files, never by hashing the data: `<data_root>.dvc` when it was `dvc add`-ed (real COCO),
    else the output of that path in dvc.lock (the generated shapes dataset). None if DVC does
    not track it (yet)."""
    target = _project_relative(data_root, project_path)
    # (source, folder its paths are relative to, its outputs)
    candidates: list[tuple[str, Path, list[dict[str, Any]]]] = []
    dvc_file = project_path / f"{target}.dvc"
    if dvc_file.is_file():
        outs = (yaml.safe_load(dvc_file.read_text()) or {}).get("outs", [])
        candidates.append((dvc_file.name, dvc_file.parent, outs))
    lock = project_path / "dvc.lock"
    if lock.is_file():
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
        candidates += [
            (f"dvc.lock:{name}", project_path, stage.get("outs", []))
            for name, stage in stages.items()
        ]
    for source, folder, outs in candidates:
        for out in outs:
            path = _project_relative(folder / out.get("path", ""), project_path)
            if path == target and out.get("md5"):
                return out["md5"], source
    return None


# --- names, descriptions and inputs ------------------------------------------------------------


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested parameters as {"train.epochs": 3, ...}; lists and scalars are leaves."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def changed_params(params: Mapping[str, Any], base: Mapping[str, Any]) -> dict[str, Any]:
    """The leaves of `params` whose value differs from (or is absent in) `base`."""
    base_flat = flatten(base)
    return {
        key: value
        for key, value in flatten(params).items()
        if key not in base_flat or base_flat[key] != value
    }


def run_name(
    pipelines: list[str] | None,
    env: str | None,
    runtime_params: Mapping[str, Any],
    experiment: str | None = None,
) -> str:
    """A run name a person can read: "all stages · local", "train · smoke · train.epochs=3",
    "exp lucid-pony · train · local": the DVC experiment when there is one, the stages run,
    the Kedro environment, and the parameters given on the command line."""
    stages = [name for name in (pipelines or []) if name != _DEFAULT_PIPELINE]
    parts = [f"exp {experiment}"] if experiment else []
    parts.append("+".join(stages) if stages else "all stages")
    parts.append(env or "local")
    parts += [f"{key}={value}" for key, value in sorted(flatten(runtime_params or {}).items())]
    return " · ".join(parts)


def caption_digest(table: pd.DataFrame) -> str:
    """12 hex digits of sha256 over (image_id, annotation_id, caption) sorted: the same rows
    give the same digest on any machine, whatever their order."""
    rows = (
        table[["image_id", "annotation_id", "caption"]]
        .sort_values(["image_id", "annotation_id"])
        .itertuples(index=False)
    )
    digest = hashlib.sha256()
    for image_id, annotation_id, caption in rows:
        digest.update(f"{image_id}\t{annotation_id}\t{caption}\n".encode())
    return digest.hexdigest()[:12]


def caption_inputs(table: pd.DataFrame, data_root: str, data_hash: str | None) -> list:
    """(mlflow Dataset, context, tags) for each split of the caption table: named
    "captions-<split>", its digest `caption_digest`, its source the raw data folder, tagged
    with the DVC hash of that folder (or "untracked")."""
    inputs = []
    for split in sorted(table["split"].unique()):
        rows = table[table["split"] == split].reset_index(drop=True)
        with warnings.catch_warnings():  # a local path: MLflow registers two local sources
            warnings.filterwarnings("ignore", "The specified dataset source can be interpreted")
            dataset = mlflow.data.from_pandas(
                rows, source=str(data_root), name=f"captions-{split}", digest=caption_digest(rows)
            )
        tags = {
            "split": split,
            "dvc_data_hash": data_hash or "untracked",
            "images": str(rows["image_id"].nunique()),
        }
        inputs.append((dataset, _SPLIT_CONTEXT.get(split, split), tags))
    return inputs


class MlflowRunHooks:
    """Project-level additions to kedro-mlflow's run (see the module docstring)."""

    def __init__(self) -> None:
        self._run_id: str | None = None
        self._data_root: str | None = None
        self._context = None
        self._inputs_logged = False

    @hook_impl(tryfirst=True)
    def after_context_created(self, context) -> None:
        """Before kedro-mlflow reads mlflow.yml: make a relative sqlite database and artifact
        folder absolute under the project root, so every working directory (notebooks/, a
        DVC stage) uses the same store. In a DVC stage the root is DVC_ROOT, the repository
        `dvc` was run in: a queued `dvc exp run` runs in a temporary copy under
        .dvc/tmp/exps, deleted afterwards, and DVC names the real repository there."""
        self._context = context
        self._data_root = (context.params.get("dataset") or {}).get("root")
        # Read when kedro-mlflow starts the run; a process that sets it itself keeps its own.
        os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "true")
        mlflow.set_system_metrics_sampling_interval(SYSTEM_METRICS_INTERVAL)
        try:
            conf = context.config_loader["mlflow"]
        except (MissingConfigException, KeyError):
            return
        root = Path(os.environ.get("DVC_ROOT") or context.project_path)
        server = conf["server"] = conf.get("server") or {}
        uri = server.get("mlflow_tracking_uri")
        if isinstance(uri, str) and uri.startswith(_SQLITE) and not uri.startswith(_SQLITE + "/"):
            server["mlflow_tracking_uri"] = _SQLITE + (root / uri[len(_SQLITE) :]).as_posix()
        tracking = conf["tracking"] = conf.get("tracking") or {}
        if non_chief_worker(context.params.get("train")):  # the chief's run is the run
            from kedro.framework.project import pipelines

            disable = tracking["disable_tracking"] = tracking.get("disable_tracking") or {}
            disable["pipelines"] = sorted(pipelines)
        experiment = tracking["experiment"] = tracking.get("experiment") or {}
        kwargs = experiment["create_experiment_kwargs"] = (
            experiment.get("create_experiment_kwargs") or {}
        )
        location = kwargs.get("artifact_location")
        if isinstance(location, str) and "://" not in location and not Path(location).is_absolute():
            kwargs["artifact_location"] = (root / location).as_uri()
        context.config_loader["mlflow"] = conf

    @hook_impl(trylast=True)
    def before_pipeline_run(self, run_params: dict[str, Any]) -> None:
        """After kedro-mlflow started the run: tag it with the code and data versions."""
        run = mlflow.active_run()
        self._run_id = run.info.run_id if run else None
        self._inputs_logged = False
        if run is None:
            return
        project_path = Path(run_params["project_path"])
        tags: dict[str, str] = {}
        git = git_commit(project_path)
        tags["git_commit"], tags["git_dirty"] = (
            (git[0], str(git[1]).lower()) if git else ("none", "")
        )
        found = dvc_data_hash(project_path, self._data_root) if self._data_root else None
        tags["dvc_data_path"] = str(self._data_root or "")
        tags["dvc_data_hash"], tags["dvc_data_source"] = found or ("untracked", "")
        experiment = os.environ.get("DVC_EXP_NAME")
        tags["dvc_experiment"] = experiment or ""
        tags["mlflow.runName"] = run_name(
            run_params.get("pipeline_names"),
            run_params.get("env"),
            run_params.get("runtime_params") or {},
            experiment,
        )
        tags["mlflow.note.content"] = "`" + " ".join(["kedro", *sys.argv[1:]]) + "`"
        changed = self._changed_params()
        tags["params_changed"] = (
            ", ".join(f"{k}={v}" for k, v in sorted(changed.items()))[:_MAX_TAG_CHARS] or "none"
        )
        mlflow.set_tags({key: value for key, value in tags.items() if value != ""})

    def _changed_params(self) -> dict[str, Any]:
        """This run's parameters that differ from conf/base's (environment and --params)."""
        context = self._context
        if context is None:
            return {}
        loader = type(context.config_loader)
        try:
            base = loader(
                str(Path(context.project_path) / "conf"), env="base", **CONFIG_LOADER_ARGS
            )["parameters"]
        except Exception:  # noqa: BLE001 (a loader that cannot load base alone: no tag)
            return {}
        return changed_params(context.params, base)

    @hook_impl
    def after_dataset_loaded(self, dataset_name: str, data: Any) -> None:
        """The caption table a stage reads, as the run's dataset inputs."""
        self._log_inputs(dataset_name, data)

    @hook_impl
    def after_dataset_saved(self, dataset_name: str, data: Any) -> None:
        """The caption table ingest writes, as the run's dataset inputs."""
        self._log_inputs(dataset_name, data)

    def _log_inputs(self, dataset_name: str, data: Any) -> None:
        if (
            dataset_name != "caption_table"
            or self._inputs_logged
            or mlflow.active_run() is None
            or not isinstance(data, pd.DataFrame)
        ):
            return
        root = Path(self._context.project_path) if self._context else Path.cwd()
        found = dvc_data_hash(root, self._data_root) if self._data_root else None
        for dataset, context, tags in caption_inputs(
            data, self._data_root or "", found[0] if found else None
        ):
            mlflow.log_input(dataset, context=context, tags=tags)
        self._inputs_logged = True

    @hook_impl(tryfirst=True)
    def on_pipeline_error(self, error: Exception) -> None:
        """Before kedro-mlflow marks the run FAILED: record the error on it."""
        if self._run_id is None:
            return
        client = mlflow.MlflowClient()
        message = f"{type(error).__name__}: {error}"
        client.set_tag(self._run_id, "error", message[:_MAX_TAG_CHARS])
        client.log_text(
            self._run_id,
            "".join(traceback.format_exception(type(error), error, error.__traceback__)),
            "error.txt",
        )
