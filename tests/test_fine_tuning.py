"""Encoder fine-tuning: what it trains and what it keeps, its two learning rates (TensorFlow with
XLA, and JAX), resume after kill -9, NASNet, and the train pipeline around it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from types import SimpleNamespace

import keras
import numpy as np
import pandas as pd
import pytest
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner

from caption_pipeline.data.shards.reader import make_image_dataset
from caption_pipeline.datasets import KerasModelDataset
from caption_pipeline.model import Captioner, ModelConfig
from caption_pipeline.params import defaults, from_conf
from caption_pipeline.pipelines.train import create_pipeline
from caption_pipeline.pipelines.train.nodes import caption_datasets, steps_per_epoch
from caption_pipeline.training.cross_entropy import TrainConfig
from caption_pipeline.training.features import (
    build_feature_plan,
    build_frozen_encoder,
    load_model_inputs,
    write_model_inputs,
)
from caption_pipeline.training.fine_tuning import FineTuneConfig, fine_tune_captioner
from tests.test_features import FROZEN, SIZE, encoder_file, write_image_shards
from tests.test_training import TINY_MODEL, driver, history_of, kill_when

# make_images' captions: <start> w4 .. w8 <end>, at most 5 words
WORDS = [f"w{i}" for i in range(4, 10)]
VOCABULARY = {
    "tokens": ["<pad>", "<start>", "<end>", "<unk>", *WORDS],
    "counts": dict.fromkeys(WORDS, 1),
    "min_count": 1,
    "max_caption_length": 6,
}
CAPTION_LENGTH = 6 + 2
MODEL = {**FROZEN, "embed_dim": 16, "attention_dim": 16, "lstm_units": 32}
TRAIN = {
    "epochs": 1,
    "batch_size": 4,
    "progress": False,
    "jit_compile": False,
    "early_stopping_patience": None,
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Image shards (8 train, 4 val images of 64 px) and the frozen compact encoder's features."""
    root = tmp_path_factory.mktemp("fine_tuning")
    _, images = write_image_shards(
        root, {"train": 8, "val": 4, "test": 2}, {"train": 2, "val": 1, "test": 1}
    )
    weights = encoder_file(root / "encoder.weights.h5", FROZEN, seed=3)
    plan = build_feature_plan(
        images, weights, FROZEN, {"batch_size": 4, "seed": 3, "projection_images": 8}
    )
    write_model_inputs(plan, root / "model_inputs", progress=False)
    return SimpleNamespace(
        images=images, weights=weights, features=load_model_inputs(root / "model_inputs")
    )


def xent_model(data, model: dict = MODEL) -> Captioner:
    """A captioner as cross-entropy leaves it: frozen encoder with the features' weights."""
    keras.utils.set_random_seed(1)
    config = ModelConfig.from_dict({**model, "vocab_size": len(VOCABULARY["tokens"])})
    captioner = Captioner(config)
    if config.encoder == "compact":
        captioner.encoder.set_weights(build_frozen_encoder(config, data.weights).get_weights())
    return captioner


def fine_tune(captioner: Captioner, data, folder: Path, **params):
    train = from_conf(TrainConfig, "train", **TRAIN, checkpoint_dir=str(folder / "xent"))
    config = from_conf(
        FineTuneConfig,
        "fine_tune",
        **{
            "enabled": True,
            "batch_size": 4,
            "progress": False,
            "checkpoint_dir": str(folder / "fine_tune"),
            **params,
        },
    )
    phase = config.train_config(train)
    datasets = caption_datasets(data.images, phase, captioner.config.image_size, CAPTION_LENGTH)
    return fine_tune_captioner(
        captioner,
        datasets,
        train,
        config,
        steps_per_epoch=steps_per_epoch(data.images, phase),
        data_fingerprint={"test": "fine_tuning"},
    )


def encoder_values(model: Captioner) -> dict[str, np.ndarray]:
    return {v.path: keras.ops.convert_to_numpy(v).copy() for v in model.encoder.weights}


def decoder_values(model: Captioner) -> list[np.ndarray]:
    return [keras.ops.convert_to_numpy(v).copy() for v in model.decoder.weights]


def is_batchnorm(path: str) -> bool:
    return path.split("/")[-1] in ("gamma", "beta", "moving_mean", "moving_variance")


def test_fine_tuning_trains_the_encoder_but_not_its_batchnorm(data, tmp_path):
    start = xent_model(data)
    before = encoder_values(start)
    tuned, history, _ = fine_tune(
        start, data, tmp_path, learning_rate=1e-2, encoder_learning_rate=1e-2, max_steps_per_epoch=2
    )
    after = encoder_values(tuned)
    assert tuned.config.trains_encoder and tuned.config.encoder_batchnorm == "frozen"
    assert history["step"].tolist() == [2] and np.isfinite(history["val_xent"]).all()
    kernels = [p for p in before if not is_batchnorm(p)]
    assert kernels and all(not np.allclose(after[p], before[p]) for p in kernels)
    statistics = [p for p in before if is_batchnorm(p)]
    assert len(statistics) == 4 * 3  # 3 blocks: gamma, beta and the moving mean and variance
    for path in statistics:
        np.testing.assert_array_equal(after[path], before[path], err_msg=path)
    assert not (tmp_path / "fine_tune").exists()  # a finished phase cleans up

    # batchnorm: train normalises by batch statistics and moves the moving ones
    trained, _, _ = fine_tune(
        xent_model(data), data, tmp_path / "train", batchnorm="train", max_steps_per_epoch=2
    )
    moved = encoder_values(trained)
    assert all(not np.allclose(moved[p], before[p]) for p in statistics if "moving" in p)


def test_an_encoder_learning_rate_of_zero_leaves_the_encoder_as_it_was(data, tmp_path):
    start = xent_model(data)
    encoder, decoder = encoder_values(start), decoder_values(start)
    tuned, _, _ = fine_tune(start, data, tmp_path, encoder_learning_rate=0.0, max_steps_per_epoch=1)
    for path, value in encoder_values(tuned).items():
        np.testing.assert_array_equal(value, encoder[path], err_msg=path)
    assert any(
        not np.array_equal(a, b) for a, b in zip(decoder_values(tuned), decoder, strict=False)
    )


ONE_STEP = textwrap.dedent("""
    import json, keras, numpy as np
    from caption_pipeline.model import Captioner, ModelConfig, TwoRateAdam, variable_indices
    from caption_pipeline.params import from_conf
    LR = 1e-2
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (4, 16, 16, 3)).astype("float32")
    captions = np.concatenate([np.ones((4, 1)), rng.integers(4, 12, (4, 5)),
                               np.full((4, 1), 2)], axis=1).astype("int32")
    moves = {}
    for ratio in (0.1, 1.0):
        keras.utils.set_random_seed(0)
        model = Captioner(from_conf(ModelConfig, "model",
                                    vocab_size=12, image_size=16, compact_filters=(8, 8),
                                    embed_dim=16, attention_dim=16, lstm_units=24,
                                    dropout=0.0, encoder_trainable=True))
        encoder = variable_indices(model.trainable_variables, model.encoder.trainable_variables)
        model.compile(optimizer=TwoRateAdam(LR, ratio=ratio, scaled=encoder), jit_compile=True)
        before = [keras.ops.convert_to_numpy(v).copy() for v in model.trainable_variables]
        model.train_on_batch({"image": images}, captions)
        # Adam's first step moves every weight with a gradient by ~lr: the largest move is lr
        largest = [float(np.abs(keras.ops.convert_to_numpy(v) - b).max())
                   for v, b in zip(model.trainable_variables, before)]
        moves[ratio] = {"encoder": [m for i, m in enumerate(largest) if i in encoder],
                        "decoder": [m for i, m in enumerate(largest) if i not in encoder]}
    print(json.dumps({"backend": keras.backend.backend(), "lr": LR, "moves": moves}))
""")


@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
def test_the_encoder_moves_ratio_times_the_decoders_first_adam_step(backend):
    env = {
        **os.environ,
        "KERAS_BACKEND": backend,
        "JAX_PLATFORMS": "cpu",
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    done = subprocess.run(
        [sys.executable, "-c", ONE_STEP], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["backend"] == backend
    lr, moves = result["lr"], result["moves"]
    # The decoder's rate is the same whatever the encoder's; Adam's first step moves a weight
    # by ~lr (its gradient's sign), so the encoder moves by ~r * lr: r times its moves at r = 1.
    assert moves["0.1"]["decoder"] == moves["1.0"]["decoder"]
    assert moves["1.0"]["encoder"] == pytest.approx([lr] * len(moves["1.0"]["encoder"]), rel=0.02)
    assert moves["0.1"]["encoder"] == pytest.approx(
        [0.1 * move for move in moves["1.0"]["encoder"]], rel=1e-3
    )


def test_kill_9_during_fine_tuning_resumes_to_the_same_result(shard_project, tmp_path):
    model = {**TINY_MODEL, "dropout": 0.0}  # dropout with resume: tests/test_exact_resume.py

    def configs(root: Path) -> tuple[dict, dict]:
        train = {
            "epochs": 1,
            "batch_size": 8,
            "max_steps_per_epoch": 4,
            "checkpoint_dir": str(root / "xent"),
            "progress": False,
            "early_stopping_patience": None,
            "jit_compile": False,
        }
        tuning = {
            "enabled": True,
            "epochs": 2,
            "batch_size": 8,
            "max_steps_per_epoch": 5,
            "checkpoint_every_steps": 2,
            "progress": False,
            "checkpoint_dir": str(root / "fine_tune"),
        }
        return train, tuning

    xent_steps = 4

    train, tuning = configs(tmp_path / "unbroken")
    unbroken = driver(shard_project, train, fine_tune=tuning, model=model)
    expected, _ = unbroken.communicate(timeout=600)
    assert unbroken.returncode == 0, expected[-3000:]

    train, tuning = configs(tmp_path / "killed")
    killed_at = kill_when(
        driver(shard_project, train, fine_tune=tuning, model=model),
        tmp_path / "killed" / "fine_tune" / "latest.json",
        6,
    )
    assert 5 < killed_at < 10
    second = driver(shard_project, train, fine_tune=tuning, model=model)
    output, _ = second.communicate(timeout=600)
    assert second.returncode == 0, output[-3000:]
    # Cross-entropy is restored, not retrained; fine-tuning picks up where it was.
    assert f"Resuming from checkpoint at step {xent_steps}" in output
    assert f"Resuming from checkpoint at step {killed_at}" in output
    assert history_of(output)[0]["val_xent"] == history_of(expected)[0]["val_xent"]
    resumed, reference = (history_of(text, "FINE_TUNE_HISTORY") for text in (output, expected))
    assert [row["step"] for row in resumed] == [5, 10]
    assert [row["val_xent"] for row in resumed] == pytest.approx(
        [row["val_xent"] for row in reference], rel=1e-5
    )
    assert not (tmp_path / "killed" / "xent").exists()  # both phases clean up at the end
    assert not (tmp_path / "killed" / "fine_tune").exists()


def test_nasnet_mobile_fine_tunes_end_to_end(data, tmp_path):
    model = {
        **defaults("model"),
        "encoder": "nasnet_mobile",
        "image_size": SIZE,
        "encoder_weights": None,
        "encoder_trainable": False,
        "embed_dim": 16,
        "attention_dim": 16,
        "lstm_units": 32,
    }
    start = xent_model(data, model)
    before = encoder_values(start)
    tuned, history, _ = fine_tune(start, data, tmp_path, batch_size=2, max_steps_per_epoch=2)
    after = encoder_values(tuned)
    assert history["step"].tolist() == [2] and np.isfinite(history["val_xent"]).all()
    assert any(not np.array_equal(after[p], before[p]) for p in before if not is_batchnorm(p))
    moving = [p for p in before if "moving" in p]
    assert len(moving) > 100  # NASNet's BN layers, nested two models deep, all frozen
    assert all(np.array_equal(after[p], before[p]) for p in moving)


def test_train_pipeline_fine_tunes_from_features_and_saves_an_image_model(data, tmp_path):
    # The runner releases what a later node has read: the histories reach us as metric series.
    outputs = ("captioner@keras", "training_metrics", "fine_tune_metrics", "self_critical_metrics")
    catalog = DataCatalog(
        {
            "model_inputs": MemoryDataset(data.features),
            "vocabulary": MemoryDataset(VOCABULARY),
            "caption_table": MemoryDataset(pd.DataFrame()),
            "params:model": MemoryDataset(MODEL),
            "params:train": MemoryDataset(
                {
                    **defaults("train"),
                    **TRAIN,
                    "max_steps_per_epoch": 2,
                    "checkpoint_dir": str(tmp_path / "xent"),
                }
            ),
            "params:fine_tune": MemoryDataset(
                {
                    **defaults("fine_tune"),
                    "enabled": True,
                    "batch_size": 4,
                    "max_steps_per_epoch": 2,
                    "progress": False,
                    "checkpoint_dir": str(tmp_path / "fine_tune"),
                }
            ),
            "params:self_critical": MemoryDataset({**defaults("self_critical"), "enabled": False}),
            **{name: MemoryDataset(copy_mode="assign") for name in outputs},
        }
    )
    SequentialRunner().run(create_pipeline(), catalog)
    captioner = catalog.load("captioner@keras")
    assert [point["step"] for point in catalog.load("training_metrics")["val_xent"]] == [1]
    # The same series as the cross-entropy phase's (the catalog prefixes them fine_tune.).
    metrics = catalog.load("fine_tune_metrics")
    assert [point["step"] for point in metrics["val_xent"]] == [1]
    assert catalog.load("self_critical_metrics") == {}
    assert not (tmp_path / "xent").exists() and not (tmp_path / "fine_tune").exists()
    assert captioner.config.trains_encoder

    # Saved and loaded, it encodes images with the fine-tuned encoder, no longer the one that
    # computed the features; its optimizer (two rates) comes back whole.
    dataset = KerasModelDataset(filepath=str(tmp_path / "captioner.keras"))
    dataset.save(captioner)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = dataset.load()
    assert not [w for w in caught if "optimizer" in str(w.message)], caught
    assert type(loaded.optimizer).__name__ == "TwoRateAdam"
    batch = next(iter(make_image_dataset(data.images, "val", batch_size=4)))
    images = {"image": batch["image"]}
    encoded = keras.ops.convert_to_numpy(loaded(images))
    np.testing.assert_allclose(
        encoded, keras.ops.convert_to_numpy(captioner(images)), rtol=1e-5, atol=1e-5
    )
    frozen = build_frozen_encoder(captioner.config, data.weights).predict_on_batch(images["image"])
    assert not np.allclose(encoded, frozen, atol=1e-3)
