"""The project modules a piece of code imports, directly or not, read from the source with
`ast` (nothing is imported to find them): what a DVC stage's code deps are
(`dvc_stages`). A dep is a module's file, or its package's folder, except in
`SPLIT_PACKAGES`, whose modules are separate units."""

from __future__ import annotations

import ast
import importlib
import importlib.util
from collections.abc import Iterator
from pathlib import Path

PACKAGE = "caption_pipeline"
# Packages whose modules are separate units (one Kedro dataset, one stage's nodes, one job of
# a concern): a stage depends on the modules it uses, not on the whole folder as for `model/`
# (or `data/shards/`, a unit inside `data/`).
SPLIT_PACKAGES = {
    "data",
    "training",
    "evaluation",
    "serving",
    "tracking",
    "mlops",
    "datasets",
    "pipelines",
}


def imported_closure(src: Path, start: list[Path | None], skip: set[Path | None]) -> list[Path]:
    """`start` and every project module (file or package folder) they import, directly or
    not, but those in `skip` (and what only they import)."""
    todo, seen = list(start), []
    while todo:
        path = todo.pop()
        if path is None or path in seen or path in skip:
            continue
        seen.append(path)
        todo += [module_path(src, m) for m in imported(src, path)]
    return seen


def class_module(dotted: str) -> str:
    """The module that defines a catalog `type` (`caption_pipeline.datasets.X` is re-exported
    by the package; the class knows its own module)."""
    module, name = dotted.rsplit(".", 1)
    return getattr(importlib.import_module(module), name).__module__


def module_path(src: Path, module: str) -> Path | None:
    """The dep for a project module: its file, or its package's folder (`model/`), or, in a
    `SPLIT_PACKAGES` package, its own file (`datasets/keras_model.py`, the package's
    `__init__.py` for a name imported from the package itself). None: not a project module."""
    parts = module.split(".")
    if parts[0] != PACKAGE or len(parts) == 1:
        return None
    depth = 3 if parts[1] in SPLIT_PACKAGES else 2
    if len(parts) < depth:
        return src.joinpath(*parts, "__init__.py")
    base = src.joinpath(*parts[:depth])
    for candidate in (base.with_suffix(".py"), base):
        if candidate.exists():
            return candidate
    return None


def imported(src: Path, path: Path) -> Iterator[str]:
    """The modules that the Python files at `path` (a file or a folder) import; for
    `from M import N`, both M and M.N (N may be a module or a name in M)."""
    for file in [path] if path.is_file() else sorted(path.rglob("*.py")):
        package = ".".join(file.parent.relative_to(src).parts)  # of relative imports
        for node in _import_nodes(ast.parse(file.read_text(), str(file))):
            if isinstance(node, ast.Import):
                yield from (alias.name for alias in node.names)
                continue
            module = importlib.util.resolve_name("." * node.level + (node.module or ""), package)
            yield module
            yield from (f"{module}.{alias.name}" for alias in node.names)


def _import_nodes(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Import statements anywhere in the tree (functions too), but under `if TYPE_CHECKING:`,
    which never runs."""
    for child in ast.iter_child_nodes(tree):
        typing_only = isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test)
        for node in child.orelse if typing_only else [child]:
            if isinstance(node, ast.Import | ast.ImportFrom):
                yield node
            yield from _import_nodes(node)
