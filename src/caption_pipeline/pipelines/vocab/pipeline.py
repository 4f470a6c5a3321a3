"""`vocab` pipeline: caption_table + params:vocab -> tokenized_captions, vocabulary, reports."""

from __future__ import annotations

from kedro.pipeline import Node, Pipeline

from caption_pipeline.pipelines.vocab.nodes import (
    build_vocabulary,
    limit_caption_lengths,
    plot_caption_lengths,
    summarize_vocabulary,
    tokenize_captions,
)


def create_pipeline(**kwargs) -> Pipeline:
    # caption_tokens (every caption's tokens, before the length limit) stays in memory.
    return Pipeline(
        [
            Node(tokenize_captions, "caption_table", "caption_tokens", name="tokenize_captions"),
            Node(
                limit_caption_lengths,
                ["caption_tokens", "params:vocab"],
                "tokenized_captions",
                name="limit_caption_lengths",
            ),
            Node(
                build_vocabulary,
                ["tokenized_captions", "params:vocab"],
                "vocabulary",
                name="build_vocabulary",
            ),
            Node(
                summarize_vocabulary,
                ["caption_tokens", "tokenized_captions", "vocabulary", "params:vocab"],
                "vocabulary_stats",
                name="summarize_vocabulary",
            ),
            Node(
                plot_caption_lengths,
                ["caption_tokens", "params:vocab"],
                "caption_length_histogram",
                name="plot_caption_lengths",
            ),
        ],
        tags=["vocab"],
        namespace="vocabulary",  # the kedro-viz group; dataset and parameter names stay global
        prefix_datasets_with_namespace=False,
    )
