"""Issue 24: what a user's own runs leave in their checkout never reaches the suite. `make run`
writes `dvc.lock` and `data/08_reporting/metrics.json` (untracked and not ignored: README says
to commit them), and a user keeps their own `conf/local`, `data/`, `mlflow.db`. The helpers that
copy the project for tests (`copy_project`, `clone_working_tree`, the `project_root` fixture's
copy) must give what a fresh clone gives, whether those files are committed or not."""

from __future__ import annotations

from pathlib import Path

import pytest
from kedro.config import OmegaConfigLoader

from caption_pipeline.project import copy_project, is_run_output, source_files
from caption_pipeline.settings import CONFIG_LOADER_ARGS
from tests.helpers import clone_working_tree, git

# A user's checkout after `make run` and some work of their own: (path, committed?).
PLANTED = {
    "dvc.lock": True,  # README: commit it with the code
    "data/08_reporting/metrics.json": True,
    "conf/local/parameters.yml": False,
    "data/01_raw/shapes/train/000000000001.jpg": False,
    "data/06_models/captioner.keras": False,
    "mlflow.db": False,
    "mlartifacts/1/model/MLmodel": False,
}
LOCAL_EPOCHS = 999  # what the planted conf/local sets; conf/base sets something else


@pytest.fixture(scope="module")
def user_checkout(tmp_path_factory) -> Path:
    """A git checkout of the project after a run: the planted files, some of them committed."""
    checkout = clone_working_tree(tmp_path_factory.mktemp("user") / "checkout")
    for name, committed in PLANTED.items():
        path = checkout / name
        path.parent.mkdir(parents=True, exist_ok=True)
        text = f"train:\n  epochs: {LOCAL_EPOCHS}\n" if name.endswith(".yml") else "planted\n"
        path.write_text(text)
        if committed:
            git(checkout, "add", "--force", name)
    git(checkout, "commit", "-q", "-m", "the user's run outputs, as README advises")
    tracked = git(checkout, "ls-files").split()
    assert {"dvc.lock", "data/08_reporting/metrics.json"} <= set(tracked)
    return checkout


def crossed(copy: Path) -> list[str]:
    return [name for name in PLANTED if (copy / name).exists()]


def test_the_planted_files_are_run_outputs():
    assert all(is_run_output(name) for name in PLANTED)
    assert not is_run_output("data/08_reporting/.gitkeep")  # the layout is the project's
    assert not is_run_output("conf/base/parameters_train.yml")
    assert not is_run_output("src/caption_pipeline/project.py")


def test_clone_working_tree_takes_no_run_output(user_checkout, tmp_path):
    assert not [name for name in source_files(user_checkout) if name in PLANTED]
    clone = clone_working_tree(tmp_path / "clone", root=user_checkout)
    assert crossed(clone) == []
    # ... and everything else a fresh clone has: code, conf, dvc.yaml, the data layout.
    for name in ("dvc.yaml", "conf/base/parameters_train.yml", "src/caption_pipeline/project.py"):
        assert (clone / name).is_file(), name
    assert (clone / "data/08_reporting/.gitkeep").is_file()
    assert git(clone, "status", "--porcelain") == ""


def test_copy_project_takes_no_run_output(user_checkout, tmp_path):
    copy = copy_project(tmp_path / "copy", root=user_checkout)
    assert crossed(copy) == []
    assert sorted(p.name for p in (copy / "data").iterdir()) == sorted(
        p.name for p in (user_checkout / "data").iterdir() if p.is_dir()
    )
    assert list((copy / "data").rglob("*.*")) == []


def test_parameters_read_from_a_copy_ignore_the_users_conf_local(user_checkout, tmp_path):
    """What the `project_root` and `base_parameters` fixtures read: the user's conf/local
    (train.epochs = 999 here) changes nothing."""
    loader_args = CONFIG_LOADER_ARGS  # as `kedro run` loads them, conf/local included
    in_checkout = OmegaConfigLoader(str(user_checkout / "conf"), **loader_args)["parameters"]
    assert in_checkout["train"]["epochs"] == LOCAL_EPOCHS  # the plant is real
    copy = copy_project(tmp_path / "copy", root=user_checkout)
    in_copy = OmegaConfigLoader(str(copy / "conf"), **loader_args)["parameters"]
    assert in_copy["train"]["epochs"] != LOCAL_EPOCHS


def test_the_project_root_fixture_is_a_pristine_copy(project_root):
    from caption_pipeline.project import PROJECT_ROOT

    assert project_root != PROJECT_ROOT
    assert list((project_root / "conf" / "local").iterdir()) == []
    assert not (project_root / "dvc.lock").exists()
    assert list((project_root / "data").rglob("*.*")) == []
