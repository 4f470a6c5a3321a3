"""The `train` pipeline."""

from kedro.pipeline import Node, Pipeline

from caption_pipeline.pipelines.train.nodes import (
    fine_tune_encoder,
    plot_training_curves,
    train_cross_entropy,
    train_self_critical,
)
from caption_pipeline.tracking.runs import (
    self_critical_metric_series,
    training_metric_series,
)


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(  # writes a whole captioner: on features, the decoder and their encoder
                train_cross_entropy,
                inputs=[
                    "model_inputs",
                    "vocabulary",
                    "params:model",
                    "params:train",
                    "params:fine_tune",  # checked before training; its checkpoints kept for later
                    "params:self_critical",
                ],
                outputs=["captioner_cross_entropy", "training_history", "training_steps"],
                name="train_cross_entropy",
            ),
            Node(  # off: passes the captioner through
                fine_tune_encoder,
                inputs=[
                    "captioner_cross_entropy",
                    "model_inputs",  # the image shards behind them
                    "vocabulary",
                    "params:train",
                    "params:fine_tune",
                    "params:self_critical",
                ],
                outputs=["captioner_fine_tuned", "fine_tune_history", "fine_tune_steps"],
                name="fine_tune_encoder",
            ),
            Node(  # off: passes the captioner through; the last phase clears the kept checkpoints
                train_self_critical,
                inputs=[
                    "captioner_fine_tuned",
                    "model_inputs",
                    "vocabulary",
                    "caption_table",  # the reward's references
                    "params:train",
                    "params:fine_tune",
                    "params:self_critical",
                ],
                outputs=["captioner@keras", "self_critical_history", "self_critical_steps"],
                name="train_self_critical",
            ),
            Node(
                plot_training_curves,
                inputs="training_history",
                outputs="training_curves",
                name="plot_training_curves",
            ),
            Node(  # MLflow metric series (prefixed xent.): per epoch, the loss per logged step
                training_metric_series,
                inputs=["training_history", "training_steps"],
                outputs="training_metrics",
                name="log_training_metrics",
            ),
            Node(  # the same series of the fine-tuning phase (prefixed fine_tune.)
                training_metric_series,
                inputs=["fine_tune_history", "fine_tune_steps"],
                outputs="fine_tune_metrics",
                name="log_fine_tune_metrics",
            ),
            Node(  # SCST's reward, baseline and entropy per step, val CIDEr-D per epoch
                self_critical_metric_series,
                inputs=["self_critical_history", "self_critical_steps"],
                outputs="self_critical_metrics",
                name="log_self_critical_metrics",
            ),
        ],
        tags=["train"],
        namespace="training",  # the kedro-viz group; dataset and parameter names stay global
        prefix_datasets_with_namespace=False,
    )
