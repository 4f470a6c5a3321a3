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
