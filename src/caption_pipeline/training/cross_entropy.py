"""Training: fit the Captioner on shards, with checkpoints that survive `kill -9`.

A run killed and resumed ends with the same weights and history, bit for bit, as one nobody
killed (tests/test_exact_resume.py, float32 and mixed_float16). What that takes:

* `model.fit` runs one epoch per call, so that a resumed run can start in the middle of an
  epoch. `TrainState` counts the batches itself (epoch, batches done in it, global step): the
  optimizer's `iterations` cannot be trusted for it, since under mixed_float16 Keras wraps it in
  a LossScaleOptimizer whose count skips the steps whose gradients overflowed. An epoch's
  batches are a function of (seed, epoch) alone, so the resumed run skips exactly those.
* An epoch is read to its end, not for a precomputed number of steps: `bucket_boundaries`
  make up to one partial batch per bucket, more than ceil(N / B), and a `.repeat()`ed dataset
  cut at ceil(N / B) steps silently dropped the rest every epoch. `steps_per_epoch` is left to
  the learning-rate schedule (and `max_steps_per_epoch` to a `take`).
* A checkpoint knows whether its epoch was validated (`state.epoch` moves on only after its
  history row): one written at an epoch's last step, before validation, resumes with no batch
  to train and that epoch's validation, not with the next epoch (which lost the epoch's
  history row, best weights and early-stopping count). Validation runs after `fit`, with
  `evaluate`, so that it is the same call whether or not the epoch was resumed.
* The checkpoint holds what the weights file does not: the state of every dropout
  `SeedGenerator` (Keras tracks them apart from the weights, and `set_random_seed` restarts
  them) and the train metrics' running totals, so that a resumed epoch's train loss is the
  mean over all its batches, summed in the order an unbroken run sums them.

How a checkpoint is written so that a kill at any instruction leaves one complete checkpoint
in charge is `checkpoints.py`; training over several devices or machines (only the chief
writes, `is_chief`) is `distributed.py`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import pandas as pd

from caption_pipeline.model import Captioner, ModelConfig
from caption_pipeline.params import from_params, require
from caption_pipeline.training.checkpoints import (
    CHECKPOINT_FORMAT,
    Checkpoints,
    TrainState,
    metric_variables,
)
from caption_pipeline.training.cluster import is_chief_of
from caption_pipeline.training.devices import (
    AUTO,
    PRECISIONS,
    log_devices,
    resolve_precision,
    training_devices,
)
from caption_pipeline.training.distributed import (
    STRATEGIES,
    barrier,
    clip_after_all_reduce,
    make_strategy,
    strategy_scope,
    without_symbolic_build,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """`params:train`; see conf/base/parameters_train.yml for what each key means."""

    epochs: int
    batch_size: int
    # sample: one random caption per image per epoch | all: every caption, one by one |
    # grouped: each image once with `captions_per_image` captions (encoder runs once for them)
    caption_mode: str
    captions_per_image: int
    max_steps_per_epoch: int | None
    learning_rate: float
    lr_decay_rate: float  # exponential decay, multiplied in every `lr_decay_epochs`
    lr_decay_epochs: float
    # The largest global norm of all the gradients together (Keras' `global_clipnorm`): a
    # gradient over it is scaled down as a whole, keeping its direction. Not Keras' own
    # `clipnorm`, which clips every variable's gradient on its own and so changes the
    # direction; the key keeps its name so that parameter files stay valid.
    clipnorm: float | None
    early_stopping_patience: int | None  # epochs without a better val xent; None = off
    checkpoint_dir: str
    checkpoint_every_steps: int
    keep_checkpoints: bool  # after a finished run
    log_every_steps: int  # per-step loss recorded in the history
    strategy: str  # default | mirrored | multi_worker (TensorFlow backend)
    devices: list[str] | None  # mirrored: e.g. ["/cpu:0", "/cpu:1"]; None = all GPUs
    precision: str  # auto | float32 | mixed_float16 | mixed_bfloat16 (devices.py)
    jit_compile: bool | str
    bucket_boundaries: list[int] | None
    shuffle_buffer: int
    seed: int
    progress: bool

    def __post_init__(self):
        checks = {
            "caption_mode": self.caption_mode in ("sample", "all", "grouped"),
            "captions_per_image": self.captions_per_image >= 1,
            "strategy": self.strategy in STRATEGIES,
            "precision": self.precision in (AUTO, *PRECISIONS),
            "epochs": self.epochs >= 1,
            "batch_size": self.batch_size >= 1,
            "checkpoint_every_steps": self.checkpoint_every_steps >= 1,
        }
        require("train", self, checks)

    @classmethod
    def from_dict(cls, params: dict) -> TrainConfig:
        """From a `params:train` dict; unknown keys are an error that names them."""
        return from_params(cls, params, "train")


# A function (split, epoch, caption_mode, shuffle) -> tf.data.Dataset of batches.
DatasetFactory = Callable[[str, int, str, bool], Any]


def is_chief(config: TrainConfig) -> bool:
    """Whether this process writes checkpoints, best weights and results: always, but under
    `strategy: multi_worker` only TF_CONFIG's "chief" task, or "worker" 0 when there is none."""
    return is_chief_of(config.strategy)


def with_device_defaults(config: TrainConfig) -> TrainConfig:
    """`config` with `precision: auto` resolved for the devices found, which are logged."""
    devices = training_devices()
    precision = resolve_precision(config.precision, devices)
    log_devices(devices, precision, config.precision, config.jit_compile)
    return dataclasses.replace(config, precision=precision)


def run_fingerprint(model_config: ModelConfig, config: TrainConfig, data: dict) -> str:
    """What a checkpoint must match to be resumed: model, optimisation and data."""
    ignored = {
        "checkpoint_dir",
        "keep_checkpoints",
        "progress",
        "epochs",
        "early_stopping_patience",
        "log_every_steps",
        "checkpoint_every_steps",
    }
    train = {k: v for k, v in dataclasses.asdict(config).items() if k not in ignored}
    blob = json.dumps(
        [dataclasses.asdict(model_config), train, data, CHECKPOINT_FORMAT],
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# (model, learning-rate schedule, clipnorm) -> the optimizer that trains `model`; clipnorm is
# the global norm (`TrainConfig.clipnorm`), passed to Keras as `global_clipnorm`.
OptimizerFactory = Callable[[Captioner, Any, float | None], keras.optimizers.Optimizer]


def adam(model: Captioner, schedule, clipnorm: float | None) -> keras.optimizers.Optimizer:
    """The cross-entropy phase's optimizer: one learning rate for every variable, gradients
    clipped to a global norm of `clipnorm`."""
    return keras.optimizers.Adam(schedule, global_clipnorm=clipnorm)


def build_captioner(
    model_config: ModelConfig,
    config: TrainConfig,
    steps_per_epoch: int,
    sample_inputs: dict,
    *,
    optimizer: OptimizerFactory = adam,
    initialise: Callable[[Captioner], None] | None = None,
) -> Captioner:
    """A compiled Captioner with `optimizer` (Adam), exponential decay and gradient clipping;
    the decoder alone when `sample_inputs` are precomputed features (no encoder runs, so none
    is built). `initialise(model)`: its starting weights and trainable layers, set before the
    optimizer is made (and before a checkpoint restore replaces them), since it may change
    which variables the optimizer trains."""
    keras.mixed_precision.set_global_policy(config.precision)
    features = sample_inputs.get("features")
    model = Captioner(
        model_config, feature_shape=None if features is None else tuple(features.shape[1:])
    )
    if initialise is not None:
        initialise(model)
    schedule = keras.optimizers.schedules.ExponentialDecay(
        config.learning_rate,
        decay_steps=max(1, round(config.lr_decay_epochs * steps_per_epoch)),
        decay_rate=config.lr_decay_rate,
    )
    model.compile(
        optimizer=optimizer(model, schedule, config.clipnorm), jit_compile=config.jit_compile
    )
    model(sample_inputs)  # builds every variable, so that weights can be loaded
    model.optimizer.build(model.trainable_variables)
    return model


def current_learning_rate(model: Captioner) -> float:
    optimizer = model.optimizer
    return float(keras.ops.convert_to_numpy(optimizer.learning_rate))


def metric_results(model: keras.Model) -> dict[str, float]:
    """The model's metrics as `fit` logs them at an epoch's end."""
    return {m.name: float(keras.ops.convert_to_numpy(m.result())) for m in model.metrics}


class OneEpoch(keras.callbacks.Callback):
    """Ends `fit` after one epoch (and its validation): the caller loops over the epochs, and
    `fit(epochs=N, initial_epoch=k)` makes the progress bar read "Epoch k+1/N"."""

    def on_epoch_end(self, epoch, logs=None):
        self.model.stop_training = True


class _StepCheckpoint(keras.callbacks.Callback):
    """Counts the batches, samples the per-step loss, and checkpoints every N steps.
    `metrics`: the train metrics' totals of a resumed epoch, put back after `fit` resets them.

    A checkpoint of an epoch's last step (written before its validation) resumes with no batch
    left to train: `fit` then trains none, the restored totals are the epoch's train metrics,
    and the epoch is validated, as an unbroken run validates it."""

    def __init__(
        self,
        checkpoints: Checkpoints,
        state: TrainState,
        config: TrainConfig,
        metrics: list | None = None,
    ):
        super().__init__()
        self.checkpoints, self.state, self.config = checkpoints, state, config
        self.metrics = metrics

    def on_epoch_begin(self, epoch, logs=None):
        if self.metrics is not None:
            for variable, value in zip(metric_variables(self.model), self.metrics, strict=False):
                variable.assign(value)
            self.metrics = None

    def on_train_batch_end(self, batch, logs=None):
        self.state.step += 1
        self.state.batch += 1
        if logs and self.state.step % self.config.log_every_steps == 0:
            self.state.steps.append({"step": self.state.step, "loss": float(logs["loss"])})
        if self.state.step % self.config.checkpoint_every_steps == 0:
            self.checkpoints.save(self.model, self.state, self.state.step)


def train_captioner(
    datasets: DatasetFactory,
    model_config: ModelConfig,
    config: TrainConfig,
    *,
    steps_per_epoch: int,
    data_fingerprint: dict,
    initialise: Callable[[Captioner], None] | None = None,
    optimizer: OptimizerFactory = adam,
) -> tuple[Captioner, pd.DataFrame, pd.DataFrame]:
    """Train (or resume) and return the model with the best validation xent, the per-epoch
    history and the per-step loss samples: on precomputed features, a decoder-only Captioner
    (`Captioner.with_encoder` joins it with their encoder). `initialise`, `optimizer`: see
    `build_captioner` (fine-tuning starts from a trained model, with a learning rate of its
    own for the encoder). When `initialise` sets trained weights,
    `data_fingerprint` must name them, so that a checkpoint is resumed only on the same ones."""
    keras.utils.set_random_seed(config.seed)
    config = with_device_defaults(config)
    strategy = make_strategy(config.strategy, config.devices)
    fingerprint = run_fingerprint(model_config, config, data_fingerprint)
    # Validation scores every caption; grouped, the encoder runs once per image for them.
    val_mode = "grouped" if config.caption_mode == "grouped" else "all"
    sample_inputs, _ = next(iter(datasets("val", 0, val_mode, False)))
    with strategy_scope(strategy):
        model = build_captioner(
            model_config,
            config,
            steps_per_epoch,
            sample_inputs,
            optimizer=optimizer,
            initialise=initialise,
        )
    if strategy is not None:
        clip_after_all_reduce(model.optimizer)
    if config.strategy == "multi_worker":
        without_symbolic_build(model)
    checkpoints = Checkpoints(config.checkpoint_dir, chief=is_chief(config))
    state = checkpoints.restore(model, fingerprint) or TrainState(fingerprint)
    if state.step:
        logger.info(
            "Resuming from checkpoint at step %d (epoch %d, batch %d)",
            state.step,
            state.epoch + 1,
            state.batch,
        )
    val = datasets("val", 0, val_mode, False)

    while state.epoch < config.epochs and not state.stopped_early:
        epoch = state.epoch
        started = time.perf_counter()
        # A resumed epoch's metric totals, which `fit` resets: the restored ones.
        totals = (
            [keras.ops.convert_to_numpy(v) for v in metric_variables(model)]
            if state.batch
            else None
        )
        callback = _StepCheckpoint(checkpoints, state, config, totals)
        # Batches are a function of (seed, epoch): skipping the done ones resumes exactly.
        train = datasets("train", epoch, config.caption_mode, True)
        if config.max_steps_per_epoch:
            train = train.take(config.max_steps_per_epoch)
        # epochs=config.epochs, stopped after this one: the progress bar reads "Epoch 3/7".
        with warnings.catch_warnings():  # an epoch ends when its data does, on purpose
            warnings.filterwarnings("ignore", "Your input ran out of data")
            model.fit(
                train.skip(state.batch),
                epochs=config.epochs,
                initial_epoch=epoch,
                callbacks=[callback, OneEpoch()],
                verbose=1 if config.progress else 0,
            )
            train_logs = metric_results(model)
            val_logs = model.evaluate(val, verbose=0, return_dict=True)
        row = {
            "epoch": epoch + 1,
            "step": state.step,
            "train_loss": train_logs["loss"],
            "train_xent": train_logs["xent"],
            "val_loss": val_logs["loss"],
            "val_xent": val_logs["xent"],
            "val_perplexity": float(np.exp(val_logs["xent"])),
            "learning_rate": current_learning_rate(model),
            "seconds": round(time.perf_counter() - started, 2),
        }
        state.history.append(row)
        logger.info(
            "Epoch %d/%d: %s",
            epoch + 1,
            config.epochs,
            ", ".join(f"{k}={v:.4g}" for k, v in row.items() if k not in ("epoch",)),
        )
        if row["val_xent"] < state.best_val_xent:
            state.best_val_xent, state.best_epoch, state.bad_epochs = row["val_xent"], epoch + 1, 0
            checkpoints.save_best(model)
        else:
            state.bad_epochs += 1
            patience = config.early_stopping_patience
            if patience is not None and state.bad_epochs >= patience:
                state.stopped_early = True
                logger.info("Early stopping: val xent has not improved for %d epochs", patience)
        state.epoch, state.batch = epoch + 1, 0
        checkpoints.save(model, state, state.step)

    if checkpoints.load_best(model):
        logger.info(
            "Keeping the weights of epoch %d (best val xent %.4f)",
            state.best_epoch,
            state.best_val_xent,
        )
    barrier(strategy)  # every worker has read the best weights before the chief deletes them
    if not config.keep_checkpoints:
        checkpoints.clear()
    return model, pd.DataFrame(state.history), pd.DataFrame(state.steps)


def training_curves_figure(history: pd.DataFrame):
    """Loss and perplexity per epoch, train vs validation, and the learning rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (loss_ax, ppl_ax, lr_ax) = plt.subplots(1, 3, figsize=(13, 3.8))
    epochs = history["epoch"]
    loss_ax.plot(epochs, history["train_xent"], "o-", label="train")
    loss_ax.plot(epochs, history["val_xent"], "o-", label="validation")
    loss_ax.set(title="Cross-entropy per word", xlabel="epoch", ylabel="nats")
    loss_ax.legend()
    ppl_ax.plot(epochs, history["val_perplexity"], "o-", color="tab:orange")
    ppl_ax.set(title="Validation perplexity", xlabel="epoch", yscale="log")
    lr_ax.plot(epochs, history["learning_rate"], "o-", color="tab:green")
    lr_ax.set(title="Learning rate (end of epoch)", xlabel="epoch")
    for ax in (loss_ax, ppl_ax, lr_ax):
        ax.grid(alpha=0.3)
    figure.tight_layout()
    return figure
