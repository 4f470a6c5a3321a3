"""Nodes of the `train` pipeline, one per training phase: cross-entropy, encoder fine-tuning,
SCST; thin wrappers over the modules `cross_entropy`, `fine_tuning` and `scst` of
`caption_pipeline.training`.

Each phase reads the captioner of the phase before it from the catalog and writes its own,
whole: on precomputed features the decoder trains alone, and the node joins it with the frozen
encoder the features came from, so that every stored captioner captions images (the next phase
takes the decoder out again when it too trains on the features). A phase that is off passes
its captioner through, with an empty history. A run killed in a later phase must find the
earlier ones finished, not retrain them: a phase's last checkpoint stays while a later phase is
enabled (each later phase resumes only on the same starting weights), and the last node clears
them.
"""

from __future__ import annotations

import dataclasses
import math

import keras
import pandas as pd

from caption_pipeline.data.shards.reader import make_caption_dataset, pad_captions
from caption_pipeline.data.shards.shard_set import ShardSet
from caption_pipeline.data.text import Vocabulary
from caption_pipeline.model import Captioner, ModelConfig
from caption_pipeline.training import scst
from caption_pipeline.training.checkpoints import Checkpoints
from caption_pipeline.training.cross_entropy import (
    DatasetFactory,
    TrainConfig,
    is_chief,
    train_captioner,
    training_curves_figure,
    with_device_defaults,
)
from caption_pipeline.training.features import feature_encoder_weights, image_shards
from caption_pipeline.training.fine_tuning import (
    FineTuneConfig,
    fine_tune_captioner,
    refuse_multi_worker,
)
from caption_pipeline.training.scst import SelfCriticalConfig, reference_tokens

Phase = tuple[Captioner, pd.DataFrame, pd.DataFrame]  # the captioner, per epoch, per step


def train_cross_entropy(
    model_inputs: ShardSet,
    vocabulary: dict,
    model: dict,
    train: dict,
    fine_tune: dict,
    self_critical: dict,
) -> Phase:
    """Cross-entropy training on the model inputs, resuming from a checkpoint if one matches:
    the captioner of val xent's best epoch, its per-epoch history and per-step loss. Every
    phase's parameters are checked here, before hours of training."""
    vocab = Vocabulary.from_dict(vocabulary)
    model_config = ModelConfig.from_dict({**model, "vocab_size": vocab.size})
    config = TrainConfig.from_dict(train)
    tuning = FineTuneConfig.from_dict(fine_tune)
    critical = SelfCriticalConfig.from_dict(self_critical)
    refuse_multi_worker(tuning, config)  # before the cross-entropy phase, not hours after
    # Features came from a frozen encoder: training runs the decoder alone, and the captioner
    # it returns carries that very encoder, so that it encodes images as the features were
    # computed (random-initialised ones included).
    encoder = feature_encoder_weights(model_inputs, model_config)
    captioner, history, steps = train_captioner(
        caption_datasets(model_inputs, config, model_config.image_size, _caption_length(vocab)),
        model_config,
        _kept_for_later(config, tuning.enabled or critical.enabled),
        steps_per_epoch=steps_per_epoch(model_inputs, config),
        data_fingerprint=_fingerprint(model_inputs, vocab),
    )
    if captioner.encoder is None:
        captioner = captioner.with_encoder(encoder)
    return captioner, history, steps


def fine_tune_encoder(
    captioner: Captioner,
    model_inputs: ShardSet,
    vocabulary: dict,
    train: dict,
    fine_tune: dict,
    self_critical: dict,
) -> Phase:
    """When `fine_tune.enabled`, `captioner` trained again, end to end on images with its
    encoder unfrozen, resuming from a checkpoint of the same starting weights: val xent's best
    epoch, its history and per-step loss; else `captioner` as it is, and empty ones."""
    tuning = FineTuneConfig.from_dict(fine_tune)
    if not tuning.enabled:
        return captioner, pd.DataFrame(), pd.DataFrame()
    vocab = Vocabulary.from_dict(vocabulary)
    config = TrainConfig.from_dict(train)
    critical = SelfCriticalConfig.from_dict(self_critical)
    # The encoder changes: from now on every phase reads images, never the features.
    images = image_shards(model_inputs)
    phase_train = tuning.train_config(config)
    return fine_tune_captioner(
        captioner,
        caption_datasets(images, phase_train, captioner.config.image_size, _caption_length(vocab)),
        config,
        _kept_for_later(tuning, critical.enabled),
        steps_per_epoch=steps_per_epoch(images, phase_train),
        data_fingerprint=_fingerprint(images, vocab),
    )


def train_self_critical(
    captioner: Captioner,
    model_inputs: ShardSet,
    vocabulary: dict,
    caption_table: pd.DataFrame,
    train: dict,
    fine_tune: dict,
    self_critical: dict,
) -> Phase:
    """When `self_critical.enabled`, SCST from `captioner`, resuming from a checkpoint of the
    same starting weights: the captioner of val CIDEr-D's best epoch (`captioner` if none beats
    it), whole, its per-epoch history and per-step rows; else `captioner` as it is, and empty
    ones. The last phase: it clears the checkpoints the earlier ones kept for it."""
    config = TrainConfig.from_dict(train)
    tuning = FineTuneConfig.from_dict(fine_tune)
    critical = SelfCriticalConfig.from_dict(self_critical)
    history = steps = pd.DataFrame()
    if critical.enabled:
        vocab = Vocabulary.from_dict(vocabulary)
        # A fine-tuned encoder is no longer the one of the features: SCST reads images then.
        inputs = image_shards(model_inputs) if tuning.enabled else model_inputs
        on_features = inputs.kind == "features"
        _as_the_last_phase_left_it(tuning.train_config(config) if tuning.enabled else config)
        # On features, the decoder alone, as the phase before trained it: the same weights,
        # so the same checkpoint fingerprint.
        start = captioner.rebuilt(decoder_alone=on_features)
        kept, history, steps = self_critical_phase(
            start, inputs, vocab, caption_table, critical, _fingerprint(inputs, vocab), config
        )
        captioner = kept.with_encoder(captioner.encoder.get_weights()) if on_features else kept
    clear_kept_checkpoints(config, tuning, critical)
    return captioner, history, steps


def clear_kept_checkpoints(
    config: TrainConfig, tuning: FineTuneConfig, critical: SelfCriticalConfig
) -> None:
    """After the last phase, the checkpoints of the earlier ones that were kept only for the
    phases after them (not for their own `keep_checkpoints`)."""
    for kept, keep, folder in (
        (tuning.enabled or critical.enabled, config.keep_checkpoints, config.checkpoint_dir),
        (tuning.enabled and critical.enabled, tuning.keep_checkpoints, tuning.checkpoint_dir),
    ):
        if kept and not keep:
            Checkpoints(folder, chief=is_chief(config)).clear()


def _as_the_last_phase_left_it(config: TrainConfig) -> None:
    """Keras' global state as the training phase of `config` left it, whether it ran in this
    process or not (`--from-nodes`): its precision, in which SCST builds its model, and its
    seed (`train_captioner` sets it), which TensorFlow joins to the seeds of the shuffles of
    SCST's batches. A whole run and SCST alone then train alike, bit for bit."""
    keras.utils.set_random_seed(config.seed)
    keras.mixed_precision.set_global_policy(with_device_defaults(config).precision)


def _kept_for_later(config, later: bool):
    """A phase's `config` (TrainConfig, FineTuneConfig) with its checkpoints kept when a later
    phase is enabled: `clear_kept_checkpoints` removes them after the last one."""
    return dataclasses.replace(config, keep_checkpoints=True) if later else config


def _caption_length(vocab: Vocabulary) -> int:
    """<start> + the longest caption the vocabulary stage lets through + <end>."""
    return vocab.max_caption_length + 2


def _fingerprint(inputs: ShardSet, vocab: Vocabulary) -> dict:
    """What a phase's checkpoint must have been trained on to be resumed."""
    return {"model_inputs": inputs.manifest.get("fingerprint"), "vocabulary": vocab.size}


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
    return scst.train_self_critical(
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
