"""MLflow tracking through kedro-mlflow: the smoke run read back from a real `mlflow server`
over its REST API, a failed run, the store of every environment, and the metric reshaping."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

from caption_pipeline.project import PROJECT_ROOT, copy_project
from caption_pipeline.tracking.runs import (
    caption_digest,
    caption_inputs,
    changed_params,
    dvc_data_hash,
    evaluation_metric_values,
    run_name,
    training_metric_series,
)
from tests.helpers import free_port, run_kedro, start_server, stop_server

MLFLOW = str(Path(sys.executable).with_name("mlflow"))
EXPERIMENT = "caption-pipeline"


# --- the pieces ---------------------------------------------------------------------------------


def test_training_history_becomes_series_per_epoch_and_per_step():
    history = pd.DataFrame(
        {"epoch": [1, 2], "step": [4, 8], "val_xent": [2.5, 2.0], "learning_rate": [1e-3, 8e-4]}
    )
    steps = pd.DataFrame({"step": [2, 4, 6], "loss": [5.0, 4.5, float("nan")]})
    series = training_metric_series(history, steps)
    assert series == {
        "val_xent": [{"step": 1, "value": 2.5}, {"step": 2, "value": 2.0}],
        "learning_rate": [{"step": 1, "value": 1e-3}, {"step": 2, "value": 8e-4}],
        "loss": [{"step": 2, "value": 5.0}, {"step": 4, "value": 4.5}],
    }
    assert "loss" not in training_metric_series(history, pd.DataFrame(columns=["step", "loss"]))


def test_metrics_json_is_flattened_to_numeric_leaves():
    metrics = {
        "test": {"CIDEr": 0.5, "Bleu_4": 0.1},
        "blind_baseline": {"CIDEr": 0.2},
        "attention_localization": 0.4,
        "attention_localization_uniform": None,
        "decoding": {"method": "beam", "beam_size": 3},
        "details": {"n_images": 24},
    }
    assert evaluation_metric_values(metrics) == {
        "test.CIDEr": [{"step": 0, "value": 0.5}],
        "test.Bleu_4": [{"step": 0, "value": 0.1}],
        "blind_baseline.CIDEr": [{"step": 0, "value": 0.2}],
        "attention_localization": [{"step": 0, "value": 0.4}],
    }


def test_data_hash_comes_from_a_dvc_file_or_dvc_lock(tmp_path):
    assert dvc_data_hash(tmp_path, "data/01_raw/coco") is None
    (tmp_path / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n  synthetic:\n    cmd: kedro run\n    outs:\n"
        "    - path: data/01_raw/shapes\n      md5: abc.dir\n"
    )
    assert dvc_data_hash(tmp_path, "data/01_raw/shapes/") == ("abc.dir", "dvc.lock:synthetic")
    assert dvc_data_hash(tmp_path, tmp_path / "data/01_raw/shapes") == (
        "abc.dir",
        "dvc.lock:synthetic",
    )
    (tmp_path / "data/01_raw").mkdir(parents=True)
    (tmp_path / "data/01_raw/coco.dvc").write_text("outs:\n- md5: def.dir\n  path: coco\n")
    assert dvc_data_hash(tmp_path, "data/01_raw/coco") == ("def.dir", "coco.dvc")


def test_every_environment_tracks_to_the_project_sqlite_database(tmp_path):
    """kedro-mlflow falls back to the refused ./mlruns file store where an environment has no
    mlflow.yml: each one must resolve to <project>/mlflow.db, whatever the working folder."""
    project = copy_project(tmp_path / "project")
    (project / "notebooks").mkdir()
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from kedro.framework.session import KedroSession\n"
        "from kedro.framework.startup import bootstrap_project\n"
        "project = Path(sys.argv[1])\n"
        "bootstrap_project(project)\n"
        "for env in ('base', 'smoke', 'coco', 'local', None):\n"
        "    with KedroSession.create(project_path=project, env=env) as session:\n"
        "        server = session.load_context().mlflow.server\n"
        "        print('URI', env, server.mlflow_tracking_uri)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(project)],
        cwd=project / "notebooks",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    uris = dict(
        line.split(" ", 2)[1:] for line in result.stdout.splitlines() if line.startswith("URI ")
    )
    assert uris == {
        env: f"sqlite:///{project}/mlflow.db" for env in ("base", "smoke", "coco", "local", "None")
    }
    assert not (project / "notebooks" / "mlflow.db").exists() and not (project / "mlruns").exists()


def test_run_names_tell_runs_apart():
    assert run_name(["__default__"], None, {}) == "all stages · local"
    assert run_name(["train"], "smoke", {"train": {"epochs": 3, "batch_size": 8}}) == (
        "train · smoke · train.batch_size=8 · train.epochs=3"
    )
    assert run_name(["train", "evaluate"], "local", {}, "lucid-pony") == (
        "exp lucid-pony · train+evaluate · local"
    )
    assert changed_params(
        {"train": {"epochs": 3, "seed": 1}, "new": [1]}, {"train": {"epochs": 10, "seed": 1}}
    ) == {"train.epochs": 3, "new": [1]}


def test_each_split_of_the_caption_table_is_a_dataset_input_with_a_stable_digest():
    table = pd.DataFrame(
        {
            "image_id": [1, 1, 2, 3],
            "annotation_id": [10, 11, 20, 30],
            "caption": ["a", "b", "c", "d"],
            "split": ["train", "train", "val", "test"],
        }
    )
    assert caption_digest(table) == caption_digest(table.iloc[::-1])
    assert caption_digest(table) != caption_digest(table.assign(caption=["a", "b", "c", "e"]))
    inputs = caption_inputs(table, "data/01_raw/shapes", "abc123")
    assert [(d.name, context, tags["images"]) for d, context, tags in inputs] == [
        ("captions-test", "test", "1"),
        ("captions-train", "training", "1"),
        ("captions-val", "validation", "1"),
    ]
    dataset, _, tags = inputs[1]
    assert dataset.digest == caption_digest(table[table.split == "train"])
    assert dataset.source.uri == "data/01_raw/shapes" and tags["dvc_data_hash"] == "abc123"


def _gate_registry(tmp_path: Path):
    """A real sqlite registry with model "m", and a function registering a new version (in
    a run of its own, whose artifacts hold its per-image scores) and passing it to `promote`."""
    import mlflow

    from caption_pipeline.params import from_conf
    from caption_pipeline.tracking.mlflow_model import GateSettings, promote

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("gate", (tmp_path / "artifacts").as_uri())
    client.create_registered_model("m")
    gate = from_conf(GateSettings, "export.mlflow.gate")

    def register(score, mode: str = "auto") -> dict:
        run_id = client.create_run(experiment).info.run_id
        version = str(client.create_model_version("m", str(tmp_path), run_id=run_id).version)
        decision = promote(client, "m", version, score, mode, gate)
        assert str(client.get_model_version_by_alias("m", "candidate").version) == version
        tags = client.get_model_version("m", version).tags
        assert tags["promotion"] == ("champion" if decision["promoted"] else "kept")
        assert tags["promotion_reason"] == decision["reason"]
        assert float(tags["val.CIDEr"]) == pytest.approx(score.value, abs=1e-6)
        return decision

    def champion() -> str:
        return str(client.get_model_version_by_alias("m", "champion").version)

    return client, register, champion


def _val(per_image, digest: str = "val-1", first_id: int = 0):
    """A ValScore of these per-image CIDEr values (images first_id, first_id + 1, ...)."""
    import math

    from caption_pipeline.tracking.mlflow_model import ValScore

    scores = {first_id + i: float(s) for i, s in enumerate(per_image)}
    return ValScore(math.fsum(scores.values()) / len(scores), digest, scores)


def test_the_champion_gate_promotes_only_a_gain_above_the_noise(tmp_path):
    """A real sqlite registry: the first version is the champion; a gain inside the paired
    bootstrap interval's noise keeps it, a clear gain takes over, a loss does not, `force`
    and `skip` do what they say, and a score on other val captions or images is never
    compared. Every version is the `candidate` when registered."""
    import numpy as np

    rng = np.random.default_rng(7)
    base = rng.gamma(2.0, 0.5, 300)  # per-image CIDEr-D: skewed, 0..~4
    client, register, champion = _gate_registry(tmp_path)

    first = register(_val(base))
    assert first["reason"] == "no champion yet" and champion() == "1" and first["gain"] is None
    assert first["val_CIDEr_low"] < base.mean() < first["val_CIDEr_high"]
    noise = rng.normal(0, 0.5, base.size)
    noisy = register(_val(base + noise - noise.mean() + 0.005))  # a higher val CIDEr, by noise
    assert noisy["gain"] == pytest.approx(0.005) and noisy["gain_low"] < 0 < noisy["gain_high"]
    assert not noisy["promoted"] and champion() == "1" and "low end <= 0" in noisy["reason"]
    clear = register(_val(base + 0.2 + rng.normal(0, 0.5, base.size)))
    assert clear["promoted"] and clear["gain_low"] > 0 and champion() == "3", clear
    assert clear["previous_champion"] == 1 and clear["reason"].startswith("val CIDEr ")
    assert clear["previous_champion_val_CIDEr"] == pytest.approx(base.mean(), abs=1e-6)
    worse = register(_val(base))
    assert not worse["promoted"] and worse["gain_high"] < 0 and champion() == "3"
    assert register(_val(base), "force")["promoted"] and champion() == "5"
    assert not register(_val(base + 9), "skip")["promoted"] and champion() == "5"
    other = register(_val(base + 9, digest="val-2"))
    assert other["reason"] == "not comparable: champion version 5 was scored on other val captions"
    assert not other["promoted"] and other["gain"] is None and champion() == "5"
    shifted = register(_val(base + 9, first_id=1))
    assert shifted["reason"].startswith("not comparable: champion version 5 was scored on other")
    assert "299 shared" in shifted["reason"] and champion() == "5"


def test_the_gate_records_its_interval_on_the_version(tmp_path):
    """The decision's interval (gain, its low and high ends, confidence, images, resamples)
    is in the `promotion.*` tags of the version; the version's per-image scores are in its run,
    named by its `val_per_image` tag, for the next versions to be paired with."""
    import numpy as np

    client, register, _ = _gate_registry(tmp_path)
    base = np.linspace(0.0, 2.0, 50)
    register(_val(base))
    decision = register(_val(base + np.linspace(0.1, 0.3, 50)))
    tags = client.get_model_version("m", "2").tags
    for key in (
        *("gain", "gain_low", "gain_high", "val_CIDEr_low", "val_CIDEr_high"),
        *("confidence", "images", "bootstrap_samples"),
    ):
        assert float(tags[f"promotion.{key}"]) == pytest.approx(decision[key], rel=1e-5), key
    assert decision["val_CIDEr_low"] < (base + np.linspace(0.1, 0.3, 50)).mean()
    assert decision["val_CIDEr_high"] - decision["val_CIDEr_low"] > 0.3  # scores span 0.1..2.3
    assert decision["confidence"] == 0.95 and decision["images"] == 50
    assert decision["bootstrap_samples"] == 10000
    assert decision["gain"] == pytest.approx(0.2) and decision["promoted"]
    assert decision["gain_low"] < decision["gain"] < decision["gain_high"]
    assert "95 % interval" in decision["reason"]
    run = client.get_model_version("m", "2").run_id
    local = client.download_artifacts(run, tags["val_per_image"], str(tmp_path / "read"))
    assert json.loads(Path(local).read_text())["49"] == pytest.approx(2.3)


def test_a_champion_without_per_image_scores_is_kept_until_forced(tmp_path):
    """A champion registered before the paired gate (no per-image val scores) cannot be paired
    with: kept, the reason says so and how to replace it; after `force`, the gate pairs."""
    import numpy as np

    from caption_pipeline.tracking.mlflow_model import ValScore

    _, register, champion = _gate_registry(tmp_path)
    base = np.linspace(0.0, 2.0, 40)
    register(ValScore(1.0, "val-1", None))  # as an older version of the code registered it
    kept = register(_val(base + 5))
    assert not kept["promoted"] and champion() == "1"
    assert kept["reason"] == (
        "not comparable: champion version 1 has no per-image val CIDEr (registered before the "
        "paired bootstrap gate); export.mlflow.promote=force replaces it"
    )
    assert register(_val(base), "force")["promoted"] and champion() == "3"
    assert register(_val(base + 1))["promoted"] and champion() == "4"


def test_per_image_scores_must_be_of_the_evaluation_scored(tmp_path):
    """ValScore.of_evaluation: the val rows of caption_scores, which must average to
    metrics.json's val CIDEr (CIDEr-D is the mean of the images'); a stale table is refused."""
    from caption_pipeline.errors import DataError
    from caption_pipeline.tracking.mlflow_model import ValScore

    captions = pd.DataFrame(
        {"image_id": [1, 2, 3], "annotation_id": [1, 2, 3], "split": "val", "caption": "a b"}
    )
    scores = pd.DataFrame(
        {
            "image_id": [1, 2, 3, 1],
            "split": ["val", "val", "test", "test"],
            "caption": "a",
            "CIDEr": [0.5, 1.5, 9.0, 9.0],
        }
    )
    score = ValScore.of_evaluation({"val": {"CIDEr": 1.0}}, captions, scores)
    assert score.per_image == {1: 0.5, 2: 1.5}
    assert score.val_digest == caption_digest(captions)
    with pytest.raises(DataError, match="average 1.000000, not metrics.json's val CIDEr 1.2"):
        ValScore.of_evaluation({"val": {"CIDEr": 1.2}}, captions, scores)
    with pytest.raises(DataError, match="no CIDEr column"):
        ValScore.of_evaluation({"val": {"CIDEr": 1.0}}, captions, scores.drop(columns="CIDEr"))


# --- a failed run -------------------------------------------------------------------------------


def test_failed_run_is_recorded_as_failed_with_its_error(tmp_path):
    """Two failed runs with different parameters: each FAILED with its error, and each named
    after its stage, environment and parameters (issue 14), described by its command."""
    import mlflow

    project = copy_project(tmp_path / "project")
    for value in (99, 98):
        result = run_kedro(
            project,
            "run",
            "--env",
            "smoke",
            "--pipelines",
            "synthetic",
            "--params",
            f"synthetic.captions_per_image={value}",
        )
        assert result.returncode != 0
    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    runs = client.search_runs(
        [client.get_experiment_by_name(EXPERIMENT).experiment_id],
        order_by=["attributes.start_time ASC"],
    )
    assert [r.info.run_name for r in runs] == [
        "synthetic · smoke · synthetic.captions_per_image=99",
        "synthetic · smoke · synthetic.captions_per_image=98",
    ]
    run = runs[0]
    assert run.info.status == "FAILED"
    assert "captions_per_image" in run.data.tags["error"]
    assert run.data.params["synthetic.captions_per_image"] == "99"
    assert run.data.tags["mlflow.note.content"].startswith("`kedro run --env smoke")
    assert "synthetic.captions_per_image=99" in run.data.tags["params_changed"]
    error_txt = Path(client.download_artifacts(run.info.run_id, "error.txt", str(tmp_path)))
    assert "DataError" in error_txt.read_text()


# --- the smoke run, through `mlflow server` -----------------------------------------------------


class MlflowRest:
    def __init__(self, url: str):
        self.url = url

    def get(self, endpoint: str, **query) -> dict:
        address = f"{self.url}/api/2.0/mlflow/{endpoint}?{urllib.parse.urlencode(query)}"
        with urllib.request.urlopen(address, timeout=30) as response:
            return json.loads(response.read())

    def post(self, endpoint: str, body: dict) -> dict:
        request = urllib.request.Request(
            f"{self.url}/api/2.0/mlflow/{endpoint}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())


@pytest.fixture
def mlflow_server(smoke_project):
    """`mlflow server` on the smoke project's database, on 127.0.0.1."""
    port = free_port()
    server = start_server(
        [
            MLFLOW,
            "server",
            "--backend-store-uri",
            f"sqlite:///{smoke_project / 'mlflow.db'}",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        smoke_project,
        f"http://127.0.0.1:{port}/health",
    )
    yield MlflowRest(f"http://127.0.0.1:{port}")
    stop_server(server)


@pytest.mark.slow
def test_smoke_run_is_one_mlflow_run_read_back_over_rest(smoke_project, mlflow_server):
    api = mlflow_server
    experiment = api.get("experiments/get-by-name", experiment_name=EXPERIMENT)["experiment"]
    runs = api.post("runs/search", {"experiment_ids": [experiment["experiment_id"]]})["runs"]
    (run,) = [r for r in runs if r["info"]["run_name"] == "all stages · smoke"]
    assert run["info"]["status"] == "FINISHED"
    run_id = run["info"]["run_id"]

    # Its inputs: each split of the caption table, as MLflow datasets (issue 14).
    inputs = {i["dataset"]["name"]: i for i in run["inputs"]["dataset_inputs"]}
    assert sorted(inputs) == ["captions-test", "captions-train", "captions-val"]
    table = pd.read_parquet(smoke_project / "data/02_intermediate/captions.parquet")
    train = inputs["captions-train"]
    assert train["dataset"]["digest"] == caption_digest(table[table.split == "train"])
    assert {t["key"]: t["value"] for t in train["tags"]}["mlflow.data.context"] == "training"

    # Every parameter block, flattened.
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    for key in (
        "dataset.root",
        "synthetic.splits.train",
        "ingest.max_bad_image_fraction",
        "vocab.min_count",
        "shard.num_shards.train",
        "features.batch_size",
        "model.lstm_units",
        "train.learning_rate",
        "evaluate.decoding.beam_size",
    ):
        assert key in params, key
    assert params["train.epochs"] == "2" and params["model.lstm_units"] == "64"

    # Evaluation metrics with the blind and human reference points; training curves as series.
    metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    for key in (
        "test.CIDEr",
        "val.Bleu_4",
        "blind_baseline.CIDEr",
        "human.CIDEr",
        "test_vs_human_refs.CIDEr",
    ):
        assert key in metrics, key
    history = pd.read_csv(smoke_project / "data/08_reporting/training_history.csv")
    val_xent = api.get("metrics/get-history", run_id=run_id, metric_key="xent.val_xent")["metrics"]
    assert [(m["step"], round(m["value"], 5)) for m in val_xent] == [
        (epoch, round(value, 5))
        for epoch, value in zip(history["epoch"], history["val_xent"], strict=False)
    ]
    steps = pd.read_csv(smoke_project / "data/08_reporting/training_steps.csv")
    loss = api.get("metrics/get-history", run_id=run_id, metric_key="xent.loss")["metrics"]
    assert [m["step"] for m in loss] == steps["step"].tolist() and len(loss) >= 2

    # Artifacts: vocabulary, attention PNGs, training curves, results JSON, metrics.json.
    def listing(path: str = "") -> set[str]:
        return {
            f["path"] for f in api.get("artifacts/list", run_id=run_id, path=path).get("files", [])
        }

    assert {"data", "training", "evaluation"} <= listing()
    assert {"data/vocabulary.json", "data/caption_length_histogram.png"} <= listing("data")
    assert {"training/training_curves.png", "training/training_history.csv"} <= listing("training")
    assert {
        "evaluation/metrics.json",
        "evaluation/captions_val.json",
        "evaluation/captions_test.json",
        "evaluation/attention",
    } <= listing("evaluation")
    pngs = sorted(p.name for p in (smoke_project / "data/08_reporting/attention").glob("*.png"))
    assert sorted(Path(p).name for p in listing("evaluation/attention")) == pngs and pngs

    # System metrics, sampled while it ran (MLflow's own: system/cpu_utilization_percentage).
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(
        metrics
    ), sorted(metrics)
    assert {"xent.val_xent", "fine_tune.val_xent", "scst.val_cider"} <= set(metrics)

    # Tags: the code and data versions (the copy is no git repository and DVC tracks nothing).
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    assert tags["env"] == "smoke"
    assert tags["git_commit"] == "none" and tags["dvc_data_hash"] == "untracked"
    assert tags["dvc_data_path"] == "data/01_raw/shapes"

    # The registered model of the export pipeline, once it is part of the default run.
    if (PROJECT_ROOT / "src/caption_pipeline/pipelines/export").is_dir():
        model = api.get("registered-models/get", name="image-captioner")["registered_model"]
        versions = api.get("model-versions/search", filter="name='image-captioner'")
        assert run_id in {v["run_id"] for v in versions["model_versions"]}, model
        # The first version is the champion: there was none (issue 14).
        champion = api.get("registered-models/alias", name="image-captioner", alias="champion")
        assert champion["model_version"]["run_id"] == run_id
        assert tags["promotion"] == "champion" and tags["promotion_reason"] == "no champion yet"
        # With no champion to gain over, the version still records the interval of its own
        # val CIDEr (issue 26), as the run's metrics and the version's tags.
        version = {t["key"]: t["value"] for t in champion["model_version"]["tags"]}
        low, high = (float(version[f"promotion.val_CIDEr_{end}"]) for end in ("low", "high"))
        assert low <= float(version["val.CIDEr"]) <= high  # [0, 0]: the smoke model's CIDEr is 0
        assert metrics["promotion.val_CIDEr_low"] == pytest.approx(low, rel=1e-5)
