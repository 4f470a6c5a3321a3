"""Project hooks."""

from __future__ import annotations

import sys
from types import TracebackType

from kedro.framework.hooks import hook_impl

from caption_pipeline.errors import DataError


def _data_error_in(exc: BaseException | None) -> DataError | None:
    """The DataError that caused `exc`, following Kedro's wrapping, if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, DataError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


class CleanDataErrorHooks:
    """Show bad-input errors as one clear message, not a traceback through Kedro.

    A DataError means the input (a file, a field, a setting) is wrong, and its message says
    which; the stack of frames inside Kedro's runner helps nobody. Other errors are bugs and
    keep their full traceback.
    """

    @hook_impl
    def after_context_created(self, context) -> None:  # noqa: ARG002 (hook signature)
        previous = sys.excepthook
        if getattr(previous, "_caption_pipeline", False):
            return

        def excepthook(
            exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None
        ) -> None:
            data_error = _data_error_in(exc)
            if data_error is None:
                previous(exc_type, exc, tb)
                return
            print(f"\nError: {data_error}", file=sys.stderr)

        excepthook._caption_pipeline = True  # type: ignore[attr-defined]
        sys.excepthook = excepthook


class MissingInputsHooks:
    """Stop a run whose inputs another stage writes, and is yet to, with one line naming it.

    `kedro run --pipelines=ingest` on a fresh clone would otherwise fail deep in Kedro's
    loading, with a traceback about data/01_raw/raw_dataset.json, which the `synthetic` stage
    writes for any dataset (the shapes data, generated, or your own, recorded as configured).
    Only inputs that a registered stage produces are checked: they would fail to load anyway,
    so this changes no run that could succeed, only how one that cannot is reported.
    """

    @hook_impl
    def before_pipeline_run(self, run_params, pipeline, catalog) -> None:  # noqa: ARG002
        missing = [name for name in sorted(pipeline.inputs()) if not _exists(catalog, name)]
        if not missing:
            return
        stages = _all_stages()
        for name in missing:
            writers = sorted(stage for stage, p in stages.items() if name in p.all_outputs())
            if writers:
                where = getattr(catalog.get(name), "_filepath", None)
                raise DataError(
                    f"{name}{f' ({where})' if where else ''} does not exist yet: run "
                    f"`kedro run --pipelines={','.join(writers)}` first (or `kedro run` for "
                    "every stage)")


def _exists(catalog, name: str) -> bool:
    """The dataset is there, or cannot tell (then loading it decides)."""
    try:
        return bool(catalog.exists(name))
    except Exception:  # noqa: BLE001 (a dataset that cannot check: not this hook's call)
        return True


def _all_stages() -> dict:
    """Every stage's pipeline, by folder name as `pipeline_registry` registers them. Not from
    Kedro's `pipelines` or `find_pipelines`: under `--pipelines=X` they load X only."""
    import importlib
    import pkgutil

    import caption_pipeline.pipelines as package

    return {info.name: importlib.import_module(f"{package.__name__}.{info.name}").create_pipeline()
            for info in pkgutil.iter_modules(package.__path__) if info.ispkg}
