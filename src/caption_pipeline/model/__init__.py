"""Show, Attend and Tell in Keras 3: one module per concept (encoder, attention, decoder,
captioner, the optimizer that fine-tunes the encoder). Backend-portable: only `keras.layers`
and `keras.ops`, no `tf.*`."""

from caption_pipeline.model.attention import SoftAttention
from caption_pipeline.model.captioner import Captioner, ModelConfig, caption_losses
from caption_pipeline.model.decoder import AttentionDecoder, DecoderState
from caption_pipeline.model.encoder import (
    ENCODERS,
    EncoderConfig,
    build_encoder,
    load_weights_file,
)
from caption_pipeline.model.optimizer import TwoRateAdam, variable_indices

__all__ = [
    "ENCODERS",
    "AttentionDecoder",
    "Captioner",
    "DecoderState",
    "EncoderConfig",
    "ModelConfig",
    "SoftAttention",
    "TwoRateAdam",
    "build_encoder",
    "caption_losses",
    "load_weights_file",
    "variable_indices",
]
