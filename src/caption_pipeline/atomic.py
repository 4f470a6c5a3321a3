"""Atomic writes: write to a temporary name in the same folder, then rename.

A killed run leaves at worst a `.tmp-*` file or folder behind, never a half-written file
under the final name, so nothing a later run trusts is ever partial. The next write of the
same path deletes such leftovers of processes that are gone (a SavedModel's is hundreds of MB
at COCO size), and leaves those of a live writer alone.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TMP_MARKER = ".tmp-"


def temp_sibling(path: Path) -> Path:
    """A unique temporary name next to `path` (same filesystem, so rename is atomic):
    `.{name}.tmp-{pid}-{8 hex}`, the writer's process id in it."""
    return path.with_name(f".{path.name}{TMP_MARKER}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's
    return True


def remove_stale_siblings(path: str | os.PathLike) -> int:
    """Delete the temporaries that writers of `path` which no longer run left next to it
    (a kill between writing and the rename); returns how many."""
    final = Path(path)
    if not final.parent.is_dir():
        return 0
    pattern = re.compile(re.escape(f".{final.name}{TMP_MARKER}") + r"(\d+)-[0-9a-f]{8}")
    count = 0
    for child in final.parent.glob(glob.escape(f".{final.name}{TMP_MARKER}") + "*"):
        match = pattern.match(child.name)
        if match and not _alive(int(match.group(1))):
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
            count += 1
    return count


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path to write; on success it is renamed to `path`. `suffix` ends the
    temporary name, for writers that insist on one (Keras: ".keras", ".weights.h5")."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(final)
    tmp = temp_sibling(final)
    tmp = tmp.with_name(tmp.name + suffix)
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder to fill; on success it replaces `path` as a whole."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(final)
    tmp = temp_sibling(final)
    tmp.mkdir()
    try:
        yield tmp
        if final.exists():
            old = temp_sibling(final)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def remove_stale_temporaries(folder: str | os.PathLike) -> int:
    """Delete `.tmp-*` leftovers of killed runs in `folder`; returns how many."""
    count = 0
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    for child in folder.iterdir():
        if child.name.startswith(".") and TMP_MARKER in child.name:
            shutil.rmtree(child) if child.is_dir() else child.unlink()
            count += 1
    return count
