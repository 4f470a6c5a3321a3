"""The default pipeline, run by the Kedro CLI in a copy of the project on the smoke config."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from caption_pipeline.datasets import KerasModelDataset
from caption_pipeline.project import copy_project
from caption_pipeline.training.features import build_frozen_encoder, weights_fingerprint
from tests.helpers import run_kedro


def test_default_smoke_run_produces_every_stage_output(smoke_project):
    data = smoke_project / "data"
    raw = json.loads((data / "01_raw" / "raw_dataset.json").read_text())
    assert raw["name"] == "shapes" and raw["generated"] is True

    table = pd.read_parquet(data / "02_intermediate" / "captions.parquet")
    assert set(table["split"]) == {"train", "val", "test"}
    ids = {split: set(group["image_id"]) for split, group in table.groupby("split")}
    assert not ids["train"] & ids["val"] and not ids["train"] & ids["test"]
    assert not ids["val"] & ids["test"]
    assert (table.groupby("image_id").size() >= 5).all()

    report = json.loads((data / "08_reporting" / "ingestion_report.json").read_text())
    assert report  # ingestion always reports what it read and skipped

    vocab = json.loads((data / "03_primary" / "vocabulary.json").read_text())
    assert vocab["tokens"][:4] == ["<pad>", "<start>", "<end>", "<unk>"]
    assert (data / "08_reporting" / "caption_length_histogram.png").stat().st_size > 1000

    manifest = json.loads((data / "03_primary" / "shards" / "manifest.json").read_text())
    images_per_split = table.groupby("split")["image_id"].nunique().to_dict()
    assert {s: manifest["splits"][s]["records"] for s in images_per_split} == images_per_split

    # The compact encoder is pretrained on the object masks, then frozen: its features are
    # precomputed; the smoke run then fine-tunes it, so the captioner carries the fine-tuned
    # encoder (with its BatchNormalization as it was), and says so.
    pretraining = pd.read_csv(data / "08_reporting" / "encoder_pretraining_history.csv")
    assert pretraining["epoch"].tolist() == [1]
    assert pretraining["val_colour_accuracy"].between(0, 1).all()
    inputs = json.loads((data / "05_model_input" / "model_inputs" / "manifest.json").read_text())
    assert inputs["kind"] == "features"
    weights = data / "06_models" / "initial_encoder.weights.h5"
    assert inputs["params"]["weights"] == weights_fingerprint(weights)
    captioner = KerasModelDataset(filepath=str(data / "06_models" / "captioner.keras")).load()
    assert captioner.config.trains_encoder and captioner.config.encoder_batchnorm == "frozen"
    initial = build_frozen_encoder(captioner.config, weights)
    changed = {
        variable.path: not np.array_equal(tuned, first)
        for variable, tuned, first in zip(
            initial.weights, captioner.encoder.get_weights(), initial.get_weights(), strict=True
        )
    }
    assert any(changed[path] for path in changed if path.endswith("kernel"))
    assert not any(changed[path] for path in changed if "/moving_" in path)
    tuned = pd.read_csv(data / "08_reporting" / "fine_tune_history.csv")
    assert tuned["step"].tolist() == [2] and tuned["val_xent"].notna().all()
    assert not (data / "06_models" / "checkpoints_finetune").exists()

    history = pd.read_csv(data / "08_reporting" / "training_history.csv")
    assert history["epoch"].tolist() == [1, 2]
    assert (
        history[["train_xent", "val_xent", "val_perplexity", "learning_rate"]].notna().all().all()
    )
    assert (data / "08_reporting" / "training_curves.png").stat().st_size > 5000
    assert (data / "06_models" / "captioner.keras").stat().st_size > 10_000
    assert not (data / "06_models" / "checkpoints").exists()

    # The smoke config runs one short SCST epoch after cross-entropy (epoch 0: that model).
    scst = pd.read_csv(data / "08_reporting" / "self_critical_history.csv")
    assert scst["epoch"].tolist() == [0, 1] and scst["val_cider"].notna().all()
    scst_steps = pd.read_csv(data / "08_reporting" / "self_critical_steps.csv")
    assert scst_steps["step"].tolist() == [1, 2]
    assert (scst_steps["entropy"] > 0).all() and scst_steps["reward"].notna().all()
    assert not (data / "06_models" / "checkpoints_scst").exists()


def test_trained_model_loads_and_captions_a_test_image(smoke_project):
    import keras
    import numpy as np

    from caption_pipeline.data.shards.reader import make_caption_dataset
    from caption_pipeline.data.shards.shard_set import load_shard_set
    from caption_pipeline.datasets import KerasModelDataset

    model = KerasModelDataset(filepath=str(smoke_project / "data/06_models/captioner.keras")).load()
    shards = load_shard_set(smoke_project / "data/03_primary/shards")
    inputs, _ = next(iter(make_caption_dataset(shards, "test", batch_size=2)))
    features = keras.ops.convert_to_numpy(model({"image": inputs["image"]}))
    assert features.shape[0] == 2 and np.isfinite(features).all()


def test_second_run_of_data_stages_is_stable(smoke_project):
    manifest = smoke_project / "data" / "03_primary" / "shards" / "manifest.json"
    before = manifest.read_bytes()
    result = run_kedro(smoke_project, "run", "--env", "smoke", "--pipelines", "shard")
    assert result.returncode == 0, result.stderr[-3000:]
    assert manifest.read_bytes() == before


def test_missing_dataset_root_is_one_clear_error(tmp_path):
    project = copy_project(tmp_path / "project")
    result = run_kedro(
        project,
        "run",
        "--env",
        "smoke",
        "--pipelines",
        "synthetic,ingest",
        "--params",
        f"dataset.name=mine,dataset.root={tmp_path / 'nowhere'}",
    )
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "nowhere" in output
    assert "Traceback" not in output
