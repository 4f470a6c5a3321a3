"""`evaluate` pipeline: the captioner to evaluate + shards (or the stored features of
model_inputs, when they are its frozen encoder's) + caption_table -> COCO results files,
metrics.json, per-image scores and attention figures."""

from __future__ import annotations

from kedro.pipeline import Node, Pipeline

from caption_pipeline.pipelines.evaluate.nodes import (
    generate_captions,
    localize_attention,
    plot_attention,
    score_captions,
    summarize_metrics,
    write_results,
)
from caption_pipeline.tracking.runs import evaluation_metric_values


def create_pipeline(**kwargs) -> Pipeline:
    # evaluation_captions, evaluated_model_source, coco_scores and attention_scores stay in
    # memory.
    return Pipeline(
        [
            Node(
                generate_captions,
                [
                    "captioner@evaluated",
                    "shards",
                    "model_inputs",
                    "vocabulary",
                    "params:evaluate",
                ],
                ["evaluation_captions", "evaluated_model_source"],
                name="generate_captions",
            ),
            Node(
                write_results,
                "evaluation_captions",
                ["caption_results_val", "caption_results_test"],
                name="write_caption_results",
            ),
            Node(
                score_captions,
                ["caption_results_val", "caption_results_test", "caption_table"],
                ["coco_scores", "caption_scores"],
                name="score_captions",
            ),
            Node(
                localize_attention,
                ["evaluation_captions", "raw_dataset"],
                "attention_scores",
                name="localize_attention",
            ),
            Node(
                plot_attention,
                ["evaluation_captions", "caption_table", "params:evaluate"],
                "attention_maps",
                name="plot_attention",
            ),
            Node(
                summarize_metrics,
                [
                    "coco_scores",
                    "attention_scores",
                    "evaluated_model_source",
                    "vocabulary",
                    "params:evaluate",
                ],
                "evaluation_metrics",
                name="summarize_metrics",
            ),
            Node(  # MLflow metrics: test.CIDEr, blind_baseline.BLEU_4, ...
                evaluation_metric_values,
                "evaluation_metrics",
                "evaluation_metric_values",
                name="log_evaluation_metrics",
            ),
        ],
        tags=["evaluate"],
        namespace="evaluation",  # the kedro-viz group; dataset and parameter names stay global
        prefix_datasets_with_namespace=False,
    )
