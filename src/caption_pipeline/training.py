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

A checkpoint is a folder `step-NNNNNNNN-<unique>/` holding the weights (model and optimizer
state), `variables.npz` (RNG and metric state) and `state.json` (history, counters,
early-stopping state). It is written under a temporary name and renamed to a name no other
folder has (never replacing one: that takes two renames, and a kill between them leaves no
folder under the name), then `latest.json` is pointed at it atomically, then the older folders
are deleted. A folder that `latest.json` does not name is never read (and is deleted on
resume), so a kill at any instruction leaves one complete checkpoint in charge.

Under `strategy: multi_worker` every worker runs this same code on the same `checkpoint_dir`
(a shared filesystem), and only the chief writes there: `is_chief` (TF_CONFIG's "chief" task,
or "worker" 0 when the cluster has none; a single process is the chief). The other workers read
the chief's checkpoint to resume, and otherwise write every checkpoint to a scratch folder of
their own that is deleted at once: saving reads the metrics' on-read variables, an all-reduce
that every worker must enter (tests/test_multi_worker.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pandas as pd

from caption_pipeline.atomic import atomic_directory, atomic_write_json, remove_stale_temporaries
from caption_pipeline.devices import (
    AUTO,
    PRECISIONS,
    log_devices,
    resolve_precision,
    training_devices,
)
from caption_pipeline.errors import DataError
from caption_pipeline.model import Captioner, ModelConfig
from caption_pipeline.params import from_params, require

logger = logging.getLogger(__name__)

STRATEGIES = ("default", "mirrored", "multi_worker")
LATEST = "latest.json"
BEST_WEIGHTS = "best.weights.h5"
WEIGHTS = "checkpoint.weights.h5"
VARIABLES = "variables.npz"
# In the run fingerprint: checkpoints of an older layout (which counted optimizer iterations
# and clipped each variable's gradient alone) are started afresh rather than misread.
CHECKPOINT_FORMAT = 2


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


@dataclass
class TrainState:
    """What a checkpoint remembers besides the weights."""

    fingerprint: str
    history: list[dict[str, Any]] = field(default_factory=list)  # one row per epoch
    steps: list[dict[str, Any]] = field(default_factory=list)  # per-step loss samples
    best_val_xent: float = math.inf
    best_epoch: int = -1
    bad_epochs: int = 0
    stopped_early: bool = False
    # Counted here, not read from the optimizer (see the module docstring).
    step: int = 0  # batches trained, all epochs
    epoch: int = 0  # the epoch in progress, from 0
    batch: int = 0  # its batches done (all of them: trained, not yet validated)


# A function (split, epoch, caption_mode, shuffle) -> tf.data.Dataset of batches.
DatasetFactory = Callable[[str, int, str, bool], Any]


def make_strategy(config: TrainConfig):
    """The tf.distribute strategy of `config.strategy`; None for Keras' default."""
    if config.strategy == "default":
        return None
    if keras.backend.backend() != "tensorflow":
        raise DataError(
            f"parameters train.strategy: {config.strategy!r} needs KERAS_BACKEND=tensorflow "
            f"(this run uses {keras.backend.backend()!r}); use 'default'"
        )
    import tensorflow as tf

    if config.strategy == "mirrored":
        strategy = tf.distribute.MirroredStrategy(devices=config.devices)
    else:
        # Reads the cluster from the TF_CONFIG environment variable, one process per worker.
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    logger.info("Training with the %s strategy over %d replicas", config.strategy,
                strategy.num_replicas_in_sync)
    return strategy


def is_chief(config: TrainConfig) -> bool:
    """Whether this process writes checkpoints, best weights and results: always, but under
    `strategy: multi_worker` only TF_CONFIG's "chief" task, or "worker" 0 when there is none."""
    return config.strategy != "multi_worker" or is_chief_task()


def is_chief_task() -> bool:
    """TF_CONFIG's task is the cluster's chief (True without a TF_CONFIG)."""
    if not os.environ.get("TF_CONFIG"):
        return True
    try:
        tf_config = json.loads(os.environ["TF_CONFIG"])
        cluster, task = tf_config.get("cluster", {}), tf_config.get("task", {})
        kind, index = task.get("type"), int(task.get("index", 0))
    except (ValueError, TypeError, AttributeError) as error:
        raise DataError(f"TF_CONFIG: not a cluster and task ({error})") from None
    if "chief" in cluster:
        return kind == "chief"
    return kind == "worker" and index == 0


def _barrier(strategy) -> None:
    """Return once every worker of `strategy` is here (an all-reduce); no-op without one."""
    if strategy is None or strategy.num_replicas_in_sync == 1:
        return
    import tensorflow as tf

    strategy.reduce(tf.distribute.ReduceOp.SUM,
                    strategy.run(lambda: tf.constant(1.0)), axis=None)


def _without_symbolic_build(model: keras.Model) -> None:
    """Under tf.distribute, Keras' `fit` and `evaluate` first all-reduce a whole batch to build
    the model symbolically (`_maybe_symbolic_build`, Keras 3.15), which fails under
    MultiWorkerMirroredStrategy (its `reduce` takes one tensor, not a batch's dict: a
    ValueError). `build_captioner` has built every layer and the optimizer, and the Captioner
    compiles no loss or metric, so there is nothing left to build: the step is skipped while
    that holds."""
    original = model._maybe_symbolic_build

    def maybe_symbolic_build(iterator=None, data_batch=None):
        built = (all(layer.built for layer in model._flatten_layers())
                 and all(part is None or part.built
                         for part in (model._compile_metrics, model._compile_loss)))
        if not built:
            original(iterator=iterator, data_batch=data_batch)

    object.__setattr__(model, "_maybe_symbolic_build", maybe_symbolic_build)


def _clip_after_all_reduce(optimizer: keras.optimizers.Optimizer) -> None:
    """Clip the global norm of the gradient all the replicas make together, as one device
    clips its batch's. Keras 3.15 clips each replica's gradient (of its share of the loss)
    before the all-reduce sums them: another direction and size whenever the clip bites. Here
    the replicas sum their gradients first, clip the sum, and hand Keras 1/N of it each, which
    its own all-reduce sums back (exactly: N = 2^k). One more all-reduce per step; only with
    `global_clipnorm` set. Under mixed precision it is the wrapped optimizer that clips."""
    import tensorflow as tf

    optimizer = getattr(optimizer, "inner_optimizer", optimizer)
    if optimizer.global_clipnorm is None:
        return
    original = optimizer._clip_gradients

    def clip_gradients(grads):
        context = tf.distribute.get_replica_context()
        if context is None or context.num_replicas_in_sync == 1:
            return original(grads)
        present = [i for i, grad in enumerate(grads) if grad is not None]
        summed = context.all_reduce(tf.distribute.ReduceOp.SUM, [grads[i] for i in present])
        clipped = original(summed)
        share = 1.0 / context.num_replicas_in_sync
        grads = list(grads)
        for i, grad in zip(present, clipped):
            grads[i] = grad * tf.cast(share, grad.dtype)
        return grads

    object.__setattr__(optimizer, "_clip_gradients", clip_gradients)


def with_device_defaults(config: TrainConfig) -> TrainConfig:
    """`config` with `precision: auto` resolved for the devices found, which are logged."""
    devices = training_devices()
    precision = resolve_precision(config.precision, devices)
    log_devices(devices, precision, config.precision, config.jit_compile)
    return dataclasses.replace(config, precision=precision)


def run_fingerprint(model_config: ModelConfig, config: TrainConfig, data: dict) -> str:
    """What a checkpoint must match to be resumed: model, optimisation and data."""
    ignored = {"checkpoint_dir", "keep_checkpoints", "progress", "epochs",
               "early_stopping_patience", "log_every_steps", "checkpoint_every_steps"}
    train = {k: v for k, v in dataclasses.asdict(config).items() if k not in ignored}
    blob = json.dumps([dataclasses.asdict(model_config), train, data, CHECKPOINT_FORMAT],
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# (model, learning-rate schedule, clipnorm) -> the optimizer that trains `model`; clipnorm is
# the global norm (`TrainConfig.clipnorm`), passed to Keras as `global_clipnorm`.
OptimizerFactory = Callable[[Captioner, Any, float | None], keras.optimizers.Optimizer]


def adam(model: Captioner, schedule, clipnorm: float | None) -> keras.optimizers.Optimizer:
    """The cross-entropy phase's optimizer: one learning rate for every variable, gradients
    clipped to a global norm of `clipnorm`."""
    return keras.optimizers.Adam(schedule, global_clipnorm=clipnorm)


def build_captioner(model_config: ModelConfig, config: TrainConfig, steps_per_epoch: int,
                    sample_inputs: dict, *, optimizer: OptimizerFactory = adam,
                    initialise: Callable[[Captioner], None] | None = None) -> Captioner:
    """A compiled Captioner with `optimizer` (Adam), exponential decay and gradient clipping;
    the decoder alone when `sample_inputs` are precomputed features (no encoder runs, so none
    is built). `initialise(model)`: its starting weights and trainable layers, set before the
    optimizer is made (and before a checkpoint restore replaces them), since it may change
    which variables the optimizer trains."""
    keras.mixed_precision.set_global_policy(config.precision)
    features = sample_inputs.get("features")
    model = Captioner(model_config,
                      feature_shape=None if features is None else tuple(features.shape[1:]))
    if initialise is not None:
        initialise(model)
    schedule = keras.optimizers.schedules.ExponentialDecay(
        config.learning_rate,
        decay_steps=max(1, round(config.lr_decay_epochs * steps_per_epoch)),
        decay_rate=config.lr_decay_rate,
    )
    model.compile(optimizer=optimizer(model, schedule, config.clipnorm),
                  jit_compile=config.jit_compile)
    model(sample_inputs)  # builds every variable, so that weights can be loaded
    model.optimizer.build(model.trainable_variables)
    return model


def weights_digest(model: keras.Model) -> str:
    """A hash of every weight of `model`: what a later phase's checkpoint must start from."""
    digest = hashlib.sha256()
    for weights in model.get_weights():
        digest.update(np.ascontiguousarray(weights).tobytes())
    return digest.hexdigest()[:16]


def current_learning_rate(model: Captioner) -> float:
    optimizer = model.optimizer
    return float(keras.ops.convert_to_numpy(optimizer.learning_rate))


def extra_variables(model: keras.Model) -> list:
    """What a checkpoint keeps besides `save_weights`: the state of every `SeedGenerator`
    (dropout masks; Keras keeps them out of the weights) and of every metric (running totals),
    in `model.variables` order, which is the same for every model of one configuration."""
    seeds = [v for v in model.variables if v.path.endswith("seed_generator_state")]
    return seeds + metric_variables(model)


def metric_variables(model: keras.Model) -> list:
    return [v for metric in model.metrics for v in metric.variables]


def metric_results(model: keras.Model) -> dict[str, float]:
    """The model's metrics as `fit` logs them at an epoch's end."""
    return {m.name: float(keras.ops.convert_to_numpy(m.result())) for m in model.metrics}


class Checkpoints:
    """Atomic checkpoint folders under `root`, with `latest.json` naming the one in charge
    (see the module docstring). `state_type`: the dataclass of `state.json` (`TrainState`;
    SCST has its own). `chief=False` (a multi-worker run's other workers): `root` is only
    read; every save goes to a scratch folder, deleted before `save` returns."""

    def __init__(self, root: str | Path, state_type: type = TrainState, *, chief: bool = True):
        self.root = Path(root)
        self.state_type = state_type
        self.chief = chief

    def latest(self) -> Path | None:
        pointer = self.root / LATEST
        if not pointer.exists():
            return None
        try:
            folder = self.root / json.loads(pointer.read_text())["checkpoint"]
        except (ValueError, KeyError, TypeError) as error:
            raise DataError(f"{pointer}: not a checkpoint pointer ({error})") from None
        if not (folder / "state.json").exists():
            raise DataError(f"{pointer} names {folder.name}, which is incomplete or missing")
        return folder

    def save(self, model: keras.Model, state, step: int) -> Path | None:
        if not self.chief:
            # The same reads as the chief's (an all-reduce of the metrics), written nowhere
            # that lasts.
            with tempfile.TemporaryDirectory(prefix="worker-checkpoint-") as scratch:
                self._write(Path(scratch), model, state, step)
            return None
        # A unique name: the folder is renamed once into place, never over another one.
        name = f"step-{step:08d}-{uuid.uuid4().hex[:8]}"
        with atomic_directory(self.root / name) as tmp:
            self._write(tmp, model, state, step)
        self._point_at(name, step)
        self._remove_unnamed(name)
        return self.root / name

    @staticmethod
    def _write(folder: Path, model: keras.Model, state, step: int) -> None:
        model.save_weights(folder / WEIGHTS)
        np.savez(folder / VARIABLES, *[keras.ops.convert_to_numpy(v)
                                       for v in extra_variables(model)])
        atomic_write_json(folder / "state.json", dataclasses.asdict(state) | {"step": step})

    def _point_at(self, name: str, step: int) -> None:
        """The instant the new checkpoint takes charge: one atomic rename of `latest.json`."""
        atomic_write_json(self.root / LATEST, {"checkpoint": name, "step": step})

    def _remove_unnamed(self, name: str | None) -> None:
        """Delete the checkpoint folders other than `name`: older ones, and those a kill left
        before `latest.json` named them."""
        for old in self.root.glob("step-*"):
            if old.name != name:
                shutil.rmtree(old)

    def restore(self, model: keras.Model, fingerprint: str):
        """Load the latest checkpoint into `model` if it belongs to this run, else None."""
        if self.chief:
            remove_stale_temporaries(self.root)
        folder = self.latest()
        if self.chief and self.root.exists():
            self._remove_unnamed(folder and folder.name)
        if folder is None:
            return None
        saved = json.loads((folder / "state.json").read_text())
        if saved.get("fingerprint") != fingerprint:
            logger.warning("Checkpoint %s is of another configuration or data; starting afresh",
                           folder)
            self.clear()
            return None
        model.load_weights(folder / WEIGHTS)
        variables = extra_variables(model)
        if not (folder / VARIABLES).exists():
            raise DataError(f"{folder / VARIABLES} is missing: a checkpoint is incomplete")
        with np.load(folder / VARIABLES) as arrays:
            values = [arrays[f"arr_{i}"] for i in range(len(arrays.files))]
        if len(values) != len(variables) or any(
                value.shape != tuple(v.shape) for value, v in zip(values, variables)):
            raise DataError(f"{folder / VARIABLES}: {len(values)} RNG and metric variables, "
                            f"the model has {len(variables)} (another model?)")
        for variable, value in zip(variables, values):
            variable.assign(value)
        known = {f.name for f in dataclasses.fields(self.state_type)}
        return self.state_type(**{k: v for k, v in saved.items() if k in known})

    def save_best(self, model: keras.Model) -> None:
        if not self.chief:  # joins the chief's reads, as `save` does
            with tempfile.TemporaryDirectory(prefix="worker-best-") as scratch:
                model.save_weights(Path(scratch) / BEST_WEIGHTS)
            return
        path = self.root / BEST_WEIGHTS
        tmp = path.with_name(f".tmp-{BEST_WEIGHTS}")
        self.root.mkdir(parents=True, exist_ok=True)
        model.save_weights(tmp)
        tmp.replace(path)

    def load_best(self, model: keras.Model) -> bool:
        path = self.root / BEST_WEIGHTS
        if not path.exists():
            return False
        model.load_weights(path)
        return True

    def clear(self) -> None:
        if self.chief and self.root.exists():
            shutil.rmtree(self.root)


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

    def __init__(self, checkpoints: Checkpoints, state: TrainState, config: TrainConfig,
                 metrics: list | None = None):
        super().__init__()
        self.checkpoints, self.state, self.config = checkpoints, state, config
        self.metrics = metrics

    def on_epoch_begin(self, epoch, logs=None):
        if self.metrics is not None:
            for variable, value in zip(metric_variables(self.model), self.metrics):
                variable.assign(value)
            self.metrics = None

    def on_train_batch_end(self, batch, logs=None):
        self.state.step += 1
        self.state.batch += 1
        if logs and self.state.step % self.config.log_every_steps == 0:
            self.state.steps.append({"step": self.state.step, "loss": float(logs["loss"])})
        if self.state.step % self.config.checkpoint_every_steps == 0:
            self.checkpoints.save(self.model, self.state, self.state.step)


@contextlib.contextmanager
def _scope(strategy) -> Iterator[None]:
    if strategy is None:
        yield
    else:
        with strategy.scope():
            yield


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
    strategy = make_strategy(config)
    fingerprint = run_fingerprint(model_config, config, data_fingerprint)
    # Validation scores every caption; grouped, the encoder runs once per image for them.
    val_mode = "grouped" if config.caption_mode == "grouped" else "all"
    sample_inputs, _ = next(iter(datasets("val", 0, val_mode, False)))
    with _scope(strategy):
        model = build_captioner(model_config, config, steps_per_epoch, sample_inputs,
                                optimizer=optimizer, initialise=initialise)
    if strategy is not None:
        _clip_after_all_reduce(model.optimizer)
    if config.strategy == "multi_worker":
        _without_symbolic_build(model)
    checkpoints = Checkpoints(config.checkpoint_dir, chief=is_chief(config))
    state = checkpoints.restore(model, fingerprint) or TrainState(fingerprint)
    if state.step:
        logger.info("Resuming from checkpoint at step %d (epoch %d, batch %d)", state.step,
                    state.epoch + 1, state.batch)
    val = datasets("val", 0, val_mode, False)

    while state.epoch < config.epochs and not state.stopped_early:
        epoch = state.epoch
        started = time.perf_counter()
        # A resumed epoch's metric totals, which `fit` resets: the restored ones.
        totals = ([keras.ops.convert_to_numpy(v) for v in metric_variables(model)]
                  if state.batch else None)
        callback = _StepCheckpoint(checkpoints, state, config, totals)
        # Batches are a function of (seed, epoch): skipping the done ones resumes exactly.
        train = datasets("train", epoch, config.caption_mode, True)
        if config.max_steps_per_epoch:
            train = train.take(config.max_steps_per_epoch)
        # epochs=config.epochs, stopped after this one: the progress bar reads "Epoch 3/7".
        with warnings.catch_warnings():  # an epoch ends when its data does, on purpose
            warnings.filterwarnings("ignore", "Your input ran out of data")
            model.fit(train.skip(state.batch), epochs=config.epochs, initial_epoch=epoch,
                      callbacks=[callback, OneEpoch()], verbose=1 if config.progress else 0)
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
        logger.info("Epoch %d/%d: %s", epoch + 1, config.epochs,
                    ", ".join(f"{k}={v:.4g}" for k, v in row.items() if k not in ("epoch",)))
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
        logger.info("Keeping the weights of epoch %d (best val xent %.4f)",
                    state.best_epoch, state.best_val_xent)
    _barrier(strategy)  # every worker has read the best weights before the chief deletes them
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
