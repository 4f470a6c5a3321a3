"""Model inputs: precomputed encoder features when the encoder is frozen, else the image shards.

A frozen encoder (NASNet by default, or any encoder with `model.encoder_trainable: false`)
gives an image the same region features at every epoch, so they are computed once: one
feature shard per image shard, same file name, same record order, each record the image's
record with its JPEG replaced by float16 features [R, D] (see `shards.records`).
Shards are written atomically and resumably by `shards.shard_set.write_shard_set`, and the
manifest (kind "features") records R, D, the encoder, a fingerprint of its weights and the
fingerprint of the image shards they came from.

An encoder trained end to end (the compact CNN by default) has nothing to precompute: the
model inputs are then only a manifest (kind "images") that points at the image shards.

Either way `load_model_inputs` gives the `ShardSet` that `make_caption_dataset` reads.
Keras is imported only where features are computed.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import tensorflow as tf
from tqdm.auto import tqdm

from caption_pipeline.atomic import atomic_write_json
from caption_pipeline.data.shards.records import decode_jpeg_image, feature_example, parse_example
from caption_pipeline.data.shards.shard_set import (
    FEATURE_FORMAT,
    MANIFEST,
    ShardSet,
    ShardTask,
    WriteSummary,
    commit_shard,
    is_complete,
    load_shard_set,
    read_manifest,
    remove_shards,
    write_shard_set,
)
from caption_pipeline.errors import DataError

if TYPE_CHECKING:
    import keras

    from caption_pipeline.model import ModelConfig

logger = logging.getLogger(__name__)

POINTER_FORMAT = "caption-pipeline/model-inputs-pointer/v1"
FEATURE_DTYPE = "float16"  # halves disk and reader memory; decoder inputs need no more
FEATURE_PARAMS = ("batch_size", "seed", "projection_images")


@dataclass(frozen=True, eq=False)
class FeaturePlan:
    """What the model inputs will be: the pure output of the `features` node (no pixels)."""

    source: ShardSet  # the image shards
    model: ModelConfig
    weights: str  # the encoder's weights file (`initial_encoder` of the catalog)
    batch_size: int  # how to run, not what to write: not part of the fingerprint

    @property
    def precompute(self) -> bool:
        """Features are precomputed only for a frozen encoder."""
        return not self.model.trains_encoder

    @property
    def encoder(self) -> dict[str, Any]:
        """The `model` fields that decide the encoder's architecture (its weights: `weights`)."""
        return encoder_architecture(self.model)


def encoder_architecture(model: ModelConfig) -> dict[str, Any]:
    from caption_pipeline.model.encoder import plain_filters

    architecture = {
        "encoder": model.encoder,
        "image_size": model.image_size,
        "compact_filters": plain_filters(model.compact_filters),
        "compact_pool_last": model.compact_pool_last,
    }
    if model.compact_context:  # absent when empty, as in manifests written before it
        architecture["compact_context"] = list(model.compact_context)
    if model.compact_strided_stem:  # absent when false, as in manifests written before it
        architecture["compact_strided_stem"] = True
    if model.feature_projection is not None:  # absent, as in manifests written before it
        architecture["feature_projection"] = model.feature_projection
    return architecture


def build_feature_plan(
    shards: ShardSet, weights: str, model: Mapping[str, Any], features: Mapping[str, Any]
) -> FeaturePlan:
    """Check `params:model` and `params:features` against the image shards; `weights`: the
    initial encoder's weights file. No I/O."""
    from caption_pipeline.model import ModelConfig

    config = ModelConfig.for_encoder(model)
    if set(features) != set(FEATURE_PARAMS):
        raise DataError(
            f"parameters features: has keys {sorted(features)}; expected exactly "
            f"{sorted(FEATURE_PARAMS)}"
        )
    batch_size = features["batch_size"]
    if not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(
            f"parameters features.batch_size: must be an integer >= 1, got {batch_size!r}"
        )
    if shards.kind != "images":
        raise DataError(
            f"{shards.root / MANIFEST}: features are computed from image shards, "
            f"this is a {shards.kind} shard set"
        )
    if config.image_size > shards.image_size:
        logger.warning(
            "model.image_size %d is larger than the image shards' %d px: the encoder "
            "sees upscaled images",
            config.image_size,
            shards.image_size,
        )
    return FeaturePlan(shards, config, weights=str(weights), batch_size=batch_size)


# --- the frozen encoder ----------------------------------------------------------------------


def weights_fingerprint(weights: str | os.PathLike) -> str:
    """What identifies an encoder weights file: "sha256:<the file's hash>"."""
    path = Path(weights)
    if not path.is_file():
        raise DataError(f"{path}: encoder weights file does not exist (run the features pipeline)")
    with open(path, "rb") as f:
        return "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()


def build_frozen_encoder(model: ModelConfig, weights: str | os.PathLike) -> keras.Model:
    """The encoder of `model` with the weights of file `weights`, not trainable."""
    from caption_pipeline.model import load_weights_file

    encoder = model.build_encoder(None)
    load_weights_file(encoder, str(weights))
    encoder.trainable = False
    return encoder


def encode_batch(encoder: keras.Model, images: np.ndarray) -> np.ndarray:
    """Images float32 [B, S, S, 3] in 0..255 -> features float16 [B, R, D]."""
    return np.asarray(encoder.predict_on_batch(images), dtype=np.float32).astype(FEATURE_DTYPE)


def _fill_feature_shard(
    encoder: keras.Model, source: str, plan: FeaturePlan, bar: tqdm, tmp: Path
) -> dict[str, Any]:
    """Encode the images of image shard `source`, in batches, into feature shard `tmp`."""

    def decode(record: tf.Tensor) -> tuple[tf.Tensor, ...]:
        parsed = parse_example(record)
        pixels = decode_jpeg_image(parsed["image/encoded"], plan.model.image_size)
        return record, pixels, parsed["image/id"], parsed["caption/ids"].nrows()

    batches = (
        tf.data.TFRecordDataset(source)
        .map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .batch(plan.batch_size)
        .prefetch(1)
    )
    records = captions = 0
    with tf.io.TFRecordWriter(str(tmp)) as writer:
        try:
            # string [B], float32 [B, S, S, 3], int64 [B], int64 [B]
            for raw, pixels, ids, counts in batches:
                features = encode_batch(encoder, pixels.numpy())  # float16 [B, R, D]
                finite = np.isfinite(features).all(axis=(1, 2))
                if not finite.all():
                    raise DataError(
                        f"{source}: image {int(ids[np.argmin(finite)])}: its "
                        f"features overflow {FEATURE_DTYPE} (the encoder's weights?)"
                    )
                for record, values in zip(raw.numpy(), features, strict=False):
                    writer.write(feature_example(record, values))
                records += len(features)
                captions += int(counts.numpy().sum())
                bar.update(len(features))
        except tf.errors.OpError as error:  # DataLossError: a truncated or corrupt record
            raise DataError(f"{source}: cannot be read: {error.message}") from None
    return {
        "records": records,
        "captions": captions,
        "skipped": 0,
        "skipped_examples": [],
        "feature_shape": list(encoder.output_shape[1:]),
    }


# --- writing and loading model inputs --------------------------------------------------------


def _current_source(plan: FeaturePlan) -> ShardSet:
    """The image shards as they are now: complete, and still the ones the plan was made of."""
    source = load_shard_set(plan.source.root, verify=False, kind="images")
    if source.manifest["fingerprint"] != plan.source.manifest["fingerprint"]:
        raise DataError(
            f"{source.root / MANIFEST}: fingerprint: the image shards changed after "
            "the features were planned; run the features pipeline again"
        )
    return source


def _relative(source: Path, folder: Path) -> str:
    """`source` as seen from `folder`: the manifest stays right when the project moves."""
    return os.path.relpath(os.path.abspath(source), os.path.abspath(folder))


def _source_root(folder: Path, manifest: Mapping[str, Any]) -> Path:
    return Path(os.path.normpath(folder / manifest["source"]))


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def write_features(
    plan: FeaturePlan, folder: str | os.PathLike, *, progress: bool = True
) -> WriteSummary:
    """Encode every image of every split once into feature shards in `folder`.

    Same plan, same weights and same image shards as a complete manifest: a no-op. A killed
    run resumes: complete feature shards are kept, the others computed.
    """
    folder = Path(folder)
    source = _current_source(plan)
    content = {
        "encoder": plan.encoder,
        "weights": weights_fingerprint(plan.weights),
        "dtype": FEATURE_DTYPE,
    }
    # A feature shard depends on its image shard's bytes only: a partly rewritten image
    # set recomputes the features of the rewritten shards only.
    tasks = [
        ShardTask(
            entry["file"],
            split,
            entry["records"],
            _digest([FEATURE_FORMAT, content, entry["sha256"]]),
        )
        for split, group in source.manifest["splits"].items()
        for entry in group["shards"]
    ]
    if not tasks:
        raise DataError(f"{source.root / MANIFEST}: splits: the image shard set has no shards")
    header = {
        "format": FEATURE_FORMAT,
        "kind": "features",
        "params": {
            **content,
            "image_size": plan.model.image_size,
            "source_fingerprint": source.manifest["fingerprint"],
            "weights_file": _relative(Path(plan.weights), folder),
        },
        "source": _relative(source.root, folder),
    }

    def write_missing(missing: list[ShardTask], bar: tqdm) -> Iterator[dict[str, Any]]:
        encoder = build_frozen_encoder(plan.model, plan.weights)  # only when a shard is due
        bar.set_description(f"Encoding images ({plan.model.encoder})")
        for task in missing:
            fill = functools.partial(
                _fill_feature_shard, encoder, str(source.root / task.filename), plan, bar
            )
            yield commit_shard(folder, task, fill)

    def finish(body: dict[str, Any]) -> dict[str, Any]:
        regions, depth = next(iter(body["splits"].values()))["shards"][0]["feature_shape"]
        return {"regions": regions, "feature_dim": depth}

    logger.info(
        "Encoder %s is frozen: computing its features once per image into %s",
        plan.model.encoder,
        folder,
    )
    return write_shard_set(
        folder,
        tasks,
        write_missing,
        header=header,
        finish=finish,
        progress=progress,
        desc="Encoding images",
    )


def write_image_pointer(plan: FeaturePlan, folder: str | os.PathLike) -> WriteSummary:
    """For an encoder trained end to end: a manifest naming the image shards, nothing else."""
    folder = Path(folder)
    source = _current_source(plan)
    m = plan.model
    reason = (
        f"model.encoder {m.encoder!r} is trained end to end (model.encoder_trainable: "
        f"{json.dumps(m.encoder_trainable)}): its features change at every step, so none "
        f"are precomputed; the model inputs are the image shards in {source.root}"
    )
    logger.info(reason)
    manifest = {
        "format": POINTER_FORMAT,
        "kind": "images",
        "complete": True,
        "source": _relative(source.root, folder),
        "source_fingerprint": source.manifest["fingerprint"],
        "encoder": plan.encoder,
        "reason": reason,
    }
    if read_manifest(folder) == manifest and not any(folder.glob("*.tfrecord")):
        return WriteSummary(manifest, noop=True)
    remove_shards(folder)  # feature shards of an earlier, frozen encoder
    atomic_write_json(folder / MANIFEST, manifest)
    return WriteSummary(manifest)


def write_model_inputs(
    plan: FeaturePlan, folder: str | os.PathLike, *, progress: bool = True
) -> WriteSummary:
    """Execute a plan: feature shards for a frozen encoder, else a pointer to the images."""
    if plan.precompute:
        return write_features(plan, folder, progress=progress)
    return write_image_pointer(plan, folder)


def load_model_inputs(folder: str | os.PathLike, *, verify: bool = True) -> ShardSet:
    """The feature shard set in `folder`, or the image shard set its manifest points at.

    DataError naming the path when it is missing, incomplete, corrupt, or features of image
    shards that have been rewritten since.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        raise DataError(
            f"{folder / MANIFEST}: missing or unreadable: no model inputs in "
            f"{folder} (run the features pipeline)"
        )
    if manifest.get("format") == POINTER_FORMAT:
        if manifest.get("complete") is not True or not isinstance(manifest.get("source"), str):
            raise DataError(
                f"{folder / MANIFEST}: source/complete: not a complete pointer to image shards"
            )
        return load_shard_set(_source_root(folder, manifest), verify=verify, kind="images")
    shard_set = load_shard_set(folder, verify=verify, kind="features")
    source = _source_root(folder, shard_set.manifest)
    current = read_manifest(source)
    # Image shards deleted to save disk are fine; image shards rewritten since are not.
    if (
        current
        and current.get("complete")
        and (current.get("fingerprint") != shard_set.manifest["params"]["source_fingerprint"])
    ):
        raise DataError(
            f"{folder / MANIFEST}: source_fingerprint: these features were computed "
            f"from other image shards than those now in {source}; run the features "
            "pipeline again"
        )
    return shard_set


def model_inputs_exist(folder: str | os.PathLike) -> bool:
    """Complete model inputs are in `folder` (files not verified)."""
    manifest = read_manifest(folder)
    if manifest and manifest.get("format") == POINTER_FORMAT:
        return (
            manifest.get("complete") is True
            and isinstance(manifest.get("source"), str)
            and is_complete(_source_root(Path(folder), manifest), "images")
        )
    return is_complete(folder, "features")


def image_shards(model_inputs: ShardSet) -> ShardSet:
    """The image shards behind `model_inputs`: themselves, or those the features came from
    (what a phase that trains the encoder reads). DataError naming the path when they are gone
    or incomplete."""
    if model_inputs.kind == "images":
        return model_inputs
    source = _source_root(model_inputs.root, model_inputs.manifest)
    # load_model_inputs has checked that they are the shards the features came from
    return load_shard_set(source, verify=False, kind="images")


def feature_encoder_weights(model_inputs: ShardSet, model: ModelConfig) -> list | None:
    """The weights of the frozen encoder that computed `model_inputs` (None for images).

    The captioner carries its encoder into evaluation and serving, where it sees images, so its
    encoder must be the very one the features came from, random-initialised ones included.
    """
    if model_inputs.kind != "features":
        return None
    problem = feature_encoder_problem(model_inputs, model)
    if problem:
        raise DataError(f"{problem}; re-run the features pipeline")
    return stored_encoder(model_inputs, model).get_weights()


def feature_encoder_problem(features: ShardSet, model: ModelConfig) -> str | None:
    """Why the frozen encoder that computed the feature set `features` cannot be rebuilt as
    `model`'s encoder: the manifest names another architecture, or the weights file it
    recorded is gone or has changed since; None when it can (`stored_encoder`)."""
    where = features.root / MANIFEST
    params = features.manifest["params"]
    current = encoder_architecture(model)
    if params["encoder"] != current:
        return (
            f"{where}: params.encoder: the features were computed with {params['encoder']}, "
            f"the model's encoder is {current}"
        )
    weights = features.root / params["weights_file"]
    if not weights.is_file() or weights_fingerprint(weights) != params["weights"]:
        return (
            f"{where}: params.weights: the encoder weights file {weights} is missing or has "
            f"changed since the features were computed"
        )
    return None


def stored_encoder(features: ShardSet, model: ModelConfig) -> keras.Model:
    """The frozen encoder that computed `features`, in `model`'s architecture, from the weights
    file its manifest names (check `feature_encoder_problem` first)."""
    return build_frozen_encoder(model, features.root / features.manifest["params"]["weights_file"])
