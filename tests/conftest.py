"""Shared test fixtures."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

PROJECT_ROOT = Path(__file__).resolve().parents[1]
KEDRO = str(Path(sys.executable).with_name("kedro"))


@pytest.fixture
def project_root() -> Path:
    return PROJECT_ROOT


def copy_project(dest: Path) -> Path:
    """A runnable copy of the Kedro project (config and metadata; the package is installed)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("pyproject.toml", ".telemetry"):
        shutil.copy2(PROJECT_ROOT / name, dest / name)
    shutil.copytree(PROJECT_ROOT / "conf", dest / "conf", ignore=shutil.ignore_patterns("local"))
    (dest / "conf" / "local").mkdir()
    (dest / "src").mkdir()  # Kedro checks that the source folder exists; the package is installed
    for layer in (PROJECT_ROOT / "data").iterdir():
        if layer.is_dir():
            (dest / "data" / layer.name).mkdir(parents=True)
    return dest


def run_kedro(project: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """`kedro ARGS` in `project`, capturing output; never raises on a non-zero exit."""
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run(
        [KEDRO, *args], cwd=project, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="session")
def smoke_project(tmp_path_factory) -> Path:
    """A project copy on which `kedro run --env smoke` (the default pipeline) has run once."""
    project = copy_project(tmp_path_factory.mktemp("smoke") / "project")
    result = run_kedro(project, "run", "--env", "smoke")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return project


def kill_9_when(child, ready, *, timeout: float, what: str) -> None:
    """SIGKILL `child` (started with start_new_session=True) once `ready()` is true."""
    import signal
    import time

    try:
        deadline = time.monotonic() + timeout
        while not ready():
            assert child.poll() is None and time.monotonic() < deadline, (
                f"{what} ended before it was killed"
            )
            time.sleep(0.01)
        os.killpg(child.pid, signal.SIGKILL)
    finally:
        child.wait()
