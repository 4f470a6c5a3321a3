"""Dataclasses built from a parameters block, with unknown keys named in the error."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

from caption_pipeline.errors import DataError

T = TypeVar("T")


def from_params(cls: type[T], params: Mapping[str, Any], block: str) -> T:
    """`cls(**params)`, where a key that `cls` does not have is a DataError naming it."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - known)
    if unknown:
        raise DataError(f"parameters {block}: unknown keys {unknown}; known: {sorted(known)}")
    return cls(**params)


def require(block: str, config: Any, checks: Mapping[str, bool]) -> None:
    """A DataError naming `block.key` and its value for the first check that is False."""
    for key, ok in checks.items():
        if not ok:
            raise DataError(f"parameters {block}.{key}: invalid value {getattr(config, key)!r}")
