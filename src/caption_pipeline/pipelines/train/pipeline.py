"""The `train` pipeline."""

from kedro.pipeline import Node, Pipeline

from caption_pipeline.pipelines.train.nodes import plot_training_curves, train_model


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                train_model,
                inputs=["model_inputs", "vocabulary", "params:model", "params:train"],
                outputs=["captioner", "training_history", "training_steps"],
                name="train_captioner",
            ),
            Node(
                plot_training_curves,
                inputs="training_history",
                outputs="training_curves",
                name="plot_training_curves",
            ),
        ],
        tags=["train"],
    )
