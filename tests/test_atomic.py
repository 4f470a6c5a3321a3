"""Atomic writes after a real kill -9: the final name is never partial, and a process's first
write into the folder removes the dead writer's temporary (but not a live writer's, nor a name
not of our making)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from caption_pipeline.atomic import (
    TMP_MARKER,
    atomic_directory,
    atomic_path,
    remove_stale_temporaries,
)

KILLED_WRITER = """
import os, signal, sys
from caption_pipeline.atomic import atomic_directory, atomic_path
target, kind = sys.argv[1], sys.argv[2]
if kind == "file":
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"half of the new")
        os.kill(os.getpid(), signal.SIGKILL)
else:
    with atomic_directory(target) as tmp:
        (tmp / "variables").mkdir()
        (tmp / "variables" / "data").write_bytes(b"half")
        os.kill(os.getpid(), signal.SIGKILL)
"""


def killed_write(target: Path, kind: str) -> list[Path]:
    """Run a writer of `target` that is killed between writing and the rename; its leftovers."""
    done = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(target), kind])
    assert done.returncode == -signal.SIGKILL
    return sorted(target.parent.glob(f".{target.name}{TMP_MARKER}*"))


def test_a_killed_file_write_leaves_the_old_file_and_the_next_write_cleans_up(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_bytes(b"old")
    leftovers = killed_write(target, "file")
    assert len(leftovers) == 1 and leftovers[0].read_bytes() == b"half of the new"
    assert target.read_bytes() == b"old"  # the final name is never partial

    with atomic_path(target) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new"
    assert not leftovers[0].exists()
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_a_killed_folder_write_is_removed_by_the_next_one(tmp_path):
    target = tmp_path / "saved_model"
    leftovers = killed_write(target, "folder")
    assert len(leftovers) == 1 and (leftovers[0] / "variables" / "data").exists()
    assert not target.exists()

    with atomic_directory(target) as tmp:
        (tmp / "saved_model.pb").write_bytes(b"graph")
    assert [p.name for p in tmp_path.iterdir()] == ["saved_model"]
    assert (target / "saved_model.pb").read_bytes() == b"graph"


def test_a_live_writers_temporary_and_other_paths_are_kept(tmp_path):
    target = tmp_path / "captioner.keras"
    live = tmp_path / f".captioner.keras{TMP_MARKER}{os.getpid()}-0123abcd.keras"
    live.write_bytes(b"being written")
    similar = tmp_path / f".captioner.keras.bak{TMP_MARKER}1-0123abcd"  # process 1's: alive
    similar.write_bytes(b"x")
    odd = tmp_path / f".captioner.keras{TMP_MARKER}not-a-pid"  # not our naming: not ours
    odd.write_bytes(b"x")
    with atomic_path(target) as tmp:  # this process's first write into the folder
        tmp.write_bytes(b"new")
    assert remove_stale_temporaries(tmp_path) == 0
    assert live.exists() and similar.exists() and odd.exists()


@pytest.mark.parametrize("name", ["a[1].json", "b*?.json"])
def test_names_with_glob_characters(tmp_path, name):
    target = tmp_path / name
    killed_write(target, "file")
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"ok")
    assert [p.name for p in tmp_path.iterdir()] == [name]


def test_a_folder_is_cleaned_at_this_process_first_write_there_only(tmp_path):
    """Later writes into a folder do not list it again (writing N files stays linear); an
    explicit `remove_stale_temporaries` still cleans it."""
    first = killed_write(tmp_path / "a.jpg", "file")
    with atomic_path(tmp_path / "b.jpg") as tmp:
        tmp.write_bytes(b"b")
    assert not first[0].exists()  # another path's, of a writer that is gone

    later = killed_write(tmp_path / "c.jpg", "file")
    with atomic_path(tmp_path / "d.jpg") as tmp:
        tmp.write_bytes(b"d")
    assert later[0].exists()
    assert remove_stale_temporaries(tmp_path) == 1 and not later[0].exists()
