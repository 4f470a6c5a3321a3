"""MLflow tracking around kedro-mlflow: metric series for its datasets, run tags, failed runs.

kedro-mlflow opens one MLflow run per `kedro run`, logs the parameters that nodes read and the
datasets the catalog declares as `kedro_mlflow.io.*`. This module adds what it does not do:

- `training_metric_series` (`fine_tune_metric_series`) / `evaluation_metric_values`: reshape
  the training history and metrics.json into the {name: [{step, value}, ...]} form that
  `MlflowMetricsHistoryDataset` logs (one point per epoch, per logged step, or a single value);
- `MlflowRunHooks`: anchor a relative `sqlite:///` tracking URI at the project root, tag the run
  with the git commit and the DVC hash of the raw data, and record the error of a failed run.
"""

from __future__ import annotations

import math
import subprocess
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import yaml
from kedro.config import MissingConfigException
from kedro.framework.hooks import hook_impl

MetricSeries = dict[str, list[dict[str, float]]]

_SQLITE = "sqlite:///"
_MAX_TAG_CHARS = 5000  # MLflow accepts 8000; the full traceback goes to error.txt


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


def fine_tune_metric_series(history: pd.DataFrame, steps: pd.DataFrame) -> MetricSeries:
    """The fine-tuning phase's `training_metric_series`, each name prefixed `fine_tune_`
    (fine_tune_val_xent, fine_tune_loss, ...) beside the cross-entropy phase's in the run."""
    return {f"fine_tune_{name}": points
            for name, points in training_metric_series(history, steps).items()}


def self_critical_metric_series(history: pd.DataFrame, steps: pd.DataFrame) -> MetricSeries:
    """SCST's per-step reward, baseline, advantage, entropy and policy loss over the SCST step,
    and its val CIDEr-D per epoch (epoch 0: the cross-entropy model) as `val_cider`."""
    series = {}
    if not steps.empty:
        series = {column: _points(steps["step"], steps[column]) for column in steps.columns
                  if column != "step" and pd.api.types.is_numeric_dtype(steps[column])}
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
        candidates += [(f"dvc.lock:{name}", project_path, stage.get("outs", []))
                       for name, stage in stages.items()]
    for source, folder, outs in candidates:
        for out in outs:
            path = _project_relative(folder / out.get("path", ""), project_path)
            if path == target and out.get("md5"):
                return out["md5"], source
    return None


class MlflowRunHooks:
    """Project-level additions to kedro-mlflow's run (see the module docstring)."""

    def __init__(self) -> None:
        self._run_id: str | None = None
        self._data_root: str | None = None

    @hook_impl(tryfirst=True)
    def after_context_created(self, context) -> None:
        """Before kedro-mlflow reads mlflow.yml: make a relative sqlite database and artifact
        folder absolute under the project root, so every working directory (notebooks/, a
        DVC stage) uses the same store."""
        self._data_root = (context.params.get("dataset") or {}).get("root")
        try:
            conf = context.config_loader["mlflow"]
        except (MissingConfigException, KeyError):
            return
        root = Path(context.project_path)
        server = conf["server"] = conf.get("server") or {}
        uri = server.get("mlflow_tracking_uri")
        if isinstance(uri, str) and uri.startswith(_SQLITE) and not uri.startswith(_SQLITE + "/"):
            server["mlflow_tracking_uri"] = _SQLITE + (root / uri[len(_SQLITE):]).as_posix()
        tracking = conf["tracking"] = conf.get("tracking") or {}
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
        if run is None:
            return
        project_path = Path(run_params["project_path"])
        tags: dict[str, str] = {}
        git = git_commit(project_path)
        tags["git_commit"], tags["git_dirty"] = (git[0], str(git[1]).lower()) if git else ("none", "")
        found = dvc_data_hash(project_path, self._data_root) if self._data_root else None
        tags["dvc_data_path"] = str(self._data_root or "")
        tags["dvc_data_hash"], tags["dvc_data_source"] = found or ("untracked", "")
        mlflow.set_tags({key: value for key, value in tags.items() if value != ""})

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

