"""Export: the trained Captioner as one TensorFlow SavedModel from encoded image bytes to
captions, its TFLite conversion, the self-check, and the loader the CLI and server use.

The SavedModel holds the whole path in one graph: the preprocessing training's images went
through (`image_graph`: EXIF orientation, alpha over white, 16-bit and CMYK to 8-bit RGB,
Pillow's box reduction + Lanczos resize, the shard set's JPEG round trip), the encoder, the
decoder and the search, with the vocabulary as a constant; serving needs TensorFlow and
nothing of this package, and no client has to preprocess anything. Signatures (B images,
K beams, L steps, an H x W grid of regions):

  serving_default(images: string [B])                        the default beam size
  caption_beam(images: string [B], beam_size: int32 [])       any beam size in 1..max_beam_size
  caption_pixels(pixels: float32 [B, S, S, 3])                decoded 0..255 pixels, default
                                                              beam size, no caption text
                                                              (what the TFLite model runs)
  encode_pixels(pixels: float32 [B, S, S, 3])                 the encoder alone: regions
                                                              float32 [B, R, D]
  preprocess_images(images: string [B])                       the preprocessing alone:
                                                              pixels float32 [B, S, S, 3]

  outputs  caption    string  [B]               the best caption
           captions   string  [B, K]            every beam's caption, best first
           scores     float32 [B, K]            what beams are ranked by (length-normalized)
           log_probs  float32 [B, K]            sum of the words' log-probabilities
           lengths    int32   [B, K]            generated tokens, <end> included
           tokens     string  [B, K, L]         each step's word ("<end>", then "")
           attention  float32 [B, K, L, H, W]   where each word looked; 0 after <end>

A beam size is a static shape of the search (the beams are folded into the batch), so
`caption_beam` holds one traced search per size and picks one with `tf.switch_case`.
`assets.extra/export.json` describes the export (image size, JPEG quality, pixel limit, grid,
beam sizes, vocabulary) for Python clients; the graph itself does not need it.

A bad image fails the byte signatures with an InvalidArgumentError naming the image and the
problem ("image 1 is not a JPEG, PNG, GIF or BMP image ...", "image 0 is a GIF with
transparency ...", "image 0 is 30000 x 30000 pixels, more than max_pixels 50000000 ..." read
from the header before anything is decoded, or the decoder's "Invalid JPEG data ...");
`ExportedCaptioner` raises it as a DataError.
The export self-check, what the export pipeline runs before anything is registered, is
`export_check.py`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from caption_pipeline.atomic import atomic_directory
from caption_pipeline.data.images import DEFAULT_MAX_PIXELS, JPEG_QUALITY
from caption_pipeline.errors import DataError
from caption_pipeline.params import from_params
from caption_pipeline.serving.image_graph import decode_images

logger = logging.getLogger(__name__)

FORMAT = "caption-pipeline/saved-model/v1"
INFO_FILE = "assets.extra/export.json"
BEAM_SIGNATURE = "caption_beam"
PIXELS_SIGNATURE = "caption_pixels"
ENCODER_SIGNATURE = "encode_pixels"
PREPROCESS_SIGNATURE = "preprocess_images"
DEFAULT_SIGNATURE = "serving_default"
# Outputs of the TFLite model (the `caption_pixels` signature), sorted by name.
TFLITE_OUTPUTS = ("attention", "ids", "lengths", "log_probs", "scores", "tokens")
OUTPUTS = ("caption", "captions", "scores", "log_probs", "lengths", "tokens", "attention")


@dataclass(frozen=True)
class CheckSettings:
    """The self-check: exported captions against the in-process model's."""

    max_images: int | None  # test images compared; null: all
    batch_size: int
    tflite_images: int  # images run through the TFLite interpreter too (0: skip)


@dataclass(frozen=True)
class ExportSettings:
    """`params:export`; see conf/base/parameters_export.yml."""

    max_beam_size: int
    max_pixels: int  # larger canvases are refused by the graph itself
    tflite: bool  # convert to TFLite too (conf/coco: off, a NASNetLarge model is no phone's)
    check: CheckSettings

    def __post_init__(self):
        if not isinstance(self.max_beam_size, int) or not 1 <= self.max_beam_size <= 16:
            raise DataError(
                f"parameters export.max_beam_size: expected 1..16, got {self.max_beam_size!r}"
            )
        if not isinstance(self.max_pixels, int) or self.max_pixels < 1:
            raise DataError(
                f"parameters export.max_pixels: expected a positive integer, "
                f"got {self.max_pixels!r}"
            )
        if not isinstance(self.tflite, bool):
            raise DataError(
                f"parameters export.tflite: expected true or false, got {self.tflite!r}"
            )

    @property
    def test_images_read(self) -> int | None:
        """How many test images the export reads (None: all): the self-check's, the TFLite
        check's when there is a TFLite model, and one, the MLflow model's input example."""
        if not self.check.max_images:  # null (or 0): every one
            return None
        return max(self.check.max_images, self.check.tflite_images if self.tflite else 0, 1)

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> ExportSettings:
        params = dict(params or {})
        params.pop("mlflow", None)  # checked and read by caption_pipeline.tracking.mlflow_model
        return from_params(cls, params, "export")


# --- building and saving the graph ------------------------------------------------------------


def region_grid(captioner) -> tuple[int, int]:
    """(H, W) of the encoder's region grid: R = H * W regions, row by row."""
    _, height, width, _ = captioner.encoder.get_layer("regions").input.shape
    return int(height), int(width)


def build_module(
    captioner,
    vocabulary,
    decoding,
    max_beam_size: int,
    jpeg_quality: int = JPEG_QUALITY,
    max_pixels: int = DEFAULT_MAX_PIXELS,
):
    """The `tf.Module` with the five signatures of the module docstring over `captioner` (a
    trained Captioner), and its export.json.

    vocabulary: a `text.Vocabulary`; decoding: the `decoding.DecodeSettings` whose method,
    alpha, max length and beam size (the default) the export keeps; jpeg_quality: the quality
    the image shards were written with (their manifest's params.jpeg_quality), repeated in
    the graph's JPEG round trip; max_pixels: the largest canvas the byte signatures decode
    (a direct client of the SavedModel has no Pillow in front of it to refuse a
    decompression bomb).
    """
    import tensorflow as tf

    from caption_pipeline.model.decoding import search

    default_beam = decoding.beam_size if decoding.method == "beam" else 1
    if not 1 <= default_beam <= max_beam_size:
        raise DataError(
            f"parameters: the default beam size {default_beam} is outside "
            f"export.max_beam_size 1..{max_beam_size}"
        )
    max_length = decoding.steps(vocabulary)
    size = captioner.config.image_size
    height, width = region_grid(captioner)

    class CaptionerExport(tf.Module):
        def __init__(self):
            super().__init__(name="captioner_export")
            self.captioner = captioner  # tracks every variable of the model
            # [V + 1]: id -> word, and "" at V for the steps after a beam's <end>.
            self.words = tf.constant([*vocabulary.tokens, ""])

        @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32)])
        def encode(self, pixels):
            """The encoder, traced once: every signature calls this one function, so that
            the SavedModel holds its graph once, not once per signature and beam size (8
            copies). With NASNetLarge: saved_model.pb 28 MB instead of 74, and a loaded
            export 1.7 GB instead of 2.4."""
            return captioner({"image": pixels})

        def search(self, pixels, beam_size: int) -> dict[str, tf.Tensor]:
            """pixels [B, S, S, 3] float32 0..255 -> the numeric outputs and `tokens`, with
            K = beam_size; only ops that TFLite has as builtins."""
            settings = dataclasses.replace(
                decoding, beam_size=beam_size, method="beam" if beam_size > 1 else decoding.method
            )
            found = search(captioner, self.encode(pixels), settings, max_length)
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
            special = tf.logical_or(
                tf.equal(ids, vocabulary.pad_id), tf.equal(ids, vocabulary.start_id)
            )
            word = tf.logical_and(tf.equal(ends, 0), tf.logical_not(special))
            spaced = tf.where(word, tf.strings.join([out["tokens"], " "]), "")
            captions = tf.strings.strip(tf.strings.reduce_join(spaced, axis=-1))  # [B, K]
            return {"caption": captions[:, 0], "captions": captions, **out}

        @tf.function(
            input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32, name="pixels")]
        )
        def caption_pixels(self, pixels):
            return self.search(pixels, default_beam)

        @tf.function(
            input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32, name="pixels")]
        )
        def encode_pixels(self, pixels):
            """The encoder alone: region features [B, R, D] (benchmarks, feature reuse)."""
            return {"regions": self.encode(pixels)}

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="images")])
        def preprocess_images(self, images):
            """What the byte signatures feed the model: pixels [B, S, S, 3] (checks, clients
            that batch pixels themselves)."""
            return {"pixels": decode_images(images, size, jpeg_quality, max_pixels)}

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="images")])
        def serving_default(self, images):
            pixels = decode_images(images, size, jpeg_quality, max_pixels)
            return self.outputs(pixels, default_beam)

        @tf.function(
            input_signature=[
                tf.TensorSpec([None], tf.string, name="images"),
                tf.TensorSpec([], tf.int32, name="beam_size"),
            ]
        )
        def caption_beam(self, images, beam_size):
            in_range = tf.logical_and(beam_size >= 1, beam_size <= max_beam_size)
            check = tf.debugging.Assert(
                in_range, ["beam_size must be in 1..", max_beam_size, "got", beam_size]
            )
            with tf.control_dependencies([check]):
                pixels = decode_images(images, size, jpeg_quality, max_pixels)
            branches = [lambda k=k: self.outputs(pixels, k) for k in range(1, max_beam_size + 1)]
            return tf.switch_case(beam_size - 1, branches)

    info = {
        "format": FORMAT,
        "image_size": size,
        "jpeg_quality": jpeg_quality,
        "max_pixels": max_pixels,
        "grid": [height, width],
        "max_length": max_length,
        "method": decoding.method,
        "alpha": decoding.alpha,
        "default_beam_size": default_beam,
        "max_beam_size": max_beam_size,
        "signatures": {
            DEFAULT_SIGNATURE: ["images"],
            BEAM_SIGNATURE: ["images", "beam_size"],
            PIXELS_SIGNATURE: ["pixels"],
            ENCODER_SIGNATURE: ["pixels"],
            PREPROCESS_SIGNATURE: ["images"],
        },
        "outputs": list(OUTPUTS),
        "vocabulary": vocabulary.to_dict(),
    }
    return ModelExport(CaptionerExport(), info)


@dataclass
class ModelExport:
    """What `build_module` makes and `save_export` writes."""

    module: Any  # the tf.Module whose tf.functions are the signatures
    info: dict[str, Any]  # assets.extra/export.json


def save_export(export: ModelExport, path: str | os.PathLike) -> Path:
    """Write the SavedModel and its export.json to `path` atomically (a temporary sibling
    folder, renamed when complete)."""
    import tensorflow as tf

    module = export.module
    signatures = {
        DEFAULT_SIGNATURE: module.serving_default.get_concrete_function(),
        BEAM_SIGNATURE: module.caption_beam.get_concrete_function(),
        PIXELS_SIGNATURE: module.caption_pixels.get_concrete_function(),
        ENCODER_SIGNATURE: module.encode_pixels.get_concrete_function(),
        PREPROCESS_SIGNATURE: module.preprocess_images.get_concrete_function(),
    }
    with atomic_directory(path) as tmp:
        tf.saved_model.save(module, str(tmp), signatures=signatures)
        (tmp / INFO_FILE).parent.mkdir(parents=True, exist_ok=True)
        (tmp / INFO_FILE).write_text(json.dumps(export.info, indent=1) + "\n")
    return Path(path)


def convert_tflite(saved_model: str | os.PathLike) -> bytes:
    """The `caption_pixels` signature as a TFLite flatbuffer of builtin ops only.

    The model takes pixels, not image bytes: image decoding needs TensorFlow's DecodeImage,
    a Flex op that the interpreter of the `tensorflow` pip package cannot run, and TFLite has
    none of the string ops, JPEG codec or data-dependent resize of `image_graph`. Before
    calling it, an app must do what `preprocess_images` does, in this order (S and Q are
    export.json's "image_size" and "jpeg_quality"):

      1. decode the image to 8-bit RGB: grey replicated to 3 channels; CMYK converted to RGB;
         16-bit grey scaled v * 255 / 65535 and rounded, 16-bit colour its high byte;
      2. turn it upright by its EXIF orientation tag (0x0112), as a viewer shows it;
      3. composite any transparency (alpha channel, palette or tRNS transparency) over opaque
         white: round((c * a + 255 * (255 - a)) / 255) per channel;
      4. resize to S x S, aspect ratio not kept, as Pillow's `resize((S, S), LANCZOS,
         reducing_gap=3)`: first the mean of fx x fy blocks, f = int(side / S / 3) or 1, then
         Lanczos-3 (antialiased: the kernel widened by the scale) rounded to 8 bits; a plain
         bilinear or GPU resize gives other pixels, and aliasing on big photos;
      5. encode as baseline JPEG at quality Q with 4:2:0 chroma (libjpeg's defaults) and
         decode it again (training saw JPEG artifacts) - unless the image already is an
         upright 3-channel S x S JPEG, which is decoded as it is;
      6. pass float32 [B, S, S, 3], RGB, 0..255 (not normalized: the model does that).

    It gets ids, scores, attention and each step's word; the vocabulary is inside. Skipping
    steps 4-5 (a bilinear resize, no round trip) costs a few grey levels per pixel and may
    change a caption; the SavedModel's byte signatures do all six.
    """
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2,
    )

    loaded = tf.saved_model.load(str(saved_model))
    # Weights as constants: the search's while loop would otherwise read them as resource
    # variables, which the interpreter leaves uninitialized.
    frozen = convert_variables_to_constants_v2(
        loaded.signatures[PIXELS_SIGNATURE], lower_control_flow=False
    )
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
        raise DataError(
            f"model {path}: no such folder (make one with `kedro run` or "
            f"`kedro run --pipelines=export`, or pass --model)"
        )
    if not (path / "saved_model.pb").is_file() or not info_file.is_file():
        raise DataError(
            f"model {path}: not a caption-pipeline export (needs saved_model.pb and {INFO_FILE})"
        )
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

    `lazy`: read export.json now, load the SavedModel at the first call that runs it. The
    export pipeline's nodes get the export this way (`datasets.SavedModelDataset`): a loaded
    COCO export takes 1.7 GB, and the nodes that need only its folder and export.json
    (registering it, no TFLite conversion) would each hold one more copy.
    """

    def __init__(self, path: str | os.PathLike, *, lazy: bool = False):
        self.path = Path(path)
        self.info = read_export_info(self.path)  # before importing TensorFlow (seconds)
        self._lock = threading.Lock()
        self._loaded = None
        if not lazy:
            self._signature(BEAM_SIGNATURE)

    def _signature(self, name: str):
        """The loaded SavedModel's signature `name`, loading the SavedModel at the first call;
        None for an optional one the export lacks (older exports), a DataError for a required
        one."""
        with self._lock:
            if self._loaded is None:
                import tensorflow as tf

                try:
                    self._loaded = tf.saved_model.load(str(self.path))
                except Exception as error:  # noqa: BLE001
                    raise DataError(f"model {self.path}: cannot be loaded ({error})") from None
        signature = self._loaded.signatures.get(name)
        if signature is None and name in (BEAM_SIGNATURE, PIXELS_SIGNATURE):
            raise DataError(f"model {self.path}: no {name} signature; export it again")
        return signature

    @property
    def default_beam_size(self) -> int:
        return int(self.info["default_beam_size"])

    @property
    def max_beam_size(self) -> int:
        return int(self.info["max_beam_size"])

    def caption(
        self, images: Sequence[bytes], beam_size: int | None = None
    ) -> dict[str, np.ndarray]:
        """Encoded images (already checked, see `inference.prepare_image`) -> the outputs of
        the module docstring as numpy; strings as Python str."""
        import tensorflow as tf

        beam_size = self.default_beam_size if beam_size is None else beam_size
        if not 1 <= beam_size <= self.max_beam_size:
            raise DataError(f"beam_size must be in 1..{self.max_beam_size}, got {beam_size}")
        with _image_errors():
            out = self._signature(BEAM_SIGNATURE)(
                images=tf.constant(list(images), tf.string),
                beam_size=tf.constant(beam_size, tf.int32),
            )
        result = {key: value.numpy() for key, value in out.items()}
        for key in ("caption", "captions", "tokens"):
            result[key] = np.vectorize(bytes.decode, otypes=[object])(result[key])
        return result

    def preprocess(self, images: Sequence[bytes]) -> np.ndarray:
        """The graph's preprocessing alone: encoded images -> pixels float32 [B, S, S, 3]."""
        import tensorflow as tf

        preprocess = self._signature(PREPROCESS_SIGNATURE)
        if preprocess is None:
            raise DataError(
                f"model {self.path}: exported before {PREPROCESS_SIGNATURE} "
                f"existed; export it again"
            )
        with _image_errors():
            return preprocess(images=tf.constant(list(images), tf.string))["pixels"].numpy()

    def caption_pixels(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        """The `caption_pixels` signature (what the TFLite model computes) on [B, S, S, 3]."""
        import tensorflow as tf

        out = self._signature(PIXELS_SIGNATURE)(pixels=tf.constant(pixels, tf.float32))
        return {key: value.numpy() for key, value in out.items()}


class RefusedImages(DataError):
    """The graph refused a batch for one of its images (its message may not say which):
    callers that must caption the others split the batch (`inference.caption_each`)."""


@contextlib.contextmanager
def _image_errors():
    """The graph's InvalidArgumentError for a bad image as a RefusedImages naming the problem:
    "images: image 1 is not a JPEG, PNG, GIF or BMP image ...", or the decoder's own words
    ("images: Invalid JPEG data, size 13")."""
    import tensorflow as tf

    try:
        yield
    except tf.errors.InvalidArgumentError as error:
        reason = _error_reason(str(error.message))
        raise RefusedImages(f"images: {reason}") from None


def _error_reason(message: str) -> str:
    """The line of a TensorFlow error message that says what is wrong, without the node,
    function and traceback decoration around it."""
    found = re.search(r"assertion failed: *(.*)", message)
    if found:
        # tf.debugging.Assert prints each part in brackets: "[image] [0] [is not ...]".
        return re.sub(r"\]\s*\[", " ", found.group(1)).strip("[] ")
    message = re.sub(r"\{\{[^}]*\}\}|\[\[.*?\]\]|\[Op:[^\]]*\]", "", message)
    lines = [
        line.strip()
        for line in message.splitlines()
        if line.strip()
        and not line.startswith((" ", "\t"))
        and not line.startswith(("Graph execution error", "Detected at node"))
    ]
    return lines[-1] if lines else "invalid image"
