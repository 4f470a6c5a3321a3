"""The tf.data reader: batches of (images or features, captions) from a shard set.

    files (shuffled) -> interleave(TFRecordDataset) -> parse -> one, every or grouped captions
        -> shuffle buffer -> decode the JPEG, captions to int32 -> padded or bucketed batches

Shuffling happens twice: the order of the files, then a buffer of elements while images are
still JPEG strings (small, so the buffer is too; features are as small as they get, R x D
float16). A seeded reader gives the same batches for the same seed (its parallel stages keep
their order); an unseeded one lets parallel reads finish in any order.

`pad_captions` then gives the captions one static length for training, and
`without_autotune_model` turns tf.data's autotuning off (why: its docstring).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import tensorflow as tf

from caption_pipeline.data.shards.records import (
    decode_jpeg_image,
    parse_example,
    parse_feature_example,
)
from caption_pipeline.data.shards.shard_set import MANIFEST, ShardSet
from caption_pipeline.errors import DataError

CAPTION_MODES = ("sample", "all", "grouped")

# kind -> (the record field that holds the image, the input name the model reads it under)
_PAYLOAD_BY_KIND = {
    "images": ("image/encoded", "image"),
    "features": ("image/features", "features"),
}


@dataclass(frozen=True)
class ReaderOptions:
    """What `make_caption_dataset` can also do, that no pipeline asks of it (tests, benchmarks).

    decode_images: False leaves "image" the JPEG string [B] (image shards only).
    repeat: read the split this many times (True: forever) within one dataset; training
      instead makes one dataset per epoch.
    cycle_length: shard files read at once.
    """

    decode_images: bool = True
    repeat: bool | int = False
    cycle_length: int = 8


def _every_caption(record: dict[str, tf.Tensor], kind: str) -> tf.data.Dataset:
    """One element per caption: the image repeated C times."""
    field_name, name = _PAYLOAD_BY_KIND[kind]
    captions = record["caption/ids"]  # int64 ragged [C, None]
    count = captions.nrows()
    payload = record[field_name]  # JPEG string [] or float16 features [R, D]
    image = {
        name: tf.repeat(payload[None], count, axis=0),  # [C] or [C, R, D]
        "image_id": tf.repeat(record["image/id"][None], count),  # int64 [C]
    }
    return tf.data.Dataset.from_tensor_slices((image, captions))


def _grouped_captions(
    record: dict[str, tf.Tensor], kind: str, per_image: int
) -> tuple[dict, tf.Tensor]:
    """One element per image with its first `per_image` captions as int64 [per_image, T]
    (missing captions are all-pad rows, which the loss masks out)."""
    field_name, name = _PAYLOAD_BY_KIND[kind]
    captions = record["caption/ids"][:per_image].to_tensor()  # int64 [<=C, T]
    captions = tf.pad(captions, [[0, per_image - tf.shape(captions)[0]], [0, 0]])
    image = {name: record[field_name], "image_id": record["image/id"]}
    return image, tf.ensure_shape(captions, [per_image, None])


def _one_caption(
    record: dict[str, tf.Tensor], random: tf.Tensor, kind: str
) -> tuple[dict, tf.Tensor]:
    """One element per image with caption number `random` mod C: int64 [T]."""
    field_name, name = _PAYLOAD_BY_KIND[kind]
    captions = record["caption/ids"]  # int64 ragged [C, None]
    row = tf.math.floormod(random, captions.nrows(out_type=tf.int64))
    start, end = captions.row_splits[row], captions.row_splits[row + 1]
    image = {name: record[field_name], "image_id": record["image/id"]}
    return image, captions.values[start:end]


def make_caption_dataset(
    source: ShardSet,
    split: str,
    *,
    batch_size: int,
    caption_mode: str = "sample",
    captions_per_image: int = 5,
    shuffle: bool = False,
    seed: int | None = None,
    image_size: int | None = None,
    bucket_boundaries: Sequence[int] | None = None,
    shuffle_buffer: int = 2048,
    options: ReaderOptions = ReaderOptions(),
) -> tf.data.Dataset:
    """Batches `({"image", "image_id"}, captions)` from image shards, or
    `({"features", "image_id"}, captions)` from feature shards.

    image: float32 [B, S, S, 3] in 0..255 (S = image_size, default the shards' size), or the
    JPEG string [B] with `options.decode_images` False; features: float16 [B, R, D] (R and D
    from the manifest; image_size does not apply); image_id: int64 [B]; captions: int32 [B, T],
    padded with 0 (<pad>) to the longest caption of the batch.
    `caption_mode` "sample" takes one random caption per image per epoch, "all" one element
    per caption, "grouped" one element per image with its first `captions_per_image`
    captions: int32 [B, captions_per_image, T] (the encoder then runs once for all of them).
    `bucket_boundaries` (not with "grouped") batches captions of similar length together.
    """
    if caption_mode not in CAPTION_MODES:
        raise DataError(f"caption_mode must be one of {CAPTION_MODES}, got {caption_mode!r}")
    if caption_mode == "grouped" and bucket_boundaries:
        raise DataError("bucket_boundaries do not apply to caption_mode 'grouped'")
    files = source.files(split)
    if not files:
        raise DataError(f"{source.root / MANIFEST}: no shard files for split {split!r}")
    kind = source.kind
    if kind == "features":
        parse = functools.partial(parse_feature_example, feature_shape=source.feature_shape)
    else:
        parse = parse_example
        image_size = image_size or source.image_size
    decode_images = options.decode_images and kind == "images"
    autotune = tf.data.AUTOTUNE
    # Shuffled without a seed: let parallel reads finish in any order, it is random anyway.
    deterministic = not shuffle or seed is not None

    ds = tf.data.Dataset.from_tensor_slices(files)
    if shuffle:
        ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    ds = ds.interleave(
        tf.data.TFRecordDataset,
        cycle_length=min(options.cycle_length, len(files)),
        num_parallel_calls=autotune,
        deterministic=deterministic,
    )
    if options.repeat:
        ds = ds.repeat(None if options.repeat is True else int(options.repeat))
    ds = ds.map(parse, num_parallel_calls=autotune, deterministic=deterministic)
    if caption_mode == "sample":
        # A random stream zipped in, rather than a random op in map: a new draw every epoch.
        randoms = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
        ds = tf.data.Dataset.zip(ds, randoms).map(
            functools.partial(_one_caption, kind=kind), num_parallel_calls=autotune
        )
    elif caption_mode == "grouped":
        ds = ds.map(
            functools.partial(_grouped_captions, kind=kind, per_image=captions_per_image),
            num_parallel_calls=autotune,
            deterministic=deterministic,
        )
    else:
        ds = ds.flat_map(functools.partial(_every_caption, kind=kind))
    if shuffle:
        # Shuffle while images are still small JPEG strings, so the buffer stays small; the
        # price: "all" mode decodes an image once per caption.
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)

    def finish(image: dict[str, tf.Tensor], caption: tf.Tensor) -> tuple[dict, tf.Tensor]:
        if decode_images:
            image = {**image, "image": decode_jpeg_image(image["image"], image_size)}
        return image, tf.cast(caption, tf.int32)

    ds = ds.map(finish, num_parallel_calls=autotune, deterministic=deterministic)
    if bucket_boundaries:
        ds = ds.bucket_by_sequence_length(
            lambda image, caption: tf.shape(caption)[0],
            bucket_boundaries=list(bucket_boundaries),
            bucket_batch_sizes=[batch_size] * (len(bucket_boundaries) + 1),
        )
    else:
        ds = ds.padded_batch(batch_size)  # pads with 0
    return without_autotune_model(ds.prefetch(autotune))


def pad_captions(batches: tf.data.Dataset, length: int) -> tf.data.Dataset:
    """Pad the captions of each batch to one static length: [B, length] or [B, C, length].

    The decoder unrolls its time loop, so a fixed length means one compiled step function
    instead of one per batch-maximum length.
    """

    def pad(inputs, captions):
        leading = captions.shape[:-1]  # [B] or [B, C]: tf.pad loses the static sizes
        captions = captions[..., :length]
        extra = tf.maximum(length - tf.shape(captions)[-1], 0)
        paddings = tf.concat([tf.zeros([tf.rank(captions) - 1, 2], tf.int32), [[0, extra]]], 0)
        captions = tf.pad(captions, paddings)
        return inputs, tf.ensure_shape(captions, [*leading, length])

    return batches.map(pad, num_parallel_calls=tf.data.AUTOTUNE)


def without_autotune_model(ds: tf.data.Dataset) -> tf.data.Dataset:
    """`ds` without tf.data's autotuning model: AUTOTUNE parallelism becomes the core count.

    Training makes a new iterator every epoch (one `fit` call per epoch), and destroying one
    waits for the autotuning thread: 15 to 40 s of idle CPU at most epoch ends, measured on 2
    cores (benchmarks in docs/benchmarks.md), for no faster epochs.
    """
    options = tf.data.Options()
    options.autotune.enabled = False
    return ds.with_options(options)


def make_image_dataset(
    source: ShardSet, split: str, *, batch_size: int, image_size: int | None = None
) -> tf.data.Dataset:
    """Batches `{"image", "image_id"}` of an image shard set, or `{"features", "image_id"}` of
    a feature shard set, one element per image, in file order (captions are not read): what
    captioning a split needs.

    image: float32 [B, S, S, 3] in 0..255 (S = image_size, default the shards' size);
    features: float16 [B, R, D] (image_size does not apply); image_id: int64 [B].
    """
    if source.kind == "features":
        parse = functools.partial(parse_feature_example, feature_shape=source.feature_shape)

        def element(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
            record = parse(serialized)
            return {"features": record["image/features"], "image_id": record["image/id"]}

    else:
        image_size = image_size or source.image_size

        def element(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
            record = parse_example(serialized)
            return {
                "image": decode_jpeg_image(record["image/encoded"], image_size),
                "image_id": record["image/id"],
            }

    ds = tf.data.TFRecordDataset(source.files(split))
    ds = ds.map(element, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
