"""Export (issue 5): the SavedModel from image bytes to captions, its self-check, TFLite."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from conftest import EXPORT_DIR
from PIL import Image

from caption_pipeline.errors import DataError


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_smoke_run_writes_a_checked_export(smoke_project, test_jpegs):
    export = smoke_project / EXPORT_DIR
    assert (export / "saved_model.pb").is_file()
    assert (export / "assets.extra/export.json").is_file()
    assert (smoke_project / "data/06_models/export/captioner.tflite").stat().st_size > 10_000
    check = json.loads((smoke_project / "data/08_reporting/export_check.json").read_text())
    assert check["images"] == check["equal"] == len(test_jpegs[0]) > 0
    # Atomic writes leave no temporary sibling behind.
    assert not [p.name for p in export.parent.iterdir() if ".tmp-" in p.name]


def test_exported_captions_equal_the_in_process_model(smoke_project, exported, test_jpegs):
    """Independently of the node's check: every beam and score, for beam sizes 1, 2 and 3."""
    import keras
    import tensorflow as tf

    import caption_pipeline.model  # noqa: F401 (registers the layers)
    from caption_pipeline.decoding import DecodeSettings, decode_dataset
    from caption_pipeline.text import Vocabulary
    from caption_pipeline.tfrecords import decode_jpeg_image

    captioner = keras.saving.load_model(smoke_project / "data/06_models/captioner.keras")
    vocab = Vocabulary.from_dict(json.loads(
        (smoke_project / "data/03_primary/vocabulary.json").read_text()))
    ids, jpegs = test_jpegs[0][:8], test_jpegs[1][:8]
    batches = tf.data.Dataset.from_tensor_slices({"image": jpegs, "image_id": ids}).map(
        lambda x: {**x, "image": decode_jpeg_image(x["image"], 128)}).batch(8)
    for beam in (1, 2, 3):
        reference = decode_dataset(captioner, vocab, batches,
                                   DecodeSettings(beam_size=beam, keep_attention=True))
        out = exported.caption(jpegs, beam)
        for b, ref in enumerate(reference):
            assert list(out["captions"][b]) == ref.captions
            assert out["caption"][b] == ref.caption
            np.testing.assert_allclose(out["scores"][b], ref.scores, atol=1e-4)
            # attention [K, L, R] -> [K, L, H, W]
            np.testing.assert_allclose(out["attention"][b].reshape(ref.attention.shape),
                                       ref.attention, atol=1e-5)


def test_self_check_fails_for_another_model(smoke_project, exported):
    """A captioner with other weights than the exported one: the check names the images."""
    import keras

    import caption_pipeline.model  # noqa: F401
    from caption_pipeline.decoding import DecodeSettings
    from caption_pipeline.export import CheckSettings, check_against_model
    from caption_pipeline.model import Captioner
    from caption_pipeline.text import Vocabulary
    from caption_pipeline.tfrecords import load_shard_set

    trained = keras.saving.load_model(smoke_project / "data/06_models/captioner.keras")
    keras.utils.set_random_seed(7)
    other = Captioner(trained.config)  # same architecture, fresh random weights
    vocab = Vocabulary.from_dict(json.loads(
        (smoke_project / "data/03_primary/vocabulary.json").read_text()))
    shards = load_shard_set(smoke_project / "data/05_model_input/shards")
    settings = CheckSettings(max_images=4, batch_size=4)
    report = check_against_model(exported, trained, vocab, shards, DecodeSettings(), settings)
    assert report["images"] == report["equal"] == 4
    with pytest.raises(DataError, match=r"export self-check .* images differ.*image \d+"):
        check_against_model(exported, other, vocab, shards, DecodeSettings(), settings)


def test_any_size_and_format_is_resized_as_training_resized(exported):
    """A 300x200 PNG and JPEG, grey and RGB: in-graph decoding + Lanczos equals Pillow's
    LANCZOS resize (what the shard writer did) to within a grey level on average."""
    import tensorflow as tf

    from caption_pipeline.export import decode_images

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (25, 38, 3), np.uint8)).resize(
        (300, 200), Image.Resampling.BICUBIC)
    expected = np.asarray(image.resize((128, 128), Image.Resampling.LANCZOS), np.float32)
    pixels = decode_images(tf.constant([_png(image)]), 128)[0].numpy()
    assert np.abs(pixels - expected).mean() < 0.5
    jpeg = io.BytesIO()
    image.save(jpeg, format="JPEG", quality=95)
    out = exported.caption([_png(image), jpeg.getvalue(), _png(image.convert("L"))], 2)
    assert out["captions"].shape == (3, 2)
    assert out["attention"].shape[:2] == (3, 2)
    assert out["attention"].shape[3:] == tuple(exported.info["grid"])
    assert out["tokens"].shape == out["attention"].shape[:3]


def test_beam_size_outside_the_exported_range_is_refused(exported, test_jpegs):
    import tensorflow as tf

    for beam in (0, exported.max_beam_size + 1):
        with pytest.raises(DataError, match=r"beam_size must be in 1\.\.5"):
            exported.caption(test_jpegs[1][:1], beam)
        with pytest.raises(tf.errors.InvalidArgumentError, match="beam_size"):
            exported._beam(images=tf.constant(test_jpegs[1][:1]), beam_size=tf.constant(beam))
    out = exported.caption(test_jpegs[1][:1], exported.max_beam_size)
    assert out["captions"].shape == (1, exported.max_beam_size)


def test_tflite_model_captions_as_the_saved_model(smoke_project, exported, test_jpegs):
    """The .tflite file in TFLite's interpreter: the same word ids, words and scores as the
    SavedModel's caption_pixels, and the same captions as serving_default."""
    import tensorflow as tf

    from caption_pipeline.export import run_tflite
    from caption_pipeline.tfrecords import decode_jpeg_image

    model = (smoke_project / "data/06_models/export/captioner.tflite").read_bytes()
    jpegs = test_jpegs[1][:3]
    pixels = np.stack([decode_jpeg_image(tf.constant(j), 128).numpy() for j in jpegs])
    lite = run_tflite(model, pixels)
    saved = exported.caption_pixels(pixels)
    np.testing.assert_array_equal(lite["ids"], saved["ids"])
    np.testing.assert_allclose(lite["scores"], saved["scores"], atol=1e-4)
    np.testing.assert_allclose(lite["attention"], saved["attention"], atol=1e-4)
    captions = exported.caption(jpegs)["captions"]
    for b in range(len(jpegs)):
        for k in range(captions.shape[1]):
            words = [w for w in lite["tokens"][b, k] if w and w != "<end>"]
            assert " ".join(words) == captions[b, k]


def test_export_folder_is_replaced_atomically(tmp_path, monkeypatch):
    """A save that fails half way leaves the previous export whole and no temporary folder."""
    import tensorflow as tf

    from caption_pipeline.export import ModelExport, save_export

    final = tmp_path / "saved_model"
    final.mkdir()
    (final / "saved_model.pb").write_text("previous")

    def broken_save(module, path, signatures=None):
        (tmp_path / "written").write_text(path)
        (__import__("pathlib").Path(path) / "saved_model.pb").write_text("partial")
        raise OSError("disk full")

    class Module:
        serving_default = caption_beam = caption_pixels = encode_pixels = type(
            "F", (), {"get_concrete_function": staticmethod(lambda: None)})

    monkeypatch.setattr(tf.saved_model, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_export(ModelExport(Module(), {}), final)
    assert (final / "saved_model.pb").read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved_model", "written"]
