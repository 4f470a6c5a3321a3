"""Checkpoints that survive `kill -9` at any instruction.

A checkpoint is a folder `step-NNNNNNNN-<unique>/` holding the weights (model and optimizer
state), `variables.npz` (RNG and metric state) and `state.json` (history, counters,
early-stopping state). It is written under a temporary name and renamed to a name no other
folder has (never replacing one: that takes two renames, and a kill between them leaves no
folder under the name), then `latest.json` is pointed at it atomically, then the older folders
are deleted. A folder that `latest.json` does not name is never read (and is deleted on
resume), so a kill at any instruction leaves one complete checkpoint in charge.

The checkpoint holds what the weights file does not: the state of every dropout
`SeedGenerator` (Keras tracks them apart from the weights, and `set_random_seed` restarts
them) and the train metrics' running totals (`extra_variables`), so that a resumed run is bit
for bit the run nobody killed (training.py says what else that takes).

Under `strategy: multi_worker` only the chief writes `root` (`cluster.is_chief_task`); the
other workers read the chief's checkpoint to resume, and otherwise write every checkpoint to a
scratch folder of their own that is deleted at once: saving reads the metrics' on-read
variables, an all-reduce that every worker must enter (tests/test_multi_worker.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np

from caption_pipeline.atomic import atomic_directory, atomic_write_json, remove_stale_temporaries
from caption_pipeline.errors import DataError

logger = logging.getLogger(__name__)

LATEST = "latest.json"
BEST_WEIGHTS = "best.weights.h5"
WEIGHTS = "checkpoint.weights.h5"
VARIABLES = "variables.npz"
# In the run fingerprint: checkpoints of an older layout (which counted optimizer iterations
# and clipped each variable's gradient alone) are started afresh rather than misread.
CHECKPOINT_FORMAT = 2


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


def weights_digest(model: keras.Model) -> str:
    """A hash of every weight of `model`: what a later phase's checkpoint must start from."""
    digest = hashlib.sha256()
    for weights in model.get_weights():
        digest.update(np.ascontiguousarray(weights).tobytes())
    return digest.hexdigest()[:16]


def extra_variables(model: keras.Model) -> list:
    """What a checkpoint keeps besides `save_weights`: the state of every `SeedGenerator`
    (dropout masks; Keras keeps them out of the weights) and of every metric (running totals),
    in `model.variables` order, which is the same for every model of one configuration."""
    seeds = [v for v in model.variables if v.path.endswith("seed_generator_state")]
    return seeds + metric_variables(model)


def metric_variables(model: keras.Model) -> list:
    return [v for metric in model.metrics for v in metric.variables]


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
        np.savez(
            folder / VARIABLES, *[keras.ops.convert_to_numpy(v) for v in extra_variables(model)]
        )
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
            logger.warning(
                "Checkpoint %s is of another configuration or data; starting afresh", folder
            )
            self.clear()
            return None
        model.load_weights(folder / WEIGHTS)
        variables = extra_variables(model)
        if not (folder / VARIABLES).exists():
            raise DataError(f"{folder / VARIABLES} is missing: a checkpoint is incomplete")
        with np.load(folder / VARIABLES) as arrays:
            values = [arrays[f"arr_{i}"] for i in range(len(arrays.files))]
        if len(values) != len(variables) or any(
            value.shape != tuple(v.shape) for value, v in zip(values, variables, strict=False)
        ):
            raise DataError(
                f"{folder / VARIABLES}: {len(values)} RNG and metric variables, "
                f"the model has {len(variables)} (another model?)"
            )
        for variable, value in zip(variables, values, strict=False):
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
