"""The package's layers: every import, lazy ones included, points down or within its own
package (docs/architecture.md, "Packages"), so the package graph has no cycle; and the only
modules at the top are Kedro's entry points and a few small shared ones."""

from __future__ import annotations

from pathlib import Path

import caption_pipeline
from caption_pipeline.mlops.import_graph import PACKAGE, imported

SRC = Path(caption_pipeline.__file__).parent
# Bottom to top. A module may import its own layer and those before it, never one after.
LAYERS = [
    {"errors", "atomic", "params", "project", "conf_loader"},  # small, shared
    {"data"},
    {"model"},
    {"training"},
    {"evaluation"},
    {"serving"},
    {"tracking"},
    {"datasets"},
    {"pipelines", "pipeline_registry"},
    {"mlops"},
    {"settings", "__main__", "__init__"},  # Kedro's entry points and the CLI
]
ENTRY_POINTS = {"settings", "pipeline_registry", "__main__", "__init__"}


def layer_of(unit: str) -> int:
    return next(i for i, names in enumerate(LAYERS) if unit in names)


def upward_imports(package: Path) -> list[str]:
    """Each import, in every file of `package`, of a layer above the importing file's."""
    upward = []
    for path in sorted(package.rglob("*.py")):
        unit = path.relative_to(package).parts[0].removesuffix(".py")
        others = {
            parts[1]
            for parts in (module.split(".") for module in imported(package.parent, path))
            if parts[0] == PACKAGE and len(parts) > 1 and parts[1] not in (unit, "__version__")
        }
        for other in sorted(others):
            if layer_of(other) > layer_of(unit):
                upward.append(f"{path.relative_to(package)} imports {other}")
    return upward


def test_every_import_points_down_or_within_its_package() -> None:
    assert len(list(SRC.rglob("*.py"))) > 80  # the whole package is read
    assert upward_imports(SRC) == []


def test_an_upward_import_is_found(tmp_path: Path) -> None:
    """The check can fail: a lazy import of the pipelines from the data layer is seen."""
    module = tmp_path / PACKAGE / "data" / "bad.py"
    module.parent.mkdir(parents=True)
    module.write_text("def f():\n    from caption_pipeline.pipelines import train\n")
    assert upward_imports(tmp_path / PACKAGE) == ["data/bad.py imports pipelines"]


def test_the_top_holds_entry_points_and_at_most_five_small_shared_modules() -> None:
    modules = {p.stem for p in SRC.glob("*.py")}
    shared = modules - ENTRY_POINTS
    assert shared == LAYERS[0]
    assert len(shared) <= 5
    for name in shared:
        assert len((SRC / f"{name}.py").read_text().splitlines()) <= 200, name


def test_every_package_says_what_it_holds() -> None:
    for package in sorted(p.parent for p in SRC.glob("*/__init__.py")):
        doc = (package / "__init__.py").read_text()
        assert doc.startswith('"""'), package.name
        assert layer_of(package.name) is not None


def test_a_model_registered_before_the_move_unpickles_its_class() -> None:
    """A pyfunc model logged before the split pickled its class under the old module name
    (cloudpickle stores a class by reference: module and name)."""
    import importlib
    import pickle

    from caption_pipeline.tracking import mlflow_model

    pickled = (  # pickle.dumps of the class when it was caption_pipeline.mlflow_model's
        b"\x80\x04\x954\x00\x00\x00\x00\x00\x00\x00\x8c\x1dcaption_pipeline.mlflow_model"
        b"\x94\x8c\x0eCaptionerModel\x94\x93\x94."
    )
    old = pickle.loads(pickled)
    assert old is mlflow_model.CaptionerModel
    assert importlib.import_module(f"{PACKAGE}.mlflow_model") is mlflow_model
    assert mlflow_model.__spec__.name == f"{PACKAGE}.tracking.mlflow_model"
