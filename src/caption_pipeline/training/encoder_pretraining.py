"""Supervised pretraining of the compact encoder on the train split's object masks.

A COCO captioner starts from a CNN pretrained on ImageNet, whose region features already say
what is where; the decoder then only learns to talk about them, and its attention can find the
region a word is about. The embedded shapes data has no such CNN, but its COCO `instances`
file has every object's polygon and attributes. This module turns them into dense targets,
one per encoder region: the fraction of the region's pixels covered by each category (and by
each value of each attribute, e.g. colour and size), background included. The encoder is
trained to predict them through one linear head per group; the heads are then dropped, and
the frozen encoder computes the features the captioner trains on, once per image.

The encoder learns from the train split's annotations only; the validation split's are read
to report its accuracy, and the test split's are never read here.

`initial_encoder` is what the `features` pipeline calls: the encoder the captioner starts
from, pretrained here (the compact CNN with `encoder_pretraining.enabled`) or as
`params:model` configures it (NASNet with ImageNet weights, or random weights).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw

from caption_pipeline.errors import DataError
from caption_pipeline.params import from_params

if TYPE_CHECKING:
    import keras

    from caption_pipeline.data.shards.shard_set import ShardSet
    from caption_pipeline.model import ModelConfig

logger = logging.getLogger(__name__)

BACKGROUND = "background"


@dataclass(frozen=True)
class PretrainConfig:
    """`params:encoder_pretraining`."""

    enabled: bool
    epochs: int
    batch_size: int
    learning_rate: float
    # A region's loss weighs 1 + object_weight x (its object fraction): most regions are
    # background, and without this the encoder learns little but "background".
    object_weight: float
    seed: int
    progress: bool

    def __post_init__(self):
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise DataError(
                    f"encoder_pretraining.{name}: must be an integer >= 1, got {value!r}"
                )
        if not (isinstance(self.learning_rate, (int, float)) and self.learning_rate > 0):
            raise DataError(
                f"encoder_pretraining.learning_rate: must be > 0, got {self.learning_rate!r}"
            )

    @classmethod
    def from_dict(cls, params: Mapping[str, Any]) -> PretrainConfig:
        return from_params(cls, params, "encoder_pretraining")


@dataclass(frozen=True)
class RegionTargets:
    """Dense targets of a split: `values[i]` [R, C] belongs to image `image_ids[i]`; the C
    columns are the groups' classes in order, each group summing to 1 over its columns."""

    image_ids: np.ndarray  # int64 [N]
    values: np.ndarray  # float32 [N, R, C]
    groups: dict[str, list[str]]  # group -> its class names, background first

    def slices(self) -> dict[str, slice]:
        out, start = {}, 0
        for group, names in self.groups.items():
            out[group] = slice(start, start + len(names))
            start += len(names)
        return out


def region_targets(
    instances_path: str | Path,
    image_size: int,
    grid: int,
    groups: dict[str, list[str]] | None = None,
) -> RegionTargets:
    """Dense targets from a COCO instances file with polygons (and optional `attributes`).

    Objects are painted in file order, a later one over an earlier one, as the shapes
    generator draws them. Each image is rasterised at `image_size` px, then each of the
    grid x grid cells (row by row, as the encoder's regions) gets its class fractions.
    `groups`: the classes of another split's targets (val is scored by train's heads, so it
    takes train's columns, whatever values its own objects happen to hold); a value they do
    not have is painted as background.
    """
    path = Path(instances_path)
    try:
        data = json.loads(path.read_text())
        categories = {int(c["id"]): str(c["name"]) for c in data["categories"]}
        images = {int(i["id"]): (int(i["width"]), int(i["height"])) for i in data["images"]}
        annotations = data["annotations"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DataError(
            f"{path}: not a COCO instances file with images, annotations and "
            f"categories ({type(error).__name__}: {error})"
        ) from None
    if image_size % grid:
        raise DataError(
            f"encoder_pretraining: image_size {image_size} is not a multiple of the "
            f"encoder's {grid}x{grid} grid"
        )
    if groups is None:
        attributes = sorted({key for a in annotations for key in (a.get("attributes") or {})})
        groups = {"category": [BACKGROUND, *sorted(set(categories.values()))]}
        for key in attributes:
            values = sorted(
                {
                    str(a["attributes"][key])
                    for a in annotations
                    if key in (a.get("attributes") or {})
                }
            )
            groups[key] = [BACKGROUND, *values]
    index = {group: {name: k for k, name in enumerate(names)} for group, names in groups.items()}

    painted: dict[int, dict[str, Image.Image]] = {
        image_id: {group: Image.new("L", (image_size, image_size), 0) for group in groups}
        for image_id in images
    }
    for n, annotation in enumerate(annotations):
        where = f"{path}: annotations[{n}]"
        try:
            image_id = int(annotation["image_id"])
            width, height = images[image_id]
            labels = {
                "category": categories[int(annotation["category_id"])],
                **{k: str(v) for k, v in (annotation.get("attributes") or {}).items()},
            }
            polygons = [
                np.asarray(p, np.float64).reshape(-1, 2) for p in annotation["segmentation"]
            ]
        except (KeyError, TypeError, ValueError) as error:
            raise DataError(
                f"{where}: needs image_id, category_id and polygon segmentation "
                f"({type(error).__name__}: {error})"
            ) from None
        scale = np.array([image_size / width, image_size / height])
        for group, label in labels.items():
            if group not in index:
                continue
            draw = ImageDraw.Draw(painted[image_id][group])
            for polygon in polygons:
                draw.polygon([tuple(p) for p in polygon * scale], fill=index[group].get(label, 0))

    cell = image_size // grid
    ids = np.array(sorted(images), np.int64)
    columns = []
    for group, names in groups.items():
        # [N, S, S] labels -> one-hot [N, G, cell, G, cell, C] -> fractions [N, G*G, C]
        labels = np.stack([np.asarray(painted[i][group]) for i in ids])
        onehot = np.eye(len(names), dtype=np.float32)[labels]
        fractions = onehot.reshape(len(ids), grid, cell, grid, cell, len(names)).mean((2, 4))
        columns.append(fractions.reshape(len(ids), grid * grid, len(names)))
    return RegionTargets(ids, np.concatenate(columns, axis=-1), groups)


def pretraining_model(encoder: keras.Model, targets: RegionTargets) -> keras.Model:
    """encoder + one linear softmax head per group: images -> {group: [B, R, C_group]}."""
    import keras

    regions = encoder.output  # [B, R, D]
    outputs = {
        group: keras.layers.Dense(len(names), activation="softmax", name=f"head_{group}")(regions)
        for group, names in targets.groups.items()
    }
    return keras.Model(encoder.input, outputs, name="encoder_pretraining")


def region_loss(object_weight: float):
    """Soft-target cross-entropy per region, weighted towards object regions:
    y_true, y_pred [B, R, C] (class 0 = background) -> [B]."""
    from keras import ops

    def loss(y_true, y_pred):
        xent = -ops.sum(y_true * ops.log(ops.clip(y_pred, 1e-7, 1.0)), axis=-1)  # [B, R]
        weight = 1.0 + object_weight * (1.0 - y_true[..., 0])
        return ops.sum(weight * xent, axis=-1) / ops.sum(weight, axis=-1)

    return loss


def _dataset(
    shards: ShardSet,
    split: str,
    targets: RegionTargets,
    image_size: int,
    batch_size: int,
    seed: int | None,
):
    """(images [B, S, S, 3], {group: [B, R, C]}) of every image of the split's shards."""
    import tensorflow as tf

    from caption_pipeline.data.shards.reader import without_autotune_model
    from caption_pipeline.data.shards.records import decode_jpeg_image, parse_example

    files = shards.files(split)
    ids = tf.data.TFRecordDataset(files).map(lambda record: parse_example(record)["image/id"])
    missing = sorted(set(int(i) for i in ids.as_numpy_iterator()) - set(targets.image_ids.tolist()))
    if missing:
        raise DataError(
            f"encoder_pretraining: {len(missing)} {split} image(s) of the shards are "
            f"not in the instances file (image ids {missing[:5]})"
        )
    table = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(
            tf.constant(targets.image_ids), tf.range(len(targets.image_ids), dtype=tf.int64)
        ),
        default_value=-1,
    )
    values = tf.constant(targets.values)
    slices = targets.slices()

    def example(serialized):
        record = parse_example(serialized)
        target = tf.gather(values, table.lookup(record["image/id"]))  # [R, C]
        image = decode_jpeg_image(record["image/encoded"], image_size)
        return image, {group: target[:, s] for group, s in slices.items()}

    ds = tf.data.TFRecordDataset(files)
    if seed is not None:
        ds = ds.shuffle(4096, seed=seed, reshuffle_each_iteration=True)
    ds = ds.map(example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = without_autotune_model(ds.batch(batch_size).prefetch(tf.data.AUTOTUNE))
    # Known length: the progress bar shows k/N steps.
    return ds.apply(
        tf.data.experimental.assert_cardinality(math.ceil(shards.num_images(split) / batch_size))
    )


def object_region_accuracy(
    model: keras.Model, batches, targets: RegionTargets, by: str | None = None
) -> dict[str, float]:
    """Per group: of the regions mostly covered by an object (> 50 % of their pixels), the
    fraction whose predicted class is the object's. With `by` (a group, e.g. "size"), also
    per class of that group, as "category/small": the regions whose true `by` class it is."""
    hits: dict[str, int] = {}
    totals: dict[str, int] = {}

    def count(key: str, same: np.ndarray, regions: np.ndarray) -> None:
        hits[key] = hits.get(key, 0) + int((same & regions).sum())
        totals[key] = totals.get(key, 0) + int(regions.sum())

    for images, truth in batches:
        predicted = model.predict_on_batch(images)
        covered = np.asarray(truth["category"])[..., 0] < 0.5  # [B, R]
        kind = None if by is None else np.argmax(np.asarray(truth[by]), -1)  # [B, R]
        for group in targets.groups:
            same = np.argmax(predicted[group], -1) == np.argmax(np.asarray(truth[group]), -1)
            count(group, same, covered)
            for index, name in enumerate(targets.groups[by][1:] if by else [], start=1):
                count(f"{group}/{name}", same, covered & (kind == index))
    return {key: hits[key] / totals[key] if totals[key] else math.nan for key in hits}


def pretrain_encoder(
    encoder: keras.Model,
    shards: ShardSet,
    train_targets: RegionTargets,
    val_targets: RegionTargets | None,
    config: PretrainConfig,
) -> tuple[keras.Model, list[dict[str, Any]]]:
    """Train `encoder` (in place) on the dense targets; returns it and one history row per
    epoch (losses and, with val targets, the object-region accuracy per group)."""
    import keras

    from caption_pipeline.training.cross_entropy import OneEpoch

    keras.utils.set_random_seed(config.seed)
    image_size = int(encoder.input.shape[1])
    model = pretraining_model(encoder, train_targets)
    steps = math.ceil(len(train_targets.image_ids) / config.batch_size)
    schedule = keras.optimizers.schedules.CosineDecay(
        config.learning_rate, decay_steps=steps * config.epochs
    )
    model.compile(
        optimizer=keras.optimizers.Adam(schedule),
        loss={group: region_loss(config.object_weight) for group in train_targets.groups},
    )
    train = _dataset(shards, "train", train_targets, image_size, config.batch_size, config.seed)
    val = (
        None
        if val_targets is None
        else _dataset(shards, "val", val_targets, image_size, config.batch_size, None)
    )
    history = []
    for epoch in range(config.epochs):
        logs = model.fit(
            train,
            epochs=config.epochs,
            initial_epoch=epoch,
            validation_data=val,
            callbacks=[OneEpoch()],
            verbose=1 if config.progress else 0,
        ).history
        row = {"epoch": epoch + 1, "loss": logs["loss"][-1]}
        if val is not None:
            row["val_loss"] = logs["val_loss"][-1]
            accuracy = object_region_accuracy(model, val, val_targets)
            row.update({f"val_{group}_accuracy": value for group, value in accuracy.items()})
        logger.info(
            "Encoder pretraining epoch %d/%d: %s",
            epoch + 1,
            config.epochs,
            ", ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "epoch"),
        )
        history.append(row)
    return encoder, history


def initial_encoder(
    shards: ShardSet,
    instances: Mapping[str, Path | None],
    model: ModelConfig,
    config: PretrainConfig,
    seed: int,
) -> tuple[keras.Model, list[dict[str, Any]]]:
    """The encoder the captioner starts from, and the pretraining history (empty when none).

    `instances`: split -> its COCO instances file (or None). Random weights come from `seed`.
    """
    import keras

    from caption_pipeline.model.encoder import regions_model

    keras.utils.set_random_seed(seed)
    encoder = model.build_encoder(model.encoder_weights)
    if not config.enabled:
        return encoder, []
    if model.trains_encoder:
        logger.info(
            "encoder_pretraining: skipped, the encoder is trained end to end with the "
            "decoder (model.encoder_trainable)"
        )
        return encoder, []
    if model.encoder != "compact" or model.encoder_weights is not None:
        raise DataError(
            f"encoder_pretraining.enabled: pretraining is for the compact encoder from random "
            f"weights, but model.encoder is {model.encoder!r} with weights "
            f"{model.encoder_weights!r}; set encoder_pretraining.enabled: false"
        )
    if instances.get("train") is None:
        raise DataError(
            "encoder_pretraining.enabled: the dataset has no COCO instances file with object "
            "polygons for the train split (annotations/instances_train.json) to pretrain the "
            "compact encoder on; train it end to end instead (encoder_pretraining.enabled=false,"
            "model.encoder_trainable=true) or use NASNet (model.encoder=nasnet_mobile, "
            "model.encoder_weights=imagenet, encoder_pretraining.enabled=false)"
        )
    grid = math.isqrt(int(encoder.output_shape[1]))
    train = region_targets(instances["train"], model.image_size, grid)
    val = (
        region_targets(instances["val"], model.image_size, grid, train.groups)
        if instances.get("val") is not None
        else None
    )
    # The layers before a feature projection: it is fitted on what they learn here.
    _, history = pretrain_encoder(regions_model(encoder), shards, train, val, config)
    return encoder, history
