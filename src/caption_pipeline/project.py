"""The Kedro project's own files, and a runnable copy of them elsewhere: what tests and
benchmarks run `kedro` in, so that they never touch the checkout's `data/`, `mlflow.db` or
`conf/local`. The package is installed editable (`make install`), so the project root is two
folders above this file."""

from __future__ import annotations

import shutil
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]


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
