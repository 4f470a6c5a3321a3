"""Nodes of the `train` pipeline: thin wrappers over `caption_pipeline.training`,
`caption_pipeline.fine_tuning` and `caption_pipeline.scst`."""

from __future__ import annotations

import dataclasses
import math

import pandas as pd

from caption_pipeline.checkpoints import Checkpoints
from caption_pipeline.features import feature_encoder_weights, image_shards
from caption_pipeline.fine_tuning import (
    FineTuneConfig,
    fine_tune_captioner,
    refuse_multi_worker,
)
from caption_pipeline.model import ModelConfig
from caption_pipeline.scst import SelfCriticalConfig, reference_tokens, train_self_critical
from caption_pipeline.shards.reader import make_caption_dataset, pad_captions
from caption_pipeline.shards.shard_set import ShardSet
from caption_pipeline.text import Vocabulary
from caption_pipeline.training import (
    DatasetFactory,
    TrainConfig,
    is_chief,
    train_captioner,
    training_curves_figure,
)


def train_model(
    model_inputs: ShardSet,
    vocabulary: dict,
    caption_table: pd.DataFrame,
    model: dict,
    train: dict,
    fine_tune: dict,
    self_critical: dict,
) -> tuple[
    object, pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame
]:
    """Train with cross-entropy, then (if `fine_tune.enabled`) end to end on images with the
    encoder unfrozen, then (if `self_critical.enabled`) with SCST, each resuming from a
    checkpoint if one matches; return the model of the last phase (the epoch val prefers),
    and the per-epoch history and per-step rows of each phase (empty for a phase that is off).
    """
    vocab = Vocabulary.from_dict(vocabulary)
    model_config = ModelConfig.from_dict({**model, "vocab_size": vocab.size})
    config = TrainConfig.from_dict(train)
    tuning = FineTuneConfig.from_dict(fine_tune)
    scst = SelfCriticalConfig.from_dict(self_critical)
    refuse_multi_worker(tuning, config)  # before the cross-entropy phase, not hours after

    # <start> + the longest caption the vocabulary stage lets through + <end>
    caption_length = vocab.max_caption_length + 2

    def fingerprint(inputs: ShardSet) -> dict:
        return {"model_inputs": inputs.manifest.get("fingerprint"), "vocabulary": vocab.size}

    # A run killed in a later phase must find the earlier ones finished, not retrain them: a
    # phase's last checkpoint stays until the phases after it are done (each later phase
    # resumes only on the same starting weights).
    later = tuning.enabled or scst.enabled
    xent_config = dataclasses.replace(config, keep_checkpoints=True) if later else config
    # Features came from a frozen encoder: training runs the decoder alone, and the captioner
    # it returns carries that very encoder, so that it encodes images as the features were
    # computed (random-initialised ones included).
    encoder = feature_encoder_weights(model_inputs, model_config)
    captioner, history, loss_steps = train_captioner(
        caption_datasets(model_inputs, config, model_config.image_size, caption_length),
        model_config,
        xent_config,
        steps_per_epoch=steps_per_epoch(model_inputs, config),
        data_fingerprint=fingerprint(model_inputs),
    )
    tuned_history = tuned_steps = scst_history = scst_steps = pd.DataFrame()

    if tuning.enabled:
        if captioner.encoder is None:
            captioner = captioner.with_encoder(encoder)
        # The encoder changes: from now on every phase reads images, never the features.
        model_inputs = image_shards(model_inputs)
        phase = dataclasses.replace(tuning, keep_checkpoints=True) if scst.enabled else tuning
        phase_train = tuning.train_config(config)
        captioner, tuned_history, tuned_steps = fine_tune_captioner(
            captioner,
            caption_datasets(model_inputs, phase_train, model_config.image_size, caption_length),
            config,
            phase,
            steps_per_epoch=steps_per_epoch(model_inputs, phase_train),
            data_fingerprint=fingerprint(model_inputs),
        )
    if scst.enabled:
        _, scst_history, scst_steps = self_critical_phase(
            captioner, model_inputs, vocab, caption_table, scst, fingerprint(model_inputs), config
        )
    if captioner.encoder is None:
        captioner = captioner.with_encoder(encoder)
    for ran, keep, folder in (
        (later, config.keep_checkpoints, config.checkpoint_dir),
        (tuning.enabled and scst.enabled, tuning.keep_checkpoints, tuning.checkpoint_dir),
    ):
        if ran and not keep:
            Checkpoints(folder, chief=is_chief(config)).clear()
    return (captioner, history, loss_steps, tuned_history, tuned_steps, scst_history, scst_steps)


def caption_datasets(
    inputs: ShardSet, config: TrainConfig, image_size: int, caption_length: int
) -> DatasetFactory:
    """The (split, epoch, caption_mode, shuffle) -> batches factory of `train_captioner`, its
    captions padded to `caption_length`."""

    def datasets(split: str, epoch: int, caption_mode: str, shuffle: bool):
        batches = make_caption_dataset(
            inputs,
            split,
            batch_size=config.batch_size,
            caption_mode=caption_mode,
            captions_per_image=config.captions_per_image,
            shuffle=shuffle,
            seed=config.seed + epoch,
            image_size=image_size,
            bucket_boundaries=config.bucket_boundaries,
            shuffle_buffer=config.shuffle_buffer,
        )
        return pad_captions(batches, caption_length)

    return datasets


def steps_per_epoch(inputs: ShardSet, config: TrainConfig) -> int:
    """Batches in an epoch of the train split (at most `max_steps_per_epoch`)."""
    per_epoch = (
        inputs.num_captions("train") if config.caption_mode == "all" else inputs.num_images("train")
    )
    return _steps(per_epoch, config.batch_size, config.max_steps_per_epoch)


def _steps(elements: int, batch_size: int, max_steps: int | None) -> int:
    steps = math.ceil(elements / batch_size)
    return min(steps, max_steps) if max_steps else steps


def self_critical_phase(
    captioner,
    model_inputs: ShardSet,
    vocab: Vocabulary,
    caption_table: pd.DataFrame,
    config: SelfCriticalConfig,
    fingerprint: dict,
    train: TrainConfig | None = None,
) -> tuple[object, pd.DataFrame, pd.DataFrame]:
    """SCST on the model inputs' train split, val CIDEr-D choosing the epoch, under `train`'s
    strategy (data-parallel, `scst` module docstring; None: one device, as
    benchmarks/scst_sweep.py runs it)."""

    def datasets(split: str, epoch: int, shuffle: bool):
        return make_caption_dataset(
            model_inputs,
            split,
            batch_size=config.batch_size,
            caption_mode="grouped",
            captions_per_image=1,
            shuffle=shuffle,
            seed=config.seed + epoch,
            image_size=captioner.config.image_size,
            shuffle_buffer=config.shuffle_buffer,
        )

    steps = _steps(model_inputs.num_images("train"), config.batch_size, config.max_steps_per_epoch)
    references = {split: reference_tokens(caption_table, [split]) for split in ("train", "val")}
    return train_self_critical(
        captioner,
        datasets,
        vocab,
        references,
        config,
        steps_per_epoch=steps,
        data_fingerprint=fingerprint,
        strategy=train.strategy if train else "default",
        devices=train.devices if train else None,
    )


def plot_training_curves(training_history: pd.DataFrame):
    """Training curves as a matplotlib figure (saved as PNG by the catalog)."""
    return training_curves_figure(training_history)
