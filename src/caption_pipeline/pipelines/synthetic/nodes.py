"""Nodes of the `synthetic` pipeline; the generator itself is `caption_pipeline.data.shapes`."""

from __future__ import annotations

from typing import Any

from caption_pipeline.data import shapes


def generate_dataset(dataset: dict[str, Any], synthetic: dict[str, Any]) -> dict[str, Any]:
    """Generate the shapes dataset into `dataset.root` if `dataset.name` is "shapes".

    Returns the dataset block that `ingest` reads, with "generated" and, when generated,
    the generation's "fingerprint" and per-split "counts".
    """
    if dataset.get("name") != "shapes":
        return {**dataset, "generated": False}
    result = shapes.ensure_generated(dataset, shapes.ShapesConfig.from_params(synthetic))
    return {**dataset, "generated": True, **result}
