"""Self-critical sequence training: the phase after cross-entropy that optimizes CIDEr-D.

Per batch of B images (precomputed features or images, whichever the cross-entropy phase read):

1. sample K captions per image from the model (`model.sampling`, compiled), with uniforms
   drawn from numpy's generator seeded by (seed, global step): a resumed run draws the same;
2. reward r = CIDEr-D of each sample against its image's references (`cider.CiderD`, document
   frequencies of the train references, computed once, captions tokenized as coco-caption);
3. baseline b: the reward of the greedy caption (Rennie et al. 2017, `baseline: greedy`) or the
   mean reward of the image's other K - 1 samples (Luo 2020, `baseline: mean`);
4. one optimizer step on -(r - b) * sum_t log pi (`model.self_critical`), pi being the
   distribution the samples were drawn from: the softmax over the allowed tokens (no <unk>,
   `ALLOW_UNK`), the same in the sampler and the loss.

After each epoch the greedy captions of the val split are scored with the same CIDEr-D, and the
weights with the best val CIDEr-D are kept; "epoch 0" is the cross-entropy model itself, so the
phase never returns a model that val says is worse, and the history shows SCST's val gain.
Checkpoints (weights + optimizer, dropout RNG state, `state.json`) are `checkpoints.Checkpoints`:
a killed run resumes at its last one, skipping exactly the batches it had done, with the
dropout masks an unbroken run would have drawn. The optimizer is `training.adam`: `clipnorm`
is the global norm of all gradients.

Under `train.strategy: mirrored` or `multi_worker` the phase is data-parallel, as
ruotianluo/self-critical.pytorch runs it. Every worker reads the same global batches (the same
seeded order) and draws the uniforms of the whole global batch [B, K, L] from the same
generator; then it keeps its contiguous rows (`distributed.BatchShares`: replica r of N takes
rows [r B // N, (r + 1) B // N)), samples, rewards and baselines them, and the update's
replicas sum their gradients. Each row's samples, reward and advantage are what one worker
draws for it, and each replica's loss is its share of the global batch's mean, so the summed
gradient is one worker's on the whole batch, up to the order of float32 additions
(tests/test_multi_worker.py). The logged figures are summed over the workers. Every worker
scores the whole val split, and the chief's figure decides which epoch is kept, the same
decision everywhere. Only the chief writes checkpoints and best weights (`Checkpoints(...,
chief=...)`), every worker resumes from them, and a barrier keeps the chief from deleting them
before every worker has read the best weights.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from caption_pipeline.data.text import Vocabulary, tokenize
from caption_pipeline.model.beam_search import START_ID, greedy_search
from caption_pipeline.model.decoding import compile_function
from caption_pipeline.model.sampling import sample_captions
from caption_pipeline.model.self_critical import SelfCriticalTrainer, advantages
from caption_pipeline.params import from_params, require
from caption_pipeline.training.checkpoints import CHECKPOINT_FORMAT, Checkpoints, weights_digest
from caption_pipeline.training.cider import CiderD
from caption_pipeline.training.cluster import is_chief_of
from caption_pipeline.training.cross_entropy import adam
from caption_pipeline.training.distributed import (
    BatchShares,
    barrier,
    clip_after_all_reduce,
    make_strategy,
    strategy_scope,
    without_symbolic_build,
)

logger = logging.getLogger(__name__)

BASELINES = ("greedy", "mean")
# SCST never samples <unk> (it would be rewarded for matching a reference's rare word): the
# sampler and the loss both take this, so that the gradient is that of the sampled policy.
ALLOW_UNK = False


@dataclass(frozen=True)
class SelfCriticalConfig:
    """`params:self_critical`; see conf/base/parameters_train.yml for what each key means."""

    enabled: bool
    epochs: int
    batch_size: int
    samples: int  # K captions sampled per image
    baseline: str  # greedy (Rennie) | mean (Luo: mean of the other samples)
    learning_rate: float
    clipnorm: float | None  # global norm of all gradients (`TrainConfig.clipnorm`)
    max_length: int | None  # decoding steps, <end> included; None: longest caption + 1
    max_steps_per_epoch: int | None
    checkpoint_dir: str
    checkpoint_every_steps: int
    keep_checkpoints: bool
    shuffle_buffer: int
    seed: int
    progress: bool

    def __post_init__(self):
        checks = {
            "baseline": self.baseline in BASELINES,
            "samples": self.samples >= (2 if self.baseline == "mean" else 1),
            "epochs": self.epochs >= 0,
            "batch_size": self.batch_size >= 1,
            "checkpoint_every_steps": self.checkpoint_every_steps >= 1,
        }
        require("self_critical", self, checks)

    @classmethod
    def from_dict(cls, params: dict) -> SelfCriticalConfig:
        return from_params(cls, params, "self_critical")


@dataclass
class SelfCriticalState:
    """What an SCST checkpoint remembers besides the weights."""

    fingerprint: str
    history: list[dict[str, Any]] = field(default_factory=list)  # one row per epoch (0: xent)
    steps: list[dict[str, Any]] = field(default_factory=list)  # reward, baseline, entropy
    step: int = 0
    best_val_cider: float = -math.inf
    best_epoch: int = 0


def reference_tokens(
    caption_table: pd.DataFrame, splits: Sequence[str]
) -> dict[int, list[list[str]]]:
    """Each image's reference captions, tokenized as coco-caption does, for `splits`."""
    rows = caption_table.loc[caption_table["split"].isin(list(splits))]
    rows = rows.sort_values(["image_id", "annotation_id"], kind="stable")
    references: dict[int, list[list[str]]] = {}
    for image_id, caption in zip(rows["image_id"], rows["caption"], strict=True):
        references.setdefault(int(image_id), []).append(tokenize(caption))
    return references


def _words(ids: np.ndarray, vocabulary: Vocabulary) -> list[list[str]]:
    """[N, L] ids -> the words of each caption (up to <end>; <unk> stays a token)."""
    return [vocabulary.decode(row).split() for row in ids]


def _model_inputs(batch: dict) -> dict:
    """What the Captioner reads of a reader batch: {"features"} or {"image"}, no ids."""
    return {key: value for key, value in batch.items() if key in ("features", "image")}


class _Phase:
    """The compiled functions and scorer of one SCST run."""

    def __init__(self, captioner, vocabulary: Vocabulary, references, config, max_length):
        self.vocabulary, self.references, self.config = vocabulary, references, config
        self.max_length = max_length
        self.cider = CiderD(references["train"])
        self.sample = compile_function(
            lambda inputs: sample_captions(
                captioner, captioner(inputs), inputs["uniforms"], ALLOW_UNK
            ),
            captioner,
        )
        self.greedy = compile_function(
            lambda inputs: greedy_search(captioner, captioner(inputs), max_length), captioner
        )

    def greedy_rewards(self, inputs: dict, image_ids, split: str) -> np.ndarray:
        ids = keras.ops.convert_to_numpy(self.greedy(inputs).ids)[:, 0]
        return self.score(_words(ids, self.vocabulary), image_ids, split)

    def score(self, captions: list[list[str]], image_ids, split: str) -> np.ndarray:
        refs = [self.references[split][int(i)] for i in image_ids]
        return np.asarray(self.cider.score(captions, refs), dtype=np.float64)

    def val_cider(self, batches) -> float:
        rewards = [
            self.greedy_rewards(_model_inputs(inputs), inputs["image_id"], "val")
            for inputs, _ in batches.as_numpy_iterator()
        ]
        return float(np.concatenate(rewards).mean())


def train_self_critical(
    captioner,
    datasets: Callable[[str, int, bool], Any],
    vocabulary: Vocabulary,
    references: Mapping[str, Mapping[int, list[list[str]]]],
    config: SelfCriticalConfig,
    *,
    steps_per_epoch: int,
    data_fingerprint: dict,
    strategy: str = "default",
    devices: list[str] | None = None,
) -> tuple[Any, pd.DataFrame, pd.DataFrame]:
    """SCST on `captioner` (trained with cross-entropy); returns the model with the best val
    CIDEr-D (the input model if no epoch beats it, its weights set in place), the per-epoch
    history and the per-step reward, baseline and entropy. `datasets(split, epoch, shuffle)`:
    batches of ({"features" or "image", "image_id"}, captions); `references`: {"train": ...,
    "val": ...} tokens; `strategy`, `devices`: `train.strategy` and `train.devices` (the
    module docstring)."""
    max_length = config.max_length or vocabulary.max_caption_length + 1
    fingerprint = hashlib.sha256(
        json.dumps(
            [
                dataclasses.asdict(config)
                | {
                    "progress": None,
                    "epochs": None,
                    "checkpoint_dir": None,
                    "keep_checkpoints": None,
                },
                data_fingerprint,
                weights_digest(captioner),
                CHECKPOINT_FORMAT,
            ],
            sort_keys=True,
            default=str,
        ).encode()
    ).hexdigest()[:16]
    distribution = make_strategy(strategy, devices)
    val = datasets("val", 0, False)
    policy = _in_scope(captioner, distribution, _model_inputs(next(val.as_numpy_iterator())[0]))
    trainer = self_critical_trainer(policy, config.learning_rate, config.clipnorm, distribution)
    phase = _Phase(policy, vocabulary, references, config, max_length)
    shares = BatchShares(distribution)

    def val_cider() -> float:  # the chief's, on every worker
        return float(shares.chiefs(np.array([phase.val_cider(val)]))[0])

    checkpoints = Checkpoints(config.checkpoint_dir, SelfCriticalState, chief=is_chief_of(strategy))
    state = checkpoints.restore(trainer, fingerprint) or SelfCriticalState(fingerprint)
    if not state.history:  # epoch 0: the cross-entropy model, the figure SCST has to beat
        state.best_val_cider = val_cider()
        state.history.append({"epoch": 0, "step": 0, "val_cider": state.best_val_cider})
        checkpoints.save_best(trainer)
        logger.info("SCST: val CIDEr-D of the cross-entropy model %.4f", state.best_val_cider)
    elif state.step:
        logger.info("SCST: resuming at step %d", state.step)

    first_epoch, done = divmod(state.step, steps_per_epoch)
    for epoch in range(first_epoch, config.epochs):
        started = time.perf_counter()
        batches = datasets("train", epoch, True).repeat().skip(done if epoch == first_epoch else 0)
        todo = steps_per_epoch - (done if epoch == first_epoch else 0)
        # The epoch's means are over all its steps: a resumed epoch's first ones are in the
        # checkpoint's `state.steps`, done by the run that was killed, not in this process.
        rows = [row for row in state.steps if row["step"] > epoch * steps_per_epoch]
        bar = tqdm(
            total=todo, desc=f"SCST epoch {epoch + 1}/{config.epochs}", disable=not config.progress
        )
        for (inputs, _), _ in zip(batches.as_numpy_iterator(), range(todo), strict=False):
            rows.append(_step(trainer, phase, inputs, state.step, config, shares))
            state.step += 1
            state.steps.append(rows[-1])
            bar.update(1)
            bar.set_postfix(reward=f"{rows[-1]['reward']:.3f}")
            if (
                state.step % config.checkpoint_every_steps == 0 and state.step % steps_per_epoch
            ):  # an epoch's last step: saved after val
                checkpoints.save(trainer, state, state.step)
        bar.close()
        row = {
            "epoch": epoch + 1,
            "step": state.step,
            "val_cider": val_cider(),
            **{
                key: float(np.mean([r[key] for r in rows]))
                for key in ("reward", "baseline", "advantage", "entropy", "policy_loss")
            },
            "reward_share": sum(r["reward_seconds"] for r in rows)
            / max(sum(r["step_seconds"] for r in rows), 1e-9),
            "seconds": round(time.perf_counter() - started, 2),
        }
        state.history.append(row)
        logger.info(
            "SCST epoch %d/%d: %s",
            epoch + 1,
            config.epochs,
            ", ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "epoch"),
        )
        if row["val_cider"] > state.best_val_cider:
            state.best_val_cider, state.best_epoch = row["val_cider"], epoch + 1
            checkpoints.save_best(trainer)
        checkpoints.save(trainer, state, state.step)

    barrier(distribution)  # the chief's best weights are written before any worker reads them
    checkpoints.load_best(trainer)
    if policy is not captioner:
        captioner.set_weights(policy.get_weights())
    logger.info(
        "SCST: keeping epoch %d (val CIDEr-D %.4f; cross-entropy model %.4f)",
        state.best_epoch,
        state.best_val_cider,
        state.history[0]["val_cider"],
    )
    barrier(distribution)  # every worker has read the best weights before the chief deletes them
    if not config.keep_checkpoints:
        checkpoints.clear()
    return captioner, pd.DataFrame(state.history), pd.DataFrame(state.steps)


def _in_scope(captioner, strategy, sample_inputs: dict):
    """`captioner` if its variables are `strategy`'s (built in its scope, as the cross-entropy
    phase builds them), else a copy built there with its weights: Keras trains a model under a
    strategy only if its variables are the strategy's (mirrored on every replica)."""
    if strategy is None or all(
        strategy.extended.variable_created_in_scope(v.value) for v in captioner.variables
    ):
        return captioner
    with strategy.scope():
        copy = type(captioner).from_config(captioner.get_config())
        copy(sample_inputs)  # builds every variable
    copy.set_weights(captioner.get_weights())
    return copy


def self_critical_trainer(captioner, learning_rate: float, clipnorm: float | None, strategy=None):
    """`captioner` wrapped for SCST updates, in `strategy`'s scope when there is one (its
    optimizer's variables mirrored as the captioner's are).

    Without a strategy the update is compiled with XLA (`jit_compile=True`), not Keras' "auto"
    (off on a CPU): on TensorFlow's CPU kernels the SCST update's gradient differs in the last
    bits from one call to the next with the same inputs and weights (the recurrent steps'
    gradients; the output layer's do not), and the sampler turns that into other captions
    within one epoch, so two runs of one commit gave val CIDEr 2.65 to 2.96. Under XLA the
    update is bit-identical (tests/test_sampling.py). JAX always compiles with XLA.

    Under a strategy it is not compiled with XLA: Keras compiles its whole distributed step
    (`strategy.run` over the replicas and the gradients' all-reduce) as one XLA function, which
    fails on CPUs (TensorFlow 2.21, Keras 3.15): under MirroredStrategy over two CPUs one XLA
    cluster cannot span the replicas' devices ("Trying to access resource ... replica_1 ...
    located in device CPU:1 from device CPU:0"), and under MultiWorkerMirroredStrategy XLA on
    CPU has no kernel for the all-reduce ("No registered 'CollectiveGatherV2' OpKernel for
    XLA_CPU_JIT"). The workers still end with the same weights (they apply the same
    all-reduced gradient), but two runs may differ in the last bits, as above."""
    with strategy_scope(strategy):
        trainer = SelfCriticalTrainer(captioner, allow_unk=ALLOW_UNK)
        trainer.compile(
            optimizer=adam(trainer, learning_rate, clipnorm), jit_compile=strategy is None
        )
        trainer.optimizer.build(trainer.trainable_variables)
    if strategy is not None:
        clip_after_all_reduce(trainer.optimizer)
        without_symbolic_build(trainer)
    return trainer


def _step(
    trainer,
    phase: _Phase,
    inputs: dict,
    step: int,
    config: SelfCriticalConfig,
    shares: BatchShares,
) -> dict:
    """One SCST batch: sample, reward, baseline, gradient step; the logged figures, of the
    whole global batch. Each worker takes its rows of the batch (`shares`; all of them without
    a strategy), with the uniforms one worker would draw for them."""
    started = time.perf_counter()
    batch = len(inputs["image_id"])  # the global batch, B
    uniforms = np.random.default_rng([config.seed, step]).random(
        (batch, config.samples, phase.max_length), dtype=np.float32
    )
    rows = shares.worker_rows(batch)
    model_inputs = {key: value[rows] for key, value in _model_inputs(inputs).items()}
    image_ids, uniforms = inputs["image_id"][rows], uniforms[rows]
    local = len(image_ids)
    if local:
        samples = phase.sample({**model_inputs, "uniforms": uniforms})
        ids = keras.ops.convert_to_numpy(samples.ids)  # [b, K, L]
        lengths = keras.ops.convert_to_numpy(samples.lengths)  # [b, K]
        entropy = float(keras.ops.convert_to_numpy(samples.entropy))
    else:  # fewer images than replicas: this worker's share is empty
        ids = np.zeros((0, config.samples, phase.max_length), np.int32)
        lengths, entropy = np.zeros((0, config.samples), np.int32), 0.0
    scoring = time.perf_counter()
    words = _words(ids.reshape(-1, ids.shape[-1]), phase.vocabulary)
    rewards = phase.score(words, np.repeat(image_ids, config.samples), "train").reshape(
        local, config.samples
    )
    reward_seconds = time.perf_counter() - scoring
    greedy = (
        phase.greedy_rewards(model_inputs, image_ids, "train")
        if config.baseline == "greedy" and local
        else np.zeros(local)
    )
    baseline, advantage = advantages(rewards, config.baseline, greedy)
    start = np.full((*ids.shape[:2], 1), START_ID, ids.dtype)
    targets = {
        "captions": np.concatenate([start, ids], axis=-1),
        "advantage": advantage.astype(np.float32),
    }
    if shares.replicas > 1:  # each caption's share of the global batch's mean (the replicas'
        # gradients sum to it); one device's loss stays the mean it always was, bit for bit
        targets["weight"] = np.full(advantage.shape, 1.0 / (batch * config.samples), np.float32)
    logs = trainer.train_on_batch(
        shares.per_replica(model_inputs, batch),
        shares.per_replica(targets, batch),
        return_dict=True,
    )
    tokens = float(lengths.sum())
    total, reward, base, adv, entropy_sum, token_count = shares.sum(
        np.array(
            [
                rewards.size,
                rewards.sum(),
                baseline.sum(),
                advantage.sum(),
                entropy * tokens,
                tokens,
            ]
        )
    )
    return {
        "step": step + 1,
        "reward": float(reward / total),
        "baseline": float(base / total),
        "advantage": float(adv / total),
        # mean over the sampled tokens, as `Samples.entropy`
        "entropy": float(entropy_sum / max(token_count, 1.0)),
        "policy_loss": float(np.ravel(logs["policy_loss"])[0]),  # [] or, distributed, [1]
        # the CIDEr-D reward's share of the step (the greedy baseline's scoring excluded)
        "reward_seconds": reward_seconds,
        "step_seconds": time.perf_counter() - started,
    }
