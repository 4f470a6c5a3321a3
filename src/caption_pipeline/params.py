"""Configuration: the typed config objects, built from a parameters block of conf/.

The YAML in conf/ is the only source of default values: conf/base/parameters_*.yml holds every
key, an env (conf/smoke, conf/coco, `--params`) overrides some. The dataclasses have no
defaults that could disagree with it; they are built by `from_params`, which rejects an
unknown key naming it and the conf file(s) that set it, and a missing one naming the conf/base
file it belongs in. Code that builds a config without the pipeline (tests, benchmarks, the
CLI) starts from conf/base too: `from_conf(TrainConfig, "train", epochs=2)`.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from caption_pipeline.conf_loader import CONFIG_LOADER_ARGS, CONFIG_LOADER_CLASS
from caption_pipeline.errors import DataError
from caption_pipeline.project import PROJECT_ROOT

T = TypeVar("T")


def conf_dir() -> Path:
    """The conf/ folder of the project being run (the working directory's, as `kedro run`
    reads it), else the one of this checkout."""
    here = Path.cwd() / "conf"
    return here if (here / "base").is_dir() else PROJECT_ROOT / "conf"


def _parameter_files(conf: Path) -> dict[Path, Any]:
    files = {}
    for path in sorted(conf.glob("*/parameters*.yml")):
        try:
            files[path] = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError):
            continue
    return files


def _files_setting(dotted: str, conf: Path, env: str | None = None) -> list[str]:
    """conf/*/parameters*.yml files (of `env` only, if given) that set the key path `dotted`."""
    found = []
    for path, data in _parameter_files(conf).items():
        if env is not None and path.parent.name != env:
            continue
        node: Any = data
        for part in dotted.split("."):
            if not isinstance(node, Mapping) or part not in node:
                break
            node = node[part]
        else:
            found.append(str(path.relative_to(conf.parent)))
    return found


def _main_file(block: str, conf: Path) -> str | None:
    """The conf/base file that holds most of the keys of `block`: where a missing one goes."""
    best, most = None, -1
    for path, data in _parameter_files(conf).items():
        if path.parent.name != "base":
            continue
        node: Any = data
        for part in block.split("."):
            node = node.get(part) if isinstance(node, Mapping) else None
        if isinstance(node, Mapping) and len(node) > most:
            best, most = str(path.relative_to(conf.parent)), len(node)
    return best


def _nested_types(cls: type) -> dict[str, type]:
    """The fields of `cls` whose type is itself a dataclass: built from a nested block."""
    hints = typing.get_type_hints(cls)
    return {
        f.name: hints[f.name]
        for f in dataclasses.fields(cls)
        if dataclasses.is_dataclass(hints.get(f.name))
    }


def from_params(cls: type[T], params: Mapping[str, Any] | None, block: str) -> T:
    """`cls(**params)`, nested dataclass fields built from their sub-blocks the same way.

    A key `cls` does not have, or a field without default that `params` lacks, is a DataError
    naming `block.key` and the conf file that sets it (or should)."""
    if params is not None and not isinstance(params, Mapping):
        raise DataError(f"parameters {block}: expected a mapping of keys, got {params!r}")
    params = dict(params or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    conf = conf_dir()
    for key in sorted(set(params) - set(fields)):
        files = _files_setting(f"{block}.{key}", conf)
        where = ", ".join(files) if files else "not in conf/*/parameters*.yml: --params?"
        raise DataError(f"parameters {block}.{key} ({where}): unknown key; known: {sorted(fields)}")
    for name, f in fields.items():
        if name in params or not f.init:
            continue
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            where = _main_file(block, conf) or f"conf/base/parameters_*.yml's `{block}`"
            raise DataError(f"parameters {block}.{name}: missing; it belongs in {where}")
    for name, nested in _nested_types(cls).items():
        if name in params and not isinstance(params[name], nested):
            params[name] = from_params(nested, params[name], f"{block}.{name}")
    return cls(**params)


@functools.lru_cache(maxsize=4)
def _base_parameters(conf: str) -> dict[str, Any]:
    loader = CONFIG_LOADER_CLASS(
        conf, **{**CONFIG_LOADER_ARGS, "default_run_env": "base"}, env="base"
    )
    return dict(loader["parameters"])


def defaults(block: str) -> dict[str, Any]:
    """The `block` parameters of conf/base (a fresh copy), as the settings' loader reads them:
    what code that builds a config outside the pipeline starts from."""
    parameters = _base_parameters(str(conf_dir().resolve()))
    node: Any = parameters
    for part in block.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise DataError(f"parameters {block}: not in conf/base/parameters*.yml")
        node = node[part]
    return copy.deepcopy(dict(node))


def from_conf(cls: type[T], block: str, **overrides: Any) -> T:
    """`cls` from conf/base's `block` with `overrides`, as `from_params` builds it:
    `from_conf(TrainConfig, "train", epochs=2)`. A nested block's keys may be given as a dict,
    merged over its defaults: `from_conf(EvaluateSettings, "evaluate", decoding={"alpha": 1})`."""
    params = defaults(block)
    nested = _nested_types(cls)
    for key, value in overrides.items():
        if key in nested and isinstance(value, Mapping) and isinstance(params.get(key), Mapping):
            value = {**params[key], **value}
        params[key] = value
    return from_params(cls, params, block)


def require(block: str, config: Any, checks: Mapping[str, bool]) -> None:
    """A DataError naming `block.key` and its value for the first check that is False."""
    for key, ok in checks.items():
        if not ok:
            raise DataError(f"parameters {block}.{key}: invalid value {getattr(config, key)!r}")
