"""The record format: one `tf.train.SequenceExample` per image, to bytes and back.

Image records (manifest format `shard_set.IMAGE_FORMAT`, written by `image_writer.py`):

  context        image/id (int64), image/filename (bytes), image/encoded (JPEG, image_size square),
                 image/original_width, image/original_height (int64, after EXIF orientation)
  feature_lists  caption/ids: one Int64List per caption, <start> and <end> included

Feature records (`shard_set.FEATURE_FORMAT`, written by `caption_pipeline.training.features`)
are the same records with `image/encoded` replaced by image/features (bytes: float16 [R, D],
little-endian) and image/features_shape (int64 [2]: R, D).

Records are serialized deterministically (map fields in a fixed order), so the same plan gives
byte-identical shards and a shard's sha256 can decide whether it is reused.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import tensorflow as tf


def serialize_example(
    image_id: int,
    filename: str,
    jpeg: bytes,
    original_size: tuple[int, int],
    captions: Iterable[Iterable[int]],
) -> bytes:
    """An image record: `original_size` is (width, height), `captions` the ids of each."""
    example = tf.train.SequenceExample()
    context = example.context.feature
    context["image/id"].int64_list.value.append(image_id)
    context["image/filename"].bytes_list.value.append(filename.encode())
    context["image/encoded"].bytes_list.value.append(jpeg)
    context["image/original_width"].int64_list.value.append(original_size[0])
    context["image/original_height"].int64_list.value.append(original_size[1])
    feature_list = example.feature_lists.feature_list["caption/ids"]
    for ids in captions:
        feature_list.feature.add().int64_list.value.extend(ids)
    return example.SerializeToString(deterministic=True)


def feature_example(image_record: bytes, features: np.ndarray) -> bytes:
    """An image record with its JPEG replaced by region features [R, D], stored as float16.

    Everything else (id, filename, original size, captions) is copied from the image record.
    """
    example = tf.train.SequenceExample.FromString(image_record)
    context = example.context.feature
    del context["image/encoded"]
    values = np.ascontiguousarray(features, dtype="<f2")  # little-endian, as decode_raw reads
    context["image/features"].bytes_list.value.append(values.tobytes())
    context["image/features_shape"].int64_list.value.extend(values.shape)
    return example.SerializeToString(deterministic=True)


def _parse(serialized: tf.Tensor, payload: dict[str, Any]) -> dict[str, tf.Tensor]:
    """The fields every record has, plus the `payload` features of its kind."""
    context, sequence = tf.io.parse_single_sequence_example(
        serialized,
        context_features={
            "image/id": tf.io.FixedLenFeature([], tf.int64),
            "image/filename": tf.io.FixedLenFeature([], tf.string),
            "image/original_width": tf.io.FixedLenFeature([], tf.int64),
            "image/original_height": tf.io.FixedLenFeature([], tf.int64),
            **payload,
        },
        sequence_features={"caption/ids": tf.io.RaggedFeature(tf.int64)},
    )
    return {**context, **sequence}


def parse_example(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
    """An image record: scalars for the context features (the JPEG as "image/encoded");
    "caption/ids": int64 RaggedTensor [C, None]."""
    return _parse(serialized, {"image/encoded": tf.io.FixedLenFeature([], tf.string)})


def parse_feature_example(
    serialized: tf.Tensor, feature_shape: Sequence[int] | None = None
) -> dict[str, tf.Tensor]:
    """A feature record: like `parse_example`, with "image/features" float16 [R, D] instead
    of the JPEG (static shape `feature_shape` if given)."""
    record = _parse(
        serialized,
        {
            "image/features": tf.io.FixedLenFeature([], tf.string),
            "image/features_shape": tf.io.FixedLenFeature([2], tf.int64),
        },
    )
    features = tf.io.decode_raw(record.pop("image/features"), tf.float16)
    features = tf.reshape(features, record["image/features_shape"])
    if feature_shape is not None:
        features = tf.ensure_shape(features, list(feature_shape))
    return {**record, "image/features": features}


def decode_jpeg_image(jpeg: tf.Tensor, image_size: int) -> tf.Tensor:
    """JPEG bytes -> float32 [S, S, 3] in 0..255, resized only if it is not S x S already."""
    pixels = tf.io.decode_jpeg(jpeg, channels=3)  # uint8 [H, W, 3]
    same = tf.reduce_all(tf.equal(tf.shape(pixels)[:2], image_size))
    pixels = tf.cond(
        same,
        lambda: tf.cast(pixels, tf.float32),
        lambda: tf.clip_by_value(
            tf.image.resize(pixels, [image_size, image_size], antialias=True), 0, 255
        ),
    )
    return tf.ensure_shape(pixels, [image_size, image_size, 3])
