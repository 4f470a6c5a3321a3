"""Training over several devices or machines with tf.distribute, under Keras 3.

`train.strategy` names the strategy (`make_strategy`): "default" (Keras' own: one device),
"mirrored" (the GPUs of one machine) or "multi_worker" (one process per machine, the cluster
from TF_CONFIG). Under multi_worker every worker runs the same training on the same
`checkpoint_dir`, and only the chief writes there (`is_chief_task`: TF_CONFIG's "chief" task,
or "worker" 0 when the cluster has none; a single process is the chief). What Keras 3.15 gets
wrong under these strategies is put right here, each where it is patched:
`clip_after_all_reduce` (the global-norm clip of the summed gradient, not of each replica's
share) and `without_symbolic_build` (a symbolic build that fails under MultiWorkerMirrored).
`barrier` holds every worker until all are there.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator

import keras

from caption_pipeline.errors import DataError

logger = logging.getLogger(__name__)

STRATEGIES = ("default", "mirrored", "multi_worker")


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

    if name == "mirrored":
        strategy = tf.distribute.MirroredStrategy(devices=devices)
    else:
        # Reads the cluster from the TF_CONFIG environment variable, one process per worker.
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    logger.info(
        "Training with the %s strategy over %d replicas", name, strategy.num_replicas_in_sync
    )
    return strategy


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


def barrier(strategy) -> None:
    """Return once every worker of `strategy` is here (an all-reduce); no-op without one."""
    if strategy is None or strategy.num_replicas_in_sync == 1:
        return
    import tensorflow as tf

    strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(lambda: tf.constant(1.0)), axis=None)


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
