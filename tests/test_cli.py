"""The `caption-pipeline` command (issue 5): `caption` on files and folders, errors, `run`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from caption_pipeline.__main__ import argv_with_default
from tests.helpers import EXPORT_DIR

COMMAND = str(Path(sys.executable).with_name("caption-pipeline"))


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run(
        [COMMAND, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_caption_files_and_a_folder_reports_bad_files_and_goes_on(
    smoke_project, exported, tmp_path
):
    """A folder with good images, a non-image, a truncated JPEG and a nested folder; a
    missing file on the command line: every image is captioned, each bad one reported."""
    folder = tmp_path / "photos"
    (folder / "nested").mkdir(parents=True)
    sources = sorted((smoke_project / "data/01_raw/shapes/test").glob("*.jpg"))[:3]
    shutil.copy(sources[0], folder / "a.jpg")
    shutil.copy(sources[1], folder / "nested" / "b.JPG")
    (folder / "c.png").write_bytes(b"this is not a png")
    (folder / "d.jpg").write_bytes(sources[2].read_bytes()[:1200])
    (folder / "notes.txt").write_text("ignored: not an image suffix")
    result = _run(
        "caption",
        str(sources[2]),
        str(folder),
        str(tmp_path / "missing.jpg"),
        "--beam-size",
        "2",
        cwd=smoke_project,
    )
    assert result.returncode == 1, result.stderr[-2000:]
    assert "3 of 6 images could not be captioned" in result.stderr
    assert "Traceback" not in result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    by_name = {Path(line["path"]).name: line for line in lines}
    assert sorted(by_name) == sorted(
        ["a.jpg", "b.JPG", "c.png", "d.jpg", "missing.jpg", sources[2].name]
    )
    assert by_name["c.png"]["error"]["code"] == "not_an_image"
    assert by_name["d.jpg"]["error"]["code"] == "truncated"
    assert by_name["missing.jpg"]["error"]["code"] == "missing"
    for name, source in (
        ("a.jpg", sources[0]),
        ("b.JPG", sources[1]),
        (sources[2].name, sources[2]),
    ):
        out = exported.caption([source.read_bytes()], 2)
        assert by_name[name]["caption"] == out["caption"][0]
        np.testing.assert_allclose(
            [b["score"] for b in by_name[name]["beams"]], out["scores"][0], atol=1e-3
        )
    assert "caption: 100%" in result.stderr  # the folder's progress bar


def test_caption_output_file_with_attention(smoke_project, tmp_path):
    image = sorted((smoke_project / "data/01_raw/shapes/test").glob("*.jpg"))[0]
    output = tmp_path / "captions.jsonl"
    result = _run(
        "caption",
        str(image),
        "--attention",
        "--output",
        str(output),
        "--model",
        str(smoke_project / EXPORT_DIR),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout == ""
    (record,) = [json.loads(line) for line in output.read_text().splitlines()]
    assert record["path"] == str(image)
    assert len(record["attention"]["maps"]) == len(record["attention"]["words"])


def test_missing_model_and_bad_options_are_one_clear_error(smoke_project, tmp_path):
    image = str(sorted((smoke_project / "data/01_raw/shapes/test").glob("*.jpg"))[0])
    cases = [
        (["caption", image, "--model", str(tmp_path / "nope")], tmp_path, "no such folder"),
        (["caption", image], tmp_path, "not a caption-pipeline project"),
        (["caption", image, "--model", str(tmp_path)], tmp_path, "not a caption-pipeline export"),
        (["caption", image, "--beam-size", "9"], smoke_project, "must be in 1..5"),
        (["serve", "--model", str(tmp_path / "nope")], tmp_path, "no such folder"),
        (["serve", "--threads", "0"], smoke_project, "serve.threads must be an integer >= 1"),
    ]
    for args, cwd, message in cases:
        result = _run(*args, cwd=cwd)
        assert result.returncode != 0, args
        assert message in result.stderr, (args, result.stderr[-1500:])
        assert "Traceback" not in result.stderr, args


def test_run_stays_the_default_command(smoke_project):
    assert argv_with_default([]) == ["run"]
    assert argv_with_default(["--pipelines=vocab"]) == ["run", "--pipelines=vocab"]
    assert argv_with_default(["caption", "x.jpg"]) == ["caption", "x.jpg"]
    result = _run("run", "--help", cwd=smoke_project)
    assert result.returncode == 0 and "--pipelines" in result.stdout


def test_an_image_the_graph_refuses_fails_alone():
    """`inference.caption_each`, shared by the CLI and the MLflow pyfunc (hence Spark's batch
    job): a batch the graph refuses (`export.RefusedImages`, what `ExportedCaptioner.caption`
    raises for the graph's InvalidArgumentError) is split down to the image, whose reason
    stands in its place; a setting's error (another DataError) ends the call."""
    import pytest

    from caption_pipeline.errors import DataError
    from caption_pipeline.serving.export import RefusedImages
    from caption_pipeline.serving.inference import caption_each

    class Graph:
        calls = 0

        def caption(self, images, beam_size):
            Graph.calls += 1
            if beam_size == 9:
                raise DataError("beam_size 9: expected 1 to 5")
            if b"webp" in images:
                raise RefusedImages("images: Unknown image file format\nstack trace")
            if b"crash" in images:
                raise ValueError("op failed")
            return {"batch": list(images)}

    images = [b"a", b"b", b"webp", b"c", b"d"]
    results = caption_each(Graph(), images, 3)
    assert results[2] == "images: Unknown image file format"
    good = [r for r in results if not isinstance(r, str)]
    assert [outputs["batch"][i] for outputs, i in good] == [b"a", b"b", b"c", b"d"]
    assert Graph.calls < 2 * len(images)
    assert caption_each(Graph(), [b"a", b"crash"], 3)[1] == "op failed"
    with pytest.raises(DataError, match="beam_size 9"):
        caption_each(Graph(), images, 9)
