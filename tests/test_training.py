"""Training: checkpoints that survive kill -9, and tf.distribute's mirrored strategy."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from caption_pipeline.params import defaults

# Tiny model and training, so that a step takes well under a second on 2 cores.
TINY_MODEL = {
    **defaults("model"),
    "encoder": "compact",
    "compact_filters": [8, 16],
    "compact_pool_last": True,
    "encoder_trainable": None,
    "embed_dim": 16,
    "attention_dim": 16,
    "lstm_units": 32,
}

DRIVER = """
import json, logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
import pandas as pd
import tempfile
from caption_pipeline.datasets import KerasModelDataset
from caption_pipeline.data.shards.shard_set import load_shard_set
from caption_pipeline.pipelines.train.nodes import (
    fine_tune_encoder, train_cross_entropy, train_self_critical)
from caption_pipeline.params import defaults
project = sys.argv[1]
# overrides of conf/base, as Kedro merges an env's
model, train, fine_tune, scst = ({**defaults(block), **json.loads(arg)} for block, arg in zip(
    ("model", "train", "fine_tune", "self_critical"), sys.argv[2:6], strict=True))
shards = load_shard_set(f"{project}/data/03_primary/shards")
vocabulary = json.load(open(f"{project}/data/03_primary/vocabulary.json"))
captions = pd.read_parquet(f"{project}/data/02_intermediate/captions.parquet")
folder = tempfile.mkdtemp()
def stored(captioner, name):  # saved and loaded, as the catalog hands it to the next phase
    dataset = KerasModelDataset(filepath=f"{folder}/{name}.keras")
    dataset.save(captioner)
    return dataset.load()
# the train pipeline's nodes, one phase each
captioner, history, _ = train_cross_entropy(shards, vocabulary, model, train, fine_tune, scst)
captioner, tuned_history, tuned_steps = fine_tune_encoder(
    stored(captioner, "cross_entropy"), shards, vocabulary, train, fine_tune, scst)
_, scst_history, scst_steps = train_self_critical(
    stored(captioner, "fine_tuned"), shards, vocabulary, captions, train, fine_tune, scst)
print("HISTORY " + history.to_json(orient="records"))
print("FINE_TUNE_HISTORY " + tuned_history.to_json(orient="records"))
print("FINE_TUNE_STEPS " + tuned_steps.to_json(orient="records"))
print("SCST_HISTORY " + scst_history.to_json(orient="records"))
print("SCST_STEPS " + scst_steps.to_json(orient="records"))
"""

SCST_OFF = FINE_TUNE_OFF = {"enabled": False}


def driver(
    project: Path,
    train: dict,
    scst: dict = SCST_OFF,
    *,
    fine_tune: dict = FINE_TUNE_OFF,
    model: dict = TINY_MODEL,
    **popen,
) -> subprocess.Popen:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            DRIVER,
            str(project),
            json.dumps(model),
            json.dumps(train),
            json.dumps(fine_tune),
            json.dumps(scst),
        ],
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **popen,
    )


def history_of(output: str, key: str = "HISTORY") -> list[dict]:
    line = next(line for line in output.splitlines() if line.startswith(key + " "))
    return json.loads(line.removeprefix(key + " "))


def kill_when(process: subprocess.Popen, latest: Path, step: int) -> int:
    """SIGKILL `process` once the checkpoint pointer `latest` reaches `step`; the step it
    names at the kill."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if latest.exists() and json.loads(latest.read_text())["step"] >= step:
            break
        time.sleep(0.2)
    assert process.poll() is None, (
        "training ended before it could be killed:\n" + process.stdout.read()
    )
    process.send_signal(signal.SIGKILL)
    process.wait()
    return json.loads(latest.read_text())["step"]


def test_kill_9_mid_training_resumes_from_the_last_checkpoint(shard_project, tmp_path):
    checkpoints = tmp_path / "checkpoints"
    train = {
        "epochs": 3,
        "batch_size": 8,
        "max_steps_per_epoch": 6,  # of the 15 batches of 8 of the 120 train images
        "checkpoint_every_steps": 2,
        "log_every_steps": 1,
        "checkpoint_dir": str(checkpoints),
        "progress": False,
        "early_stopping_patience": None,
    }
    steps_per_epoch = 6

    # Killed mid-way through the second epoch.
    killed_at = kill_when(
        driver(shard_project, train), checkpoints / "latest.json", steps_per_epoch + 2
    )
    assert steps_per_epoch < killed_at < 3 * steps_per_epoch

    second = driver(shard_project, train)
    output, _ = second.communicate(timeout=600)
    assert second.returncode == 0, output[-3000:]
    assert f"Resuming from checkpoint at step {killed_at}" in output
    history = history_of(output)
    # Nothing lost: every epoch is in the history, the step count is that of an unbroken run.
    assert [row["epoch"] for row in history] == [1, 2, 3]
    assert [row["step"] for row in history] == [6, 12, 18]
    assert not checkpoints.exists()  # a finished run cleans up after itself


def test_kill_9_during_self_critical_training_resumes_to_the_same_result(shard_project, tmp_path):
    def configs(root: Path) -> tuple[dict, dict]:
        train = {
            "epochs": 1,
            "batch_size": 8,
            "max_steps_per_epoch": xent_steps,
            "checkpoint_dir": str(root / "xent"),
            "progress": False,
            "early_stopping_patience": None,
            "jit_compile": False,
        }
        scst = {
            "enabled": True,
            "epochs": 2,
            "batch_size": 8,
            "samples": 2,
            "baseline": "mean",
            "max_steps_per_epoch": steps_per_epoch,
            "checkpoint_every_steps": 2,
            "progress": False,
            "checkpoint_dir": str(root / "scst"),
        }
        return train, scst

    # Short epochs (of the 15 batches of 8 of the 120 train images): SCST's second one is
    # killed after a checkpoint, 2 steps from its end at the earliest.
    xent_steps, steps_per_epoch = 4, 6

    unbroken = driver(shard_project, *configs(tmp_path / "unbroken"))
    expected, _ = unbroken.communicate(timeout=600)
    assert unbroken.returncode == 0, expected[-3000:]

    train, scst = configs(tmp_path / "killed")
    killed_at = kill_when(
        driver(shard_project, train, scst),
        tmp_path / "killed" / "scst" / "latest.json",
        steps_per_epoch + 2,
    )
    assert steps_per_epoch < killed_at < 2 * steps_per_epoch
    second = driver(shard_project, train, scst)
    output, _ = second.communicate(timeout=600)
    assert second.returncode == 0, output[-3000:]
    # The finished cross-entropy phase is restored, not retrained; SCST picks up where it was.
    assert f"Resuming from checkpoint at step {xent_steps}" in output
    assert f"SCST: resuming at step {killed_at}" in output

    def timeless(rows: list[dict]) -> list[dict]:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]

    assert timeless(history_of(output)) == timeless(history_of(expected))
    resumed = history_of(output, "SCST_HISTORY")
    assert [row["step"] for row in resumed] == [0, steps_per_epoch, 2 * steps_per_epoch]
    assert [row["step"] for row in history_of(output, "SCST_STEPS")] == list(
        range(1, 2 * steps_per_epoch + 1)
    )
    # Same samples, same rewards, same weights: the val CIDEr-D of every epoch is that of the
    # run nobody killed.
    reference = history_of(expected, "SCST_HISTORY")
    assert [row["val_cider"] for row in resumed] == pytest.approx(
        [row["val_cider"] for row in reference], rel=1e-5
    )
    assert not (tmp_path / "killed" / "xent").exists()  # both phases clean up at the end
    assert not (tmp_path / "killed" / "scst").exists()


def test_mirrored_strategy_over_two_cpus_matches_one_device(shard_project):
    script = """
import json, logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
import pandas as pd
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from caption_pipeline.data.shards.shard_set import load_shard_set
from caption_pipeline.pipelines.train.nodes import train_cross_entropy
from caption_pipeline.params import defaults
project = sys.argv[1]
shards = load_shard_set(f"{project}/data/03_primary/shards")
vocabulary = json.load(open(f"{project}/data/03_primary/vocabulary.json"))
captions = pd.read_parquet(f"{project}/data/02_intermediate/captions.parquet")
model = {**json.loads(sys.argv[2]), "dropout": 0.0}
losses = {}
for strategy in ("default", "mirrored"):
    train = {**defaults("train"), "epochs": 1, "batch_size": 16, "max_steps_per_epoch": 4,
             "progress": False,
             "strategy": strategy,
             "devices": ["/cpu:0", "/cpu:1"] if strategy == "mirrored" else None,
             "checkpoint_dir": f"{project}/ckpt-{strategy}", "jit_compile": False}
    history = train_cross_entropy(shards, vocabulary, model, train,
                                  {**defaults("fine_tune"), "enabled": False},
                                  {**defaults("self_critical"), "enabled": False})[1]
    losses[strategy] = history.iloc[-1][["train_xent", "val_xent"]].tolist()
print("LOSSES " + json.dumps(losses))
"""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run(
        [sys.executable, "-c", script, str(shard_project), json.dumps(TINY_MODEL)],
        cwd=shard_project,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("LOSSES "))
    losses = json.loads(line.removeprefix("LOSSES "))
    assert "Training with the mirrored strategy over 2 replicas" in result.stdout
    assert losses["default"] == pytest.approx(losses["mirrored"], rel=1e-3)
