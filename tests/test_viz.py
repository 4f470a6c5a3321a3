"""`kedro viz build`: every node of the default pipeline, in its stage's namespace, and every
dataset layer of the catalog appear in the built graph, and the stages chain in order."""

from __future__ import annotations

import json

import pytest
import yaml

from caption_pipeline.project import PROJECT_ROOT, copy_project
from tests.helpers import run_kedro

# The stages as the graph reads them: (pipeline folder, namespace).
STAGES = [
    ("synthetic", "synthetic"),
    ("ingest", "ingestion"),
    ("vocab", "vocabulary"),
    ("shard", "shards"),
    ("features", "features"),
    ("train", "training"),
    ("evaluate", "evaluation"),
    ("export", "export"),
]


def _stages() -> list[tuple[str, str]]:
    """The stages whose pipeline exists (export arrives with its own issue)."""
    return [
        (name, ns)
        for name, ns in STAGES
        if (PROJECT_ROOT / "src/caption_pipeline/pipelines" / name).is_dir()
    ]


def test_each_stage_pipeline_is_namespaced_and_tagged_without_renaming_datasets():
    import importlib

    for name, namespace in _stages():
        pipeline = importlib.import_module(f"caption_pipeline.pipelines.{name}").create_pipeline()
        for node in pipeline.nodes:
            assert node.namespace == namespace and node.name.startswith(f"{namespace}.")
            assert name in node.tags
        assert not [d for d in pipeline.datasets() if d.startswith(f"{namespace}.")]


def _shown_as(dataset: str) -> str:
    """The name kedro-viz gives a dataset: one node for all of a transcoded dataset's names."""
    return dataset.split("@")[0]


@pytest.mark.slow
def test_kedro_viz_build_shows_every_node_and_layer(tmp_path):
    import importlib

    project = copy_project(tmp_path / "project")
    result = run_kedro(project, "viz", "build", timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    graph = json.loads((project / "build" / "api" / "main").read_text())

    tasks = {n["full_name"]: n for n in graph["nodes"] if n["type"] == "task"}
    data = {n["name"]: n for n in graph["nodes"] if n["type"] == "data"}
    for name, namespace in _stages():
        pipeline = importlib.import_module(f"caption_pipeline.pipelines.{name}").create_pipeline()
        for node in pipeline.nodes:
            assert node.name in tasks, node.name
            assert tasks[node.name]["modular_pipelines"] == [namespace]
        for dataset in pipeline.datasets():
            if not dataset.startswith("params:"):
                assert _shown_as(dataset) in data, dataset
    assert {ns for _, ns in _stages()} <= set(graph["modular_pipelines"])

    # Layers: those of the catalog, on the datasets that declare them.
    catalog = yaml.safe_load((PROJECT_ROOT / "conf/base/catalog.yml").read_text())
    layers = {
        name: entry["metadata"]["kedro-viz"]["layer"]
        for name, entry in catalog.items()
        if isinstance(entry, dict) and "kedro-viz" in (entry.get("metadata") or {})
    }
    # kedro-viz drops every layer when the layers of connected datasets form a cycle.
    assert set(graph["layers"]) == set(layers.values()), (
        "layers missing from the graph; kedro-viz says: "
        + " ".join((result.stdout + result.stderr).split())[-1500:]
    )
    for name, layer in layers.items():
        if _shown_as(name) in data:
            assert data[_shown_as(name)]["layer"] == layer, name

    # The stages chain: each one's outputs feed the next one.
    namespace_of = {n["id"]: n["modular_pipelines"][0] for n in tasks.values()}
    producers = {
        e["target"]: namespace_of[e["source"]]
        for e in graph["edges"]
        if e["source"] in namespace_of
    }
    links = {
        (producers[e["source"]], namespace_of[e["target"]])
        for e in graph["edges"]
        if e["source"] in producers and e["target"] in namespace_of
    }
    chain = [ns for _, ns in _stages()]
    for upstream, downstream in zip(chain, chain[1:], strict=False):
        if upstream == "evaluation":
            continue  # export follows training, beside evaluation
        assert (upstream, downstream) in links, (upstream, downstream)
    if "export" in chain:
        assert ("training", "export") in links
