"""Nodes of the `train` pipeline: thin wrappers over `caption_pipeline.training`."""

from __future__ import annotations

import dataclasses
import math

import pandas as pd

from caption_pipeline.features import feature_encoder_weights
from caption_pipeline.model import ModelConfig
from caption_pipeline.scst import SelfCriticalConfig, reference_tokens, train_self_critical
from caption_pipeline.text import Vocabulary
from caption_pipeline.tfrecords import ShardSet, make_caption_dataset
from caption_pipeline.training import (
    Checkpoints,
    TrainConfig,
    pad_captions,
    train_captioner,
    training_curves_figure,
)


def train_model(
    model_inputs: ShardSet, vocabulary: dict, caption_table: pd.DataFrame, model: dict,
    train: dict, self_critical: dict,
) -> tuple[object, pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Train with cross-entropy, then (if `self_critical.enabled`) with SCST, each resuming
    from a checkpoint if one matches; return the model val prefers, the per-epoch history and
    per-step loss samples of cross-entropy, and SCST's per-epoch history and per-step rows
    (empty when SCST is off)."""
    vocab = Vocabulary.from_dict(vocabulary)
    model_config = ModelConfig.from_dict({**model, "vocab_size": vocab.size})
    config = TrainConfig.from_dict(train)

    # <start> + the longest caption the vocabulary stage lets through + <end>
    caption_length = vocab.max_caption_length + 2

    def datasets(split: str, epoch: int, caption_mode: str, shuffle: bool):
        batches = make_caption_dataset(
            model_inputs, split, batch_size=config.batch_size, caption_mode=caption_mode,
            captions_per_image=config.captions_per_image,
            shuffle=shuffle, seed=config.seed + epoch, image_size=model_config.image_size,
            bucket_boundaries=config.bucket_boundaries, shuffle_buffer=config.shuffle_buffer,
        )
        return pad_captions(batches, caption_length)

    per_epoch = (model_inputs.num_captions("train") if config.caption_mode == "all"
                 else model_inputs.num_images("train"))
    steps = math.ceil(per_epoch / config.batch_size)
    if config.max_steps_per_epoch:
        steps = min(steps, config.max_steps_per_epoch)
    fingerprint = {"model_inputs": model_inputs.manifest.get("fingerprint"),
                   "vocabulary": vocab.size}
    scst = SelfCriticalConfig.from_dict(self_critical)
    # A run killed during SCST must find the cross-entropy phase finished, not retrain it:
    # its last checkpoint stays until SCST is done (SCST resumes only on the same weights).
    xent_config = dataclasses.replace(config, keep_checkpoints=True) if scst.enabled else config
    captioner, history, loss_steps = train_captioner(
        datasets, model_config, xent_config, steps_per_epoch=steps,
        data_fingerprint=fingerprint,
        encoder_weights=feature_encoder_weights(model_inputs, model_config))
    if not scst.enabled:
        return captioner, history, loss_steps, pd.DataFrame(), pd.DataFrame()
    _, scst_history, scst_steps = self_critical_phase(
        captioner, model_inputs, vocab, caption_table, scst, fingerprint)
    if not config.keep_checkpoints:
        Checkpoints(config.checkpoint_dir).clear()
    return captioner, history, loss_steps, scst_history, scst_steps


def self_critical_phase(captioner, model_inputs: ShardSet, vocab: Vocabulary,
                        caption_table: pd.DataFrame, config: SelfCriticalConfig,
                        fingerprint: dict) -> tuple[object, pd.DataFrame, pd.DataFrame]:
    """SCST on the model inputs' train split, val CIDEr-D choosing the epoch."""

    def datasets(split: str, epoch: int, shuffle: bool):
        return make_caption_dataset(
            model_inputs, split, batch_size=config.batch_size, caption_mode="grouped",
            captions_per_image=1, shuffle=shuffle, seed=config.seed + epoch,
            image_size=captioner.config.image_size, shuffle_buffer=config.shuffle_buffer)

    steps = math.ceil(model_inputs.num_images("train") / config.batch_size)
    if config.max_steps_per_epoch:
        steps = min(steps, config.max_steps_per_epoch)
    references = {split: reference_tokens(caption_table, [split]) for split in ("train", "val")}
    return train_self_critical(captioner, datasets, vocab, references, config,
                               steps_per_epoch=steps, data_fingerprint=fingerprint)


def plot_training_curves(training_history: pd.DataFrame):
    """Training curves as a matplotlib figure (saved as PNG by the catalog)."""
    return training_curves_figure(training_history)
