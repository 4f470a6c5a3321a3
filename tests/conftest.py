"""Shared test fixtures (helpers that are not fixtures: tests/helpers.py)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from caption_pipeline.project import PROJECT_ROOT, copy_project
from tests.helpers import (
    EXPORT_DIR,
    free_port,
    run_kedro,
    start_server,
    stop_server,
)

os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture(scope="session")
def project_root(tmp_path_factory) -> Path:
    """The project as a fresh clone holds it (code, conf/base and the other committed
    environments, an empty conf/local, empty data layers): what tests read conf from, so that
    what a user's own runs left in the checkout (`conf/local`, `data/`, `dvc.lock`) changes no
    result (issue 24)."""
    return copy_project(tmp_path_factory.mktemp("pristine") / "project")


@pytest.fixture(scope="session")
def smoke_project(tmp_path_factory) -> Path:
    """A project copy on which `kedro run --env smoke` (the default pipeline) has run once."""
    project = copy_project(tmp_path_factory.mktemp("smoke") / "project")
    result = run_kedro(project, "run", "--env", "smoke")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return project


@pytest.fixture(scope="session")
def shard_project(tmp_path_factory) -> Path:
    """A project copy with the smoke data stages run: shards and vocabulary on disk (what
    tests/test_training.py and tests/test_fine_tuning.py train on)."""
    project = copy_project(tmp_path_factory.mktemp("train") / "project")
    result = run_kedro(
        project, "run", "--env", "smoke", "--pipelines", "synthetic,ingest,vocab,shard"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return project


# --- export and serving (issue 5) ---------------------------------------------------------------


@pytest.fixture(scope="session")
def caption_server(smoke_project):
    """`caption-pipeline serve` on the smoke project's export, on 127.0.0.1: its base URL."""
    port = free_port()
    command = str(Path(sys.executable).with_name("caption-pipeline"))
    process = start_server(
        [command, "serve", "--port", str(port), "--env", "smoke"],
        smoke_project,
        f"http://127.0.0.1:{port}/readyz",
    )
    yield f"http://127.0.0.1:{port}"
    stop_server(process)


@pytest.fixture(scope="session")
def exported(smoke_project):
    """The smoke project's export, loaded in the test process."""
    from caption_pipeline.serving.export import ExportedCaptioner

    return ExportedCaptioner(smoke_project / EXPORT_DIR)


@pytest.fixture(scope="session")
def test_jpegs(smoke_project):
    """(image ids, JPEG bytes) of the smoke project's test split, from its shards."""
    from caption_pipeline.data.shards.shard_set import load_shard_set
    from caption_pipeline.serving.export_check import read_held_out_images

    images = read_held_out_images(load_shard_set(smoke_project / "data/03_primary/shards"), None)
    return list(images.ids), list(images.jpegs)


# --- markers (issue 13) -------------------------------------------------------------------------

# A test is slow when it needs the smoke run (the fixture, or one built on it: `exported`,
# `test_jpegs`, `caption_server`, `mlflow_server`...) or starts `kedro` itself through
# `run_kedro`: in its body, in a fixture it uses, or in a helper of a test module it calls.
# `make test-fast` (`-m "not slow"`) leaves those out; `make test` runs everything.
SLOW_FIXTURES = {"smoke_project"}
SLOW_CALLS = {"run_kedro"}


def _names_used(function, seen: set) -> set[str]:
    """Global names `function` (and the test helpers it calls, transitively) refers to."""
    import types

    code = getattr(function, "__code__", None)
    if code is None or code in seen:
        return set()
    seen.add(code)
    names, stack = set(), [code]
    while stack:
        current = stack.pop()
        names.update(current.co_names)
        stack.extend(c for c in current.co_consts if isinstance(c, types.CodeType))
    for name in list(names):
        helper = function.__globals__.get(name)
        if (
            isinstance(helper, types.FunctionType)
            and helper.__module__ != __name__
            and str(Path(helper.__code__.co_filename)).startswith(str(PROJECT_ROOT / "tests"))
        ):
            names |= _names_used(helper, seen)
    return names


def is_slow(item) -> bool:
    """Whether `item` uses a smoke fixture or runs kedro (see SLOW_FIXTURES and SLOW_CALLS)."""
    if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
        return True
    functions = [getattr(item, "function", None)]
    info = getattr(item, "_fixtureinfo", None)
    for definitions in info.name2fixturedefs.values() if info else ():
        functions.extend(definition.func for definition in definitions)
    seen: set = set()
    return any(SLOW_CALLS & _names_used(f, seen) for f in functions if f is not None)


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's, which reads the xdist_group marks
def pytest_collection_modifyitems(config, items):
    for item in items:
        if is_slow(item) and not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.slow)
        # Under pytest-xdist (`--dist loadgroup`) the tests of the smoke run share one worker,
        # so the smoke run is made once, and no two processes write in its project at a time.
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.xdist_group("smoke"))
