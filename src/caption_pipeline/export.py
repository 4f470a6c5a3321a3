"""Export: the trained Captioner as one TensorFlow SavedModel from encoded image bytes to
captions, its TFLite conversion, the self-check, and the loader the CLI and server use.

The SavedModel holds the whole path in one graph: image decoding and resizing (as training
saw its images), the encoder, the decoder and the search, with the vocabulary as a constant;
serving needs TensorFlow and nothing of this package. Signatures (B images, K beams, L steps,
an H x W grid of regions):

  serving_default(images: string [B])                        the default beam size
  caption_beam(images: string [B], beam_size: int32 [])       any beam size in 1..max_beam_size
  caption_pixels(pixels: float32 [B, S, S, 3])                decoded 0..255 pixels, default
                                                              beam size, no caption text
                                                              (what the TFLite model runs)
  encode_pixels(pixels: float32 [B, S, S, 3])                 the encoder alone: regions
                                                              float32 [B, R, D]

  outputs  caption    string  [B]               the best caption
           captions   string  [B, K]            every beam's caption, best first
           scores     float32 [B, K]            what beams are ranked by (length-normalized)
           log_probs  float32 [B, K]            sum of the words' log-probabilities
           lengths    int32   [B, K]            generated tokens, <end> included
           tokens     string  [B, K, L]         each step's word ("<end>", then "")
           attention  float32 [B, K, L, H, W]   where each word looked; 0 after <end>

A beam size is a static shape of the search (the beams are folded into the batch), so
`caption_beam` holds one traced search per size and picks one with `tf.switch_case`.
`assets.extra/export.json` describes the export (image size, grid, beam sizes, vocabulary) for
Python clients; the graph itself does not need it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from caption_pipeline.atomic import atomic_directory
from caption_pipeline.errors import DataError
from caption_pipeline.params import from_params

logger = logging.getLogger(__name__)

FORMAT = "caption-pipeline/saved-model/v1"
INFO_FILE = "assets.extra/export.json"
BEAM_SIGNATURE = "caption_beam"
PIXELS_SIGNATURE = "caption_pixels"
ENCODER_SIGNATURE = "encode_pixels"
DEFAULT_SIGNATURE = "serving_default"
# Outputs of the TFLite model (the `caption_pixels` signature), sorted by name.
TFLITE_OUTPUTS = ("attention", "ids", "lengths", "log_probs", "scores", "tokens")
OUTPUTS = ("caption", "captions", "scores", "log_probs", "lengths", "tokens", "attention")


@dataclass(frozen=True)
class CheckSettings:
    """The self-check: exported captions against the in-process model's."""

    max_images: int | None = None  # test images compared; null: all
    batch_size: int = 32
    tflite_images: int = 4  # images run through the TFLite interpreter too (0: skip)


@dataclass(frozen=True)
class ExportSettings:
    """`params:export`; see conf/base/parameters_export.yml."""

    max_beam_size: int = 5
    check: CheckSettings = field(default_factory=CheckSettings)

    def __post_init__(self):
        if not isinstance(self.max_beam_size, int) or not 1 <= self.max_beam_size <= 16:
            raise DataError(f"parameters export.max_beam_size: expected 1..16, "
                            f"got {self.max_beam_size!r}")

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> ExportSettings:
        params = dict(params or {})
        params.pop("mlflow", None)  # read by caption_pipeline.mlflow_model
        check = from_params(CheckSettings, params.pop("check", None) or {}, "export.check")
        return from_params(cls, {**params, "check": check}, "export")


# --- building and saving the graph ------------------------------------------------------------


def region_grid(captioner) -> tuple[int, int]:
    """(H, W) of the encoder's region grid: R = H * W regions, row by row."""
    _, height, width, _ = captioner.encoder.get_layer("regions").input.shape
    return int(height), int(width)


def build_module(captioner, vocabulary, decoding, max_beam_size: int):
    """The `tf.Module` with the four signatures of the module docstring over `captioner` (a
    trained Captioner), and its export.json.

    vocabulary: a `text.Vocabulary`; decoding: the `decoding.DecodeSettings` whose method,
    alpha, max length and beam size (the default) the export keeps.
    """
    import tensorflow as tf

    from caption_pipeline.decoding import search

    default_beam = decoding.beam_size if decoding.method == "beam" else 1
    if not 1 <= default_beam <= max_beam_size:
        raise DataError(f"parameters: the default beam size {default_beam} is outside "
                        f"export.max_beam_size 1..{max_beam_size}")
    max_length = decoding.steps(vocabulary)
    size = captioner.config.image_size
    height, width = region_grid(captioner)

    class CaptionerExport(tf.Module):
        def __init__(self):
            super().__init__(name="captioner_export")
            self.captioner = captioner  # tracks every variable of the model
            # [V + 1]: id -> word, and "" at V for the steps after a beam's <end>.
            self.words = tf.constant([*vocabulary.tokens, ""])

        def search(self, pixels, beam_size: int) -> dict[str, tf.Tensor]:
            """pixels [B, S, S, 3] float32 0..255 -> the numeric outputs and `tokens`, with
            K = beam_size; only ops that TFLite has as builtins."""
            settings = dataclasses.replace(decoding, beam_size=beam_size,
                                           method="beam" if beam_size > 1 else decoding.method)
            found = search(captioner, captioner({"image": pixels}), settings, max_length)
            steps = tf.sequence_mask(found.lengths, max_length)  # [B, K, L]
            shape = tf.concat([tf.shape(found.attention)[:3], [height, width]], axis=0)
            return {
                "ids": found.ids,  # [B, K, L] int32
                "scores": found.scores,
                "log_probs": found.log_probs,
                "lengths": found.lengths,
                # A select on ids, not on strings: TFLite has no string select.
                "tokens": tf.gather(self.words, tf.where(steps, found.ids, vocabulary.size)),
                "attention": tf.reshape(found.attention, shape),  # [B, K, L, H, W]
            }

        def outputs(self, pixels, beam_size: int) -> dict[str, tf.Tensor]:
            """`search` with the captions joined into text."""
            out = self.search(pixels, beam_size)
            ids = out.pop("ids")
            # Vocabulary.decode: stop at <end>, skip <pad> and <start>.
            ends = tf.cumsum(tf.cast(tf.equal(ids, vocabulary.end_id), tf.int32), axis=-1)
            special = tf.logical_or(tf.equal(ids, vocabulary.pad_id),
                                    tf.equal(ids, vocabulary.start_id))
            word = tf.logical_and(tf.equal(ends, 0), tf.logical_not(special))
            spaced = tf.where(word, tf.strings.join([out["tokens"], " "]), "")
            captions = tf.strings.strip(tf.strings.reduce_join(spaced, axis=-1))  # [B, K]
            return {"caption": captions[:, 0], "captions": captions, **out}

        @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32,
                                                    name="pixels")])
        def caption_pixels(self, pixels):
            return self.search(pixels, default_beam)

        @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32,
                                                    name="pixels")])
        def encode_pixels(self, pixels):
            """The encoder alone: region features [B, R, D] (benchmarks, feature reuse)."""
            return {"regions": captioner({"image": pixels})}

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="images")])
        def serving_default(self, images):
            return self.outputs(decode_images(images, size), default_beam)

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="images"),
                                      tf.TensorSpec([], tf.int32, name="beam_size")])
        def caption_beam(self, images, beam_size):
            in_range = tf.logical_and(beam_size >= 1, beam_size <= max_beam_size)
            check = tf.debugging.Assert(in_range, ["beam_size must be in 1..", max_beam_size,
                                                   "got", beam_size])
            with tf.control_dependencies([check]):
                pixels = decode_images(images, size)
            branches = [lambda k=k: self.outputs(pixels, k) for k in range(1, max_beam_size + 1)]
            return tf.switch_case(beam_size - 1, branches)

    info = {
        "format": FORMAT,
        "image_size": size,
        "grid": [height, width],
        "max_length": max_length,
        "method": decoding.method,
        "alpha": decoding.alpha,
        "default_beam_size": default_beam,
        "max_beam_size": max_beam_size,
        "signatures": {DEFAULT_SIGNATURE: ["images"], BEAM_SIGNATURE: ["images", "beam_size"],
                       PIXELS_SIGNATURE: ["pixels"], ENCODER_SIGNATURE: ["pixels"]},
        "outputs": list(OUTPUTS),
        "vocabulary": vocabulary.to_dict(),
    }
    return ModelExport(CaptionerExport(), info)


@dataclass
class ModelExport:
    """What `build_module` makes and `save_export` writes."""

    module: Any  # the tf.Module whose tf.functions are the signatures
    info: dict[str, Any]  # assets.extra/export.json


def decode_images(images, size: int):
    """Encoded images string [B] -> float32 [B, S, S, 3] in 0..255, as training saw them.

    Training images were resized with Pillow's Lanczos filter to S x S (aspect ratio not kept)
    and stored as JPEG; the reader resizes only images of another size. Here: decode any
    JPEG / PNG / GIF / BMP, drop alpha, and resize with Pillow's Lanczos-3 weights
    (`lanczos_weights`) to S x S, rounded to whole grey levels as Pillow's 8-bit output is.
    S x S images pass unchanged, so shard images give the reader's exact pixels.
    """
    import tensorflow as tf

    def one(data):
        pixels = tf.io.decode_image(data, channels=3, expand_animations=False)  # uint8 [H, W, 3]
        pixels = tf.cast(tf.ensure_shape(pixels, [None, None, 3]), tf.float32)
        shape = tf.shape(pixels)
        same = tf.reduce_all(tf.equal(shape[:2], size))

        def resize():
            rows = lanczos_weights(shape[0], size)  # [S, H]
            cols = lanczos_weights(shape[1], size)  # [S, W]
            # Separable: columns first ([H, S, 3]), then rows ([S, S, 3]).
            out = tf.einsum("hwc,sw->hsc", pixels, cols)
            out = tf.einsum("hsc,rh->rsc", out, rows)
            return tf.round(tf.clip_by_value(out, 0.0, 255.0))

        resized = tf.cond(same, lambda: pixels, resize)
        return tf.ensure_shape(resized, [size, size, 3])

    return tf.map_fn(one, images, fn_output_signature=tf.TensorSpec([size, size, 3], tf.float32))


def lanczos_weights(length, size: int):
    """[size, length] float32: output pixel i as a weighted sum of input pixels j, Pillow's
    Lanczos-3 resampling (`Image.resize(..., LANCZOS)`): kernel sinc(x) sinc(x / 3) at
    x = (j + 0.5 - centre_i) / scale, centre_i = (i + 0.5) * length / size, the kernel widened
    by the scale when shrinking (antialiasing), each row normalized to sum 1.

    As a matrix product rather than `tf.image.resize(method="lanczos3")`, whose
    ScaleAndTranslate op TFLite cannot run (not even as a Flex op).
    """
    import tensorflow as tf

    length_f = tf.cast(length, tf.float32)
    ratio = length_f / size
    scale = tf.maximum(ratio, 1.0)
    centre = (tf.range(size, dtype=tf.float32) + 0.5) * ratio  # [S]
    x = ((tf.range(length_f) + 0.5)[None, :] - centre[:, None]) / scale  # [S, length]

    def sinc(v):
        pv = np.pi * v
        small = tf.abs(v) < 1e-6
        return tf.where(small, 1.0, tf.sin(pv) / tf.where(small, 1.0, pv))

    weights = tf.where(tf.abs(x) < 3.0, sinc(x) * sinc(x / 3.0), 0.0)
    return weights / tf.reduce_sum(weights, axis=1, keepdims=True)


def save_export(export: ModelExport, path: str | os.PathLike) -> Path:
    """Write the SavedModel and its export.json to `path` atomically (a temporary sibling
    folder, renamed when complete)."""
    import tensorflow as tf

    module = export.module
    signatures = {DEFAULT_SIGNATURE: module.serving_default.get_concrete_function(),
                  BEAM_SIGNATURE: module.caption_beam.get_concrete_function(),
                  PIXELS_SIGNATURE: module.caption_pixels.get_concrete_function(),
                  ENCODER_SIGNATURE: module.encode_pixels.get_concrete_function()}
    with atomic_directory(path) as tmp:
        tf.saved_model.save(module, str(tmp), signatures=signatures)
        (tmp / INFO_FILE).parent.mkdir(parents=True, exist_ok=True)
        (tmp / INFO_FILE).write_text(json.dumps(export.info, indent=1) + "\n")
    return Path(path)


def convert_tflite(saved_model: str | os.PathLike) -> bytes:
    """The `caption_pixels` signature as a TFLite flatbuffer of builtin ops only.

    The app decodes and resizes the photo itself (as an Android app does with its bitmap
    API) and gets ids, scores, attention and each step's word; the vocabulary is inside.
    Image decoding needs TensorFlow's DecodeImage, a Flex op that the interpreter of the
    `tensorflow` pip package cannot run, and TFLite has no op for the antialiased resize.
    """
    import tensorflow as tf

    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2,
    )

    loaded = tf.saved_model.load(str(saved_model))
    # Weights as constants: the search's while loop would otherwise read them as resource
    # variables, which the interpreter leaves uninitialized.
    frozen = convert_variables_to_constants_v2(loaded.signatures[PIXELS_SIGNATURE],
                                               lower_control_flow=False)
    converter = tf.lite.TFLiteConverter.from_concrete_functions([frozen], loaded)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    try:
        return converter.convert()
    except Exception as error:  # noqa: BLE001 (the converter raises many kinds)
        reason = (str(error).strip() or type(error).__name__).splitlines()[0]
        raise DataError(f"TFLite conversion of {saved_model} failed: {reason}") from None


def run_tflite(model: bytes, pixels: np.ndarray) -> dict[str, np.ndarray]:
    """Run a `convert_tflite` model on pixels [B, S, S, 3] float32 with TFLite's interpreter."""
    import tensorflow as tf

    interpreter = tf.lite.Interpreter(model_content=model)
    runner = interpreter.get_signature_runner()  # the only one
    out = runner(pixels=np.asarray(pixels, np.float32))
    # A frozen function's outputs lose their names: output_i is the i-th key in sorted order.
    out = {key: out[f"output_{i}"] for i, key in enumerate(TFLITE_OUTPUTS)}
    out["tokens"] = np.vectorize(bytes.decode, otypes=[object])(out["tokens"])
    return out


# --- loading and running an export ------------------------------------------------------------


def read_export_info(path: Path) -> dict[str, Any]:
    """The export.json of the export in `path`; a DataError if `path` is not an export."""
    info_file = path / INFO_FILE
    if not path.is_dir():
        raise DataError(f"model {path}: no such folder (make one with `kedro run` or "
                        f"`kedro run --pipelines=export`, or pass --model)")
    if not (path / "saved_model.pb").is_file() or not info_file.is_file():
        raise DataError(f"model {path}: not a caption-pipeline export "
                        f"(needs saved_model.pb and {INFO_FILE})")
    try:
        info = json.loads(info_file.read_text())
    except (OSError, ValueError) as error:
        raise DataError(f"model {info_file}: unreadable ({error})") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise DataError(f"model {info_file}: not format {FORMAT!r}")
    return info


class ExportedCaptioner:
    """A loaded export: `caption(list of encoded images, beam_size)` -> numpy outputs.

    Calls are thread-safe (TensorFlow runs concurrent calls of a concrete function).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.info = read_export_info(self.path)  # before importing TensorFlow (seconds)
        import tensorflow as tf

        try:
            self._loaded = tf.saved_model.load(str(self.path))
        except Exception as error:  # noqa: BLE001
            raise DataError(f"model {self.path}: cannot be loaded ({error})") from None
        self._beam = self._loaded.signatures[BEAM_SIGNATURE]
        self._pixels = self._loaded.signatures[PIXELS_SIGNATURE]

    @property
    def default_beam_size(self) -> int:
        return int(self.info["default_beam_size"])

    @property
    def max_beam_size(self) -> int:
        return int(self.info["max_beam_size"])

    def caption(self, images: Sequence[bytes], beam_size: int | None = None
                ) -> dict[str, np.ndarray]:
        """Encoded images (already checked, see `inference.prepare_image`) -> the outputs of
        the module docstring as numpy; strings as Python str."""
        import tensorflow as tf

        beam_size = self.default_beam_size if beam_size is None else beam_size
        if not 1 <= beam_size <= self.max_beam_size:
            raise DataError(f"beam_size must be in 1..{self.max_beam_size}, got {beam_size}")
        out = self._beam(images=tf.constant(list(images), tf.string),
                         beam_size=tf.constant(beam_size, tf.int32))
        result = {key: value.numpy() for key, value in out.items()}
        for key in ("caption", "captions", "tokens"):
            result[key] = np.vectorize(bytes.decode, otypes=[object])(result[key])
        return result


    def caption_pixels(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        """The `caption_pixels` signature (what the TFLite model computes) on [B, S, S, 3]."""
        import tensorflow as tf

        out = self._pixels(pixels=tf.constant(pixels, tf.float32))
        return {key: value.numpy() for key, value in out.items()}


# --- the self-check ---------------------------------------------------------------------------


def test_images(shards, count: int | None) -> tuple[list[int], list[bytes]]:
    """Image ids and JPEG bytes of the first `count` (None: all) test images, in file order:
    the bytes the in-process model's reader decodes."""
    import tensorflow as tf

    from caption_pipeline.tfrecords import parse_example

    ids, images = [], []
    for serialized in tf.data.TFRecordDataset(shards.files("test")).take(count or -1):
        record = parse_example(serialized)
        ids.append(int(record["image/id"]))
        images.append(record["image/encoded"].numpy())
    if not images:
        raise DataError(f"export self-check: {shards.root} has no test images")
    return ids, images


def check_against_model(exported: ExportedCaptioner, captioner, vocabulary, shards, decoding,
                        check: CheckSettings) -> dict[str, Any]:
    """The export and `decoding.decode_dataset` (the evaluation's path) on the same test
    images: every beam's caption must be equal. Returns the check's report."""
    import tensorflow as tf

    from caption_pipeline.decoding import decode_dataset
    from caption_pipeline.tfrecords import decode_jpeg_image

    ids, images = test_images(shards, check.max_images)
    size = captioner.config.image_size
    # The reader's pixels of the same JPEGs, batched as the evaluation batches them.
    batches = tf.data.Dataset.from_tensor_slices({"image": images, "image_id": ids}).map(
        lambda x: {**x, "image": decode_jpeg_image(x["image"], size)}).batch(check.batch_size)
    beam = exported.default_beam_size
    reference = {d.image_id: d.captions for d in decode_dataset(captioner, vocabulary, batches,
                                                                 decoding)}
    exported_captions = {}
    for start in range(0, len(images), check.batch_size):
        out = exported.caption(images[start:start + check.batch_size], beam)
        for image_id, beams in zip(ids[start:], out["captions"], strict=False):
            exported_captions[image_id] = [str(c) for c in beams]
    report = compare_captions(exported_captions, reference, "SavedModel vs in-process")
    logger.info("Export self-check: %d test images, every beam equal", report["images"])
    return {**report, "beam_size": beam, "method": decoding.method}


def check_tflite(model: bytes, exported: ExportedCaptioner, shards, count: int) -> dict[str, Any]:
    """The TFLite model and the SavedModel's `caption_pixels` on `count` test images: equal
    word ids, scores within 1e-3."""
    import tensorflow as tf

    from caption_pipeline.tfrecords import decode_jpeg_image

    if count < 1:
        return {"images": 0}
    ids, images = test_images(shards, count)
    size = int(exported.info["image_size"])
    pixels = np.stack([decode_jpeg_image(tf.constant(jpeg), size).numpy() for jpeg in images])
    lite = run_tflite(model, pixels)
    saved = exported.caption_pixels(pixels)
    differ = [image_id for b, image_id in enumerate(ids)
              if not np.array_equal(lite["ids"][b], saved["ids"][b])
              or not np.allclose(lite["scores"][b], saved["scores"][b], atol=1e-3)]
    if differ:
        raise DataError(f"export self-check (TFLite vs SavedModel): test images {differ} "
                        f"get other captions or scores")
    logger.info("TFLite self-check: %d test images, same captions as the SavedModel", len(ids))
    return {"images": len(ids), "equal": len(ids)}


def compare_captions(exported: Mapping[int, Sequence[str]], reference: Mapping[int, Sequence[str]],
                     what: str) -> dict[str, Any]:
    """Per image id, the beams of the export against the in-process ones. Raises a DataError
    naming the first images that differ."""
    missing = sorted(set(reference) - set(exported))
    differ = sorted(i for i in reference if i in exported
                    and list(exported[i]) != list(reference[i]))
    if missing or differ:
        examples = "; ".join(f"image {i}: exported {list(exported[i])[:1]} vs in-process "
                             f"{list(reference[i])[:1]}" for i in differ[:3])
        raise DataError(f"export self-check ({what}): {len(differ)} of {len(reference)} images "
                        f"differ, {len(missing)} missing. {examples}")
    return {"images": len(reference), "equal": len(reference)}
