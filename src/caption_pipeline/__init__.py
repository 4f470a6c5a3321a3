"""caption-pipeline: Show, Attend and Tell image captioning as an MLOps project.

The packages, bottom to top (docs/architecture.md, "Packages"): `data/`, `model/`,
`training/`, `evaluation/`, `serving/`, `tracking/`, `datasets/`, `pipelines/`, `mlops/`; an
import only ever points down (tests/test_package_layers.py).
"""

import importlib
import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"

# Models registered before the package was split by concern pickled their pyfunc class as
# `caption_pipeline.mlflow_model.CaptionerModel`: that name still imports the module, so
# every version in a registry stays loadable.
MOVED = {f"{__name__}.mlflow_model": f"{__name__}.tracking.mlflow_model"}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports a name of `MOVED` as the module it moved to (the same module object)."""

    def __init__(self) -> None:
        self._specs: dict = {}

    def find_spec(self, name, path=None, target=None):  # noqa: ARG002
        return importlib.util.spec_from_loader(name, self) if name in MOVED else None

    def create_module(self, spec):
        module = importlib.import_module(MOVED[spec.name])
        self._specs[module.__name__] = module.__spec__
        return module

    def exec_module(self, module) -> None:
        module.__spec__ = self._specs[module.__name__]  # the import set it to the old name's


if not any(isinstance(finder, _MovedModules) for finder in sys.meta_path):
    sys.meta_path.append(_MovedModules())
