"""Atomic writes: write to a temporary name in the same folder, then rename.

A killed run leaves at worst a `.tmp-*` file or folder behind, never a half-written file
under the final name, so nothing a later run trusts is ever partial. Such leftovers (a
SavedModel's is hundreds of MB at COCO size) are deleted by `remove_stale_temporaries`: a
temporary's name holds its writer's process id, so only those of processes that are gone are
touched, never a live writer's. A process's first atomic write into a folder runs it there;
later writes into that folder do not list it again (a COCO image folder holds 118,287 files:
listing it at every write would make writing it quadratic).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TMP_MARKER = ".tmp-"

logger = logging.getLogger(__name__)


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


# `.{name}.tmp-{pid}-{8 hex}`, then the writer's own suffix if any (`atomic_path`'s `suffix`).
_TEMPORARY = re.compile(r"\..+?" + re.escape(TMP_MARKER) + r"(\d+)-[0-9a-f]{8}")
_cleaned: set[Path] = set()  # folders this process has cleaned


def remove_stale_temporaries(folder: str | os.PathLike) -> int:
    """Delete the temporaries in `folder` whose writers no longer run (a kill between writing
    and the rename); returns how many."""
    folder = Path(folder)
    _cleaned.add(folder.resolve())
    if not folder.is_dir():
        return 0
    count = 0
    for child in folder.iterdir():
        match = _TEMPORARY.match(child.name)
        if match and not _alive(int(match.group(1))):
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
            count += 1
    if count:
        logger.info(
            "Removed %d unfinished write(s) of processes that are gone in %s", count, folder
        )
    return count


def _prepare_folder(final: Path) -> None:
    """Create `final`'s folder, and clean it the first time this process writes there."""
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.parent.resolve() not in _cleaned:
        remove_stale_temporaries(final.parent)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path to write; on success it is renamed to `path`. `suffix` ends the
    temporary name, for writers that insist on one (Keras: ".keras", ".weights.h5")."""
    final = Path(path)
    _prepare_folder(final)
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
    _prepare_folder(final)
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
