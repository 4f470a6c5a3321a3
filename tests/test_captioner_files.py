"""The captioner to evaluate, read by the catalog's `captioner@evaluated`: `.keras` models,
`.weights.h5` checkpoints (whole, or a decoder joined with the frozen encoder), the errors that
name the file, and the `--params=evaluated_model=PATH` override resolved by Kedro's loader."""

from __future__ import annotations

import numpy as np
import pytest
from kedro.io import DataCatalog, DatasetError

from caption_pipeline.data.text import SPECIAL_TOKENS, Vocabulary
from caption_pipeline.datasets import CaptionerFileDataset
from caption_pipeline.datasets.captioner_file import read_captioner
from caption_pipeline.errors import DataError
from caption_pipeline.model import Captioner, ModelConfig
from caption_pipeline.params import conf_dir, defaults, from_conf
from caption_pipeline.settings import CONFIG_LOADER_ARGS, CONFIG_LOADER_CLASS

MODEL = {
    **defaults("model"),
    "compact_pool_last": True,
    "encoder_trainable": None,
    "encoder": "compact",
    "image_size": 32,
    "compact_filters": [8, 8],
    "embed_dim": 8,
    "attention_dim": 8,
    "lstm_units": 16,
}


def tiny_vocabulary(words: str = "abcdefgh") -> Vocabulary:
    return Vocabulary(
        (*SPECIAL_TOKENS.values(), *words),
        dict.fromkeys(words, 1),
        min_count=1,
        max_caption_length=5,
    )


def captioner(vocab: Vocabulary, **model) -> Captioner:
    return Captioner(from_conf(ModelConfig, "model", vocab_size=vocab.size, **{**MODEL, **model}))


def assert_same_weights(a: list, b: list) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


def test_keras_models_and_whole_checkpoints_load_with_their_weights(tmp_path):
    vocab = tiny_vocabulary()
    model = captioner(vocab)
    model.save(tmp_path / "model.keras")
    model.save_weights(tmp_path / "step.weights.h5")

    saved = CaptionerFileDataset(filepath=str(tmp_path / "model.keras")).load()
    assert saved.source == str(tmp_path / "model.keras")
    checkpoint = CaptionerFileDataset(
        filepath=str(tmp_path / "step.weights.h5"), architecture=str(tmp_path / "model.keras")
    ).load()
    assert (
        checkpoint.source
        == f"{tmp_path / 'step.weights.h5'} (the architecture of "
        + str(tmp_path / "model.keras")
        + ")"
    )
    for loaded in (saved, checkpoint):
        assert isinstance(loaded.captioner, Captioner)
        assert_same_weights(loaded.captioner.get_weights(), model.get_weights())
        loaded.check_vocabulary(vocab)
    with pytest.raises(DataError, match="model.keras: the model writes 12 token ids, the voc"):
        saved.check_vocabulary(tiny_vocabulary("abcdefghi"))


def test_a_captioner_saved_before_an_architecture_key_loads_as_it_was(tmp_path):
    """A .keras file written before `compact_context` and `compact_strided_stem` existed has
    neither in its config: it loads with the architecture it was saved with (no context, a
    pooled stem), not conf/base's, and with its own weights."""
    import json
    import zipfile

    vocab = tiny_vocabulary()
    model = captioner(vocab, compact_strided_stem=False)
    stem = captioner(vocab, compact_strided_stem=True)
    assert "pool0" not in {layer.name for layer in stem.encoder.layers}  # what a new key adds
    model.save(tmp_path / "new.keras")
    old = tmp_path / "old.keras"
    with zipfile.ZipFile(tmp_path / "new.keras") as new, zipfile.ZipFile(old, "w") as out:
        for item in new.infolist():
            data = new.read(item.filename)
            if item.filename == "config.json":
                config = json.loads(data)
                for key in ("compact_context", "compact_strided_stem"):
                    del config["config"]["config"][key]
                data = json.dumps(config).encode()
            out.writestr(item, data)
    loaded = read_captioner(old).captioner
    assert loaded.config.compact_strided_stem is False and loaded.config.compact_context == ()
    assert "pool0" in {layer.name for layer in loaded.encoder.layers}
    assert_same_weights(loaded.get_weights(), model.get_weights())


def test_a_decoder_checkpoint_gets_the_frozen_encoder_of_the_saved_captioner(tmp_path):
    vocab = tiny_vocabulary()
    full = captioner(vocab, encoder_trainable=False)
    full.save(tmp_path / "captioner.keras")
    decoder = Captioner(full.config, feature_shape=(full.regions, full.feature_dim))
    decoder.save_weights(tmp_path / "decoder.weights.h5")

    joined = read_captioner(tmp_path / "decoder.weights.h5", tmp_path / "captioner.keras")
    assert joined.source.endswith(f"with the frozen encoder of {tmp_path / 'captioner.keras'}")
    assert_same_weights(
        joined.captioner.get_weights(), full.encoder.get_weights() + decoder.get_weights()
    )

    # A fine-tuned captioner's encoder is not the one that computed the decoder's features.
    tuned = captioner(vocab, encoder_trainable=True)
    tuned.save(tmp_path / "tuned.keras")
    with pytest.raises(DataError, match="holds a decoder trained on precomputed features.*"):
        read_captioner(tmp_path / "decoder.weights.h5", tmp_path / "tuned.keras")


def test_bad_model_files_are_named(tmp_path):
    vocab = tiny_vocabulary()
    captioner(vocab).save(tmp_path / "model.keras")
    captioner(tiny_vocabulary("abcdefghijk")).save_weights(tmp_path / "other.weights.h5")
    (tmp_path / "model.onnx").write_bytes(b"x")
    (tmp_path / "broken.keras").write_bytes(b"not a zip")

    cases = {
        "missing.keras": r"missing\.keras: the model to evaluate does not exist",
        "model.onnx": r"model\.onnx: expected a \.keras model or a \.weights\.h5 checkpoint",
        "broken.keras": r"broken\.keras: not a loadable Keras model",
        "other.weights.h5": r"other\.weights\.h5 does not fit the Captioner of .*model\.keras",
    }
    for name, message in cases.items():
        with pytest.raises(DataError, match=message):
            read_captioner(tmp_path / name, tmp_path / "model.keras")
    with pytest.raises(DataError, match=r"other\.weights\.h5: a checkpoint holds weights alone"):
        read_captioner(tmp_path / "other.weights.h5")
    with pytest.raises(DataError, match=r"gone\.keras: no saved captioner there"):
        read_captioner(tmp_path / "other.weights.h5", tmp_path / "gone.keras")
    saved_model = read_captioner(tmp_path / "model.keras").captioner
    with pytest.raises(DatasetError, match="read, never written"):
        CaptionerFileDataset(filepath=str(tmp_path / "model.keras")).save(saved_model)


def catalog_entry(name: str, runtime_params: dict | None = None):
    """The catalog of conf/base as `kedro run --params=...` builds it: Kedro's loader with the
    project's settings, and its runtime_params."""
    loader = CONFIG_LOADER_CLASS(
        str(conf_dir()), **CONFIG_LOADER_ARGS, env="base", runtime_params=runtime_params or {}
    )
    return DataCatalog.from_config(loader["catalog"])[name]


def test_the_evaluated_model_is_the_trained_captioner_unless_a_run_names_another():
    trained = catalog_entry("captioner@keras")._describe()["filepath"]
    assert trained == "data/06_models/captioner.keras"
    default = catalog_entry("captioner@evaluated")._describe()
    assert default == {"filepath": trained, "architecture": trained}
    named = catalog_entry("captioner@evaluated", {"evaluated_model": "ckpt/best.weights.h5"})
    assert named._describe() == {"filepath": "ckpt/best.weights.h5", "architecture": trained}


def test_export_exports_the_model_that_evaluate_scored():
    """The registered version carries metrics.json's scores: it must be the model they are of,
    also when a run names another model to evaluate."""
    from caption_pipeline.pipelines import evaluate, export

    reads = {
        node.name: [name for name in node.inputs if name.startswith("captioner")]
        for pipeline in (evaluate.create_pipeline(), export.create_pipeline())
        for node in pipeline.nodes
    }
    assert {name for names in reads.values() for name in names} == {"captioner@evaluated"}, reads
    for node in (
        "evaluation.generate_captions",
        "export.export_saved_model",
        "export.caption_in_process",  # what check_export compares the saved export with
    ):
        assert reads[node] == ["captioner@evaluated"], node


def test_export_refuses_a_model_that_metrics_json_did_not_score(tmp_path):
    """Issue 26: metrics.json records the weights evaluate scored (`details.model_weights`);
    export refuses, in one line and before building anything, a captioner with other weights:
    a stale metrics.json (a model trained again, evaluate not re-run), or one written before
    the digest was recorded."""
    from caption_pipeline.pipelines.export.nodes import export_captioner

    vocab = tiny_vocabulary()
    captioner(vocab).save(tmp_path / "scored.keras")
    scored = CaptionerFileDataset(filepath=str(tmp_path / "scored.keras")).load()
    metrics = {"details": {"model": "scored.keras", "model_weights": scored.weights_digest}}
    scored.require_scored(metrics)  # the same bytes: accepted
    again = CaptionerFileDataset(filepath=str(tmp_path / "scored.keras")).load()
    assert again.weights_digest == scored.weights_digest  # the digest is of the weights read

    captioner(vocab).save(tmp_path / "retrained.keras")  # other random weights
    retrained = CaptionerFileDataset(filepath=str(tmp_path / "retrained.keras")).load()
    assert retrained.weights_digest != scored.weights_digest
    for stale, said in (
        (metrics, f"scored weights {scored.weights_digest} (scored.keras)"),
        ({"details": {"model": "old.keras"}}, "records no weights"),
    ):
        with pytest.raises(DataError) as refused:
            export_captioner(retrained, stale, vocab.to_dict(), None, {}, {})
        message = str(refused.value)
        assert "\n" not in message and said in message, message
        assert f"retrained.keras has weights {retrained.weights_digest}" in message
        assert "run `kedro run --pipelines=evaluate` first" in message
