"""TFRecord shards of captioned images: the formats, an atomic resumable writer, a tf.data reader.

One `tf.train.SequenceExample` per image:
  context        image/id (int64), image/filename (bytes), image/encoded (JPEG, image_size square),
                 image/original_width, image/original_height (int64, after EXIF orientation)
  feature_lists  caption/ids: one Int64List per caption, <start> and <end> included

Feature shards (kind "features", written by `caption_pipeline.features`) hold the same records
with `image/encoded` replaced by image/features (bytes: float16 [R, D], little-endian) and
image/features_shape (int64 [2]: R, D).

A shard set is a folder of `{split}-{index:05d}-of-{count:05d}.tfrecord` files and a
`manifest.json` written last: no manifest, no complete set. Each shard is written under a
temporary name and renamed when complete, then a receipt (its manifest entry) is written to
`.receipts/`; a re-run reuses a shard only if its receipt or the old manifest has the same
fingerprint and the file's sha256 matches. `write_shard_set` does this for every kind.

TensorFlow is imported only where records are written or read: planning, manifests and the
Kedro catalog stay fast to import.
"""

from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import itertools
import json
import logging
import multiprocessing
import os
import shutil
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
from tqdm.auto import tqdm

from caption_pipeline.atomic import atomic_path, atomic_write_json, remove_stale_temporaries
from caption_pipeline.errors import DataError
from caption_pipeline.images import ImageError, available_cpus, encode_jpeg, load_rgb_image

if TYPE_CHECKING:
    import pandas as pd
    import tensorflow as tf

logger = logging.getLogger(__name__)

FORMAT = "caption-pipeline/sequence-example/v1"
FEATURE_FORMAT = "caption-pipeline/feature-sequence-example/v1"
FORMATS = {"images": FORMAT, "features": FEATURE_FORMAT}  # kind -> record format
MANIFEST = "manifest.json"
RECEIPTS = ".receipts"
SHARD_SUFFIX = ".tfrecord"
MAX_SKIPPED_EXAMPLES = 20
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
        for i, (image_id, file_path) in enumerate(zip(self.image_ids, self.file_paths)):
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


@dataclass(frozen=True)
class WriteSummary:
    manifest: dict[str, Any]
    written: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    noop: bool = False


@dataclass(frozen=True)
class ShardSet:
    """A complete, verified shard set: what training reads."""

    root: Path
    manifest: dict[str, Any]

    @property
    def splits(self) -> list[str]:
        return list(self.manifest["splits"])

    @property
    def kind(self) -> str:
        """ "images" (JPEGs) or "features" (precomputed encoder features)."""
        return {fmt: kind for kind, fmt in FORMATS.items()}[self.manifest["format"]]

    @property
    def image_size(self) -> int:
        return int(self.manifest["params"]["image_size"])

    @property
    def feature_shape(self) -> tuple[int, int]:
        """(R, D) of a feature shard set: regions per image, feature depth."""
        if self.kind != "features":
            raise DataError(f"{self.root / MANIFEST}: a {self.kind} shard set has no features")
        return int(self.manifest["regions"]), int(self.manifest["feature_dim"])

    def files(self, split: str) -> list[str]:
        if split not in self.manifest["splits"]:
            raise DataError(f"{self.root / MANIFEST}: no split {split!r} (has {self.splits})")
        return [str(self.root / s["file"]) for s in self.manifest["splits"][split]["shards"]]

    def num_images(self, split: str) -> int:
        return int(self.manifest["splits"][split]["records"])

    def num_captions(self, split: str) -> int:
        return int(self.manifest["splits"][split]["captions"])


# --- planning (pure) -------------------------------------------------------------------------


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
    rows = zip(ordered["split"], ordered["image_id"], ordered["file_path"], ordered["tokens"])
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
    h = hashlib.sha256(f"{FORMAT}\0{plan.image_size}\0{plan.jpeg_quality}\0".encode())
    h.update(spec.digest().encode())
    h.update(_source_stats(spec.file_paths).encode())
    return h.hexdigest()


# --- the record formats -----------------------------------------------------------------------


def serialize_example(
    image_id: int,
    filename: str,
    jpeg: bytes,
    original_size: tuple[int, int],
    captions: Iterable[Iterable[int]],
) -> bytes:
    import tensorflow as tf

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
    # deterministic: map fields in a fixed order, so the same plan gives byte-identical shards
    return example.SerializeToString(deterministic=True)


def feature_example(image_record: bytes, features: np.ndarray) -> bytes:
    """An image record with its JPEG replaced by region features [R, D], stored as float16.

    Everything else (id, filename, original size, captions) is copied from the image record.
    """
    import tensorflow as tf

    example = tf.train.SequenceExample.FromString(image_record)
    context = example.context.feature
    del context["image/encoded"]
    values = np.ascontiguousarray(features, dtype="<f2")  # little-endian, as decode_raw reads
    context["image/features"].bytes_list.value.append(values.tobytes())
    context["image/features_shape"].int64_list.value.extend(values.shape)
    return example.SerializeToString(deterministic=True)


def _parse(serialized: tf.Tensor, payload: dict[str, Any]) -> dict[str, tf.Tensor]:
    import tensorflow as tf

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
    import tensorflow as tf

    return _parse(serialized, {"image/encoded": tf.io.FixedLenFeature([], tf.string)})


def parse_feature_example(
    serialized: tf.Tensor, feature_shape: Sequence[int] | None = None
) -> dict[str, tf.Tensor]:
    """A feature record: like `parse_example`, with "image/features" float16 [R, D] instead
    of the JPEG (static shape `feature_shape` if given)."""
    import tensorflow as tf

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
    import tensorflow as tf

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


# --- writing any kind of shard set: atomic shards, receipts, manifest, resume -----------------


@dataclass(frozen=True)
class ShardTask:
    """One file of a shard set: the unit that is verified, reused or (re)written."""

    filename: str
    split: str
    size: int  # images, for the progress bar
    fingerprint: str  # of everything that decides the file's bytes


# (the tasks still to write, the progress bar) -> their receipts, in any order
WriteMissing = Callable[[list[ShardTask], tqdm], Iterable[dict[str, Any]]]


def _digest_file(path: Path) -> tuple[int, str]:
    with open(path, "rb") as f:
        os.fsync(f.fileno())  # on disk before the rename makes it final
        return os.fstat(f.fileno()).st_size, hashlib.file_digest(f, "sha256").hexdigest()


def commit_shard(
    folder: Path, task: ShardTask, fill: Callable[[Path], dict[str, Any]]
) -> dict[str, Any]:
    """Write one shard: `fill(tmp)` writes its records to a temporary file and returns their
    counts ("records", "captions", "skipped", "skipped_examples" and any other entry fields).
    The file is renamed when complete, then its receipt (its manifest entry) is written."""
    with atomic_path(folder / task.filename) as tmp:
        counts = fill(tmp)
        size, sha256 = _digest_file(tmp)
    receipt = {
        "file": task.filename,
        "split": task.split,
        **counts,
        "bytes": size,
        "sha256": sha256,
        "fingerprint": task.fingerprint,
    }
    atomic_write_json(folder / RECEIPTS / f"{task.filename}.json", receipt)
    return receipt


def _read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from `path`, or None if it is missing or unreadable (never trusted then)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_manifest(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The manifest in `folder` as it is (complete or not), or None if missing or unreadable."""
    return _read_json(Path(folder) / MANIFEST)


def _shard_problem(folder: Path, entry: Mapping[str, Any], *, checksum: bool = True) -> str | None:
    """Why the shard file of a manifest entry does not match it, or None if it does."""
    path = folder / entry["file"]
    try:
        size = path.stat().st_size
    except OSError:
        return f"{path}: missing"
    if size != entry["bytes"]:
        return f"{path}: bytes is {size}, the manifest says {entry['bytes']}"
    if checksum:
        with open(path, "rb") as f:
            sha256 = hashlib.file_digest(f, "sha256").hexdigest()
        if sha256 != entry["sha256"]:
            return f"{path}: sha256 does not match the manifest (corrupt or changed)"
    return None


def _previous_entries(folder: Path) -> dict[str, dict[str, Any]]:
    """Shard entries a previous run recorded: its manifest's, then its receipts (newer)."""
    manifest = _read_json(folder / MANIFEST) or {}
    splits = manifest.get("splits") if isinstance(manifest.get("splits"), dict) else {}
    candidates = [
        e for split in splits.values() if isinstance(split, dict) for e in split["shards"]
    ]
    receipts = sorted((folder / RECEIPTS).glob(f"*{SHARD_SUFFIX}.json"))
    candidates += [_read_json(path) for path in receipts]
    return {e["file"]: e for e in candidates if isinstance(e, dict) and "file" in e}


def _reusable(folder: Path, entry: Mapping[str, Any] | None, fingerprint: str) -> bool:
    try:
        return (
            entry is not None
            and entry["fingerprint"] == fingerprint
            and _shard_problem(folder, entry) is None
        )
    except (KeyError, TypeError):  # a receipt or manifest of another format: never trusted
        return False


def _splits_and_totals(
    tasks: Sequence[ShardTask], receipts: Mapping[str, Mapping[str, Any]]
) -> dict[str, Any]:
    keys = ("records", "captions", "skipped", "bytes")
    splits: dict[str, dict[str, Any]] = {}
    for task in tasks:
        receipt = receipts[task.filename]
        split = splits.setdefault(task.split, {**dict.fromkeys(keys, 0), "shards": []})
        for key in keys:
            split[key] += receipt[key]
        split["shards"].append(dict(receipt))
    totals = {key: sum(split[key] for split in splits.values()) for key in keys}
    return {"splits": splits, "totals": {**totals, "shards": len(tasks)}}


def remove_shards(folder: Path) -> None:
    """Delete the manifest first (the set is then incomplete), then shards and receipts."""
    (folder / MANIFEST).unlink(missing_ok=True)
    for shard in folder.glob(f"*{SHARD_SUFFIX}"):
        shard.unlink()
    shutil.rmtree(folder / RECEIPTS, ignore_errors=True)


def write_shard_set(
    folder: str | os.PathLike,
    tasks: Sequence[ShardTask],
    write_missing: WriteMissing,
    *,
    header: Mapping[str, Any],
    finish: Callable[[dict[str, Any]], Mapping[str, Any] | None] | None = None,
    progress: bool = True,
    desc: str = "Writing shards",
) -> WriteSummary:
    """Make `folder` hold exactly the shards of `tasks`, then their manifest, written last.

    `header` holds "format", "kind" and "params" (what decides the content: with the tasks'
    fingerprints it makes the set's fingerprint), plus any other manifest fields. A complete
    manifest of the same fingerprint whose files verify makes this a no-op. Otherwise a shard
    is reused if its receipt or the old manifest has its fingerprint and its sha256 matches,
    and `write_missing` writes the others (each with `commit_shard`). `finish` sees the
    splits and totals, may refuse them by raising, and returns fields to add to the manifest.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(folder)
    remove_stale_temporaries(folder / RECEIPTS)
    fingerprints = {task.filename: task.fingerprint for task in tasks}
    fingerprint = hashlib.sha256(
        json.dumps([header["format"], header["params"], list(fingerprints.items())]).encode()
    ).hexdigest()

    old = _read_json(folder / MANIFEST)
    if (
        old
        and old.get("complete")
        and old.get("fingerprint") == fingerprint
        and not _set_problems(folder, old)
    ):
        shutil.rmtree(folder / RECEIPTS, ignore_errors=True)
        logger.info("Shards in %s are complete and verified: nothing to do", folder)
        return WriteSummary(old, reused=list(fingerprints), noop=True)

    previous = _previous_entries(folder)
    # From here on the folder is not a complete set: say so before changing any shard.
    (folder / MANIFEST).unlink(missing_ok=True)
    for stale in folder.glob(f"*{SHARD_SUFFIX}"):
        if stale.name not in fingerprints:
            stale.unlink()

    receipts = {
        name: previous[name]
        for name, fp in fingerprints.items()
        if _reusable(folder, previous.get(name), fp)
    }
    missing = [task for task in tasks if task.filename not in receipts]
    with tqdm(
        total=sum(t.size for t in tasks), unit="image", desc=desc, disable=not progress
    ) as bar:
        bar.update(sum(t.size for t in tasks if t.filename in receipts))
        written = {r["file"]: r for r in write_missing(missing, bar)} if missing else {}

    body = _splits_and_totals(tasks, {**receipts, **written})
    extra = finish(body) if finish else None
    manifest = {
        "format": header["format"],
        "kind": header["kind"],
        "complete": True,
        "fingerprint": fingerprint,
        **{k: v for k, v in header.items() if k not in ("format", "kind")},
        **(extra or {}),
        **body,
    }
    atomic_write_json(folder / MANIFEST, manifest)
    shutil.rmtree(folder / RECEIPTS, ignore_errors=True)
    totals = manifest["totals"]
    logger.info(
        "Shards (%s) in %s: wrote %d, reused %d; %d images, %d captions, %d images skipped",
        header["kind"],
        folder,
        len(written),
        len(receipts),
        totals["records"],
        totals["captions"],
        totals["skipped"],
    )
    return WriteSummary(manifest, written=sorted(written), reused=sorted(receipts))


# --- writing image shards ---------------------------------------------------------------------


@dataclass(frozen=True)
class _Job:
    task: ShardTask
    spec: ShardSpec
    folder: str
    image_size: int
    jpeg_quality: int


def _write_shard(job: _Job) -> dict[str, Any]:
    """Write one image shard (in a worker process), then its receipt."""
    return commit_shard(Path(job.folder), job.task, functools.partial(_fill_image_shard, job))


def _fill_image_shard(job: _Job, tmp: Path) -> dict[str, Any]:
    """Decode, resize and encode the shard's images into `tmp`, one image at a time."""
    import tensorflow as tf

    records = captions = 0
    skipped: list[dict[str, Any]] = []
    with tf.io.TFRecordWriter(str(tmp)) as writer:
        for _, image_id, file_path, ids in job.spec.entries():
            try:
                image = load_rgb_image(file_path)
            except ImageError as exc:
                skipped.append({"image_id": image_id, "file_path": file_path, "error": str(exc)})
                continue
            jpeg = encode_jpeg(image, job.image_size, quality=job.jpeg_quality)
            writer.write(serialize_example(image_id, file_path, jpeg, image.size, ids))
            records += 1
            captions += len(ids)
    return {
        "records": records,
        "captions": captions,
        "skipped": len(skipped),
        "skipped_examples": skipped[:MAX_SKIPPED_EXAMPLES],
    }


def _run_jobs(jobs: list[_Job], workers: int, bar: tqdm) -> Iterator[dict[str, Any]]:
    if workers <= 1:
        for job in jobs:
            receipt = _write_shard(job)
            bar.update(len(job.spec))
            yield receipt
        return
    # spawn: a fresh interpreter per worker; forking a process that may hold TF state is unsafe
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        futures = {pool.submit(_write_shard, job): job for job in jobs}
        try:
            for future in concurrent.futures.as_completed(futures):
                receipt = future.result()
                bar.update(len(futures[future].spec))
                yield receipt
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise


def skipped_examples(manifest: Mapping[str, Any], split: str) -> list[dict[str, Any]]:
    """Images of `split` that failed to load (up to MAX_SKIPPED_EXAMPLES per shard)."""
    return [e for shard in manifest["splits"][split]["shards"] for e in shard["skipped_examples"]]


def _check_bad_fraction(plan: ShardPlan, folder: Path, manifest: Mapping[str, Any]) -> None:
    for name, split in manifest["splits"].items():
        seen = split["records"] + split["skipped"]
        if split["skipped"] > plan.max_bad_fraction * seen:
            example = skipped_examples(manifest, name)[0]["error"]
            raise DataError(
                f"{folder}: {split['skipped']} of {seen} {name} images failed to load, more than "
                f"shard.max_bad_fraction={plan.max_bad_fraction}; e.g. {example}"
            )


def write_shards(
    plan: ShardPlan, folder: str | os.PathLike, *, workers: int | None = None, progress: bool = True
) -> WriteSummary:
    """Execute `plan` into `folder`: parallel, atomic, resumable; the manifest is written last.

    `workers` (default `plan.workers`; 0 or None = all cores) processes each write whole shards.
    A complete manifest of the same fingerprint whose files verify makes this a no-op.
    """
    folder = Path(folder)
    specs = {spec.filename: spec for spec in plan.shards}
    tasks = [
        ShardTask(spec.filename, spec.split, len(spec), shard_fingerprint(plan, spec))
        for spec in plan.shards
    ]

    def write_missing(missing: list[ShardTask], bar: tqdm) -> Iterator[dict[str, Any]]:
        count = min(workers or plan.workers or available_cpus(), len(missing))
        bar.set_description(f"Writing shards (workers={count})")
        jobs = [
            _Job(task, specs[task.filename], str(folder), plan.image_size, plan.jpeg_quality)
            for task in missing
        ]
        return _run_jobs(jobs, count, bar)

    return write_shard_set(
        folder,
        tasks,
        write_missing,
        header={"format": FORMAT, "kind": "images", "params": plan.params},
        finish=functools.partial(_check_bad_fraction, plan, folder),
        progress=progress,
    )


# --- loading ----------------------------------------------------------------------------------


def _set_problems(folder: Path, manifest: Mapping[str, Any], *, checksum: bool = True) -> list[str]:
    problems = []
    for split in manifest["splits"].values():
        for entry in split["shards"]:
            problem = _shard_problem(folder, entry, checksum=checksum)
            if problem:
                problems.append(problem)
    return problems


def is_complete(folder: str | os.PathLike, kind: str | None = None) -> bool:
    """A manifest marks `folder` as a complete shard set of `kind` (any if None; not verified)."""
    manifest = _read_json(Path(folder) / MANIFEST)
    formats = FORMATS.values() if kind is None else [FORMATS[kind]]
    return bool(manifest and manifest.get("format") in formats and manifest.get("complete") is True)


def load_shard_set(
    folder: str | os.PathLike, *, verify: bool = True, kind: str | None = None
) -> ShardSet:
    """The complete shard set in `folder`; DataError naming the path if it is missing or corrupt.

    `verify` checks every file's sha256 (reads all shards once); otherwise only sizes.
    `kind` ("images" or "features"), if given, is the kind the set must be.
    """
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.exists():
        raise DataError(
            f"{path}: missing: no complete shard set in {folder} (run the shard pipeline)"
        )
    manifest = _read_json(path)
    if manifest is None:
        raise DataError(f"{path}: not a readable JSON object")
    formats = list(FORMATS.values()) if kind is None else [FORMATS[kind]]
    if manifest.get("format") not in formats or manifest.get("complete") is not True:
        raise DataError(
            f"{path}: format/complete: not a complete shard set manifest of format {formats}"
        )
    try:
        problems = _set_problems(folder, manifest, checksum=verify)
    except (KeyError, TypeError, AttributeError) as exc:
        raise DataError(f"{path}: malformed shard entries (missing field {exc})") from None
    if problems:
        raise DataError(f"shard set {folder} is incomplete or corrupt: " + "; ".join(problems[:5]))
    return ShardSet(folder, manifest)


# --- reading with tf.data ---------------------------------------------------------------------

CAPTION_MODES = ("sample", "all", "grouped")

# kind -> (the record field that holds the image, the input name the model reads it under)
_PAYLOAD = {"images": ("image/encoded", "image"), "features": ("image/features", "features")}


def _every_caption(record: dict[str, tf.Tensor], kind: str) -> tf.data.Dataset:
    import tensorflow as tf

    field_name, name = _PAYLOAD[kind]
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
    import tensorflow as tf

    field_name, name = _PAYLOAD[kind]
    captions = record["caption/ids"][:per_image].to_tensor()  # int64 [<=C, T]
    captions = tf.pad(captions, [[0, per_image - tf.shape(captions)[0]], [0, 0]])
    image = {name: record[field_name], "image_id": record["image/id"]}
    return image, tf.ensure_shape(captions, [per_image, None])


def _one_caption(
    record: dict[str, tf.Tensor], random: tf.Tensor, kind: str
) -> tuple[dict, tf.Tensor]:
    import tensorflow as tf

    field_name, name = _PAYLOAD[kind]
    captions = record["caption/ids"]  # int64 ragged [C, None]
    row = tf.math.floormod(random, captions.nrows(out_type=tf.int64))
    start, end = captions.row_splits[row], captions.row_splits[row + 1]
    image = {name: record[field_name], "image_id": record["image/id"]}
    return image, captions.values[start:end]


def make_caption_dataset(
    source: ShardSet | Sequence[str | os.PathLike],
    split: str | None = None,
    *,
    batch_size: int,
    caption_mode: str = "sample",
    captions_per_image: int = 5,
    shuffle: bool = False,
    seed: int | None = None,
    decode_images: bool = True,
    image_size: int | None = None,
    kind: str | None = None,
    bucket_boundaries: Sequence[int] | None = None,
    drop_remainder: bool = False,
    repeat: bool | int = False,
    shuffle_buffer: int = 2048,
    cycle_length: int = 8,
) -> tf.data.Dataset:
    """Batches `({"image", "image_id"}, captions)` from image shards, or
    `({"features", "image_id"}, captions)` from feature shards.

    image: float32 [B, S, S, 3] in 0..255 (S = image_size, default the shards' size), or the
    JPEG string [B] when `decode_images` is False; features: float16 [B, R, D] (decode_images
    and image_size do not apply); image_id: int64 [B]; captions: int32 [B, T], padded with 0
    (<pad>) to the longest caption of the batch. `kind` is the ShardSet's own, or "images" for
    a plain list of files (pass "features" for feature shards; R and D are then not static).
    `caption_mode` "sample" takes one random caption per image per epoch, "all" one element
    per caption, "grouped" one element per image with its first `captions_per_image`
    captions: int32 [B, captions_per_image, T] (the encoder then runs once for all of them).
    `bucket_boundaries` (not with "grouped") batches captions of similar length together. `repeat`:
    True = forever, an int = epochs.
    """
    import tensorflow as tf

    if caption_mode not in CAPTION_MODES:
        raise DataError(f"caption_mode must be one of {CAPTION_MODES}, got {caption_mode!r}")
    if caption_mode == "grouped" and bucket_boundaries:
        raise DataError("bucket_boundaries do not apply to caption_mode 'grouped'")
    feature_shape = None
    if isinstance(source, ShardSet):
        files = source.files(split)
        if kind is not None and kind != source.kind:
            raise DataError(f"{source.root / MANIFEST}: a {source.kind} shard set, not {kind}")
        kind = source.kind
        if kind == "features":
            feature_shape = source.feature_shape
        else:
            image_size = image_size or source.image_size
    else:
        files = [str(f) for f in source]
        kind = kind or "images"
    if kind not in _PAYLOAD:
        raise ValueError(f"kind must be one of {sorted(_PAYLOAD)}, got {kind!r}")
    if not files:
        raise DataError(f"no shard files for split {split!r}")
    decode_images = decode_images and kind == "images"
    if decode_images and not image_size:
        raise ValueError("image_size is needed to decode images from a plain list of shard files")
    if kind == "features":
        parse = functools.partial(parse_feature_example, feature_shape=feature_shape)
    else:
        parse = parse_example
    autotune = tf.data.AUTOTUNE
    # Shuffled without a seed: let parallel reads finish in any order, it is random anyway.
    deterministic = not shuffle or seed is not None

    ds = tf.data.Dataset.from_tensor_slices(files)
    if shuffle:
        ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    ds = ds.interleave(
        tf.data.TFRecordDataset,
        cycle_length=min(cycle_length, len(files)),
        num_parallel_calls=autotune,
        deterministic=deterministic,
    )
    if repeat:
        ds = ds.repeat(None if repeat is True else int(repeat))
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
            num_parallel_calls=autotune, deterministic=deterministic,
        )
    else:
        ds = ds.flat_map(functools.partial(_every_caption, kind=kind))
    if shuffle:
        # Shuffle while images are still small JPEG strings, so the buffer stays small; the
        # price: "all" mode decodes an image once per caption. Features are as small as
        # they get: R x D float16 each.
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
            drop_remainder=drop_remainder,
        )
    else:
        ds = ds.padded_batch(batch_size, drop_remainder=drop_remainder)  # pads with 0
    return without_autotune_model(ds.prefetch(autotune))


def without_autotune_model(ds: tf.data.Dataset) -> tf.data.Dataset:
    """`ds` without tf.data's autotuning model: AUTOTUNE parallelism becomes the core count.

    Training makes a new iterator every epoch (one `fit` call per epoch), and destroying one
    waits for the autotuning thread: 15 to 40 s of idle CPU at most epoch ends, measured on 2
    cores (benchmarks in docs/benchmarks.md), for no faster epochs.
    """
    import tensorflow as tf

    options = tf.data.Options()
    options.autotune.enabled = False
    return ds.with_options(options)


def make_image_dataset(
    source: ShardSet, split: str, *, batch_size: int, image_size: int | None = None
) -> tf.data.Dataset:
    """Batches `{"image", "image_id"}` of an image shard set, one element per image, in file
    order (captions are not read): what captioning a split needs.

    image: float32 [B, S, S, 3] in 0..255 (S = image_size, default the shards' size);
    image_id: int64 [B].
    """
    import tensorflow as tf

    if source.kind != "images":
        raise DataError(f"{source.root / MANIFEST}: a {source.kind} shard set, not images")
    image_size = image_size or source.image_size

    def image(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
        record = parse_example(serialized)
        return {
            "image": decode_jpeg_image(record["image/encoded"], image_size),
            "image_id": record["image/id"],
        }

    ds = tf.data.TFRecordDataset(source.files(split))
    ds = ds.map(image, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
