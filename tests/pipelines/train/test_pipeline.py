"""The `train` pipeline through Kedro: cross-entropy on the tiny shapes features with conf/base's
parameters at tiny sizes (one epoch of two steps). Fine-tuning and SCST are off: each phase
would add about as much again; tests/test_fine_tuning.py and tests/test_training.py run them."""

from __future__ import annotations

import numpy as np
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner
from matplotlib.figure import Figure

from caption_pipeline.pipelines.train import create_pipeline

OUTPUTS = (
    "captioner@keras",
    "training_history",
    "training_steps",
    "fine_tune_history",
    "fine_tune_steps",
    "self_critical_history",
    "self_critical_steps",
    "training_curves",
    "training_metrics",
    "fine_tune_metrics",
    "self_critical_metrics",
)


class KeptDataset(MemoryDataset):
    """A MemoryDataset that the runner does not release once later nodes have read it."""

    def _release(self) -> None:
        pass


def test_trains_the_decoder_on_features_and_reports_its_history(
    tiny_captions, tiny_features, params, tmp_path
):
    table, _, vocabulary = tiny_captions
    model, model_inputs = tiny_features
    train = params(
        "train",
        epochs=1,
        batch_size=4,
        max_steps_per_epoch=2,
        progress=False,
        jit_compile=False,
        checkpoint_dir=str(tmp_path / "xent"),
        log_every_steps=1,
    )
    catalog = DataCatalog(
        {
            "model_inputs": MemoryDataset(model_inputs, copy_mode="assign"),
            "vocabulary": MemoryDataset(vocabulary),
            "caption_table": MemoryDataset(table),
            "params:model": MemoryDataset(model),
            "params:train": MemoryDataset(train),
            "params:fine_tune": MemoryDataset(params("fine_tune", enabled=False)),
            "params:self_critical": MemoryDataset(params("self_critical", enabled=False)),
            **{name: KeptDataset(copy_mode="assign") for name in OUTPUTS},
        }
    )
    SequentialRunner().run(create_pipeline(), catalog)

    history = catalog.load("training_history")
    assert history["epoch"].tolist() == [1]
    assert history["step"].tolist() == [2]  # max_steps_per_epoch
    assert np.isfinite(history[["train_xent", "val_xent", "val_perplexity"]].to_numpy(float)).all()
    assert catalog.load("training_steps")["step"].tolist() == [1, 2]  # log_every_steps: 1
    for phase in ("fine_tune", "self_critical"):  # off: empty, not missing
        assert catalog.load(f"{phase}_history").empty and catalog.load(f"{phase}_metrics") == {}
    metrics = catalog.load("training_metrics")
    assert [point["step"] for point in metrics["val_xent"]] == [1]  # per epoch
    assert [point["step"] for point in metrics["loss"]] == [1, 2]  # per logged step
    assert isinstance(catalog.load("training_curves"), Figure)

    captioner = catalog.load("captioner@keras")
    assert captioner.config.vocab_size == len(vocabulary["tokens"])
    assert not captioner.config.trains_encoder
    # The checkpoints are gone once training is done (keep_checkpoints: false in conf/base).
    assert not (tmp_path / "xent").exists()
