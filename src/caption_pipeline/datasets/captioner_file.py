"""The captioner to evaluate, read from a file (a saved model or a training checkpoint), and
the Kedro dataset that reads it, `CaptionerFileDataset`.

The `evaluate` pipeline scores the model of the catalog entry `captioner@evaluated`: by default
the captioner that training saved, or whichever file an environment's catalog or
`--params=evaluated_model=PATH` names instead. Two kinds of file are accepted:

* a `.keras` file: a saved Captioner (the catalog's `captioner@keras`, or a copy of it), which
  holds its architecture and its weights;
* a `*.weights.h5` file: weights saved by `Captioner.save_weights`, e.g. a training checkpoint
  `<train.checkpoint_dir>/step-NNNNNNNN-<hex>/checkpoint.weights.h5` or `best.weights.h5`.
  Weights say nothing about the architecture, so it is that of the `.keras` captioner named
  by `architecture`: by default the one the same training run saved, from the same
  `params:model` and vocabulary. A checkpoint of training on precomputed features holds the
  decoder alone: it is joined with that captioner's frozen encoder, the one that computed the
  features (never with a fine-tuned one, which did not).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
from kedro.io import AbstractDataset, DatasetError

from caption_pipeline.data.text import Vocabulary
from caption_pipeline.errors import DataError
from caption_pipeline.model import Captioner
from caption_pipeline.training.checkpoints import weights_digest

KERAS_SUFFIX = ".keras"
WEIGHTS_SUFFIX = ".weights.h5"


def shown(path: Path) -> str:
    """`path` relative to the project (the working directory) when inside it: Kedro makes the
    catalog's paths absolute, and metrics.json, kept in git, must not hold a checkout's path."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


@dataclass(frozen=True)
class EvaluatedModel:
    """A captioner and `source`, the file(s) it was read from (metrics.json's details.model)."""

    captioner: Captioner
    source: str

    @property
    def weights_digest(self) -> str:
        """A hash of every weight (`checkpoints.weights_digest`): what evaluate records in
        metrics.json (`details.model_weights`) and export checks before it registers."""
        return weights_digest(self.captioner)

    def require_scored(self, metrics: dict) -> None:
        """A DataError, in one line, unless `metrics` (metrics.json) scored these weights: a
        version must never be registered, nor gated, with another model's scores."""
        details = metrics.get("details", {})
        scored, own = details.get("model_weights"), self.weights_digest  # hashed once
        if scored != own:
            said = (
                "records no weights (written before they were recorded)"
                if scored is None
                else f"scored weights {scored} ({details.get('model', 'a model')})"
            )
            raise DataError(
                f"metrics.json {said}, but {self.source} has weights {own}: "
                "its scores are not this model's; run `kedro run --pipelines=evaluate` first"
            )

    def check_vocabulary(self, vocabulary: Vocabulary) -> None:
        """A DataError unless the model writes the ids of `vocabulary`."""
        if self.captioner.config.vocab_size != vocabulary.size:
            raise DataError(
                f"{self.source}: the model writes {self.captioner.config.vocab_size} token ids, "
                f"the vocabulary has {vocabulary.size}: trained with another vocabulary"
            )


def read_captioner(path: str | Path, architecture: str | Path | None = None) -> EvaluatedModel:
    """The Captioner in `path` (`.keras`, or `.weights.h5` with the `.keras` `architecture`)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: the model to evaluate does not exist")
    if path.name.endswith(KERAS_SUFFIX):
        return EvaluatedModel(load_saved_captioner(path), shown(path))
    if not path.name.endswith(WEIGHTS_SUFFIX):
        raise DataError(f"{path}: expected a {KERAS_SUFFIX} model or a {WEIGHTS_SUFFIX} checkpoint")
    if architecture is None:
        raise DataError(
            f"{path}: a checkpoint holds weights alone; name the {KERAS_SUFFIX} captioner whose "
            f"architecture it has (the catalog entry's `architecture`)"
        )
    return from_checkpoint(path, load_saved_captioner(Path(architecture)), Path(architecture))


def load_saved_captioner(path: Path) -> Captioner:
    """The Captioner saved in the `.keras` file `path`."""
    if not path.is_file():
        raise DataError(f"{path}: no saved captioner there")
    try:
        model = keras.saving.load_model(path)
    except Exception as error:  # noqa: BLE001 (Keras raises many kinds for a bad file)
        raise DataError(f"{path}: not a loadable Keras model ({error})") from None
    if not isinstance(model, Captioner):
        raise DataError(f"{path}: holds a {type(model).__name__}, not a Captioner")
    return model


def from_checkpoint(path: Path, base: Captioner, base_path: Path) -> EvaluatedModel:
    """The weights in `path` in `base`'s architecture: a whole Captioner, or a decoder joined
    with `base`'s frozen encoder."""
    # The weights hold the encoder too: never fetch pretrained ones first.
    whole = Captioner(dataclasses.replace(base.config, encoder_weights=None))
    try:
        whole.load_weights(path)
        return EvaluatedModel(whole, f"{shown(path)} (the architecture of {shown(base_path)})")
    except Exception as error:  # noqa: BLE001 (h5py and Keras raise many kinds)
        reason = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
    frozen = dataclasses.replace(whole.config, encoder_trainable=False)
    decoder = Captioner(frozen, feature_shape=(whole.regions, whole.feature_dim))
    try:
        decoder.load_weights(path)
    except Exception:  # noqa: BLE001
        raise DataError(
            f"{path} does not fit the Captioner of {base_path}, whole or decoder alone ({reason})"
        ) from None
    if base.config.trains_encoder:
        raise DataError(
            f"{path} holds a decoder trained on precomputed features, whose encoder is a frozen "
            f"one; the encoder of {base_path} was fine-tuned: evaluate a {KERAS_SUFFIX} captioner"
        )
    return EvaluatedModel(
        decoder.with_encoder(base.encoder.get_weights()),
        f"{shown(path)} (a decoder) with the frozen encoder of {shown(base_path)}",
    )


class CaptionerFileDataset(AbstractDataset[Any, EvaluatedModel]):
    """Read only: loading gives an `EvaluatedModel`, the Captioner in `filepath` and where it
    came from (the module's docstring says which files are accepted). A
    checkpoint's architecture, and a decoder checkpoint's frozen encoder, are those of the
    `.keras` captioner `architecture`.

    Example catalog entry, the model of `--params=evaluated_model=PATH` or else the trained one:

        captioner@evaluated:
          type: caption_pipeline.datasets.CaptionerFileDataset
          filepath: ${runtime_params:evaluated_model, data/06_models/captioner.keras}
          architecture: data/06_models/captioner.keras
    """

    def __init__(
        self,
        *,
        filepath: str,
        architecture: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self._filepath = Path(filepath)
        self._architecture = Path(architecture) if architecture else None
        self.metadata = metadata

    def load(self) -> EvaluatedModel:
        return read_captioner(self._filepath, self._architecture)

    def save(self, data: Any) -> None:
        raise DatasetError(f"{self._filepath}: the model to evaluate is read, never written")

    def _exists(self) -> bool:
        return self._filepath.is_file()

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath), "architecture": str(self._architecture)}
