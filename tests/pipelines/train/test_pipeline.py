"""The `train` pipeline through Kedro: cross-entropy on the tiny shapes features with conf/base's
parameters at tiny sizes (one epoch of two steps). Fine-tuning and SCST are off: each phase
would add about as much again; tests/test_fine_tuning.py and tests/test_training.py run them.
And SCST re-run alone by the Kedro CLI from the captioner the smoke run stored."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner
from matplotlib.figure import Figure

from caption_pipeline.datasets import KerasModelDataset
from caption_pipeline.pipelines.train import create_pipeline
from tests.helpers import run_kedro

OUTPUTS = (
    "captioner_cross_entropy",
    "captioner_fine_tuned",
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
    # Trained on the features, stored whole: the decoder joined with their frozen encoder. The
    # phases that are off pass it through.
    assert captioner.encoder is not None
    assert catalog.load("captioner_cross_entropy") is catalog.load("captioner_fine_tuned")
    assert catalog.load("captioner_fine_tuned") is captioner
    # The checkpoints are gone once training is done (keep_checkpoints: false in conf/base).
    assert not (tmp_path / "xent").exists()


def _weights(path) -> list:
    return KerasModelDataset(filepath=str(path)).load().get_weights()


@pytest.mark.slow
def test_self_critical_training_reruns_alone_from_the_stored_captioner(smoke_project, tmp_path):
    """`--from-nodes=training.train_self_critical` in a copy of the smoke project runs SCST
    alone, from the fine-tuned captioner the whole run stored (the smoke run fine-tunes), and
    ends with the whole run's weights, bit for bit: the node sets the precision and the seed
    the phases before it would have left (training is deterministic on CPU)."""
    project = tmp_path / "project"
    shutil.copytree(smoke_project, project)
    models, reports = project / "data/06_models", project / "data/08_reporting"
    (models / "captioner.keras").unlink()
    (reports / "self_critical_history.csv").unlink()
    earlier = [
        models / "captioner_cross_entropy.keras",
        models / "captioner_fine_tuned.keras",
        reports / "training_history.csv",
        reports / "fine_tune_history.csv",
    ]
    before = {path: path.stat().st_mtime_ns for path in earlier}

    result = run_kedro(
        project,
        *("run", "--env", "smoke", "--pipelines", "train"),
        *("--from-nodes", "training.train_self_critical"),
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    assert "SCST: keeping epoch" in output
    assert "Epoch 1/" not in output  # the log of a cross-entropy epoch (fine-tuning too)
    assert {path: path.stat().st_mtime_ns for path in earlier} == before
    assert (reports / "self_critical_history.csv").stat().st_size > 0
    rerun = _weights(models / "captioner.keras")
    whole = _weights(smoke_project / "data/06_models/captioner.keras")
    assert len(rerun) == len(whole)
    assert all(np.array_equal(a, b) for a, b in zip(rerun, whole, strict=True))
    # Every stored captioner is whole: the cross-entropy one with the features' frozen encoder.
    stored = KerasModelDataset(filepath=str(models / "captioner_cross_entropy.keras")).load()
    assert stored.encoder is not None and not stored.config.trains_encoder
