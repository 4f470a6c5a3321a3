"""Batch captioning on Apache Spark: a folder (or any URI Spark reads) of images in, one
Parquet row per image out, captioned by a registered MLflow model through
`mlflow.pyfunc.spark_udf`.

The work is Spark's, not a loop over files: `binaryFile` lists and reads the images on the
executors, the pyfunc (`mlflow_model.CaptionerModel`) captions each Arrow batch, loaded once
per Python worker (spark_udf's model cache), and the Parquet writer's commit protocol makes
the output all or nothing (a failed run leaves none: the previous one is replaced from the
start). A bad image is the pyfunc's business: it answers that row with an
`error` and captions the others, so one file never fails a task.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from caption_pipeline.errors import DataError
from caption_pipeline.params import from_params, require

logger = logging.getLogger(__name__)

OUTPUT_COLUMNS = ("path", "caption", "captions", "scores", "error", "model_version", "captioned_at")
# The pyfunc's output (mlflow_model.model_signature), as Spark declares it.
RESULT_TYPE = "caption string, captions array<string>, scores array<double>, error string"
_REGISTERED = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


@dataclass(frozen=True)
class BatchSettings:
    """`params:caption_batch`."""

    input: str  # a folder, a glob, or any URI Spark reads (s3a://, gs://, hdfs://)
    recursive: bool  # into sub-folders (Spark's recursiveFileLookup)
    extensions: list[str]  # file name endings read (case-insensitive), e.g. [jpg, png]
    model: str  # models:/NAME@ALIAS, models:/NAME/VERSION, runs:/... or a pyfunc folder
    beam_size: int | None  # None: the export's default
    output: str  # the Parquet folder, replaced by each run

    def __post_init__(self):
        beam = self.beam_size
        checks = {
            "input": isinstance(self.input, str) and bool(self.input),
            # a list: `--params` splits on commas, so a list is set in conf/, never there
            "extensions": isinstance(self.extensions, list)
            and bool(self.extensions)
            and all(isinstance(e, str) and e for e in self.extensions),
            "beam_size": beam is None
            or (isinstance(beam, int) and not isinstance(beam, bool) and beam >= 1),
            "output": isinstance(self.output, str) and bool(self.output),
        }
        require("caption_batch", self, checks)

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> BatchSettings:
        return from_params(cls, params, "caption_batch")


def path_glob(extensions: list[str]) -> str:
    """Spark's `pathGlobFilter` for these endings in either case: `*.{jpg,JPG,png,PNG}`. The
    filter is a Hadoop glob, case-sensitive, and cameras write `.JPG`."""
    endings = sorted({e.lstrip(".") for x in extensions for e in (x.lower(), x.upper())})
    return "*.{" + ",".join(endings) + "}"


def pinned_model(uri: str) -> tuple[str, str]:
    """(URI of one fixed model, its version) for `uri`. An alias is resolved once, on the
    driver, against the current registry: every executor then loads that version, even if
    the alias moves during the job, and each row can say which version wrote it. Other URIs
    (runs:/, a folder) are their own version."""
    found = _REGISTERED.match(uri)
    if not found:
        return uri, uri
    if found["version"]:
        return uri, found["version"]
    import mlflow

    try:
        version = mlflow.MlflowClient().get_model_version_by_alias(found["name"], found["alias"])
    except mlflow.exceptions.MlflowException as error:
        reason = (str(error).strip() or type(error).__name__).splitlines()[0]
        raise DataError(
            f"parameters caption_batch.model: {uri} is not in the registry at "
            f"{mlflow.get_registry_uri()} ({reason})"
        ) from None
    return f"models:/{found['name']}/{version.version}", str(version.version)


def read_images(spark, settings: BatchSettings):
    """(path, image) rows of the image files under `settings.input`, read lazily by Spark,
    zero-byte files included (`_empty_files`)."""
    from pyspark.errors import AnalysisException

    try:
        files = (
            spark.read.format("binaryFile")
            .option("pathGlobFilter", path_glob(settings.extensions))
            .option("recursiveFileLookup", str(settings.recursive).lower())
            .load(settings.input)
        )
    except AnalysisException as error:  # no such folder, an unknown file system, ...
        reason = (str(error).strip() or type(error).__name__).splitlines()[0]
        raise DataError(f"parameters caption_batch.input: {settings.input}: {reason}") from None
    images = files.select("path", spark_functions().col("content").alias("image"))
    return images.unionByName(_empty_files(spark, files))


def _empty_files(spark, files):
    """The files that `files` lists but gives no row: Spark plans no split for a zero-byte
    file, so `binaryFile` skips it, and it would vanish from the output instead of being
    refused. Its listing (the file index, already on the driver) still names it; given empty
    content, the pyfunc refuses it as `empty` like any other bad image. Only paths are read
    for the anti-join: `binaryFile` opens no file when `content` is not selected. The listing
    writes a local file as `file:///x`, URL-encoded (`my%20photo.jpg`), the rows (Hadoop's
    Path) as `file:/x`, not encoded."""
    F = spark_functions()
    paths = [(unquote(re.sub(r"^file:///", "file:/", path)),) for path in files.inputFiles()]
    listed = spark.createDataFrame(paths, "path string")
    missing = listed.join(files.select("path"), "path", "left_anti")
    return missing.withColumn("image", F.lit(b"").cast("binary"))


def caption_frame(spark, images, model_uri: str, version: str, beam_size: int | None):
    """`images` with the pyfunc's captions, as OUTPUT_COLUMNS. A refused image's row keeps
    its `error` (the reason first: `empty`, `truncated`, `not_an_image`, `too_large`, ...)
    and has null captions; a captioned one has a null `error`."""
    import mlflow.pyfunc

    F = spark_functions()
    udf = mlflow.pyfunc.spark_udf(
        spark,
        model_uri,
        result_type=RESULT_TYPE,
        env_manager="local",  # the executors' Python is this one (the `spark` extra)
        params=None if beam_size is None else {"beam_size": beam_size},
    )
    out = images.withColumn("out", udf("image"))
    # The pyfunc names a bad row by its index in its batch ("row 3: empty ..."): the path says it.
    error = F.regexp_replace("out.error", r"^row \d+: ", "")
    refused = F.col("out.error") != ""
    return out.select(
        "path",
        F.when(~refused, F.col("out.caption")).alias("caption"),
        F.when(~refused, F.col("out.captions")).alias("captions"),
        F.when(~refused, F.col("out.scores")).alias("scores"),
        F.when(refused, error).alias("error"),
        F.lit(version).alias("model_version"),
        F.current_timestamp().alias("captioned_at"),
    )


def write_parquet(frame, output: str) -> None:
    """Replace `output` with `frame`, through Spark's commit protocol: tasks write to a
    temporary folder and the job commits them at its end, so a failed job leaves no
    half-written output, and a re-run replaces rather than appends. The previous output is
    deleted when the job starts (overwrite): a failed re-run leaves none, never a mix."""
    frame.write.mode("overwrite").parquet(output)


def summarize(spark, output: str) -> dict[str, Any]:
    """Counts of the written output, read back in one pass (the captions are not computed
    twice): images, captioned, refused by kind (the first word of `error`), and a digest of
    its rows, independent of their order (xor of each row's xxhash64)."""
    F = spark_functions()
    frame = spark.read.parquet(output)
    kind = F.regexp_extract("error", r"^(\w+)", 1)
    row_hash = F.xxhash64("path", "caption", "error", "model_version")
    totals = frame.agg(
        F.count(F.lit(1)).alias("images"),
        F.count("caption").alias("captioned"),
        F.bit_xor(row_hash).alias("digest"),
    ).first()
    refused = frame.where(F.col("error").isNotNull()).groupBy(kind.alias("kind")).count().collect()
    return {
        "images": int(totals["images"]),
        "captioned": int(totals["captioned"]),
        "refused": {row["kind"]: int(row["count"]) for row in sorted(refused)},
        "digest": f"{(totals['digest'] or 0) & (2**64 - 1):016x}",
    }


def caption_batch(spark, settings: BatchSettings) -> dict[str, Any]:
    """Caption every image of `settings.input` into `settings.output` (Parquet); return the
    run's summary: model, counts, digest and throughput."""
    started = time.perf_counter()
    model_uri, version = pinned_model(settings.model)
    images = read_images(spark, settings)
    write_parquet(
        caption_frame(spark, images, model_uri, version, settings.beam_size), settings.output
    )
    seconds = time.perf_counter() - started
    summary = summarize(spark, settings.output)
    summary |= {
        "input": settings.input,
        "output": settings.output,
        "model": settings.model,
        "model_uri": model_uri,
        "model_version": version,
        "beam_size": settings.beam_size,
        "seconds": round(seconds, 3),
        "images_per_s": round(summary["images"] / seconds, 3) if seconds else 0.0,
    }
    logger.info(
        "caption_batch: %d images, %d captioned, refused %s, in %.1f s (%.2f images/s) "
        "with %s (version %s) -> %s",
        summary["images"],
        summary["captioned"],
        summary["refused"] or "none",
        seconds,
        summary["images_per_s"],
        settings.model,
        version,
        settings.output,
    )
    return summary


def log_to_mlflow(spark, summary: Mapping[str, Any]) -> None:
    """The summary in the active MLflow run (kedro-mlflow's): counts and throughput as
    metrics, model and input as tags, and the Parquet output as a dataset with its digest
    (MLflow records datasets as run inputs; its context says `output`)."""
    import mlflow

    if mlflow.active_run() is None:
        return
    refused = {f"caption_batch.refused.{k}": v for k, v in summary["refused"].items()}
    mlflow.log_metrics(
        {
            "caption_batch.images": summary["images"],
            "caption_batch.captioned": summary["captioned"],
            "caption_batch.refused": sum(summary["refused"].values()),
            "caption_batch.images_per_s": summary["images_per_s"],
            "caption_batch.seconds": summary["seconds"],
            **refused,
        }
    )
    mlflow.set_tags(
        {
            "caption_batch.model_uri": summary["model_uri"],
            "caption_batch.model_version": summary["model_version"],
            "caption_batch.input": summary["input"],
        }
    )
    dataset = mlflow.data.from_spark(
        spark.read.parquet(summary["output"]),
        path=summary["output"],
        name="batch-captions",
        digest=summary["digest"],
    )
    mlflow.log_input(dataset, context="output", tags={"images": str(summary["images"])})


def spark_functions():
    """`pyspark.sql.functions`, imported when used: pyspark is the optional `spark` extra."""
    from pyspark.sql import functions

    return functions
