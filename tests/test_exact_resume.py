"""Exact resume (issue 12): a run killed at any point and resumed ends with the weights, history
and per-step losses of a run nobody killed, bit for bit, in float32 and mixed_float16.

In-process and tiny (a decoder on 3 x 4 features, 14 captions), so that a whole kill-and-resume
chain takes seconds. A kill is an exception raised at a chosen instruction of the checkpoint
code: everything a kill -9 would lose (the process's memory) is rebuilt by the resumed
`train_captioner` call, and nothing the exception's unwinding does touches the checkpoint
folder except `atomic_directory`'s removal of its own temporary, which a resume deletes anyway
(`remove_stale_temporaries`). tests/test_training.py kills real processes with SIGKILL.
"""

from __future__ import annotations

import dataclasses
import json

import keras
import numpy as np
import pytest

from caption_pipeline.data.text import Vocabulary
from caption_pipeline.errors import DataError
from caption_pipeline.model import ModelConfig
from caption_pipeline.params import from_conf
from caption_pipeline.training.checkpoints import Checkpoints
from caption_pipeline.training.cross_entropy import TrainConfig, train_captioner

VOCAB, REGIONS, DIM, LENGTH = 12, 3, 4, 7
TRAIN_CAPTIONS, BATCH = 14, 4
MODEL = from_conf(
    ModelConfig,
    "model",
    vocab_size=VOCAB,
    encoder_trainable=False,
    embed_dim=8,
    attention_dim=8,
    lstm_units=8,
    dropout=0.5,
)


def _split(seed: int, lengths: list[int]):
    """Captions <start> w.. <end> <pad>.. of `lengths` words, each with its image's features."""
    rng = np.random.default_rng(seed)
    n = len(lengths)
    captions = np.zeros((n, LENGTH), np.int32)
    for row, words in zip(captions, rng.permutation(lengths), strict=False):
        row[0], row[1 : words + 1], row[words + 1] = (
            Vocabulary.start_id,
            rng.integers(4, VOCAB, words),
            Vocabulary.end_id,
        )
    features = rng.normal(size=(n, REGIONS, DIM)).astype(np.float16)
    return {"features": features, "image_id": np.arange(n)}, captions


# 5 short and 9 long captions: buckets of 4 + 1 and 4 + 4 + 1, 5 batches where ceil(14 / 4) = 4
SPLITS = {"train": _split(0, [2] * 5 + [4] * 9), "val": _split(1, [2, 3, 4, 5, 3, 2])}


def datasets(split: str, epoch: int, caption_mode: str, shuffle: bool):
    """The `DatasetFactory`: train batches bucketed by caption length, as `bucket_boundaries`
    make them (up to one partial batch per bucket: more batches than ceil(N / B))."""
    import tensorflow as tf

    inputs, captions = SPLITS[split]
    ds = tf.data.Dataset.from_tensor_slices((inputs, captions))
    if not shuffle:
        return ds.batch(BATCH)
    ds = ds.shuffle(TRAIN_CAPTIONS, seed=42 + epoch)
    return ds.bucket_by_sequence_length(
        lambda _, caption: tf.reduce_sum(tf.cast(caption > 0, tf.int32)),
        bucket_boundaries=[5],
        bucket_batch_sizes=[BATCH, BATCH],
    )


def real_steps(epoch: int) -> int:
    return sum(1 for _ in datasets("train", epoch, "all", True))


class Killed(Exception):
    """Stands for a kill -9 at the instruction that raises it."""


def run(tmp_path, precision: str):
    """One `train_captioner` run: (final weights, history without timings, per-step losses,
    the optimizer's iteration count)."""
    config = from_conf(
        TrainConfig,
        "train",
        epochs=3,
        batch_size=BATCH,
        caption_mode="all",
        learning_rate=1e-2,
        clipnorm=1.0,
        early_stopping_patience=2,
        checkpoint_every_steps=1,
        log_every_steps=1,
        checkpoint_dir=str(tmp_path / "checkpoints"),
        precision=precision,
        jit_compile=False,
        progress=False,
    )
    model, history, steps = train_captioner(
        datasets,
        MODEL,
        config,
        steps_per_epoch=-(-TRAIN_CAPTIONS // BATCH),
        data_fingerprint={"data": "tiny"},
    )
    return (
        model.get_weights(),
        history.drop(columns="seconds").to_dict("records"),
        steps.to_dict("records"),
        int(keras.ops.convert_to_numpy(model.optimizer.iterations)),
    )


@pytest.fixture(autouse=True)
def float32_policy():
    yield
    keras.mixed_precision.set_global_policy("float32")


@pytest.mark.parametrize("precision", ["float32", "mixed_float16"])
def test_killed_and_resumed_run_ends_bit_exact_as_an_unbroken_one(tmp_path, monkeypatch, precision):
    expected_weights, expected_history, expected_steps, iterations = run(
        tmp_path / "unbroken", precision
    )
    # Every batch is trained, bucketing's extra partial batches included: the steps are the
    # dataset's real batches, not ceil(N / B) per epoch.
    ends = np.cumsum([real_steps(epoch) for epoch in range(3)]).tolist()
    assert ends[0] > -(-TRAIN_CAPTIONS // BATCH)
    assert [row["step"] for row in expected_history] == ends
    assert [row["step"] for row in expected_steps] == list(range(1, ends[-1] + 1))
    if precision == "mixed_float16":
        # The loss scale (2^15 at first) overflowed at least once, a step the optimizer skips
        # and does not count: a resume that counted `iterations` would skip too few batches.
        assert iterations < ends[-1]

    # Where each kill strikes: (method of Checkpoints, when, before or after the original).
    save, point_at, remove = Checkpoints.save, Checkpoints._point_at, Checkpoints._remove_unnamed
    kills = [
        # mid-epoch, right after a step checkpoint
        ("save", lambda s: s.epoch == 0 and s.batch == 2, "after"),
        # an epoch's last step is checkpointed, its validation has not run
        ("save", lambda s: s.epoch == 1 and s.batch == real_steps(1), "after"),
        # end of epoch 2: its new folder is in place, latest.json still names the old one
        ("_point_at", lambda s: s.epoch == 2 and s.batch == 0, "before"),
        # mid epoch 3: latest.json names the new folder, the old one is not yet deleted
        ("_remove_unnamed", lambda s: s.epoch == 2 and s.batch == 1, "before"),
    ]
    current = {}

    def struck(name: str, when: str) -> bool:
        kill = kills[0] if kills else None
        if kill and kill[0] == name and kill[2] == when and kill[1](current["state"]):
            kills.pop(0)
            return True
        return False

    def patched_save(self, model, state, step):
        current["state"] = state
        path = save(self, model, state, step)
        if struck("save", "after"):
            raise Killed
        return path

    def patched_point_at(self, name, step):
        if struck("_point_at", "before"):
            raise Killed
        point_at(self, name, step)

    def patched_remove(self, name):
        if "state" in current and struck("_remove_unnamed", "before"):
            raise Killed
        remove(self, name)

    monkeypatch.setattr(Checkpoints, "save", patched_save)
    monkeypatch.setattr(Checkpoints, "_point_at", patched_point_at)
    monkeypatch.setattr(Checkpoints, "_remove_unnamed", patched_remove)
    root = tmp_path / "killed" / "checkpoints"
    leftovers = []
    for _ in range(4):
        current.pop("state", None)
        with pytest.raises(Killed):
            run(tmp_path / "killed", precision)
        leftovers.append(len(list(root.glob("step-*"))))
    assert not kills, "a kill point was never reached"
    # The kills between the steps of a checkpoint replacement left two folders behind.
    assert leftovers[2:] == [2, 2]
    current.pop("state", None)
    weights, history, steps, _ = run(tmp_path / "killed", precision)

    assert history == expected_history
    assert steps == expected_steps
    for got, want in zip(weights, expected_weights, strict=True):
        np.testing.assert_array_equal(got, want)


def test_a_pointer_to_a_missing_checkpoint_is_a_data_error(tmp_path):
    (tmp_path / "latest.json").write_text(json.dumps({"checkpoint": "step-00000003-gone"}))
    with pytest.raises(DataError, match="step-00000003-gone"):
        Checkpoints(tmp_path).latest()


def test_clipnorm_is_the_global_norm_in_every_phase():
    """`clipnorm` (the parameter files' key) clips the norm of all gradients together: Keras'
    `global_clipnorm`, for cross-entropy, fine-tuning (TwoRateAdam, through a save) and SCST."""
    from caption_pipeline.model import Captioner, TwoRateAdam
    from caption_pipeline.training.cross_entropy import adam
    from caption_pipeline.training.fine_tuning import two_rate_optimizer

    model = Captioner(dataclasses.replace(MODEL, compact_filters=(4, 4), image_size=32))
    two_rate = two_rate_optimizer(0.1)(model, 1e-3, 5.0)
    restored = TwoRateAdam.from_config(two_rate.get_config())
    for optimizer in (adam(model, 1e-3, 5.0), two_rate, restored):  # adam: SCST's too
        assert (optimizer.global_clipnorm, optimizer.clipnorm) == (5.0, None)
