"""The export as an MLflow pyfunc model, logged and registered in the model registry, and
the champion gate that decides which version to serve.

Input: a DataFrame with a binary column `image` (encoded image bytes; base64 in JSON
requests to `mlflow models serve`), and an optional `beam_size` parameter. Output: one row
per image with `caption`, `captions` (the beams, best first), `scores` and `error` (empty,
or why the image could not be captioned; the other rows are still captioned).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd

from caption_pipeline.errors import DataError
from caption_pipeline.images import ImageError
from caption_pipeline.inference import MLFLOW_ARTIFACT, caption_record, prepare_image
from caption_pipeline.params import from_params

logger = logging.getLogger(__name__)

PROMOTIONS = ("auto", "force", "skip")
CANDIDATE, CHAMPION = "candidate", "champion"  # the registry aliases
GATE_METRIC = "CIDEr"  # of the val split: what the gate compares (never a test figure)


@dataclass(frozen=True)
class MlflowSettings:
    """`params:export.mlflow`."""

    log_model: bool
    register: bool  # a new version of `registered_model_name` per run
    registered_model_name: str
    run_name: str  # of the run started when none is active
    promote: str  # auto: champion if its val score is higher; force; skip

    def __post_init__(self):
        if self.promote not in PROMOTIONS:
            raise DataError(
                f"parameters export.mlflow.promote: expected one of {PROMOTIONS}, "
                f"got {self.promote!r}"
            )

    @classmethod
    def from_params(cls, export: Mapping[str, Any]) -> MlflowSettings:
        return from_params(cls, dict(export or {}).get("mlflow") or {}, "export.mlflow")


class CaptionerModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper of `export.ExportedCaptioner`."""

    def load_context(self, context) -> None:
        from caption_pipeline.export import ExportedCaptioner

        self.model = ExportedCaptioner(context.artifacts[MLFLOW_ARTIFACT])

    def predict(
        self, context, model_input: pd.DataFrame, params: dict | None = None
    ) -> pd.DataFrame:  # noqa: ARG002 (pyfunc signature)
        beam_size = int((params or {}).get("beam_size") or self.model.default_beam_size)
        rows: list[dict[str, Any]] = [{}] * len(model_input)
        ready, where = [], []
        for i, data in enumerate(model_input["image"]):
            try:
                ready.append(prepare_image(bytes(data), name=f"row {i}"))
                where.append(i)
            except ImageError as error:
                rows[i] = {"caption": "", "captions": [], "scores": [], "error": str(error)}
        if ready:
            outputs = self.model.caption(ready, beam_size)
            for b, i in enumerate(where):
                record = caption_record(outputs, b, self.model.info["grid"])
                rows[i] = {
                    "caption": record["caption"],
                    "captions": [beam["caption"] for beam in record["beams"]],
                    "scores": [beam["score"] for beam in record["beams"]],
                    "error": "",
                }
        return pd.DataFrame(rows, columns=["caption", "captions", "scores", "error"])


@dataclass(frozen=True)
class ValScore:
    """What the champion gate compares: the val split's `GATE_METRIC` and the digest of the
    val captions it was scored against (`tracking.caption_digest`); two versions are compared
    only when they were scored on the same val captions."""

    value: float
    val_digest: str


def promote(client, name: str, version: str, score: ValScore, mode: str) -> dict[str, Any]:
    """Alias `version` of registered model `name` as the candidate, and as the champion when
    `mode` is "force", or "auto" and there is no champion yet or `score` beats the champion's
    on the same val captions. The decision, its reason and both figures are tags of the
    version and are returned (for the run)."""
    client.set_model_version_tag(name, version, f"val.{GATE_METRIC}", f"{score.value:.6f}")
    client.set_model_version_tag(name, version, "val_digest", score.val_digest)
    client.set_registered_model_alias(name, CANDIDATE, version)
    champion = _aliased(client, name, CHAMPION)
    old = None if champion is None else champion.tags.get(f"val.{GATE_METRIC}")
    if mode == "skip":
        promoted, reason = False, "promotion skipped (export.mlflow.promote: skip)"
    elif mode == "force":
        promoted, reason = True, "promotion forced (export.mlflow.promote: force)"
    elif champion is None or old is None:
        promoted, reason = True, "no champion yet"
    elif champion.tags.get("val_digest") != score.val_digest:
        promoted, reason = (
            False,
            (
                f"not comparable: champion version {champion.version} was "
                f"scored on other val captions"
            ),
        )
    elif score.value > float(old):
        promoted, reason = (
            True,
            (
                f"val {GATE_METRIC} {score.value:.4f} > {float(old):.4f} of "
                f"version {champion.version}"
            ),
        )
    else:
        promoted, reason = (
            False,
            (
                f"val {GATE_METRIC} {score.value:.4f} <= {float(old):.4f} of "
                f"version {champion.version}"
            ),
        )
    if promoted:
        client.set_registered_model_alias(name, CHAMPION, version)
    decision = {
        "promoted": promoted,
        "reason": reason,
        f"val_{GATE_METRIC}": score.value,
        "previous_champion": None if champion is None else int(champion.version),
        f"previous_champion_val_{GATE_METRIC}": None if old is None else float(old),
    }
    client.set_model_version_tag(name, version, "promotion", "champion" if promoted else "kept")
    client.set_model_version_tag(name, version, "promotion_reason", reason)
    logger.info(
        "%s version %s: %s (%s)",
        name,
        version,
        "now the champion" if promoted else "not promoted",
        reason,
    )
    return decision


def _aliased(client, name: str, alias: str):
    """The version of `name` that `alias` points at, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def log_export(
    export_dir: str | Path,
    example_image: bytes,
    settings: MlflowSettings,
    default_beam_size: int,
    check: Mapping[str, Any],
    scores: Mapping[str, float] | None = None,
    val_score: ValScore | None = None,
) -> dict[str, Any]:
    """Log the export as a pyfunc model in the active MLflow run (or a new one, against the
    current tracking URI), registered as `settings.registered_model_name` if asked; the new
    version is tagged with `scores` (the test split's metrics, reported only), as `test.CIDEr`
    etc., aliased `candidate`, and `champion` when `promote` says so on `val_score`.

    Returns what was logged: run id, model URI, registered name and version, and the
    promotion decision.
    """
    from mlflow.models import infer_signature

    if not settings.log_model:
        return {"logged": False}
    example = pd.DataFrame({"image": [example_image]})
    loaded = CaptionerModel()  # loaded here only for the output schema; what is logged is
    loaded.load_context(_Context({MLFLOW_ARTIFACT: str(export_dir)}))  # an unloaded one
    params = {"beam_size": default_beam_size}
    signature = infer_signature(example, loaded.predict(None, example, params), params)
    package = Path(__file__).parent
    started = mlflow.active_run() is None
    run = mlflow.start_run(run_name=settings.run_name) if started else mlflow.active_run()
    try:
        info = mlflow.pyfunc.log_model(
            name="captioner",
            python_model=CaptionerModel(),
            artifacts={MLFLOW_ARTIFACT: str(export_dir)},
            # The package's code travels with the model: loading it needs no install of
            # caption-pipeline, only the requirements below.
            code_paths=[str(package)],
            pip_requirements=_requirements(),
            signature=signature,
            input_example=(example, params),
            registered_model_name=settings.registered_model_name if settings.register else None,
            metadata={"export_check": dict(check), "test_scores": dict(scores or {})},
        )
        mlflow.log_metrics({"export_check_images": check.get("images", 0)})
        decision = None
        if info.registered_model_version:
            client = mlflow.MlflowClient()
            name, version = settings.registered_model_name, str(info.registered_model_version)
            for metric, value in (scores or {}).items():
                client.set_model_version_tag(name, version, f"test.{metric}", f"{value:.4f}")
            if val_score is not None:
                decision = promote(client, name, version, val_score, settings.promote)
                mlflow.set_tags(
                    {
                        "promotion": "champion" if decision["promoted"] else "kept",
                        "promotion_reason": decision["reason"],
                    }
                )
                mlflow.log_metrics(
                    {
                        f"promotion.{key}": float(value)
                        for key, value in decision.items()
                        if isinstance(value, int | float)
                    }
                )
    except Exception as error:  # noqa: BLE001 (tracking server, database, registry errors)
        reason = (str(error).strip() or type(error).__name__).splitlines()[0]
        raise DataError(
            f"export: logging the model to MLflow at {mlflow.get_tracking_uri()} failed ({reason})"
        ) from None
    finally:
        if started:
            mlflow.end_run()
    version = info.registered_model_version
    logger.info(
        "Logged the export to MLflow run %s%s",
        run.info.run_id,
        f" as {settings.registered_model_name} version {version}" if version else "",
    )
    return {
        "logged": True,
        "tracking_uri": mlflow.get_tracking_uri(),
        "run_id": run.info.run_id,
        "model_uri": info.model_uri,
        "registered_model_name": settings.registered_model_name if version else None,
        "version": int(version) if version else None,
        "registered_model_uri": (
            f"models:/{settings.registered_model_name}/{version}" if version else None
        ),
        "promotion": decision,
        "settings": dataclasses.asdict(settings),
    }


@dataclass
class _Context:
    artifacts: dict[str, str]


def _requirements() -> list[str]:
    from importlib.metadata import version

    return [
        f"{name}=={version(name)}"
        for name in ("mlflow", "tensorflow", "keras", "pillow", "numpy", "pandas", "tqdm")
    ]
