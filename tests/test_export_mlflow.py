"""The export in MLflow (issue 5): one registered version per run, `mlflow models serve`."""

from __future__ import annotations

import base64
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import requests

from tests.helpers import free_port, run_kedro, start_server, stop_server


def _registration(project: Path) -> dict:
    return json.loads((project / "data/08_reporting/export_registration.json").read_text())


def test_every_export_run_registers_a_new_version(smoke_project, tmp_path):
    """A second `kedro run --pipelines=export` in a copy of the project: version 2."""
    import pandas as pd
    from mlflow import MlflowClient

    first = _registration(smoke_project)
    assert first["registered_model_name"] == "image-captioner" and first["version"] >= 1
    project = tmp_path / "project"
    shutil.copytree(smoke_project, project)
    result = run_kedro(project, "run", "--env", "smoke", "--pipelines", "export")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    second = _registration(project)
    assert second["version"] == first["version"] + 1
    assert second["run_id"] != first["run_id"]
    client = MlflowClient(tracking_uri=second["tracking_uri"])
    versions = client.search_model_versions("name='image-captioner'")
    assert sorted(int(v.version) for v in versions) == [first["version"], second["version"]]
    model = client.get_model_version("image-captioner", str(second["version"]))
    assert model.run_id == second["run_id"]
    metrics = json.loads((project / "data/08_reporting/metrics.json").read_text())
    assert float(model.tags["test.CIDEr"]) == round(metrics["test"]["CIDEr"], 4)
    # The same model scores the same val CIDEr: the new version is the candidate, and the
    # champion stays the first (issue 14: promoted only when better on val; issue 26: when the
    # paired bootstrap interval of the per-image gain is above 0). The same per-image scores:
    # a gain of 0 in [0, 0], recorded on the version.
    promotion = second["promotion"]
    assert not promotion["promoted"], promotion
    assert promotion["gain"] == promotion["gain_low"] == promotion["gain_high"] == 0.0
    scored = pd.read_csv(project / "data/08_reporting/caption_scores.csv")
    assert promotion["images"] == (scored["split"] == "val").sum() and promotion["confidence"]
    assert (
        int(client.get_model_version_by_alias("image-captioner", "candidate").version)
        == (second["version"])
    )
    assert (
        int(client.get_model_version_by_alias("image-captioner", "champion").version)
        == (first["version"])
    )
    assert model.tags["promotion"] == "kept" and "<=" in model.tags["promotion_reason"]
    assert float(model.tags["promotion.gain_low"]) == float(model.tags["promotion.gain_high"]) == 0


def test_mlflow_models_serve_answers_a_request(smoke_project, exported, test_jpegs):
    """`mlflow models serve -m models:/image-captioner/<v> --env-manager local` on
    127.0.0.1 captions a base64 image as the export does, and reports a bad one per row."""
    registration = _registration(smoke_project)
    port = free_port()
    mlflow = str(Path(sys.executable).with_name("mlflow"))
    process = start_server(
        [
            mlflow,
            "models",
            "serve",
            "-m",
            registration["registered_model_uri"],
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        smoke_project,
        f"http://127.0.0.1:{port}/ping",
        env={"MLFLOW_TRACKING_URI": registration["tracking_uri"]},
    )
    try:
        jpeg = test_jpegs[1][0]
        body = {
            "dataframe_split": {
                "columns": ["image"],
                "data": [
                    [base64.b64encode(jpeg).decode()],
                    [base64.b64encode(b"not an image").decode()],
                ],
            },
            "params": {"beam_size": 2},
        }
        answer = requests.post(f"http://127.0.0.1:{port}/invocations", json=body, timeout=120)
        assert answer.status_code == 200, answer.text
        good, bad = answer.json()["predictions"]
        out = exported.caption([jpeg], 2)
        assert good["error"] == "" and good["caption"] == out["caption"][0]
        assert good["captions"] == list(out["captions"][0])
        np.testing.assert_allclose(good["scores"], out["scores"][0], atol=1e-3)
        assert "not_an_image" in bad["error"] and bad["captions"] == []
    finally:
        stop_server(process)


def test_caption_command_takes_a_models_uri(smoke_project, exported, test_jpegs, tmp_path):
    """`caption --model models:/image-captioner@champion`: the registry's champion alias."""
    import os
    import subprocess

    registration = _registration(smoke_project)
    image = tmp_path / "t.jpg"
    image.write_bytes(test_jpegs[1][1])
    env = {**os.environ, "MLFLOW_TRACKING_URI": registration["tracking_uri"]}
    result = subprocess.run(
        [
            str(Path(sys.executable).with_name("caption-pipeline")),
            "caption",
            str(image),
            "--model",
            "models:/image-captioner@champion",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert (
        json.loads(result.stdout)["caption"] == exported.caption([image.read_bytes()])["caption"][0]
    )


def test_the_logged_model_keeps_its_declared_signature_and_input_example(
    smoke_project, exported, test_jpegs, monkeypatch
):
    """The registered version's signature is the declared one (`model_signature`, given to
    MLflow so that logging loads the export no more), and that is what MLflow infers from the
    pyfunc's prediction; it keeps its input example (the first test image) and predicts."""
    import mlflow
    import pandas as pd
    from mlflow.models import infer_signature

    from caption_pipeline.tracking.mlflow_model import CaptionerModel, model_signature

    registration = _registration(smoke_project)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registration["tracking_uri"])
    info = mlflow.models.get_model_info(registration["registered_model_uri"])
    declared = model_signature(exported.default_beam_size)
    assert info.signature == declared
    pyfunc = CaptionerModel()
    pyfunc.model = exported
    example = pd.DataFrame({"image": [test_jpegs[1][0]]})
    params = {"beam_size": exported.default_beam_size}
    assert infer_signature(example, pyfunc.predict(None, example, params), params) == declared
    assert info.saved_input_example_info is not None
    model = mlflow.pyfunc.load_model(registration["registered_model_uri"])
    out = model.predict(pd.DataFrame({"image": [test_jpegs[1][0]]}), params={"beam_size": 2})
    assert out["caption"][0] == exported.caption([test_jpegs[1][0]], 2)["caption"][0]
