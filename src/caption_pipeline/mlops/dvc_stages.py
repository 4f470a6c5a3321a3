"""The DVC stages of the Kedro project, so that `dvc.yaml` cannot drift from it:
`caption-pipeline dvc-yaml` writes it (`dvc_render`), `caption-pipeline dvc-yaml --check` (and
tests/test_dvc_yaml.py) fails, naming each stage's missing or extra dep, param or out, when the
committed file is not what the project generates.

For one Kedro environment: `base` (the default: the embedded shapes dataset, every
environment's overrides listed, the environment left to KEDRO_ENV) or one of conf/ (`--env
coco`: its stages run `kedro run --env coco`, list conf/base's and conf/coco's files, and read
the raw data that `dvc add` tracks). DVC has one dvc.yaml per project and no KEDRO_ENV, and two
environments' stages would write the same outs, which DVC refuses: a project reproduces the
data it is about, and a COCO project commits the dvc.yaml generated for `coco`.

One DVC stage per pipeline of `pipeline_registry` (`kedro run --pipelines=<stage>`), built from:

- data: the pipeline's free inputs that have a file path in the catalog are deps, its outputs
  with a path are outs (datasets without one are in memory or MLflow only). The paths are
  Kedro's, resolved by the config loader of `settings.py` (globals, templating, dataset
  factories); every environment must resolve them alike, so that one project's runs in two
  environments (`coco` and `smoke`, say) are one set of outs.
- params: for each `params:<key>` input, every parameter file of the environments in play
  (`base`: all of conf/ but `local`, per machine and not in git; another: base and it) that
  sets `<key>` is listed with that key, and their `globals.yml` that set a `${globals:...}` name
  its value uses. Under `base` DVC does not know KEDRO_ENV, so an environment's override re-runs
  the stage wherever it runs.
- code: the stage's pipeline folder, the project modules it imports, directly or not, and the
  modules of the project's dataset classes that load its inputs or save its outputs (packages
  as one folder dep, but `datasets` and `pipelines`, whose modules are separate units).

What Kedro cannot say is declared below, each with its reason: the datasets whose content names
other inputs (`CARRIED`), the parameters that are data folders (`PATH_PARAMS`), the outputs a
parameter may leave unwritten (`OPTIONAL_OUTS`), the modules that are no stage's code
(`IGNORED_MODULES`), DVC metrics (`METRICS`) and plots (`PLOTS`), and comments (`NOTES`).
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from caption_pipeline.mlops.import_graph import PACKAGE, class_module, imported_closure, module_path
from caption_pipeline.pipeline_registry import ON_DEMAND
from caption_pipeline.project import PROJECT_ROOT

BASE = "base"  # conf/base: the embedded dataset, and the environment left to KEDRO_ENV

# Datasets that stand for more inputs than their own file, which a stage reading them reads as
# if they were its node inputs: `raw_dataset` is the `dataset` parameter block that synthetic
# returns (ingest, features and evaluate open the files under its root); `model_inputs` can be
# a manifest pointing at the image shards (a trained encoder), and names them for fine-tuning.
CARRIED = {
    "raw_dataset": ["params:dataset"],
    "model_inputs": ["shards"],
}

# Parameters whose value is a data folder, and the stage that writes it when the parameters
# say it does: an out of that stage, and a dep of every stage that reads the parameter (or a
# block holding it). Where no stage writes it, it is the user's data, tracked by `dvc add`: a
# dep only. The checkpoint folders (`train.checkpoint_dir`, ...) are not here: resume state,
# not results.
PATH_PARAMS = {
    # synthetic generates the shapes dataset there (pipelines/synthetic); COCO is downloaded
    "dataset.root": ("synthetic", lambda params: params["dataset"].get("name") == "shapes"),
}

# Outputs that a parameter may turn off, and that parameter: DVC has no optional out (an out
# that a run does not write fails `dvc repro` and `dvc commit`), and dvc.yaml has one set of outs
# for every environment (conf/coco turns `export.tflite` off). So the stage's out is the folder
# that holds the file, which every run writes, and the stage's other outs in that folder are it
# too (DVC refuses an out inside another). The node removes the file when off (DVC, which
# removes a stage's outs before running it, does too).
OPTIONAL_OUTS = {"exported_tflite": "export.tflite"}

# Project modules that are no stage's code, so that editing them re-runs nothing.
IGNORED_MODULES = {
    f"{PACKAGE}.errors",  # exception types
    f"{PACKAGE}.params",  # builds config dataclasses: checks the keys, sets no value
    f"{PACKAGE}.atomic",  # writes a file under a temporary name, then renames it
    f"{PACKAGE}.datasets.atomic_datasets",  # kedro-datasets' own, saved through `atomic`
    f"{PACKAGE}.tracking.runs",  # MLflow logging
    f"{PACKAGE}.settings",  # Kedro's settings and hooks: how `kedro run` runs every stage
    f"{PACKAGE}.conf_loader",
    f"{PACKAGE}.mlops.hooks",  # (config loader, input checks, MLflow run), not what one computes
}


# Datasets that are DVC metrics (`dvc metrics show`/`diff`): small, so kept in git, not cached.
METRICS = {"evaluation_metrics": "`dvc metrics show`; small, kept in git"}

# Top-level `plots:` of `dvc plots show` (and `dvc plots diff` between commits), by dataset:
# the training curves per epoch from the history CSV, and the attention figures as images.
PLOTS = [
    (
        "cross_entropy",
        "training_history",
        {"x": "epoch", "y": ["train_xent", "val_xent"], "y_label": "nats per word"},
    ),
    ("val_perplexity", "training_history", {"x": "epoch", "y": "val_perplexity"}),
    ("learning_rate", "training_history", {"x": "epoch", "y": "learning_rate"}),
    (None, "attention_maps", {}),
]

# What a dep or out is for, where the data flow does not say it: comments of dvc.yaml, by stage
# and dataset (or `params:` path parameter). tests/test_dvc_yaml.py checks each still applies.
NOTES = {
    ("features", "params:dataset.root"): "the object polygons the encoder pretrains on",
    ("train", "shards"): "images: of a trained encoder, and fine-tuning's",
    ("train", "caption_table"): "SCST's reward references",
    ("evaluate", "attention_maps"): "one PNG per sampled test image",
    ("export", "evaluation_metrics"): "the registered version is tagged with its test scores",
    ("export", "export_registration"): "the MLflow run and model version",
}


@dataclass
class Project:
    """What Kedro says about the project in one environment: its pipelines, the catalog and
    parameters (resolved), and the raw parameter and globals files of the environments in play
    (`base`: all of them)."""

    root: Path
    env: str  # "base", or the environment of conf/ that dvc.yaml is for
    pipelines: dict[str, Any]
    catalog: Any  # kedro.io.CatalogConfigResolver of conf/base
    params: dict[str, Any]  # the environment's parameters (conf/base's, for "base"), resolved
    conf_files: list[tuple[str, Path, dict]]  # (kind, file, raw YAML), base env first

    def path(self, dataset: str) -> str | None:
        """The dataset's file or folder (relative to the root), or None (memory, MLflow)."""
        return _config_path(self.catalog.resolve_pattern(dataset))

    def param(self, key: str) -> Any:
        value = self.params
        for part in key.split("."):
            value = value[part]
        return value


def load_project(root: Path = PROJECT_ROOT, env: str = BASE) -> Project:
    """Kedro's view of the project at `root` (its conf/ and src/; the pipelines are those of
    the imported package), loaded the way `kedro run` loads it (settings.py), for conf/base
    alone or with `env`: the `local` environment is per machine and must not shape dvc.yaml."""
    from kedro.framework.project import configure_project, pipelines, settings
    from kedro.io.catalog_config_resolver import DEFAULT_RUNTIME_PATTERN, CatalogConfigResolver

    configure_project(PACKAGE)
    conf = root / settings.CONF_SOURCE
    envs = sorted(p.name for p in conf.iterdir() if p.is_dir() and p.name not in {BASE, "local"})
    if env != BASE and env not in envs:
        raise ValueError(f"no environment {env!r} in {conf}: expected one of {[BASE, *envs]}")

    def loader(env: str):
        return settings.CONFIG_LOADER_CLASS(
            conf_source=str(conf), env=env, **settings.CONFIG_LOADER_ARGS
        )

    base = loader(BASE)

    def resolver(env: str) -> CatalogConfigResolver:
        return CatalogConfigResolver(
            loader(env)["catalog"], default_runtime_patterns=DEFAULT_RUNTIME_PATTERN
        )

    catalog = resolver(BASE)
    for other_env in envs:
        other = resolver(other_env)
        for name in catalog.config:
            moved = _config_path(other.resolve_pattern(name))
            if moved != _config_path(catalog.resolve_pattern(name)):
                raise ValueError(f"conf/{other_env} moves {name} to {moved}: one path per dataset")
    conf_files = [
        (kind, file, yaml.safe_load(file.read_text()) or {})
        for name in [BASE, *(envs if env == BASE else [env])]
        for kind in ("parameters", "globals")
        for file in _env_files(conf / name, base.config_patterns[kind])
    ]
    params = loader(env)["parameters"] if env != BASE else base["parameters"]
    return Project(root, env, dict(pipelines), catalog, params, conf_files)


def _env_files(folder: Path, patterns: list[str]) -> list[Path]:
    """The files of one environment that the config loader reads for these patterns."""
    found = {p for pattern in patterns for p in folder.glob(pattern)}
    return sorted(p for p in found if p.is_file() and p.suffix in {".yml", ".yaml", ".json"})


def _config_path(config: dict[str, Any]) -> str | None:
    """`filepath` or `path` of a dataset's config, or of the dataset it wraps (MLflow artifact,
    partitions)."""
    if "filepath" in config or "path" in config:
        return str(config.get("filepath") or config.get("path"))
    inner = config.get("dataset")
    return _config_path(inner) if isinstance(inner, dict) else None


def _config_types(config: Any) -> Iterator[str]:
    """Every dataset `type` in a dataset config, wrapped ones included."""
    if isinstance(config, dict):
        if isinstance(config.get("type"), str):
            yield config["type"]
        for value in config.values():
            yield from _config_types(value)


# --- stages ---------------------------------------------------------------------------------


@dataclass
class Stage:
    """One DVC stage: paths relative to the project root, params as {file: [keys]}, and a
    comment for some paths (why it is there, when the pipeline's node inputs do not say)."""

    name: str
    deps: list[str]
    params: dict[str, list[str]]
    outs: list[str]
    metrics: list[str]
    notes: dict[str, str]


def build_stages(project: Project) -> list[Stage]:
    """One stage per pipeline of `__default__` (all of them but those run on demand, whose
    inputs are no project data: `caption_batch` captions any folder), in data-flow order."""
    stages = [
        _stage(project, name, pipeline)
        for name, pipeline in project.pipelines.items()
        if name not in ON_DEMAND | {"__default__"}
    ]
    return _in_order(stages)


def _stage(project: Project, name: str, pipeline: Any) -> Stage:
    """The stage of one pipeline: code deps, then its inputs' paths (those carried and the
    path parameters too), the params files of its `params:` keys, and its outputs' paths."""
    inputs = _inputs(pipeline)
    keys = [i.removeprefix("params:") for i in inputs if i.startswith("params:")]
    datasets = [i for i in inputs if not i.startswith("params:")]
    written = list(dict.fromkeys(out for node in pipeline.nodes for out in node.outputs))
    outs = [path for d in written if d not in METRICS and (path := project.path(d))]
    optional = {d: p for d, p in OPTIONAL_OUTS.items() if d in written and project.path(d)}
    folders = {posixpath.dirname(project.path(d)): d for d in optional}
    outs = _fold_into(outs, list(folders))
    # a folder a node loads to write into (`ShardFolderDataset`) is this stage's out, not a dep
    deps = [path for path in map(project.path, datasets) if path and path not in outs]
    metrics = [path for d in written if d in METRICS and (path := project.path(d))]
    notes = {project.path(d): f"via {inputs[d]}" for d in datasets if inputs[d] and project.path(d)}
    for param, (writer, writes) in PATH_PARAMS.items():
        key = next((k for k in keys if param == k or param.startswith(k + ".")), None)
        if key is not None:
            path = str(project.param(param))
            if writer != name:
                deps.append(path)
            elif writes(project.params):
                outs.append(path)
            else:
                continue  # the stage that would write it neither writes nor reads it here
            carrier = inputs[f"params:{key}"]
            notes[path] = f"params:{param}" + (f", via {carrier}" if carrier else "")
    notes.update({project.path(d): note for d, note in METRICS.items() if d in written})
    notes.update(
        {
            folder: f"{posixpath.basename(project.path(d))} only if params:{optional[d]}"
            for folder, d in folders.items()
        }
    )
    notes.update({project.path(d): "`dvc plots show`, below" for _, d, _ in PLOTS if d in written})
    for (stage, key), note in NOTES.items():
        path = _note_path(project, key) if stage == name else None
        if path in deps + outs + metrics:
            notes[path] = f"{note} ({notes[path]})" if path in notes else note
    loaded = [d for d in datasets if not inputs[d]] + written  # by this stage's dataset classes
    code = _code_deps(project, name, loaded)
    return Stage(
        name, list(dict.fromkeys(code + deps)), _params(project, keys), outs, metrics, notes
    )


def _fold_into(paths: list[str], folders: list[str]) -> list[str]:
    """`paths`, each inside one of `folders` replaced by that folder (once, where the first
    of them was)."""
    folded: list[str] = []
    for path in paths:
        path = next((f for f in folders if path.startswith(f + "/")), path)
        if path not in folded:
            folded.append(path)
    return folded


def _note_path(project: Project, key: str) -> str | None:
    """The path a `NOTES` key stands for: a dataset's, or a path parameter's value."""
    if key.startswith("params:"):
        return str(project.param(key.removeprefix("params:")))
    return project.path(key)


def _inputs(pipeline: Any) -> dict[str, str | None]:
    """The pipeline's free inputs (datasets and `params:`) in node order, each followed by
    what it carries (`CARRIED`), mapped to the dataset that carries it (None: a node's)."""
    free = pipeline.inputs()
    found: dict[str, str | None] = {}
    for node in pipeline.nodes:
        for name in node.inputs:
            if name in free:
                found[name] = None  # read by a node, even if also carried
                for carried in CARRIED.get(name, []):
                    found.setdefault(carried, name)
    return found


def _in_order(stages: list[Stage]) -> list[Stage]:
    """Each stage after the stages whose outputs it reads, ties by name: the order in which
    `dvc repro` runs them, so that dvc.yaml reads as the data flows."""
    writer = {path: s.name for s in stages for path in s.outs + s.metrics}

    def producers(stage: Stage) -> set[str]:
        return {
            name
            for dep in stage.deps
            for path, name in writer.items()
            if name != stage.name and (dep == path or dep.startswith(path + "/"))
        }

    ordered: list[Stage] = []
    while len(ordered) < len(stages):
        done = {s.name for s in ordered}
        ready = [s for s in stages if s.name not in done and producers(s) <= done]
        if not ready:
            left = sorted({s.name for s in stages} - done)
            raise ValueError(f"stages read each other's outputs in a cycle: {left}")
        ordered.append(min(ready, key=lambda s: s.name))
    return ordered


# --- params -----------------------------------------------------------------------------------

_MISSING = object()
_GLOBAL = re.compile(r"\$\{\s*globals:\s*([^,}\s]+)")
_INTERPOLATION = re.compile(r"\$\{(?!\s*globals:)")


def _params(project: Project, keys: list[str]) -> dict[str, list[str]]:
    """{file: [keys]}: every parameter file (of every environment) that sets a key the stage
    reads, then every globals file that sets a name those values use. A key is the node's
    (`evaluate`, `evaluate.decoding`): a file setting only other keys of its block is left out,
    since the environments merge key by key (`merge_strategy: soft`)."""
    params: dict[str, list[str]] = {}
    names: list[str] = []
    for kind, file, tree in project.conf_files:
        for key in keys:
            value = _lookup(tree, key)
            if kind == "parameters" and value is not _MISSING:
                params.setdefault(_relative(project, file), []).append(key)
                names += [n for n in _globals_used(value, file, key) if n not in names]
    for kind, file, tree in project.conf_files:
        for name in names:
            if kind == "globals" and _lookup(tree, name) is not _MISSING:
                params.setdefault(_relative(project, file), []).append(name)
    return params


def _lookup(tree: Any, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return _MISSING
        tree = tree[part]
    return tree


def _globals_used(value: Any, file: Path, key: str) -> list[str]:
    """The `${globals:NAME}` names in a raw parameter value. Another interpolation is an
    error: DVC reads the files as they are, so it could not see what the value depends on."""
    if isinstance(value, dict):
        return [n for v in value.values() for n in _globals_used(v, file, key)]
    if isinstance(value, list):
        return [n for v in value for n in _globals_used(v, file, key)]
    if isinstance(value, str) and _INTERPOLATION.search(value):
        raise ValueError(f"{file}: {key}: {value!r}: dvc_stages knows only ${{globals:...}}")
    return _GLOBAL.findall(value) if isinstance(value, str) else []


def _relative(project: Project, path: Path) -> str:
    return path.relative_to(project.root).as_posix()


# --- code -------------------------------------------------------------------------------------


def _code_deps(project: Project, stage: str, datasets: list[str]) -> list[str]:
    """The stage's pipeline folder first, then, sorted, every project module that it or the
    dataset classes loading and saving `datasets` import, directly or not (type-only imports
    and `IGNORED_MODULES` aside)."""
    src = project.root / "src"
    own = src / PACKAGE / "pipelines" / stage
    classes = {
        t
        for d in datasets
        for t in _config_types(project.catalog.resolve_pattern(d))
        if t.startswith(PACKAGE + ".")
    }
    start = [own] + [module_path(src, class_module(t)) for t in sorted(classes)]
    skip = {module_path(src, m) for m in IGNORED_MODULES}
    rest = sorted(_relative(project, p) for p in imported_closure(src, start, skip) if p != own)
    return [_relative(project, own), *rest]
