"""The export as an MLflow pyfunc model, logged and registered in the model registry, and
the champion gate that decides which version to serve.

Input: a DataFrame with a binary column `image` (encoded image bytes; base64 in JSON
requests to `mlflow models serve`), and an optional `beam_size` parameter. Output: one row
per image with `caption`, `captions` (the beams, best first), `scores` and `error` (empty,
or why the image could not be captioned; the other rows are still captioned).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd

from caption_pipeline.data.images import ImageError
from caption_pipeline.errors import DataError
from caption_pipeline.evaluation.bootstrap import Interval, mean_interval, paired_interval
from caption_pipeline.params import from_params, require
from caption_pipeline.serving.inference import (
    MLFLOW_ARTIFACT,
    caption_each,
    caption_record,
    prepare_image,
)

logger = logging.getLogger(__name__)

PROMOTIONS = ("auto", "force", "skip")
CANDIDATE, CHAMPION = "candidate", "champion"  # the registry aliases
GATE_METRIC = "CIDEr"  # of the val split: what the gate compares (never a test figure)
PER_IMAGE_TAG = "val_per_image"  # version tag: its run's artifact of per-image val scores


@dataclass(frozen=True)
class GateSettings:
    """`params:export.mlflow.gate`: the paired bootstrap `promote` decides on."""

    confidence: float  # of the two-sided interval of the mean gain; its low end must be > 0
    samples: int  # bootstrap resamples
    seed: int  # of the resampling: the same scores give the same decision

    def __post_init__(self):
        checks = {"confidence": 0 < self.confidence < 1, "samples": self.samples >= 1}
        require("export.mlflow.gate", self, checks)


@dataclass(frozen=True)
class MlflowSettings:
    """`params:export.mlflow`."""

    log_model: bool
    register: bool  # a new version of `registered_model_name` per run
    registered_model_name: str
    run_name: str  # of the run started when none is active
    promote: str  # auto: champion if its val gain is above the noise (`gate`); force; skip
    gate: GateSettings

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
        from caption_pipeline.serving.export import ExportedCaptioner

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
        results = caption_each(self.model, ready, beam_size) if ready else []
        for i, result in zip(where, results, strict=True):
            if isinstance(result, str):  # the graph refused this image alone
                rows[i] = {
                    "caption": "",
                    "captions": [],
                    "scores": [],
                    "error": f"row {i}: {result}",
                }
                continue
            record = caption_record(*result, self.model.info["grid"])
            rows[i] = {
                "caption": record["caption"],
                "captions": [beam["caption"] for beam in record["beams"]],
                "scores": [beam["score"] for beam in record["beams"]],
                "error": "",
            }
        return pd.DataFrame(rows, columns=["caption", "captions", "scores", "error"])


def model_signature(default_beam_size: int):
    """The pyfunc's MLflow signature, declared: what `mlflow.models.infer_signature` makes of
    `CaptionerModel.predict`'s fixed columns (tests/test_export_mlflow.py compares the two).
    Inferring it loaded the export once more only to read the output's types, 1.7 GB for a
    COCO export (docs/benchmarks.md, "The export's memory"); MLflow's `log_model` still
    loads the logged model once to run it on the input example."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import Array

    return ModelSignature(
        inputs=Schema([ColSpec("binary", "image")]),
        outputs=Schema(
            [
                ColSpec("string", "caption"),
                ColSpec(Array("string"), "captions"),
                ColSpec(Array("double"), "scores"),
                ColSpec("string", "error"),
            ]
        ),
        params=ParamSchema([ParamSpec("beam_size", "long", default_beam_size)]),
    )


@dataclass(frozen=True)
class ValScore:
    """What the champion gate compares: the val split's `GATE_METRIC` (`value`), the digest of
    the val captions it was scored against (`tracking.caption_digest`: two versions are compared
    only when they were scored on the same val captions), and each val image's score
    (`per_image`, image id -> score; None where there are none, and then the version is
    compared with no champion). A split's CIDEr-D is the mean of its images' (pycocoevalcap's
    `Cider.compute_score`), so `per_image` must average to `value`: else they come from two
    evaluations, and the gate would decide on scores that are not the registered model's."""

    value: float
    val_digest: str
    per_image: Mapping[int, float] | None

    def __post_init__(self):
        if self.per_image is None:
            return
        if not self.per_image:
            raise DataError(f"no per-image val {GATE_METRIC}: the gate has nothing to pair")
        mean = math.fsum(self.per_image.values()) / len(self.per_image)
        if not math.isclose(mean, self.value, rel_tol=1e-9, abs_tol=1e-9):
            raise DataError(
                f"the per-image val {GATE_METRIC} of {len(self.per_image)} images average "
                f"{mean:.6f}, not metrics.json's val {GATE_METRIC} {self.value:.6f}: they are "
                "of two evaluations; run `kedro run --pipelines=evaluate` first"
            )

    @classmethod
    def of_evaluation(
        cls,
        metrics: Mapping[str, Any],
        caption_table: pd.DataFrame,
        caption_scores: pd.DataFrame | None,
    ) -> ValScore:
        """The val score of metrics.json, the digest of the caption table's val captions, and
        the val rows of `caption_scores` (the per-image table of evaluate; None: no rows)."""
        from caption_pipeline.tracking.runs import caption_digest

        return cls(
            float(metrics["val"][GATE_METRIC]),
            caption_digest(caption_table[caption_table["split"] == "val"]),
            None if caption_scores is None else _split_scores(caption_scores, "val"),
        )


def _split_scores(caption_scores: pd.DataFrame, split: str) -> dict[int, float]:
    """image id -> `GATE_METRIC` of the `split` rows of the per-image score table."""
    if GATE_METRIC not in caption_scores.columns:
        raise DataError(
            f"caption_scores: no {GATE_METRIC} column (has {list(caption_scores.columns)})"
        )
    rows = caption_scores.loc[caption_scores["split"] == split]
    if rows["image_id"].duplicated().any():
        raise DataError(f"caption_scores: an image of split {split} has more than one row")
    return {int(i): float(v) for i, v in zip(rows["image_id"], rows[GATE_METRIC], strict=True)}


class NotComparable(Exception):
    """Why the candidate cannot be compared with the champion: the reason it is not promoted."""


def promote(
    client, name: str, version: str, score: ValScore, mode: str, gate: GateSettings
) -> dict[str, Any]:
    """Alias `version` of registered model `name` as the candidate, and as the champion when
    `mode` is "force", or "auto" and there is no champion yet or its val gain is above the
    noise: the low end of the two-sided `gate.confidence` paired bootstrap interval
    (`bootstrap.paired_interval`) of the mean per-image `GATE_METRIC` gain over the champion,
    on the same val images and captions, is > 0. Val CIDEr moves by about 5 % between runs of
    one commit, so promoting on any gain promotes noise; promoted on the low end of a two-sided
    95 % interval, a version no better than the champion is promoted about 2.5 % of the time.
    A champion it cannot be paired with (other val captions or images, or no per-image scores:
    registered before this gate) is kept, with that reason; `force` replaces it.

    The version keeps its per-image scores (an artifact of its run, which its `val_per_image`
    tag names) for the versions after it. The decision, its reason, both figures and the
    interval (`promotion.gain_low`, ...) are tags of the version and are returned (for the
    run); so is the interval of the version's own val score (`promotion.val_CIDEr_low`, ...,
    `bootstrap.mean_interval`), which every version with per-image scores has, the first one
    (no champion to gain over) included."""
    _record_score(client, name, version, score)
    client.set_registered_model_alias(name, CANDIDATE, version)
    champion = _aliased(client, name, CHAMPION)
    old = None if champion is None else champion.tags.get(f"val.{GATE_METRIC}")
    gain, why_not = None, None
    if champion is not None:
        try:
            gain = _paired_gain(client, champion, score, gate)
        except NotComparable as error:
            why_not = f"not comparable: {error}"
    promoted, reason = _decision(mode, champion, score, gain, why_not)
    if promoted:
        client.set_registered_model_alias(name, CHAMPION, version)
    interval = _interval_record(gain, _score_interval(score, gate))
    decision = {
        "promoted": promoted,
        "reason": reason,
        f"val_{GATE_METRIC}": score.value,
        "previous_champion": None if champion is None else int(champion.version),
        f"previous_champion_val_{GATE_METRIC}": None if old is None else float(old),
        **interval,
    }
    client.set_model_version_tag(name, version, "promotion", "champion" if promoted else "kept")
    client.set_model_version_tag(name, version, "promotion_reason", reason)
    for key, value in interval.items():
        if value is not None:
            client.set_model_version_tag(name, version, f"promotion.{key}", f"{value:.6g}")
    logger.info(
        "%s version %s: %s (%s)",
        name,
        version,
        "now the champion" if promoted else "not promoted",
        reason,
    )
    return decision


def _record_score(client, name: str, version: str, score: ValScore) -> None:
    """Tag `version` with its val score and digest, and log its per-image scores as a JSON
    artifact of its run (image id -> score), named by its `val_per_image` tag: what the gate
    pairs the next versions with, once this one is the champion."""
    client.set_model_version_tag(name, version, f"val.{GATE_METRIC}", f"{score.value:.6f}")
    client.set_model_version_tag(name, version, "val_digest", score.val_digest)
    if score.per_image is None:
        return
    run_id = client.get_model_version(name, version).run_id
    if not run_id:
        raise DataError(f"{name} version {version} has no run to keep its per-image val scores")
    path = f"champion_gate/version-{version}.val_{GATE_METRIC}_per_image.json"
    client.log_dict(run_id, {str(i): v for i, v in sorted(score.per_image.items())}, path)
    client.set_model_version_tag(name, version, PER_IMAGE_TAG, path)


def _paired_gain(client, champion, score: ValScore, gate: GateSettings) -> Interval:
    """The bootstrap interval of the mean per-image gain of `score` over `champion` (a model
    version), or NotComparable saying why the two cannot be paired image for image."""
    if champion.tags.get("val_digest") != score.val_digest:
        raise NotComparable(f"champion version {champion.version} was scored on other val captions")
    if score.per_image is None:
        raise NotComparable(f"this version has no per-image val {GATE_METRIC}")
    path = champion.tags.get(PER_IMAGE_TAG)
    if path is None:
        raise NotComparable(
            f"champion version {champion.version} has no per-image val {GATE_METRIC} "
            "(registered before the paired bootstrap gate); export.mlflow.promote=force "
            "replaces it"
        )
    theirs = _read_per_image(client, champion, path)
    if set(theirs) != set(score.per_image):
        shared = len(set(theirs) & set(score.per_image))
        raise NotComparable(
            f"champion version {champion.version} was scored on other val images "
            f"({shared} shared, {len(theirs)} and {len(score.per_image)} in all)"
        )
    ids = sorted(theirs)
    return paired_interval(
        [score.per_image[i] for i in ids],
        [theirs[i] for i in ids],
        gate.confidence,
        gate.samples,
        gate.seed,
    )


def _read_per_image(client, champion, path: str) -> dict[int, float]:
    """The per-image scores `champion` logged at `path` of its run; NotComparable if they
    cannot be read (the reason is the decision's: `force` still replaces it)."""
    try:
        with tempfile.TemporaryDirectory() as folder:
            local = client.download_artifacts(champion.run_id, path, folder)
            scores = json.loads(Path(local).read_text())
            return {int(i): float(v) for i, v in scores.items()}
    except Exception as error:  # noqa: BLE001 (artifact store, file, JSON errors)
        reason = (str(error).strip() or type(error).__name__).splitlines()[0]
        raise NotComparable(
            f"the per-image val {GATE_METRIC} of champion version {champion.version} could not "
            f"be read from {path} of run {champion.run_id} ({reason})"
        ) from None


def _decision(
    mode: str, champion, score: ValScore, gain: Interval | None, why_not: str | None
) -> tuple[bool, str]:
    """(promoted, reason) for `mode`, given the champion (None: there is none) and the
    interval of the gain over it (None: not comparable, `why_not`)."""
    if mode == "skip":
        return False, "promotion skipped (export.mlflow.promote: skip)"
    if mode == "force":
        return True, "promotion forced (export.mlflow.promote: force)"
    if champion is None:
        return True, "no champion yet"
    if gain is None:
        return False, str(why_not)
    above = gain.low > 0
    old = float(champion.tags[f"val.{GATE_METRIC}"])
    return above, (
        f"val {GATE_METRIC} {score.value:.4f} vs {old:.4f} of version {champion.version}: "
        f"gain {gain.mean:+.4f}, {gain.confidence * 100:g} % interval [{gain.low:+.4f}, "
        f"{gain.high:+.4f}] over {gain.n} val images, low end "
        + ("> 0: above the noise" if above else "<= 0: within the noise")
    )


def _score_interval(score: ValScore, gate: GateSettings) -> Interval | None:
    """The bootstrap interval of the version's own val score (None: no per-image scores)."""
    if score.per_image is None:
        return None
    values = [score.per_image[i] for i in sorted(score.per_image)]
    return mean_interval(values, gate.confidence, gate.samples, gate.seed)


def _interval_record(gain: Interval | None, own: Interval | None) -> dict[str, float | int | None]:
    """The intervals' figures for the decision and the version's `promotion.*` tags: of the
    gain over the champion, and of the version's own val score."""
    either = gain or own
    return {
        "gain": None if gain is None else gain.mean,
        "gain_low": None if gain is None else gain.low,
        "gain_high": None if gain is None else gain.high,
        f"val_{GATE_METRIC}_low": None if own is None else own.low,
        f"val_{GATE_METRIC}_high": None if own is None else own.high,
        "confidence": None if either is None else either.confidence,
        "images": None if either is None else either.n,
        "bootstrap_samples": None if either is None else either.samples,
    }


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
    if not settings.log_model:
        return {"logged": False}
    example = pd.DataFrame({"image": [example_image]})
    params = {"beam_size": default_beam_size}
    signature = model_signature(default_beam_size)
    package = Path(__file__).parents[1]  # caption_pipeline/, whole
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
                decision = promote(
                    client, name, version, val_score, settings.promote, settings.gate
                )
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


def _requirements() -> list[str]:
    from importlib.metadata import version

    return [
        f"{name}=={version(name)}"
        for name in ("mlflow", "tensorflow", "keras", "pillow", "numpy", "pandas", "tqdm")
    ]
