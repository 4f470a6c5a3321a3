"""Shard planning: which images, with which caption ids, go into which shard file (no pixels).

The `shard` node's pure output is a `ShardPlan`; the image writer (`image_writer.py`) executes
it. Each split's images are spread over `num_shards[split]` shards whose sizes differ by at
most one, in an order that depends on the seed alone (the image ids are sorted before they
are permuted), so the same table and seed give the same files whatever the table's row order.

A shard's fingerprint is the sha256 of what decides its bytes: the record format, the image
size and JPEG quality, the shard's plan (`ShardSpec.digest`) and the size and mtime of each of
its source images, so that an edited image rewrites the one shard that holds it.

No TensorFlow here: planning is numpy and hashing.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from caption_pipeline.data.shards.shard_set import IMAGE_FORMAT, SHARD_SUFFIX
from caption_pipeline.errors import DataError

if TYPE_CHECKING:
    import pandas as pd

TABLE_COLUMNS = ("split", "image_id", "file_path", "annotation_id", "tokens")


class ImageCaptions(NamedTuple):
    """One image and the token ids of each of its captions: the writer's input."""

    split: str
    image_id: int
    file_path: str
    captions: Sequence[Sequence[int]]


@dataclass(frozen=True, eq=False)
class ShardSpec:
    """Which images, with which caption ids, go into one shard file (no pixels).

    Captions are stored as a two-level ragged array, as in a RaggedTensor, so a plan for
    hundreds of thousands of captions stays a few numpy buffers.
    """

    split: str
    index: int
    count: int  # shards in this split
    image_ids: np.ndarray  # int64 [N]
    file_paths: tuple[str, ...]  # [N]
    caption_splits: np.ndarray  # int64 [N + 1]: image i has captions caption_splits[i:i + 2]
    token_splits: (
        np.ndarray
    )  # int64 [C + 1]: caption c is tokens[token_splits[c]:token_splits[c + 1]]
    tokens: np.ndarray  # int32 [T]

    @classmethod
    def from_images(
        cls, split: str, index: int, count: int, images: Sequence[ImageCaptions]
    ) -> ShardSpec:
        captions = [list(ids) for image in images for ids in image.captions]
        return cls(
            split=split,
            index=index,
            count=count,
            image_ids=np.array([image.image_id for image in images], dtype=np.int64),
            file_paths=tuple(image.file_path for image in images),
            caption_splits=np.cumsum([0] + [len(image.captions) for image in images]),
            token_splits=np.cumsum([0] + [len(ids) for ids in captions]),
            tokens=np.array(list(itertools.chain.from_iterable(captions)), dtype=np.int32),
        )

    @property
    def filename(self) -> str:
        return f"{self.split}-{self.index:05d}-of-{self.count:05d}{SHARD_SUFFIX}"

    def __len__(self) -> int:
        return len(self.image_ids)

    def entries(self) -> Iterator[ImageCaptions]:
        for i, (image_id, file_path) in enumerate(
            zip(self.image_ids, self.file_paths, strict=False)
        ):
            rows = range(self.caption_splits[i], self.caption_splits[i + 1])
            captions = [
                self.tokens[self.token_splits[c] : self.token_splits[c + 1]].tolist() for c in rows
            ]
            yield ImageCaptions(self.split, int(image_id), file_path, captions)

    def digest(self) -> str:
        """sha256 of everything that decides this shard's content, except the source pixels."""
        h = hashlib.sha256(f"{self.split}\0{self.index}\0{self.count}\0".encode())
        h.update("\0".join(self.file_paths).encode())
        for array in (self.image_ids, self.caption_splits, self.token_splits, self.tokens):
            h.update(np.ascontiguousarray(array, dtype=np.int64).tobytes())
        return h.hexdigest()


@dataclass(frozen=True, eq=False)
class ShardPlan:
    """What a shard set will contain: the pure output of the `shard` node."""

    shards: tuple[ShardSpec, ...]  # by split, then index
    image_size: int
    jpeg_quality: int
    seed: int
    num_shards: dict[str, int]
    # How to run, not what to write: neither is part of the fingerprint.
    workers: int | None = None
    max_bad_fraction: float = 0.05

    @property
    def params(self) -> dict[str, Any]:
        return {
            "image_size": self.image_size,
            "jpeg_quality": self.jpeg_quality,
            "seed": self.seed,
            "num_shards": dict(self.num_shards),
        }


def images_from_table(
    table: pd.DataFrame,
    encode: Callable[[list[str]], list[int]],
    *,
    name: str = "tokenized_captions",
) -> Iterator[ImageCaptions]:
    """Group a tokenized caption table by image, encoding each caption's tokens to ids."""
    missing = [c for c in TABLE_COLUMNS if c not in table.columns]
    if missing:
        raise DataError(f"{name}: missing column(s) {missing}")
    ordered = table.sort_values(["split", "image_id", "annotation_id"], kind="stable")
    rows = zip(
        ordered["split"], ordered["image_id"], ordered["file_path"], ordered["tokens"], strict=False
    )
    for (split, image_id), group in itertools.groupby(rows, key=lambda row: row[:2]):
        group = list(group)
        paths = {row[2] for row in group}
        if len(paths) != 1:
            raise DataError(
                f"{name}: image_id {image_id} has several file_path values {sorted(paths)}"
            )
        captions = [encode(list(row[3])) for row in group]
        yield ImageCaptions(str(split), int(image_id), paths.pop(), captions)


def build_shard_plan(
    images: Iterable[ImageCaptions],
    *,
    num_shards: Mapping[str, int],
    seed: int,
    image_size: int,
    jpeg_quality: int = 90,
    workers: int | None = None,
    max_bad_fraction: float = 0.05,
) -> ShardPlan:
    """Spread each split's images over `num_shards[split]` balanced shards, in a seeded order."""
    by_split: dict[str, dict[int, ImageCaptions]] = {split: {} for split in num_shards}
    for image in images:
        if image.split not in by_split:
            raise DataError(
                f"image {image.image_id}: split {image.split!r} has no entry in "
                f"shard.num_shards {sorted(num_shards)}"
            )
        if image.image_id in by_split[image.split]:
            raise DataError(f"image {image.image_id}: listed twice in split {image.split!r}")
        if not image.captions or not all(len(ids) for ids in image.captions):
            raise DataError(
                f"image {image.image_id} ({image.file_path}): empty caption list or caption"
            )
        by_split[image.split][image.image_id] = image

    shards = []
    for split, group in by_split.items():
        if num_shards[split] < 1:
            raise DataError(f"shard.num_shards.{split}: must be >= 1, got {num_shards[split]}")
        if not group:
            continue
        # Sorted first, so the order depends on the seed only, never on the input's row order.
        rng = np.random.default_rng([seed, zlib.crc32(split.encode())])
        order = rng.permutation(np.array(sorted(group), dtype=np.int64))
        count = min(num_shards[split], len(order))
        for index, part in enumerate(np.array_split(order, count)):  # sizes differ by <= 1
            shards.append(
                ShardSpec.from_images(split, index, count, [group[i] for i in part.tolist()])
            )
    return ShardPlan(
        shards=tuple(shards),
        image_size=int(image_size),
        jpeg_quality=int(jpeg_quality),
        seed=int(seed),
        num_shards=dict(num_shards),
        workers=workers,
        max_bad_fraction=float(max_bad_fraction),
    )


def _source_stats(paths: Iterable[str]) -> str:
    """Size and mtime of each source image: a changed image changes its shard's fingerprint."""
    stats = []
    for path in paths:
        try:
            st = os.stat(path)
            stats.append(f"{st.st_size}:{st.st_mtime_ns}")
        except OSError:
            stats.append("missing")
    return "\0".join(stats)


def shard_fingerprint(plan: ShardPlan, spec: ShardSpec) -> str:
    h = hashlib.sha256(f"{IMAGE_FORMAT}\0{plan.image_size}\0{plan.jpeg_quality}\0".encode())
    h.update(spec.digest().encode())
    h.update(_source_stats(spec.file_paths).encode())
    return h.hexdigest()
