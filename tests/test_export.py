"""Export (issues 5, 12): the SavedModel from image bytes to captions, its self-check, TFLite,
and its in-graph preprocessing against the Python (Pillow) path training used."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from caption_pipeline.errors import DataError
from caption_pipeline.params import from_conf
from tests.helpers import EXPORT_DIR


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
    """Independently of the node's check: every beam and score, for beam sizes 1, 2 and 3, on
    test JPEGs that the in-process side preprocesses with training's code (`python_pixels`:
    a model-size JPEG is re-encoded, as the shard writer re-encodes it)."""
    import keras
    import tensorflow as tf

    import caption_pipeline.model  # noqa: F401 (registers the layers)
    from caption_pipeline.data.text import Vocabulary
    from caption_pipeline.model.decoding import DecodeSettings, decode_dataset
    from caption_pipeline.serving.export_check import python_pixels

    captioner = keras.saving.load_model(smoke_project / "data/06_models/captioner.keras")
    vocab = Vocabulary.from_dict(
        json.loads((smoke_project / "data/03_primary/vocabulary.json").read_text())
    )
    ids, jpegs = test_jpegs[0][:8], test_jpegs[1][:8]
    quality = exported.info["jpeg_quality"]
    pixels = np.stack([python_pixels(jpeg, 128, quality) for jpeg in jpegs])
    batches = tf.data.Dataset.from_tensor_slices({"image": pixels, "image_id": ids}).batch(8)
    for beam in (1, 2, 3):
        reference = decode_dataset(
            captioner,
            vocab,
            batches,
            from_conf(DecodeSettings, "evaluate.decoding", beam_size=beam, keep_attention=True),
        )
        out = exported.caption(jpegs, beam)
        for b, ref in enumerate(reference):
            assert list(out["captions"][b]) == ref.captions
            assert out["caption"][b] == ref.caption
            np.testing.assert_allclose(out["scores"][b], ref.scores, atol=1e-4)
            # attention [K, L, R] -> [K, L, H, W]
            np.testing.assert_allclose(
                out["attention"][b].reshape(ref.attention.shape), ref.attention, atol=1e-5
            )


def test_self_check_fails_for_another_model(smoke_project, exported):
    """A captioner with other weights than the exported one: the check names the images."""
    import keras

    import caption_pipeline.model  # noqa: F401
    from caption_pipeline.data.shards.shard_set import load_shard_set
    from caption_pipeline.data.text import Vocabulary
    from caption_pipeline.model import Captioner
    from caption_pipeline.model.decoding import DecodeSettings
    from caption_pipeline.serving.export import CheckSettings
    from caption_pipeline.serving.export_check import (
        check_against_model,
        in_process_captions,
        read_held_out_images,
    )

    trained = keras.saving.load_model(smoke_project / "data/06_models/captioner.keras")
    keras.utils.set_random_seed(7)
    other = Captioner(trained.config)  # same architecture, fresh random weights
    vocab = Vocabulary.from_dict(
        json.loads((smoke_project / "data/03_primary/vocabulary.json").read_text())
    )
    images = read_held_out_images(load_shard_set(smoke_project / "data/03_primary/shards"), 6)
    settings = from_conf(CheckSettings, "export.check", max_images=4, batch_size=4)
    decoding = from_conf(DecodeSettings, "evaluate.decoding")
    expected = in_process_captions(trained, vocab, images, decoding, settings)
    report = check_against_model(exported, expected, images, settings)
    assert report["images"] == report["equal"] == 4  # the first max_images of those read
    expected = in_process_captions(other, vocab, images, decoding, settings)
    with pytest.raises(DataError, match=r"export self-check .* images differ.*image \d+"):
        check_against_model(exported, expected, images, settings)


def test_any_size_and_format_is_resized_as_training_resized(exported):
    """A 300x200 PNG and JPEG, grey and RGB: in-graph decoding, resize and JPEG round trip
    give exactly the Python path's pixels (decode_image -> encode_jpeg -> the reader)."""
    import tensorflow as tf

    from caption_pipeline.serving.export import decode_images
    from caption_pipeline.serving.export_check import python_pixels

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (25, 38, 3), np.uint8)).resize(
        (300, 200), Image.Resampling.BICUBIC
    )
    pixels = decode_images(tf.constant([_png(image)]), 128, 90)[0].numpy()
    np.testing.assert_array_equal(pixels, python_pixels(_png(image), 128, 90))
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
            exported._signature("caption_beam")(
                images=tf.constant(test_jpegs[1][:1]), beam_size=tf.constant(beam)
            )
    out = exported.caption(test_jpegs[1][:1], exported.max_beam_size)
    assert out["captions"].shape == (1, exported.max_beam_size)


def test_tflite_model_captions_as_the_saved_model(smoke_project, exported, test_jpegs):
    """The .tflite file in TFLite's interpreter: the same word ids, words and scores as the
    SavedModel's caption_pixels, and the same captions as serving_default."""
    import tensorflow as tf

    from caption_pipeline.data.shards.records import decode_jpeg_image
    from caption_pipeline.serving.export import run_tflite

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

    from caption_pipeline.serving.export import ModelExport, save_export

    final = tmp_path / "saved_model"
    final.mkdir()
    (final / "saved_model.pb").write_text("previous")

    def broken_save(module, path, signatures=None):
        (tmp_path / "written").write_text(path)
        (__import__("pathlib").Path(path) / "saved_model.pb").write_text("partial")
        raise OSError("disk full")

    class Module:
        serving_default = caption_beam = caption_pixels = encode_pixels = preprocess_images = type(
            "F", (), {"get_concrete_function": staticmethod(lambda: None)}
        )

    monkeypatch.setattr(tf.saved_model, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_export(ModelExport(Module(), {}), final)
    assert (final / "saved_model.pb").read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved_model", "written"]


# --- issue 12: one preprocessing, in the graph and in Python -----------------------------------

TINY_SIZE = 32
TINY_QUALITY = 85  # not the default 90: the export must carry the shard set's quality


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    """(ExportedCaptioner, captioner, vocabulary, decoding) of a real SavedModel saved from a
    tiny random Captioner (32 px, 8x8 grid), beam sizes 1..2."""
    import keras

    from caption_pipeline.data.text import SPECIAL_TOKENS, Vocabulary
    from caption_pipeline.model import Captioner, ModelConfig
    from caption_pipeline.model.decoding import DecodeSettings
    from caption_pipeline.serving.export import ExportedCaptioner, build_module, save_export

    keras.utils.set_random_seed(3)
    captioner = Captioner(
        from_conf(
            ModelConfig,
            "model",
            vocab_size=12,
            encoder="compact",
            image_size=TINY_SIZE,
            compact_filters=(8, 8),
            embed_dim=8,
            attention_dim=8,
            lstm_units=16,
        )
    )
    rng = np.random.default_rng(0)
    # Large decoder weights: captions and scores move with the image.
    captioner.decoder.set_weights(
        [rng.normal(0.0, 1.0, w.shape).astype("float32") for w in captioner.decoder.get_weights()]
    )
    vocabulary = Vocabulary(
        (*SPECIAL_TOKENS.values(), *"abcdefgh"),
        {w: 1 for w in "abcdefgh"},
        min_count=1,
        max_caption_length=5,
    )
    decoding = from_conf(DecodeSettings, "evaluate.decoding", beam_size=2, jit_compile=False)
    path = tmp_path_factory.mktemp("tiny_export") / "saved_model"
    save_export(build_module(captioner, vocabulary, decoding, 2, TINY_QUALITY), path)
    return ExportedCaptioner(path), captioner, vocabulary, decoding


def _source_image() -> Image.Image:
    """A smooth colour image with detail, so that resampling and JPEG differences show."""
    rng = np.random.default_rng(1)
    return Image.fromarray(rng.integers(0, 255, (12, 9, 3), np.uint8)).resize(
        (90, 120), Image.Resampling.BICUBIC
    )


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _all_cases() -> dict[str, bytes]:
    """The self-check's cases, plus every EXIF orientation, GIF, BMP, 16-bit colour PNGs and
    an upright model-size JPEG (re-encoded, as the shard writer re-encodes every image)."""
    import tensorflow as tf

    from caption_pipeline.serving.export_check import preprocessing_cases

    image = _source_image()
    cases = preprocessing_cases(image, TINY_SIZE)
    for orientation in range(2, 9):
        tags = Image.Exif()
        tags[0x0112] = orientation
        cases[f"exif_{orientation}_jpeg"] = _encode(image, "JPEG", quality=92, exif=tags.tobytes())
    cases["gif"] = _encode(image.convert("P"), "GIF")
    cases["bmp"] = _encode(image, "BMP")
    cases["model_size_jpeg"] = _encode(image.resize((TINY_SIZE, TINY_SIZE)), "JPEG")
    wide = np.random.default_rng(2).integers(0, 65535, (50, 70, 4)).astype(np.uint16)
    cases["rgba_16_bit_png"] = tf.io.encode_png(wide).numpy()  # Pillow cannot write these
    cases["rgb_16_bit_png"] = tf.io.encode_png(wide[..., :3]).numpy()
    return cases


def _in_process(captioner, vocabulary, decoding, pixels: np.ndarray):
    """The in-process model's beams on pixels [B, S, S, 3] (the evaluation's path)."""
    import tensorflow as tf

    from caption_pipeline.model.decoding import decode_dataset

    batches = tf.data.Dataset.from_tensor_slices(
        {"image": pixels, "image_id": np.arange(len(pixels))}
    ).batch(len(pixels))
    return decode_dataset(captioner, vocabulary, batches, decoding)


def test_saved_model_preprocesses_every_kind_of_image_as_the_python_path(tiny_export):
    """EXIF-rotated (all 8 orientations, JPEG and PNG), alpha, palette transparency, grey,
    CMYK, 16-bit, off-size, box-reduced, GIF, BMP: the graph's pixels are the Python path's
    exactly (0 grey levels apart), and captions and scores equal the in-process model's on
    the Python pixels."""
    import tensorflow as tf

    from caption_pipeline.data.shards.records import decode_jpeg_image
    from caption_pipeline.serving.export_check import python_pixels

    exported, captioner, vocabulary, decoding = tiny_export
    cases = _all_cases()
    names, data = list(cases), list(cases.values())
    expected = np.stack([python_pixels(d, TINY_SIZE, TINY_QUALITY, n) for n, d in cases.items()])
    pixels = exported.preprocess(data)
    assert pixels.shape == (len(names), TINY_SIZE, TINY_SIZE, 3)
    differ = {
        n: float(np.abs(pixels[i] - expected[i]).max())
        for i, n in enumerate(names)
        if not np.array_equal(pixels[i], expected[i])
    }
    assert differ == {}
    # The steps are really taken: rotation, compositing and the round trip change pixels.
    plain = {n: expected[i] for i, n in enumerate(names)}
    assert np.abs(plain["exif_6_jpeg"] - plain["exif_3_jpeg"]).mean() > 10
    # The alpha case is transparent at the left: white there, unlike the opaque image.
    assert plain["alpha_png"][:, 0].mean() > 240 > plain["off_size_jpeg"][:, 0].mean()
    # A model-size JPEG takes the round trip as well: its pixels are not the file's own, as
    # they would be if it were read as the reader reads a shard image.
    own = decode_jpeg_image(tf.constant(cases["model_size_jpeg"]), TINY_SIZE).numpy()
    assert np.abs(plain["model_size_jpeg"] - own).max() > 0
    reference = _in_process(captioner, vocabulary, decoding, expected)
    out = exported.caption(data)
    for i, ref in enumerate(reference):
        assert list(out["captions"][i]) == ref.captions, names[i]
        np.testing.assert_allclose(out["scores"][i], ref.scores, atol=1e-5, err_msg=names[i])


def test_exif_orientation_and_alpha_are_read_from_the_bytes(tiny_export):
    """The same picture stored rotated with an EXIF tag, or with a transparent border, is
    captioned as the upright, white-bordered one (what ingestion made of it)."""
    exported, *_ = tiny_export
    image = _source_image()
    upright = _encode(image, "PNG")
    for orientation, transpose in (
        (6, Image.Transpose.ROTATE_90),
        (8, Image.Transpose.ROTATE_270),
        (3, Image.Transpose.ROTATE_180),
    ):
        tags = Image.Exif()
        tags[0x0112] = orientation
        stored = _encode(image.transpose(transpose), "PNG", exif=tags.tobytes())
        np.testing.assert_array_equal(*exported.preprocess([stored, upright]))
    framed = Image.new("RGBA", (110, 140), (0, 0, 0, 0))  # transparent black
    framed.paste(image, (10, 10))
    on_white = Image.new("RGB", framed.size, "white")
    on_white.paste(image, (10, 10))
    np.testing.assert_array_equal(
        *exported.preprocess([_encode(framed, "PNG"), _encode(on_white, "PNG")])
    )


def test_self_check_covers_off_size_rotated_grey_cmyk_and_alpha_images(tiny_export, monkeypatch):
    """check_preprocessing passes on the real export with 0 grey levels of difference, and
    names the case when the graph and the Python path part (here: a Python path that forgets
    the EXIF orientation)."""
    from caption_pipeline.serving import export_check as export_module
    from caption_pipeline.serving.export import CheckSettings
    from caption_pipeline.serving.export_check import (
        PIXEL_TOLERANCE,
        HeldOutImages,
        check_preprocessing,
        in_process_captions,
    )

    exported, captioner, vocabulary, decoding = tiny_export
    jpeg = _encode(_source_image().resize((TINY_SIZE, TINY_SIZE)), "JPEG")
    images = HeldOutImages((0,), (jpeg,), TINY_QUALITY)
    settings = from_conf(CheckSettings, "export.check")

    def expected():
        return in_process_captions(captioner, vocabulary, images, decoding, settings)

    report = check_preprocessing(exported, expected())
    assert {
        "off_size_jpeg",
        "large_jpeg",
        "exif_rotated_jpeg",
        "exif_rotated_png",
        "grey_jpeg",
        "grey_png",
        "cmyk_jpeg",
        "alpha_png",
        "palette_transparency_png",
        "grey_16_bit_png",
    } <= set(report["cases"])
    assert report["images"] == report["equal"] == len(report["cases"])
    assert PIXEL_TOLERANCE == 0
    assert all(d["max"] == 0 for d in report["cases"].values())

    real = export_module.python_pixels

    def no_exif(data, size, quality, name="<bytes>"):
        if name.startswith("exif"):
            image = Image.open(io.BytesIO(data))
            return real(_encode(image.convert("RGB"), "PNG"), size, quality, name)
        return real(data, size, quality, name)

    monkeypatch.setattr(export_module, "python_pixels", no_exif)
    with pytest.raises(DataError, match=r"preprocessing.*exif_rotated_jpeg"):
        check_preprocessing(exported, expected())


def test_export_json_records_the_shards_jpeg_quality(tiny_export):
    exported, *_ = tiny_export
    assert exported.info["jpeg_quality"] == TINY_QUALITY
    assert "preprocess_images" in exported.info["signatures"]


def test_unsupported_images_are_refused_with_a_clear_error(tiny_export):
    """WebP, TIFF, a transparent GIF, a truncated JPEG: a DataError naming the image and the
    problem, from the SavedModel itself (no Pillow in front of it)."""
    exported, *_ = tiny_export
    image = _source_image()
    good = _encode(image, "PNG")
    for fmt in ("WEBP", "TIFF"):
        with pytest.raises(DataError, match=r"image 1 is not a JPEG, PNG, GIF or BMP image"):
            exported.caption([good, _encode(image, fmt)])
    transparent = _encode(image.convert("P"), "GIF", transparency=0)
    with pytest.raises(DataError, match=r"image 0 is a GIF with transparency.*convert it to PNG"):
        exported.preprocess([transparent])
    truncated = _encode(image, "JPEG")[:40]
    with pytest.raises(DataError, match=r"images: .*JPEG"):
        exported.caption([truncated])


def _claiming(data: bytes, offset: int, fields: bytes) -> bytes:
    """`data` with its header's width and height bytes at `offset` replaced by `fields`."""
    return data[:offset] + fields + data[offset + len(fields) :]


def test_a_canvas_over_max_pixels_is_refused_from_the_header(tiny_export):
    """A small file that claims a huge canvas (a decompression bomb) is refused by the
    SavedModel itself, as `images.decode_image` refuses it, before anything is decoded: the
    images below hold 16 x 16 pixels of data and could not be decoded at the size claimed."""
    import struct

    exported, *_ = tiny_export
    image = _source_image().resize((16, 16))
    jpeg = _encode(image, "JPEG")
    sof = jpeg.index(b"\xff\xc0") + 5  # baseline frame header: precision, then H, W
    bombs = {
        "png": (
            _claiming(_encode(image, "PNG"), 16, struct.pack(">II", 20000, 10000)),
            "20000 x 10000",
        ),
        "jpeg": (_claiming(jpeg, sof, struct.pack(">HH", 9000, 8000)), "8000 x 9000"),
        "gif": (
            _claiming(_encode(image, "GIF"), 6, struct.pack("<HH", 60000, 1000)),
            "60000 x 1000",
        ),
        # A negative height is a top-down bitmap: its size is the absolute value.
        "bmp": (
            _claiming(_encode(image, "BMP"), 18, struct.pack("<ii", 10000, -6000)),
            "10000 x 6000",
        ),
    }
    good = _encode(image, "PNG")
    for _kind, (data, size) in bombs.items():
        with pytest.raises(
            DataError,
            match=rf"image 1 is {size} pixels, more than "
            rf"max_pixels 50000000",
        ):
            exported.caption([good, data])
    assert exported.info["max_pixels"] == 50_000_000
    assert exported.preprocess([good]).shape == (1, TINY_SIZE, TINY_SIZE, 3)


def test_self_check_refuses_captions_of_another_preprocessing(tiny_export):
    """The in-process captions are computed before the export is loaded (issue 26): the check
    refuses those of another image size or JPEG quality than the export's."""
    from caption_pipeline.serving.export import CheckSettings
    from caption_pipeline.serving.export_check import (
        HeldOutImages,
        check_against_model,
        in_process_captions,
    )

    exported, captioner, vocabulary, decoding = tiny_export
    jpeg = _encode(_source_image().resize((TINY_SIZE, TINY_SIZE)), "JPEG")
    images = HeldOutImages((0,), (jpeg,), TINY_QUALITY + 5)
    settings = from_conf(CheckSettings, "export.check")
    expected = in_process_captions(captioner, vocabulary, images, decoding, settings)
    with pytest.raises(DataError, match=r"preprocessing .*jpeg_quality.* is not the in-process"):
        check_against_model(exported, expected, images, settings)
