"""Project hooks."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

import yaml
from kedro.framework.hooks import hook_impl

from caption_pipeline.errors import DataError
from caption_pipeline.training.cluster import non_chief_worker

logger = logging.getLogger(__name__)


def _data_error_in(exc: BaseException | None) -> DataError | None:
    """The DataError that caused `exc`, following Kedro's wrapping, if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, DataError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


class CleanDataErrorHooks:
    """Show bad-input errors as one clear message, not a traceback through Kedro.

    A DataError means the input (a file, a field, a setting) is wrong, and its message says
    which; the stack of frames inside Kedro's runner helps nobody. Other errors are bugs and
    keep their full traceback.
    """

    @hook_impl
    def after_context_created(self, context) -> None:  # noqa: ARG002 (hook signature)
        previous = sys.excepthook
        if getattr(previous, "_caption_pipeline", False):
            return

        def excepthook(
            exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None
        ) -> None:
            data_error = _data_error_in(exc)
            if data_error is None:
                previous(exc_type, exc, tb)
                return
            print(f"\nError: {data_error}", file=sys.stderr)

        excepthook._caption_pipeline = True  # type: ignore[attr-defined]
        sys.excepthook = excepthook


class MissingInputsHooks:
    """Stop a run whose inputs another stage writes, and is yet to, with one line naming it.

    `kedro run --pipelines=ingest` on a fresh clone would otherwise fail deep in Kedro's
    loading, with a traceback about data/01_raw/raw_dataset.json, which the `synthetic` stage
    writes for any dataset (the shapes data, generated, or your own, recorded as configured).
    Only inputs that a registered stage produces are checked: they would fail to load anyway,
    so this changes no run that could succeed, only how one that cannot is reported.
    """

    @hook_impl
    def before_pipeline_run(self, run_params, pipeline, catalog) -> None:  # noqa: ARG002
        missing = [name for name in sorted(pipeline.inputs()) if not _exists(catalog, name)]
        if not missing:
            return
        stages = _all_stages()
        for name in missing:
            writers = sorted(stage for stage, p in stages.items() if name in p.all_outputs())
            if writers:
                where = getattr(catalog.get(name), "_filepath", None)
                raise DataError(
                    f"{name}{f' ({where})' if where else ''} does not exist yet: run "
                    f"`kedro run --pipelines={','.join(writers)}` first (or `kedro run` for "
                    "every stage)"
                )


def _exists(catalog, name: str) -> bool:
    """The dataset is there, or cannot tell (then loading it decides)."""
    try:
        return bool(catalog.exists(name))
    except Exception:  # noqa: BLE001 (a dataset that cannot check: not this hook's call)
        return True


def _all_stages() -> dict:
    """Every stage's pipeline, by folder name as `pipeline_registry` registers them. Not from
    Kedro's `pipelines` or `find_pipelines`: under `--pipelines=X` they load X only."""
    import importlib
    import pkgutil

    import caption_pipeline.pipelines as package

    return {
        info.name: importlib.import_module(f"{package.__name__}.{info.name}").create_pipeline()
        for info in pkgutil.iter_modules(package.__path__)
        if info.ispkg
    }


class ChiefWritesHooks:
    """Under `train.strategy: multi_worker`, only the chief saves what a run makes.

    Training already keeps the checkpoints to the chief (`cluster.is_chief_task`); this does the
    same for Kedro's outputs (the captioner, the history CSVs, the figures): on every other
    worker they become MemoryDatasets, so two workers that share a `data/` never race on one
    file, and no worker leaves a second copy behind. (`tracking.MlflowRunHooks` keeps the
    other workers out of MLflow the same way.)
    """

    @hook_impl
    def before_pipeline_run(self, run_params, pipeline, catalog) -> None:  # noqa: ARG002
        if not non_chief_worker(_params(catalog, "train")):
            return
        from kedro.io import MemoryDataset

        for name in sorted(pipeline.all_outputs()):
            catalog[name] = MemoryDataset()


def _params(catalog, key: str) -> dict | None:
    name = f"params:{key}"
    return catalog.load(name) if name in catalog else None


class DvcLockHooks:
    """After a successful `kedro run`, record the DVC stages it ran in dvc.lock, so that Kedro
    and DVC keep one state: `dvc status` reports them up to date, and `dvc repro` re-runs
    nothing until their code, data or params change.

    `dvc commit --force <stages>` records what `dvc repro` would have (deps, params and outs
    hashed, outs cached as hard links, dvc.lock and the run-cache written). A hook, not
    `make run` through `dvc repro`: a plain `kedro run`, whole or `--pipelines=X`, must leave
    the same state, and one process for the whole pipeline starts TensorFlow once, not once
    per stage. Recorded: each stage whose Kedro pipeline ran whole (a partial run that skipped
    some of a stage's nodes leaves it changed). Not recorded, their outputs being other than
    conf/ gives: runs with `--params`, `--load-versions` or `--only-missing-outputs`, in
    another environment than the one a dvc.yaml generated with `--env` is for (the `base`
    one leaves the environment to KEDRO_ENV), or on raw data that is
    neither a dvc.yaml output nor tracked by `dvc add` (COCO before `caption-pipeline dvc-yaml
    --env coco`, your own images); nor multi-worker runs (every worker would commit, some
    before the chief has written). Never inside a DVC stage (`dvc repro`, `dvc exp run` set
    DVC_STAGE in its command, record it themselves and hold the repository lock). A DVC
    failure never fails the run: one warning line says what to run.
    """

    @hook_impl
    def after_pipeline_run(self, run_params, pipeline, catalog) -> None:
        root = Path(run_params["project_path"])
        if (
            os.environ.get("DVC_STAGE")
            or not (root / ".dvc").is_dir()
            or not (root / "dvc.yaml").is_file()
        ):
            return  # inside a DVC stage, or no DVC pipeline here (a project copy)
        from caption_pipeline.mlops.dvc_render import generated_env

        text = (root / "dvc.yaml").read_text()
        dvc_stages = yaml.safe_load(text)["stages"]
        pipelines, ran = _all_stages(), {node.name for node in pipeline.nodes}
        stages = [
            name
            for name in dvc_stages  # in dvc.yaml's order, the data flow's
            if name in pipelines and {n.name for n in pipelines[name].nodes} <= ran
        ]
        why_not = _not_recordable(root, run_params, catalog, dvc_stages, generated_env(text))
        if not stages or why_not:
            if stages:
                logger.info("DVC: %s not recorded in dvc.lock (%s)", ", ".join(stages), why_not)
            return
        start = time.monotonic()
        try:
            result = subprocess.run(
                [sys.executable, "-m", "dvc", "commit", "--force", *stages],
                cwd=root,
                capture_output=True,
                text=True,
            )
            error = (result.stderr.strip().splitlines() or ["dvc failed"])[-1]
        except OSError as exc:
            result, error = None, str(exc)
        if result is None or result.returncode:
            logger.warning(
                "DVC did not record this run (%s): run `dvc commit --force %s`",
                error,
                " ".join(stages),
            )
            return
        logger.info(
            "DVC: recorded %s in dvc.lock (%.1f s)", ", ".join(stages), time.monotonic() - start
        )


def _not_recordable(
    root: Path, run_params: dict, catalog, dvc_stages: dict, generated_for: str | None
) -> str | None:
    """Why the outputs of this run are not what dvc.yaml's stages give, or None: a run
    whose outputs are not conf/'s, on raw data that is neither a stage's output nor tracked
    by `dvc add` as a stage's dep, in another environment than the one dvc.yaml is generated
    for (`generated_for`, from `caption-pipeline dvc-yaml --env`'s header), or one of several
    workers."""
    from caption_pipeline.mlops.dvc_stages import BASE

    if generated_for not in (None, BASE) and run_params.get("env") != generated_for:
        return f"dvc.yaml is generated for --env {generated_for}"
    for flag, key in (
        ("--params", "runtime_params"),
        ("--load-versions", "load_versions"),
        ("--only-missing-outputs", "only_missing_outputs"),
    ):
        if run_params.get(key):
            return f"a run with {flag}"
    outs, deps = (
        {
            next(iter(path)) if isinstance(path, dict) else path
            for stage in dvc_stages.values()
            for path in stage.get(kind, [])
        }
        for kind in ("outs", "deps")
    )
    params = {
        key: catalog.load(f"params:{key}")
        for key in ("dataset", "train")
        if f"params:{key}" in catalog
    }
    data_root = str((params.get("dataset") or {}).get("root", "")).rstrip("/")
    tracked = data_root in deps and (root / f"{data_root}.dvc").is_file()
    if data_root not in outs and not tracked:
        return f"its raw data, {data_root}, is no dvc.yaml output nor a dep tracked by `dvc add`"
    if (params.get("train") or {}).get("strategy") == "multi_worker":
        return "multi-worker: run `dvc commit` once every worker is done"
    return None
