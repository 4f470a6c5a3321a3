"""notebooks/*.ipynb execute top to bottom on the smoke run, reading through the Kedro catalog."""

from __future__ import annotations

import shutil

import pytest

from caption_pipeline.project import PROJECT_ROOT

NOTEBOOKS = sorted((PROJECT_ROOT / "notebooks").glob("*.ipynb"))


def test_notebooks_are_committed_without_outputs():
    import nbformat

    assert [p.name for p in NOTEBOOKS] == ["01_dataset.ipynb", "02_attention.ipynb"]
    for path in NOTEBOOKS:
        notebook = nbformat.read(path, as_version=4)
        assert notebook.cells[1].source.strip() == "%load_ext kedro.ipython", path.name
        for cell in notebook.cells:
            assert not cell.get("outputs") and not cell.get("execution_count"), path.name


@pytest.mark.slow
@pytest.mark.parametrize("name", [p.name for p in NOTEBOOKS])
def test_notebook_runs_on_the_smoke_environment(smoke_project, name, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    folder = smoke_project / "notebooks"
    folder.mkdir(exist_ok=True)
    path = shutil.copy2(PROJECT_ROOT / "notebooks" / name, folder / name)
    monkeypatch.setenv("KEDRO_ENV", "smoke")  # the kernel inherits it; Kedro reads it
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(folder)}}
    ).execute()

    outputs = [out for cell in notebook.cells for out in cell.get("outputs", [])]
    assert not [out for out in outputs if out.get("output_type") == "error"]
    images = [out for out in outputs if "image/png" in out.get("data", {})]
    assert len(images) >= 3, name  # 01: samples, lengths, words; 02: one figure per image
    assert not (folder / "mlflow.db").exists()  # the project's database, not one per folder
