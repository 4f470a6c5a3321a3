"""The `export` pipeline through Kedro, on the tiny shapes shards and a random tiny captioner:
the shards are loaded, and so hashed, once (issue 26: each node that took `shards` verified
every shard's sha256 again, 6 GB per load for COCO), and with `export.tflite` off no TFLite
model is converted and none from an earlier run stays behind; the SavedModel is loaded by
the self-check alone (issue 26: each node that took `exported_model` loaded it). MLflow
logging is off here; tests/test_export_mlflow.py logs and registers the smoke run's export."""

from __future__ import annotations

import collections

import pandas as pd
import tensorflow as tf
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner

from caption_pipeline.data.shards import shard_set
from caption_pipeline.datasets import AtomicBytesDataset, SavedModelDataset, TFRecordShardsDataset
from caption_pipeline.datasets.captioner_file import EvaluatedModel
from caption_pipeline.pipelines.export import create_pipeline
from tests.pipelines.conftest import TINY_MODEL


class KeptDataset(MemoryDataset):
    """A MemoryDataset that the runner does not release once later nodes have read it."""

    def _release(self) -> None:
        pass


def test_loads_the_shards_once_and_leaves_no_tflite_when_off(
    tiny_captions, tiny_shards, params, monkeypatch, tmp_path
):
    from caption_pipeline.model import Captioner, ModelConfig
    from caption_pipeline.params import from_params

    table, _, vocabulary = tiny_captions
    captioner = Captioner(
        from_params(
            ModelConfig,
            {**params("model", **TINY_MODEL), "vocab_size": len(vocabulary["tokens"])},
            "model",
        )
    )
    evaluated = EvaluatedModel(captioner, "a random tiny captioner")
    metrics = {
        "details": {"model_weights": evaluated.weights_digest},
        "val": {"CIDEr": 0.5},
        "test": {"CIDEr": 0.4},
    }
    val_images = table.loc[table["split"] == "val", "image_id"].unique()
    scores = pd.DataFrame({"image_id": val_images, "split": "val", "CIDEr": 0.5})
    evaluate = params("evaluate", decoding={"beam_size": 2, "jit_compile": False})
    export = params("export", max_beam_size=2, tflite=False, mlflow={"log_model": False})
    stale = tmp_path / "export/captioner.tflite"  # an earlier run's, with export.tflite on
    stale.parent.mkdir()
    stale.write_bytes(b"an earlier run's model")
    catalog = DataCatalog(
        {
            "captioner@evaluated": MemoryDataset(evaluated, copy_mode="assign"),
            "evaluation_metrics": MemoryDataset(metrics),
            "vocabulary": MemoryDataset(vocabulary),
            "caption_table": MemoryDataset(table),
            "caption_scores": MemoryDataset(scores),
            "shards": TFRecordShardsDataset(path=str(tiny_shards.root)),
            "params:evaluate": MemoryDataset(evaluate),
            "params:export": MemoryDataset(export),
            "exported_model": SavedModelDataset(path=str(tmp_path / "export/saved_model")),
            "exported_tflite": AtomicBytesDataset(filepath=str(stale)),
            "export_check": KeptDataset(),
            "export_registration": KeptDataset(),
        }
    )
    hashed = collections.Counter()
    sha256 = shard_set._file_sha256

    def counted(file):
        hashed[file.name] += 1
        return sha256(file)

    monkeypatch.setattr(shard_set, "_file_sha256", counted)
    loads = []
    load = tf.saved_model.load
    monkeypatch.setattr(tf.saved_model, "load", lambda path: loads.append(path) or load(path))
    SequentialRunner().run(create_pipeline(), catalog)

    # The export is loaded by the one node that runs it, the self-check: `exported_model`
    # gives each node a lazy ExportedCaptioner, and export_tflite (off) and register_export
    # need only its folder and export.json.
    assert loads == [str(tmp_path / "export/saved_model")]

    files = [f for split in tiny_shards.splits for f in tiny_shards.files(split)]
    assert sorted(hashed) == sorted(files) and set(hashed.values()) == {1}  # each shard, once
    test_images = tiny_shards.num_images("test")
    check = catalog.load("export_check")
    assert check["images"] == check["equal"] == test_images > 0
    assert (tmp_path / "export/saved_model/saved_model.pb").is_file()
    assert not stale.exists()  # removed, not left to pass for this run's
    assert sorted(p.name for p in stale.parent.iterdir()) == ["saved_model"]
    assert catalog.load("export_registration") == {"logged": False}


def test_the_in_process_captions_are_made_before_the_export_is_traced():
    """Kedro runs the nodes that are ready in name order; the in-process captions come first,
    on a heap that holds no traced graphs yet (issue 26: the lower peak at COCO size)."""
    names = [node.name for node in create_pipeline().nodes]
    assert names.index("export.caption_in_process") < names.index("export.export_saved_model")
