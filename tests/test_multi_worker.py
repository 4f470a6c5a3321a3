"""Multi-worker training (issue 12): two worker processes on 127.0.0.1, joined by TF_CONFIG under
`strategy: multi_worker`, train as one worker does at the same global batch; only the chief
writes to `checkpoint_dir`; a kill -9 of one worker, then a restart of both, resumes from the
chief's last checkpoint and finishes.

Tiny and on features (a decoder on 3 x 4 features), so that each worker process spends its
time starting TensorFlow, not training. Every caption has the same length, and every batch
splits evenly over the two workers: each worker's loss is a mean over its own tokens, and
Keras averages the workers' means, which equals the mean over the global batch only when the
workers hold as many tokens (a ragged split weighs the tokens differently: another result,
not a rounding error). Dropout is off, since each worker draws its own masks. The global-norm
clip (1.0) bites: it is applied to the gradient the workers sum, as one device clips its batch's
(`distributed.clip_after_all_reduce`; Keras alone clips each worker's half).

SCST (issue 26) after cross-entropy runs data-parallel too (`scst` module docstring): each
worker samples its half of every global batch, and the update's loss is each caption's share of
the global mean, so a ragged split would still give one worker's result.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from caption_pipeline.data.text import Vocabulary
from caption_pipeline.model import ModelConfig
from caption_pipeline.params import defaults, from_conf
from caption_pipeline.project import PROJECT_ROOT
from tests.helpers import free_port

VOCAB, REGIONS, DIM, LENGTH, WORDS = 12, 3, 4, 7, 4
BATCH = 4  # the global batch: 2 per worker
MODEL = from_conf(
    ModelConfig,
    "model",
    vocab_size=VOCAB,
    encoder_trainable=False,
    embed_dim=8,
    attention_dim=8,
    lstm_units=8,
    dropout=0.0,
)
EPOCHS, STEPS_PER_EPOCH = 3, 4  # 16 captions / 4
# float32 rounding over 12 Adam steps: each worker's gradient is the mean over its 2
# captions, halved, and the all-reduce adds the halves, where one device sums 4 captions in
# one go; a different order of the same float32 additions (measured: 1.2e-7 at most).
RTOL, ATOL = 1e-5, 1e-6


def _split(seed: int, n: int):
    rng = np.random.default_rng(seed)
    captions = np.zeros((n, LENGTH), np.int32)
    captions[:, 0], captions[:, WORDS + 1] = Vocabulary.start_id, Vocabulary.end_id
    captions[:, 1 : WORDS + 1] = rng.integers(4, VOCAB, (n, WORDS))
    features = rng.normal(size=(n, REGIONS, DIM)).astype(np.float16)
    return {"features": features, "image_id": np.arange(n)}, captions


SPLITS = {"train": _split(0, BATCH * STEPS_PER_EPOCH), "val": _split(1, 2 * BATCH)}


def datasets(split: str, epoch: int, caption_mode: str, shuffle: bool):
    """The `DatasetFactory`. The same on every worker (the shuffle's seed is the epoch's):
    tf.distribute's data sharding gives each worker its half of every global batch."""
    import tensorflow as tf

    inputs, captions = SPLITS[split]
    ds = tf.data.Dataset.from_tensor_slices((inputs, captions))
    if shuffle:
        ds = ds.shuffle(len(captions), seed=42 + epoch)
    return ds.batch(BATCH)


def train_config(checkpoints: Path, strategy: str) -> dict:
    return {
        **defaults("train"),
        "epochs": EPOCHS,
        "batch_size": BATCH,
        "caption_mode": "all",
        "learning_rate": 1e-2,
        "clipnorm": 1.0,
        "early_stopping_patience": None,
        "checkpoint_every_steps": 1,
        "log_every_steps": 1,
        "checkpoint_dir": str(checkpoints),
        "strategy": strategy,
        "precision": "float32",
        "jit_compile": False,
        "progress": False,
    }


def train(config: dict):
    from caption_pipeline.training.cross_entropy import TrainConfig, train_captioner

    return train_captioner(
        datasets,
        MODEL,
        TrainConfig.from_dict(config),
        steps_per_epoch=STEPS_PER_EPOCH,
        data_fingerprint={"data": "tiny"},
    )


def scst_config(checkpoints: Path) -> dict:
    """SCST after the cross-entropy phase: 2 epochs of 4 global batches of 4 images (2 per
    worker), 2 samples each, the greedy baseline (each worker decodes its own images)."""
    return {
        **defaults("self_critical"),
        "epochs": 2,
        "batch_size": BATCH,
        "samples": 2,
        "baseline": "greedy",
        "learning_rate": 1e-3,
        "max_length": WORDS + 2,
        "checkpoint_dir": str(checkpoints),
        "checkpoint_every_steps": 1,
        "keep_checkpoints": False,
        "progress": False,
    }


def train_with_scst(config: dict, scst: dict):
    """`train`, then SCST on its model under the same strategy, as the `train` node runs them;
    the references are the captions of the tiny data, one per image."""
    from caption_pipeline.training.scst import SelfCriticalConfig, train_self_critical
    from tests.test_decoding import tiny_vocabulary

    model, _, _ = train(config)
    vocabulary = tiny_vocabulary()
    references = {
        split: {
            int(i): [vocabulary.decode(caption).split()]
            for i, caption in zip(inputs["image_id"], captions, strict=True)
        }
        for split, (inputs, captions) in SPLITS.items()
    }
    return train_self_critical(
        model,
        lambda split, epoch, shuffle: datasets(split, epoch, "grouped", shuffle),
        vocabulary,
        references,
        SelfCriticalConfig.from_dict(scst),
        steps_per_epoch=STEPS_PER_EPOCH,
        data_fingerprint={"data": "tiny"},
        strategy=config["strategy"],
    )


# One worker: records every change its Python code makes under the checkpoint folder (audit
# events: what h5py writes in C goes to files created and renamed through them), optionally
# slowed down per batch so that it can be killed mid-way, and saves its final weights.
WORKER = """
import json, logging, os, sys, time
sys.path.insert(0, sys.argv[1])
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
config, log_path, out = json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]
scst, root = json.loads(sys.argv[5]), os.path.abspath(sys.argv[6])
log = open(log_path, "a", buffering=1)
WRITES = {"os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree", "os.truncate"}
def audit(event, args):
    if event == "open" and args[1] is not None and not any(c in str(args[1]) for c in "wax+"):
        return
    if event in WRITES or event == "open":
        paths = [a for a in args if isinstance(a, (str, bytes, os.PathLike))]
        if any(os.path.abspath(os.fsdecode(p)).startswith(root) for p in paths):
            log.write(json.dumps([event, [os.fsdecode(p) for p in paths]]) + "\\n")
sys.addaudithook(audit)
import numpy as np
from caption_pipeline.training import cross_entropy as training
if os.environ.get("SLOW_STEPS"):
    end = training._StepCheckpoint.on_train_batch_end
    def slow(self, batch, logs=None):
        end(self, batch, logs)
        time.sleep(float(os.environ["SLOW_STEPS"]))
    training._StepCheckpoint.on_train_batch_end = slow
if os.environ.get("SLOW_SCST_STEPS"):
    from caption_pipeline.training import scst as scst_module
    step = scst_module._step
    def slow_step(*args):
        row = step(*args)
        time.sleep(float(os.environ["SLOW_SCST_STEPS"]))
        return row
    scst_module._step = slow_step
from tests.test_multi_worker import train, train_with_scst
model, history, steps = train_with_scst(config, scst) if scst else train(config)
np.savez(out, *model.get_weights())
print("HISTORY " + history.drop(columns="seconds").to_json(orient="records"))
"""


def start_workers(
    tmp_path: Path,
    config: dict,
    run: str,
    slow: float = 0.0,
    chief: bool = False,
    scst: dict | None = None,
    slow_scst: float = 0.0,
):
    """Two workers of one cluster (fresh ports), each in its own session (for kill -9): two
    "worker" tasks, or with `chief` a "chief" task and one "worker" (process 0 is the chief
    either way). With `scst`, each runs SCST after cross-entropy (`train_with_scst`), and the
    writes recorded are those under the two phases' checkpoint folders' parent."""
    root = Path(config["checkpoint_dir"])
    if scst is not None:
        root = Path(os.path.commonpath([root, scst["checkpoint_dir"]]))
    hosts = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    cluster = {"chief": hosts[:1], "worker": hosts[1:]} if chief else {"worker": hosts}
    tasks = [("chief", 0), ("worker", 0)] if chief else [("worker", 0), ("worker", 1)]
    workers = []
    for index in range(2):
        scratch = tmp_path / f"tmp-{run}-{index}"
        scratch.mkdir()
        kind, task_index = tasks[index]
        tf_config = {"cluster": cluster, "task": {"type": kind, "index": task_index}}
        env = {
            **os.environ,
            "TF_CONFIG": json.dumps(tf_config),
            "TF_CPP_MIN_LOG_LEVEL": "2",
            "PYTHONUNBUFFERED": "1",
            "TMPDIR": str(scratch),
            "KERAS_BACKEND": "tensorflow",
            "SLOW_STEPS": str(slow) if slow else "",
            "SLOW_SCST_STEPS": str(slow_scst) if slow_scst else "",
        }
        out = open(tmp_path / f"out-{run}-{index}.txt", "w")
        workers.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    WORKER,
                    str(PROJECT_ROOT),
                    json.dumps(config),
                    str(tmp_path / f"writes-{index}.jsonl"),
                    str(tmp_path / f"weights-{run}-{index}.npz"),
                    json.dumps(scst),
                    str(root),
                ],
                cwd=tmp_path,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
    return workers


@contextlib.contextmanager
def reaped(workers: list[subprocess.Popen]):
    """Kills (-9) whatever of `workers` still runs when the block ends, and waits for it."""
    try:
        yield workers
    finally:
        for worker in workers:
            if worker.poll() is None:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait()


def finished(tmp_path: Path, run: str, workers: list[subprocess.Popen]) -> list[str]:
    """Each worker's output, once it is checked that it ended well, as one of two replicas."""
    texts = []
    for index, worker in enumerate(workers):
        text = output(tmp_path, run, index)
        assert worker.returncode == 0, text[-5000:]
        assert "Training with the multi_worker strategy over 2 replicas" in text
        texts.append(text)
    return texts


def saved_weights(tmp_path: Path, run: str, index: int) -> list[np.ndarray]:
    with np.load(tmp_path / f"weights-{run}-{index}.npz") as saved:
        return [saved[f"arr_{i}"] for i in range(len(saved.files))]


def output(tmp_path: Path, run: str, index: int) -> str:
    return (tmp_path / f"out-{run}-{index}.txt").read_text()


def history_of(text: str) -> list[dict]:
    line = next(line for line in text.splitlines() if line.startswith("HISTORY "))
    return json.loads(line.removeprefix("HISTORY "))


def writes(tmp_path: Path, index: int) -> list:
    path = tmp_path / f"writes-{index}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def assert_resumed_weights(tmp_path, index: int, expected: list) -> None:
    """The weights worker `index` saved after its resumed run equal `expected` (one worker's at
    the same global batch) to float32 rounding (RTOL, ATOL)."""
    got = saved_weights(tmp_path, "resumed", index)
    assert len(got) == len(expected)
    worst = max(float(np.max(np.abs(g - want))) for g, want in zip(got, expected, strict=True))
    print(f"worker {index}: largest weight difference {worst:.3g}")
    for g, want in zip(got, expected, strict=True):
        np.testing.assert_allclose(g, want, rtol=RTOL, atol=ATOL)


def kill_non_chief_at(tmp_path, workers, latest: Path, step: int, timeout_s: float) -> int:
    """Once the chief's checkpoint `latest` is at `step` or later, kill -9 the non-chief (the
    chief, whose next all-reduce has no peer, then too); every worker is reaped. Returns the
    step of the checkpoint at the kill."""
    try:
        deadline = time.monotonic() + timeout_s
        while not (latest.exists() and json.loads(latest.read_text())["step"] >= step):
            assert all(w.poll() is None for w in workers) and time.monotonic() < deadline, (
                "the workers ended or stalled before the kill:\n"
                + output(tmp_path, "killed", 0)[-3000:]
                + output(tmp_path, "killed", 1)[-3000:]
            )
            time.sleep(0.02)
        os.killpg(workers[1].pid, signal.SIGKILL)
        return json.loads(latest.read_text())["step"]
    finally:
        for worker in workers:
            if worker.poll() is None:
                os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()


def test_two_workers_train_as_one_and_resume_from_the_chiefs_checkpoint(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    latest = checkpoints / "latest.json"

    # Two workers, slowed down, the non-chief killed -9 in the second epoch; the chief, whose
    # next all-reduce has no peer, then too.
    first = start_workers(tmp_path, train_config(checkpoints, "multi_worker"), "killed", 0.3)
    killed_at = kill_non_chief_at(tmp_path, first, latest, step=6, timeout_s=90)
    assert killed_at < EPOCHS * STEPS_PER_EPOCH
    resumed_at = json.loads(latest.read_text())["step"]  # the chief may have saved one more

    # Both restarted (fresh ports), not slowed; meanwhile, in this process, the reference: one
    # worker at the same global batch.
    second = start_workers(tmp_path, train_config(checkpoints, "multi_worker"), "resumed")
    with reaped(second):
        model, expected_history, _ = train(train_config(tmp_path / "single", "default"))
        expected = model.get_weights()
        # The clip bites in this run: unclipped, it ends elsewhere (Keras alone clips each
        # worker's half of the gradient: `distributed.clip_after_all_reduce`).
        unclipped = train({**train_config(tmp_path / "unclipped", "default"), "clipnorm": None})
        assert (
            max(
                np.max(np.abs(a - b))
                for a, b in zip(unclipped[0].get_weights(), expected, strict=False)
            )
            > 1e-3
        )
        for worker in second:
            worker.wait(timeout=150)
    for text in finished(tmp_path, "resumed", second):
        assert f"Resuming from checkpoint at step {resumed_at}" in text

    # (a) Both workers end with the weights of one worker at the same global batch, to
    # float32 rounding (RTOL, ATOL), and with its history: every epoch, none trained twice.
    for index in range(2):
        assert_resumed_weights(tmp_path, index, expected)
        history = history_of(output(tmp_path, "resumed", index))
        assert [row["step"] for row in history] == [4, 8, 12]
        for row, want in zip(history, expected_history.to_dict("records"), strict=True):
            assert row["val_xent"] == pytest.approx(want["val_xent"], rel=RTOL)

    # (b) Only the chief wrote to the checkpoint folder, in both runs; the other worker's
    # scratch checkpoints are gone; the finished run removed the folder.
    assert writes(tmp_path, 1) == []
    chief = writes(tmp_path, 0)
    assert any(event == "os.rename" and "latest.json" in paths[-1] for event, paths in chief)
    assert any("best.weights.h5" in paths[-1] for event, paths in chief)
    for index in range(2):
        assert list((tmp_path / f"tmp-resumed-{index}").iterdir()) == []
    assert not checkpoints.exists()


def test_a_chief_and_a_worker_train_as_one(tmp_path):
    """Issue 26: TF_CONFIG with a "chief" task and one "worker" is a cluster of two training
    processes, counted so everywhere (the per-worker logs Keras averages, the chief that
    writes): the same weights as one process, and only the chief writes checkpoints."""
    workers = start_workers(
        tmp_path, train_config(tmp_path / "checkpoints", "multi_worker"), "chief", chief=True
    )
    with reaped(workers):
        expected = train(train_config(tmp_path / "single", "default"))[0].get_weights()
        for worker in workers:
            worker.wait(timeout=150)
    finished(tmp_path, "chief", workers)
    for index in range(2):
        for g, want in zip(saved_weights(tmp_path, "chief", index), expected, strict=True):
            np.testing.assert_allclose(g, want, rtol=RTOL, atol=ATOL)
    assert writes(tmp_path, 1) == []
    assert any("latest.json" in paths[-1] for _, paths in writes(tmp_path, 0))


def test_two_workers_run_scst_as_one_and_resume_from_the_chiefs_checkpoint(tmp_path):
    """Issue 26: SCST under `multi_worker` is data-parallel. Each worker samples, rewards and
    baselines its 2 images of every global batch of 4, with the uniforms one worker draws for
    them, and the update sums the workers' gradients: the weights of one worker at the same
    global batch. Only the chief writes SCST's checkpoints; a kill -9 of the other worker mid-way
    through SCST, then a restart of both, resumes from the chief's last one."""
    root = tmp_path / "checkpoints"
    config = {**train_config(root / "xent", "multi_worker"), "keep_checkpoints": True}
    scst = scst_config(root / "scst")
    latest = root / "scst" / "latest.json"

    first = start_workers(tmp_path, config, "killed", scst=scst, slow_scst=0.5)
    kill_non_chief_at(tmp_path, first, latest, step=3, timeout_s=150)
    resumed_at = json.loads(latest.read_text())["step"]
    assert resumed_at < 2 * STEPS_PER_EPOCH

    second = start_workers(tmp_path, config, "resumed", scst=scst)
    with reaped(second):
        single = tmp_path / "single"
        reference = {**train_config(single / "xent", "default"), "keep_checkpoints": True}
        model, expected_history, expected_steps = train_with_scst(
            reference, scst_config(single / "scst")
        )
        expected = model.get_weights()
        for worker in second:
            worker.wait(timeout=150)
    for text in finished(tmp_path, "resumed", second):
        assert f"SCST: resuming at step {resumed_at}" in text

    # (a) Both workers end with one worker's weights (measured: 8.9e-8 at most) and val
    # CIDEr-D history, and SCST did train: its weights are not the cross-entropy model's.
    xent = train(reference)[0].get_weights()  # its finished checkpoint, restored
    assert max(float(np.max(np.abs(a - b))) for a, b in zip(xent, expected, strict=True)) > 1e-3
    for index in range(2):
        assert_resumed_weights(tmp_path, index, expected)
        history = history_of(output(tmp_path, "resumed", index))
        assert [row["epoch"] for row in history] == [0, 1, 2]
        for row, want in zip(history, expected_history.to_dict("records"), strict=True):
            assert row["val_cider"] == pytest.approx(want["val_cider"], rel=1e-5)
            if row["epoch"]:  # the logged figures are the global batch's, summed over workers
                assert row["reward"] == pytest.approx(want["reward"], rel=1e-5)

    # (b) Only the chief wrote, in both runs; SCST's folder is gone at the end.
    assert writes(tmp_path, 1) == []
    chief = writes(tmp_path, 0)
    assert any(
        event == "os.rename" and paths[-1].endswith("scst/latest.json") for event, paths in chief
    )
    assert not (root / "scst").exists()


def test_fine_tuning_under_multi_worker_is_refused_in_one_line(tmp_path):
    from caption_pipeline.errors import DataError
    from caption_pipeline.training.cross_entropy import TrainConfig
    from caption_pipeline.training.fine_tuning import FineTuneConfig, refuse_multi_worker

    tuning = FineTuneConfig.from_dict({**defaults("fine_tune"), "enabled": True})
    config = TrainConfig.from_dict(train_config(tmp_path, "multi_worker"))
    with pytest.raises(DataError, match="fine_tune.enabled and train.strategy"):
        refuse_multi_worker(tuning, config)
    refuse_multi_worker(tuning, TrainConfig.from_dict(train_config(tmp_path, "mirrored")))


def test_only_the_chief_saves_kedro_outputs_and_logs_to_mlflow(tmp_path):
    """`kedro run` under `train.strategy: multi_worker` on a worker that is not the chief
    saves none of the pipeline's outputs (they stay in memory) and opens no MLflow run; on
    the chief both happen as usual. The synthetic stage stands in for any stage: it is quick,
    and what is checked is Kedro's saving, which is the same for every stage."""
    from mlflow import MlflowClient

    from caption_pipeline.project import copy_project

    kedro = str(Path(sys.executable).with_name("kedro"))
    cluster = {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}
    for index in (1, 0):
        project = copy_project(tmp_path / f"worker{index}")
        env = {
            **os.environ,
            "KEDRO_DISABLE_TELEMETRY": "1",
            "TF_CPP_MIN_LOG_LEVEL": "2",
            "TF_CONFIG": json.dumps(
                {"cluster": cluster, "task": {"type": "worker", "index": index}}
            ),
        }
        result = subprocess.run(
            [
                kedro,
                "run",
                "--env",
                "smoke",
                "--pipelines",
                "synthetic",
                "--params",
                "train.strategy=multi_worker",
            ],
            cwd=project,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        saved = (project / "data/01_raw/raw_dataset.json").exists()
        database = project / "mlflow.db"
        runs = (
            MlflowClient(f"sqlite:///{database}").search_runs(
                [
                    MlflowClient(f"sqlite:///{database}")
                    .get_experiment_by_name("caption-pipeline")
                    .experiment_id
                ]
            )
            if database.exists()
            else []
        )
        assert (saved, len(runs)) == ((True, 1) if index == 0 else (False, 0)), (
            index,
            saved,
            len(runs),
        )
