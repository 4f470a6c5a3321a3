"""A shard set on disk: its files and manifest, loading it verified, writing it resumably.

A shard set is a folder of `{split}-{index:05d}-of-{count:05d}.tfrecord` files and a
`manifest.json` written last: no manifest, no complete set. Each shard is written under a
temporary name and renamed when complete, then a receipt (its manifest entry) is written to
`.receipts/`; a re-run reuses a shard only if its receipt or the old manifest has the same
fingerprint and the file's sha256 matches. `write_shard_set` does this for every kind of
record (the image writer, `image_writer.py`, and the feature writer, `features.py`, say only
how to fill one shard).

Why the manifest comes last: a kill at any instruction leaves either a complete manifest
whose files verify, or no manifest and files that the next run checks one by one.

No TensorFlow here: the bytes of a shard are only hashed, never parsed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from caption_pipeline.atomic import atomic_path, atomic_write_json, remove_stale_temporaries
from caption_pipeline.errors import DataError

logger = logging.getLogger(__name__)

# The manifest's "format", one per kind of record (the layouts: `records.py`).
IMAGE_FORMAT = "caption-pipeline/sequence-example/v1"
FEATURE_FORMAT = "caption-pipeline/feature-sequence-example/v1"
FORMAT_BY_KIND = {"images": IMAGE_FORMAT, "features": FEATURE_FORMAT}
MANIFEST = "manifest.json"
RECEIPTS = ".receipts"
SHARD_SUFFIX = ".tfrecord"


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
        return {fmt: kind for kind, fmt in FORMAT_BY_KIND.items()}[self.manifest["format"]]

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


@dataclass(frozen=True)
class ShardFolder:
    """Where a node writes a shard set: the folder of the catalog's entry, and whether the
    writer shows a progress bar. A destination, not data: the node that receives it writes
    the set there (resumably, manifest last) and returns the `ShardSet` it wrote."""

    path: Path
    progress: bool


@dataclass(frozen=True)
class WriteSummary:
    manifest: dict[str, Any]
    written: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    noop: bool = False


@dataclass(frozen=True)
class ShardTask:
    """One file of a shard set: the unit that is verified, reused or (re)written."""

    filename: str
    split: str
    size: int  # images, for the progress bar
    fingerprint: str  # of everything that decides the file's bytes


# (the tasks still to write, the progress bar) -> their receipts, in any order
WriteMissing = Callable[[list[ShardTask], tqdm], Iterable[dict[str, Any]]]


# --- reading and verifying ----------------------------------------------------------------------


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


def _file_sha256(file) -> str:
    return hashlib.file_digest(file, "sha256").hexdigest()


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
            sha256 = _file_sha256(f)
        if sha256 != entry["sha256"]:
            return f"{path}: sha256 does not match the manifest (corrupt or changed)"
    return None


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
    manifest = read_manifest(folder)
    formats = FORMAT_BY_KIND.values() if kind is None else [FORMAT_BY_KIND[kind]]
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
    formats = list(FORMAT_BY_KIND.values()) if kind is None else [FORMAT_BY_KIND[kind]]
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


def skipped_examples(manifest: Mapping[str, Any], split: str) -> list[dict[str, Any]]:
    """Images of `split` that failed to load (the writer keeps a few per shard)."""
    return [e for shard in manifest["splits"][split]["shards"] for e in shard["skipped_examples"]]


# --- writing: atomic shards, receipts, manifest, resume -----------------------------------------


def _size_and_sha256(path: Path) -> tuple[int, str]:
    with open(path, "rb") as f:
        os.fsync(f.fileno())  # on disk before the rename makes it final
        return os.fstat(f.fileno()).st_size, _file_sha256(f)


def commit_shard(
    folder: Path, task: ShardTask, fill: Callable[[Path], dict[str, Any]]
) -> dict[str, Any]:
    """Write one shard: `fill(tmp)` writes its records to a temporary file and returns their
    counts ("records", "captions", "skipped", "skipped_examples" and any other entry fields).
    The file is renamed when complete, then its receipt (its manifest entry) is written."""
    with atomic_path(folder / task.filename) as tmp:
        counts = fill(tmp)
        size, sha256 = _size_and_sha256(tmp)
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

    old_manifest = _read_json(folder / MANIFEST)
    if (
        old_manifest
        and old_manifest.get("complete")
        and old_manifest.get("fingerprint") == fingerprint
        and not _set_problems(folder, old_manifest)
    ):
        shutil.rmtree(folder / RECEIPTS, ignore_errors=True)
        logger.info("Shards in %s are complete and verified: nothing to do", folder)
        return WriteSummary(old_manifest, reused=list(fingerprints), noop=True)

    previous = _previous_entries(folder)
    # From here on the folder is not a complete set: say so before changing any shard.
    (folder / MANIFEST).unlink(missing_ok=True)
    for stale in folder.glob(f"*{SHARD_SUFFIX}"):
        if stale.name not in fingerprints:
            stale.unlink()

    reused = {
        name: previous[name]
        for name, fp in fingerprints.items()
        if _reusable(folder, previous.get(name), fp)
    }
    missing = [task for task in tasks if task.filename not in reused]
    with tqdm(
        total=sum(t.size for t in tasks), unit="image", desc=desc, disable=not progress
    ) as bar:
        bar.update(sum(t.size for t in tasks if t.filename in reused))
        written = {r["file"]: r for r in write_missing(missing, bar)} if missing else {}

    body = _splits_and_totals(tasks, {**reused, **written})
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
        len(reused),
        totals["records"],
        totals["captions"],
        totals["skipped"],
    )
    return WriteSummary(manifest, written=sorted(written), reused=sorted(reused))
