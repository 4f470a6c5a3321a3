"""The Kedro project's own files, and a runnable copy of them elsewhere: what tests and
benchmarks run `kedro` in, so that they never touch the checkout's `data/`, `mlflow.db` or
`conf/local`. The package is installed editable (`make install`), so the project root is two
folders above this file.

A project's files are its code and conf; what a run leaves in it is not. `make run` writes
`dvc.lock` and `data/08_reporting/metrics.json`, which git does not ignore (README: commit them
with the code), and `conf/local` is each user's own: a copy made from a user's checkout must be
the same as one made from a fresh clone, so neither kind of file ever crosses over."""

from __future__ import annotations

import fnmatch
import shutil
import subprocess
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]

# What runs write into a project (relative, POSIX): never part of a copy, committed or not. The
# folders' `.gitkeep` files are the project's layout and do cross.
RUN_OUTPUTS = (
    "dvc.lock",
    "data/*",
    "conf/local/*",
    "mlflow.db",
    "mlartifacts/*",
    "mlruns/*",
    "dvc_plots/*",
    ".dvc/cache/*",
    ".dvc/tmp/*",
)


def is_run_output(name: str) -> bool:
    """Whether the project-relative POSIX path `name` is something a run writes (RUN_OUTPUTS),
    not the project's code or conf."""
    if name.endswith("/.gitkeep") or name == ".gitkeep":
        return False
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in RUN_OUTPUTS)


def source_files(root: Path = PROJECT_ROOT) -> list[str]:
    """The project's files as a fresh clone of its working tree holds them: those git tracks
    and those it would track (new, not ignored), less what runs write (RUN_OUTPUTS), even
    where a user has committed it."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    return sorted(
        name
        for name in set(filter(None, listed))
        if not is_run_output(name) and (root / name).is_file()
    )


def copy_project(dest: Path, root: Path = PROJECT_ROOT) -> Path:
    """A runnable copy of the Kedro project at `dest`: its metadata and `conf/` (an empty
    `conf/local`) and empty data layers; the code is the installed package."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("pyproject.toml", ".telemetry"):
        shutil.copy2(root / name, dest / name)
    shutil.copytree(root / "conf", dest / "conf", ignore=shutil.ignore_patterns("local"))
    (dest / "conf" / "local").mkdir()
    (dest / "src").mkdir()  # Kedro checks that the source folder exists
    for layer in (root / "data").iterdir():
        if layer.is_dir():
            (dest / "data" / layer.name).mkdir(parents=True)
    return dest
