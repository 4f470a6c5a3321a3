"""Encoder fine-tuning: the phase after cross-entropy on frozen features that trains end to end.

Cross-entropy training on precomputed features (`training.py`) is fast because the encoder is
frozen; its features are then those of ImageNet (NASNet) or of the pretraining on object masks
(the compact CNN), not those captioning needs. This phase (im2txt's second phase, sgrvinod's
`fine_tune_encoder`) goes on from the trained decoder and the (pre)trained encoder with the
encoder unfrozen, reading images (the image shards the features came from):

* it is cross-entropy training, so it is `training.train_captioner` (checkpoints, resume after
  kill -9, early stopping on val xent, best epoch kept) on a Captioner whose config says
  `encoder_trainable: true`, started from the cross-entropy model's weights. The starting
  weights' digest is part of the run fingerprint: a checkpoint resumes only on the same model;
* two learning rates (`model.optimizer.TwoRateAdam`): the decoder's, and a lower one for the
  encoder (10x by default): its weights are already good, and the first gradients that reach it
  come from a decoder that has never seen features other than the frozen ones;
* BatchNormalization frozen (`batchnorm: frozen`, `model.encoder.freeze_batchnorm`): the
  encoder's BN layers run in inference mode with their moving statistics and scales fixed (in
  Keras 3 a BN layer with trainable=False does). Fine-tuning batches are small (the encoder's
  activations are kept for the backward pass), so their batch statistics are noisy, and the
  features the decoder was trained on are those of the learnt statistics (ImageNet's, for
  NASNet): normalising by batch statistics would change every feature at the first step.
  `batchnorm: train` trains them instead. It is the model's `encoder_batchnorm`, so a saved
  fine-tuned model comes back with the same trainable variables.

The model returned is that Captioner: saved, it encodes images with the fine-tuned encoder,
which is what evaluation and export run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pandas as pd

from caption_pipeline.errors import DataError
from caption_pipeline.model import Captioner, ModelConfig, TwoRateAdam, variable_indices
from caption_pipeline.model.encoder import BATCHNORM
from caption_pipeline.params import from_params, require
from caption_pipeline.training.checkpoints import weights_digest
from caption_pipeline.training.cross_entropy import (
    DatasetFactory,
    OptimizerFactory,
    TrainConfig,
    train_captioner,
)


@dataclass(frozen=True)
class FineTuneConfig:
    """`params:fine_tune`; see conf/base/parameters_train.yml for what each key means. The rest
    of the optimisation (caption mode, decay, clipping, precision, early stopping) is `train`'s."""

    enabled: bool
    epochs: int
    batch_size: int
    learning_rate: float  # the decoder's
    encoder_learning_rate: float
    batchnorm: str  # frozen: inference mode, moving statistics fixed | train
    checkpoint_dir: str
    checkpoint_every_steps: int
    keep_checkpoints: bool
    max_steps_per_epoch: int | None
    shuffle_buffer: int
    seed: int
    progress: bool

    def __post_init__(self):
        checks = {
            "epochs": self.epochs >= 1,
            "batch_size": self.batch_size >= 1,
            "learning_rate": self.learning_rate > 0,
            "encoder_learning_rate": self.encoder_learning_rate >= 0,
            "batchnorm": self.batchnorm in BATCHNORM,
            "checkpoint_every_steps": self.checkpoint_every_steps >= 1,
        }
        require("fine_tune", self, checks)

    @classmethod
    def from_dict(cls, params: dict) -> FineTuneConfig:
        return from_params(cls, params, "fine_tune")

    def train_config(self, train: TrainConfig) -> TrainConfig:
        """`train` with this phase's schedule, batches, checkpoints and seed."""
        own = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in ("enabled", "encoder_learning_rate", "batchnorm")
        }
        return dataclasses.replace(train, **own)


def fine_tune_captioner(
    captioner: Captioner,
    datasets: DatasetFactory,
    train: TrainConfig,
    config: FineTuneConfig,
    *,
    steps_per_epoch: int,
    data_fingerprint: dict,
) -> tuple[Captioner, pd.DataFrame, pd.DataFrame]:
    """Train `captioner` (cross-entropy, trained) end to end on `datasets` of images, resuming
    from a checkpoint of the same starting weights; returns the fine-tuned Captioner (val xent's
    best epoch), its per-epoch history and per-step loss, as `train_captioner` does."""
    refuse_multi_worker(config, train)
    start = captioner.get_weights()
    ratio = config.encoder_learning_rate / config.learning_rate

    def initialise(model: Captioner) -> None:
        model.set_weights(start)

    # train_captioner's fingerprint has the model (batchnorm included) and `train`'s keys
    fingerprint = {
        **data_fingerprint,
        "start_weights": weights_digest(captioner),
        "encoder_learning_rate": config.encoder_learning_rate,
    }
    return train_captioner(
        datasets,
        fine_tuned_config(captioner.config, config),
        config.train_config(train),
        steps_per_epoch=steps_per_epoch,
        data_fingerprint=fingerprint,
        initialise=initialise,
        optimizer=two_rate_optimizer(ratio),
    )


def refuse_multi_worker(config: FineTuneConfig, train: TrainConfig) -> None:
    """Fine-tuning is not supported under `train.strategy: multi_worker`: it is untested
    there (the phase joins the decoder with the feature encoder outside the strategy's scope
    and rebuilds the model; no 2-worker test covers it)."""
    if config.enabled and train.strategy == "multi_worker":
        raise DataError(
            "parameters fine_tune.enabled and train.strategy: fine-tuning is not supported "
            "under 'multi_worker'; set fine_tune.enabled=false or train.strategy=mirrored"
        )


def two_rate_optimizer(ratio: float) -> OptimizerFactory:
    """`train_captioner`'s optimizer for fine-tuning: Adam, the encoder's variables at `ratio`
    times the decoder's learning rate."""

    def optimizer(model: Captioner, schedule, clipnorm: float | None) -> TwoRateAdam:
        encoder = variable_indices(model.trainable_variables, model.encoder.trainable_variables)
        return TwoRateAdam(schedule, ratio=ratio, scaled=encoder, global_clipnorm=clipnorm)

    return optimizer


def fine_tuned_config(model: ModelConfig, config: FineTuneConfig) -> ModelConfig:
    """`model` with its encoder trained, BatchNormalization as `config` says: what the
    fine-tuned Captioner is, and what its saved config rebuilds (the same trainable variables,
    so that its optimizer's state and encoder rate load back)."""
    return dataclasses.replace(model, encoder_trainable=True, encoder_batchnorm=config.batchnorm)
