"""`caption_batch` (issue 28) on the smoke project's registered `image-captioner`, on a
local[2] Spark session: good images get the CLI's captions, bad files their error without
failing the job, a re-run replaces the output, the hook stops the session (after a failure
too), and the champion alias resolves inside the executors against the project's registry.

Two `kedro run --pipelines=caption_batch` (the second a re-run) and one Spark session in this
process: each run starts a JVM and loads the model once per Python worker."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from tests.helpers import run_kedro

pytestmark = pytest.mark.slow

GOOD = 20
BAD = {  # file -> the reason its error starts with
    "empty.jpg": "empty",
    "truncated.jpg": "truncated",
    "notes.jpg": "not_an_image",
    "huge.png": "too_large",
}
CHAMPION = "models:/image-captioner@champion"


@pytest.fixture(scope="module")
def images(smoke_project, tmp_path_factory) -> Path:
    """GOOD shapes JPEGs of the smoke data (one as PNG, in a sub-folder, one with a space and
    an accent in its name, which Spark's file listing URL-encodes), BAD files, and a text file
    the extension filter leaves out."""
    folder = tmp_path_factory.mktemp("batch") / "images"
    (folder / "nested").mkdir(parents=True)
    jpegs = sorted((smoke_project / "data/01_raw/shapes/train").rglob("*.jpg"))[:GOOD]
    assert len(jpegs) == GOOD
    for i, jpeg in enumerate(jpegs[:-1]):
        name = f"good_{i:02d}.jpg" if i else "good café 00.jpg"
        (folder / name).write_bytes(jpeg.read_bytes())
    Image.open(jpegs[-1]).save(folder / "nested" / "good_png.png")
    (folder / "empty.jpg").write_bytes(b"")
    data = jpegs[0].read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "notes.jpg").write_text("not a photo\n")
    Image.new("1", (7072, 7072)).save(folder / "huge.png")  # 50.01 MP, over the 50 MP limit
    (folder / "readme.txt").write_text("skipped\n")
    return folder


def caption_batch(project: Path, images: Path, output: Path) -> pd.DataFrame:
    """`kedro run --pipelines=caption_batch` on a local[2] master; its Parquet output."""
    params = f"caption_batch.input={images},caption_batch.output={output}"
    result = run_kedro(
        project, "run", "--env", "smoke", "--pipelines=caption_batch", f"--params={params}"
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "Spark session stopped" in result.stderr + result.stdout
    return pd.read_parquet(output).assign(name=lambda f: f["path"].map(lambda p: Path(p).name))


@pytest.fixture(scope="module")
def runs(smoke_project, images, tmp_path_factory):
    """The output of a first run and of a re-run over the same input and output, on local[2]
    (set as a user's conf/<env>/spark.yml would, for these runs only)."""
    spark_conf = smoke_project / "conf/smoke/spark.yml"
    spark_conf.write_text("spark.master: local[2]\n")
    output = tmp_path_factory.mktemp("batch_out") / "captions.parquet"
    try:
        first = caption_batch(smoke_project, images, output)
        summary = json.loads(
            (smoke_project / "data/08_reporting/caption_batch_summary.json").read_text()
        )
        again = caption_batch(smoke_project, images, output)
    finally:
        spark_conf.unlink()
    return first, summary, again


@pytest.fixture(scope="module")
def cli_captions(smoke_project, images) -> dict[str, dict]:
    """`caption-pipeline caption` on the same folder and model: record by file name."""
    command = str(Path(sys.executable).with_name("caption-pipeline"))
    done = subprocess.run(
        [command, "caption", str(images), "--model", CHAMPION],
        cwd=smoke_project,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 1, done.stderr[-3000:]  # 1: some files were refused
    records = [json.loads(line) for line in done.stdout.splitlines()]
    return {Path(r["path"]).name: r for r in records}


def champion_version(project: Path) -> str:
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    return str(client.get_model_version_by_alias("image-captioner", "champion").version)


def test_good_images_get_the_cli_captions(runs, cli_captions, smoke_project):
    first, _, _ = runs
    good = first[first["error"].isna()].set_index("name")
    assert len(good) == GOOD
    for name, row in good.iterrows():
        expected = cli_captions[name]
        assert row["caption"] == expected["caption"], name
        assert list(row["captions"]) == [beam["caption"] for beam in expected["beams"]], name
    assert set(first["model_version"]) == {champion_version(smoke_project)}
    assert list(first.columns[:-1]) == [
        "path",
        "caption",
        "captions",
        "scores",
        "error",
        "model_version",
        "captioned_at",
    ]


def test_bad_files_get_their_error_and_the_job_succeeds(runs, cli_captions):
    first, summary, _ = runs
    bad = first[first["error"].notna()].set_index("name")
    assert sorted(bad.index) == sorted(BAD)
    for name, reason in BAD.items():
        assert bad.loc[name, "error"].startswith(reason), bad.loc[name, "error"]
        assert pd.isna(bad.loc[name, "caption"]) and bad.loc[name, "captions"] is None
        assert cli_captions[name]["error"]["code"] == reason
    assert "readme.txt" not in set(first["name"])
    assert summary["images"] == GOOD + len(BAD) and summary["captioned"] == GOOD
    assert summary["refused"] == {reason: 1 for reason in BAD.values()}


def test_a_rerun_replaces_the_output(runs):
    first, _, again = runs
    assert len(again) == len(first) and again["path"].is_unique
    assert again["captioned_at"].min() > first["captioned_at"].max()
    columns = ["name", "caption", "error"]
    pd.testing.assert_frame_equal(
        again[columns].sort_values("name").reset_index(drop=True),
        first[columns].sort_values("name").reset_index(drop=True),
    )


def test_the_hook_stops_spark_and_the_champion_resolves_in_the_executors(
    smoke_project, runs, monkeypatch
):
    """The hook's session (local[2], as spark.yml sets it for an environment) is started only
    for a pipeline with a `spark` node and stopped after a failed run too; inside its executors
    the champion alias resolves against the project's sqlite registry, as the driver's."""
    import mlflow
    from kedro.pipeline import Node, Pipeline
    from pyspark.sql import SparkSession

    from caption_pipeline.serving.spark_session import SPARK_TAG, SparkSessionHooks

    class Context:
        config_loader = {"spark": {"spark.master": "local[2]", "spark.ui.enabled": False}}

    def spark_pipeline(tags):
        return Pipeline([Node(len, "x", "y", tags=tags)])

    hooks = SparkSessionHooks()
    hooks.after_context_created(Context())
    hooks.before_pipeline_run({}, spark_pipeline([]))
    assert SparkSession.getActiveSession() is None  # no spark node, no JVM session

    # The environment, not mlflow.set_tracking_uri: a URI set in the process would outlive the
    # test and hide other tests' MLFLOW_TRACKING_URI (MLflow prefers the one set), so any set
    # one is put aside for the test and restored after it.
    from mlflow.tracking._tracking_service import utils as tracking_utils

    monkeypatch.setattr(tracking_utils, "_tracking_uri", None)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{smoke_project / 'mlflow.db'}")
    assert mlflow.get_tracking_uri() == f"sqlite:///{smoke_project / 'mlflow.db'}"
    try:
        hooks.before_pipeline_run({}, spark_pipeline([SPARK_TAG]))
        spark = SparkSession.getActiveSession()
        assert spark is not None and spark.sparkContext.master == "local[2]"

        def executor_champion(_):
            import os

            import mlflow

            client = mlflow.MlflowClient()  # from the executor's environment alone
            version = client.get_model_version_by_alias("image-captioner", "champion").version
            return os.environ["MLFLOW_TRACKING_URI"], str(version)

        seen = spark.sparkContext.parallelize([0, 1], 2).map(executor_champion).collect()
    finally:
        hooks.on_pipeline_error()  # as Kedro calls it when a node raised
    assert SparkSession.getActiveSession() is None
    uri = f"sqlite:///{smoke_project / 'mlflow.db'}"
    assert seen == [(uri, champion_version(smoke_project))] * 2


def test_a_bad_setting_is_one_line_naming_it():
    """A list cannot come through `--params` (it splits on commas): a string given for
    `extensions` would be read letter by letter into a glob matching nothing."""
    from caption_pipeline.errors import DataError
    from caption_pipeline.serving.batch_captioning import BatchSettings

    good = {
        "input": "photos/",
        "recursive": True,
        "extensions": ["jpg"],
        "model": CHAMPION,
        "beam_size": None,
        "output": "out.parquet",
    }
    assert BatchSettings.from_params(good).extensions == ["jpg"]
    for key, value in (("extensions", "jpg"), ("beam_size", "3"), ("beam_size", 0)):
        with pytest.raises(DataError, match=rf"^parameters caption_batch\.{key}: invalid value"):
            BatchSettings.from_params({**good, key: value})
