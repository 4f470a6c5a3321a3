"""Training over several devices or machines with tf.distribute, under Keras 3.

`train.strategy` names the strategy (`make_strategy`): "default" (Keras' own: one device),
"mirrored" (the GPUs of one machine) or "multi_worker" (one process per machine, the cluster
from TF_CONFIG). Under multi_worker every worker runs the same training on the same
`checkpoint_dir`, and only the chief writes there (`is_chief_task`: TF_CONFIG's "chief" task,
or "worker" 0 when the cluster has none; a single process is the chief). What Keras 3.15 gets
wrong under these strategies is put right here, each where it is patched:
`clip_after_all_reduce` (the global-norm clip of the summed gradient, not of each replica's
share) and `without_symbolic_build` (a symbolic build that fails under MultiWorkerMirrored).
`barrier` holds every worker until all are there. `make_strategy` makes one strategy per name
and devices in a process: every phase of a run trains in the same one (a second
MultiWorkerMirroredStrategy would configure the process's collectives again), so that a later
phase's model can be the earlier phase's, built in its scope.

SCST runs its own loop (sample, reward, update) rather than `fit`: `BatchShares` splits each
global batch into the contiguous rows every replica takes, and sums figures over the workers.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import keras
import numpy as np

from caption_pipeline.errors import DataError

logger = logging.getLogger(__name__)

STRATEGIES = ("default", "mirrored", "multi_worker")
_STRATEGIES: dict[tuple, Any] = {}  # made in this process, by (name, devices)


def make_strategy(name: str, devices: list[str] | None = None):
    """The tf.distribute strategy named `name` (`train.strategy`); None for Keras' default.
    `devices`: the mirrored strategy's (`train.devices`; None: every visible GPU)."""
    if name == "default":
        return None
    if keras.backend.backend() != "tensorflow":
        raise DataError(
            f"parameters train.strategy: {name!r} needs KERAS_BACKEND=tensorflow "
            f"(this run uses {keras.backend.backend()!r}); use 'default'"
        )
    import tensorflow as tf

    key = (name, tuple(devices or ()))
    if key in _STRATEGIES:
        return _STRATEGIES[key]
    if name == "mirrored":
        strategy = tf.distribute.MirroredStrategy(devices=devices)
    else:
        # Reads the cluster from the TF_CONFIG environment variable, one process per worker.
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    _STRATEGIES[key] = strategy
    logger.info(
        "Training with the %s strategy over %d replicas", name, strategy.num_replicas_in_sync
    )
    return strategy


def barrier(strategy) -> None:
    """Return once every worker of `strategy` is here (an all-reduce); no-op without one."""
    if strategy is None or strategy.num_replicas_in_sync == 1:
        return
    import tensorflow as tf

    strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(lambda: tf.constant(1.0)), axis=None)


class BatchShares:
    """The rows of a global batch of B each replica of `strategy` takes: replica r the
    contiguous rows [r B // N, (r + 1) B // N), N replicas in all (a share may be empty when
    B < N); this worker's replicas (one per device) take consecutive shares. Without a strategy
    one replica takes every row."""

    def __init__(self, strategy):
        self.strategy = strategy
        if strategy is None:
            self.replicas, self.local = 1, [0]
            return
        import tensorflow as tf

        self.replicas = strategy.num_replicas_in_sync
        ids = strategy.experimental_distribute_values_from_function(
            lambda context: tf.constant(context.replica_id_in_sync_group)
        )
        self.local = [int(i) for i in strategy.experimental_local_results(ids)]

    def edges(self, batch: int) -> list[int]:
        return [r * batch // self.replicas for r in range(self.replicas + 1)]

    def worker_rows(self, batch: int) -> slice:
        """This worker's rows of a global batch of `batch`: its replicas' shares together."""
        edges = self.edges(batch)
        return slice(edges[self.local[0]], edges[self.local[-1] + 1])

    def per_replica(self, arrays: dict, batch: int):
        """`arrays` (a dict of arrays [b, ...], the rows `worker_rows(batch)`) as each replica's
        share: the arrays themselves without a strategy, else tf.distribute's PerReplica values,
        which `strategy.run` (so Keras' `train_on_batch`) hands out one per replica."""
        if self.strategy is None:
            return arrays
        import tensorflow as tf

        edges, start = self.edges(batch), self.worker_rows(batch).start

        def share(context):
            r = context.replica_id_in_sync_group
            return tf.nest.map_structure(
                lambda a: tf.constant(a[edges[r] - start : edges[r + 1] - start]), arrays
            )

        return self.strategy.experimental_distribute_values_from_function(share)

    def sum(self, values: np.ndarray) -> np.ndarray:
        """`values` (float64 [n]) summed over the workers; each worker's own without one."""
        return self._reduce(values, chief_only=False)

    def chiefs(self, values: np.ndarray) -> np.ndarray:
        """The chief's `values` (float64 [n]: replica 0's worker's) on every worker, bit for bit:
        a decision taken on them is the same everywhere."""
        return self._reduce(values, chief_only=True)

    def _reduce(self, values: np.ndarray, chief_only: bool) -> np.ndarray:
        values = np.asarray(values, np.float64)
        if self.strategy is None or self.replicas == 1:
            return values
        import tensorflow as tf

        # A worker adds its values once, through its first replica; with `chief_only`, only
        # replica 0 adds them.
        adding = 0 if chief_only else self.local[0]
        contribution = self.strategy.experimental_distribute_values_from_function(
            lambda context: tf.constant(
                values if context.replica_id_in_sync_group == adding else np.zeros_like(values)
            )
        )
        total = self.strategy.reduce(tf.distribute.ReduceOp.SUM, contribution, axis=None)
        return np.asarray(total, np.float64)


def without_symbolic_build(model: keras.Model) -> None:
    """Under tf.distribute, Keras' `fit` and `evaluate` first all-reduce a whole batch to build
    the model symbolically (`_maybe_symbolic_build`, Keras 3.15), which fails under
    MultiWorkerMirroredStrategy (its `reduce` takes one tensor, not a batch's dict: a
    ValueError). `build_captioner` has built every layer and the optimizer, and the Captioner
    compiles no loss or metric, so there is nothing left to build: the step is skipped while
    that holds."""
    original = model._maybe_symbolic_build

    def maybe_symbolic_build(iterator=None, data_batch=None):
        built = all(layer.built for layer in model._flatten_layers()) and all(
            part is None or part.built for part in (model._compile_metrics, model._compile_loss)
        )
        if not built:
            original(iterator=iterator, data_batch=data_batch)

    object.__setattr__(model, "_maybe_symbolic_build", maybe_symbolic_build)


def clip_after_all_reduce(optimizer: keras.optimizers.Optimizer) -> None:
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
        for i, grad in zip(present, clipped, strict=False):
            grads[i] = grad * tf.cast(share, grad.dtype)
        return grads

    object.__setattr__(optimizer, "_clip_gradients", clip_gradients)


@contextlib.contextmanager
def strategy_scope(strategy) -> Iterator[None]:
    if strategy is None:
        yield
    else:
        with strategy.scope():
            yield
