"""The export self-check: what the export pipeline proves of a SavedModel before it is
registered, on the shards' test images.

- `check_against_model`: the export's captions equal the in-process model's (the evaluation's
  path, `decoding.decode_dataset`), beam for beam, on every test image's JPEG, which the
  in-process side preprocesses with training's own code (`python_pixels`): the graph takes
  no shortcut for a model-size JPEG, and neither does the oracle. The in-process side runs
  first (`in_process_captions`, its own node), so that one model at a time is in memory.
- `check_preprocessing`: Pillow-made off-size, EXIF-rotated, grey, CMYK, palette, alpha and
  16-bit versions of one test image (`preprocessing_cases`) go through the SavedModel and
  through the Python path (`python_pixels`: `images.decode_image` -> `images.encode_jpeg` ->
  the reader); the pixels must be equal (measured: bit-exact, see `image_graph`), and so must
  the captions.
- `check_tflite`: the TFLite model's captions equal the SavedModel's on a few test images.

They take the test images as `HeldOutImages`, read from the shard set once
(`read_held_out_images`): each load of a `ShardSet` verifies every shard's sha256 (COCO: 6 GB),
so the export pipeline loads it in one node and passes these on.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from caption_pipeline.data.shards.shard_set import ShardSet
from caption_pipeline.errors import DataError
from caption_pipeline.serving.export import CheckSettings, ExportedCaptioner, run_tflite

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class HeldOutImages:
    """What export reads of the image shards, read once (`read_held_out_images`): the first
    test images, ids and JPEG bytes in file order (the bytes the in-process model's reader
    decodes), and the JPEG quality the shard writer encoded them at (which the graph repeats)."""

    ids: tuple[int, ...]
    jpegs: tuple[bytes, ...]
    jpeg_quality: int


def read_held_out_images(shards: ShardSet, count: int | None) -> HeldOutImages:
    """The first `count` (None: all) test images of `shards` and its JPEG quality; a
    DataError if it has no test images."""
    import tensorflow as tf

    from caption_pipeline.data.shards.records import parse_example

    ids, images = [], []
    for serialized in tf.data.TFRecordDataset(shards.files("test")).take(count or -1):
        record = parse_example(serialized)
        ids.append(int(record["image/id"]))
        images.append(record["image/encoded"].numpy())
    if not images:
        raise DataError(f"export self-check: {shards.root} has no test images")
    return HeldOutImages(tuple(ids), tuple(images), int(shards.manifest["params"]["jpeg_quality"]))


def held_out_images(images: HeldOutImages, count: int | None) -> tuple[list[int], list[bytes]]:
    """Ids and JPEG bytes of the first `count` (None: all) of `images`."""
    return list(images.ids[: count or None]), list(images.jpegs[: count or None])


@dataclass(frozen=True)
class InProcessCaptions:
    """What the self-check compares the export with, computed by the in-process model before
    the export is loaded (`in_process_captions`): no node holds both models (with NASNetLarge,
    each takes over 1 GB, and its activations more). The Python path's image size and JPEG
    quality, which the export's must equal; every test image's beams; and the preprocessing
    cases of the first test image (`preprocessing_cases`), with their pixels and beams."""

    image_size: int
    jpeg_quality: int
    method: str
    test: Mapping[int, list[str]]  # test image id -> beams, best first
    cases: Mapping[str, bytes]  # case name -> encoded image
    case_pixels: np.ndarray  # float32 [cases, S, S, 3], the Python path's, in case order
    case_captions: tuple[list[str], ...]  # each case's beams, in case order


def in_process_captions(
    captioner, vocabulary, test_images: HeldOutImages, decoding, check: CheckSettings
) -> InProcessCaptions:
    """`decoding.decode_dataset` (the evaluation's path) on the check's test images and on
    the preprocessing cases of the first one, each preprocessed by training's own code
    (`python_pixels`): the graph takes no shortcut for a model-size JPEG, and neither does
    the oracle."""
    import tensorflow as tf
    from PIL import Image

    ids, images = held_out_images(test_images, check.max_images)
    size = captioner.config.image_size
    quality = test_images.jpeg_quality  # the export's too (`build_module`)

    def training_pixels():  # one image at a time: COCO's test set would not fit as pixels
        for image_id, jpeg in zip(ids, images, strict=True):
            pixels = python_pixels(jpeg, size, quality, f"test image {image_id}")
            yield {"image": pixels, "image_id": image_id}

    # The same JPEG bytes as training's code would see them as source files, batched as the
    # evaluation batches them.
    batches = tf.data.Dataset.from_generator(
        training_pixels,
        output_signature={
            "image": tf.TensorSpec([size, size, 3], tf.float32),
            "image_id": tf.TensorSpec([], tf.int64),
        },
    ).batch(check.batch_size)
    cases = preprocessing_cases(Image.open(io.BytesIO(images[0])), size)
    pixels = np.stack([python_pixels(data, size, quality, name) for name, data in cases.items()])
    case_batches = tf.data.Dataset.from_tensor_slices(
        {"image": pixels, "image_id": np.arange(len(cases))}
    ).batch(len(cases))
    return InProcessCaptions(
        size,
        quality,
        decoding.method,
        _beams(captioner, vocabulary, batches, decoding),
        cases,
        pixels,
        tuple(_beams(captioner, vocabulary, case_batches, decoding).values()),
    )


def _beams(captioner, vocabulary, batches, decoding) -> dict[int, list[str]]:
    """image id -> the in-process model's beams, by `decoding.decode_dataset`."""
    from caption_pipeline.model.decoding import decode_dataset

    return {
        d.image_id: d.captions for d in decode_dataset(captioner, vocabulary, batches, decoding)
    }


def check_against_model(
    exported: ExportedCaptioner,
    expected: InProcessCaptions,
    test_images: HeldOutImages,
    check: CheckSettings,
) -> dict[str, Any]:
    """The export's captions of the test images against the in-process model's (`expected`):
    every beam's caption must be equal; then `check_preprocessing`. Returns the check's
    report."""
    found = {key: exported.info.get(key) for key in ("image_size", "jpeg_quality")}
    wanted = {"image_size": expected.image_size, "jpeg_quality": expected.jpeg_quality}
    if found != wanted:
        raise DataError(
            f"export self-check: the export's preprocessing {found} is not the in-process "
            f"model's {wanted}"
        )
    ids, images = held_out_images(test_images, check.max_images)
    beam = exported.default_beam_size
    exported_captions = {}
    for start in range(0, len(images), check.batch_size):
        out = exported.caption(images[start : start + check.batch_size], beam)
        for image_id, beams in zip(ids[start:], out["captions"], strict=False):
            exported_captions[image_id] = [str(c) for c in beams]
    report = compare_captions(exported_captions, expected.test, "SavedModel vs in-process")
    logger.info("Export self-check: %d test images, every beam equal", report["images"])
    preprocessing = check_preprocessing(exported, expected)
    return {**report, "beam_size": beam, "method": expected.method, "preprocessing": preprocessing}


# Largest difference in grey levels allowed between the graph's preprocessing and the Python
# path's. 0: `image_graph` repeats Pillow's integer arithmetic and libjpeg's defaults
# bit-exactly (measured 0 on every case of `preprocessing_cases`); a difference means the
# two paths have drifted (a Pillow or TensorFlow upgrade), to be looked at, not tolerated.
PIXEL_TOLERANCE = 0


def python_pixels(data: bytes, size: int, jpeg_quality: int, name: str = "<bytes>") -> np.ndarray:
    """float32 [S, S, 3]: the pixels training would have seen of this image as a source
    file, by training's own code: `images.decode_image` (as ingestion), `images.encode_jpeg`
    (as the shard writer, which re-encodes every image, model-size JPEGs too),
    `shards.records.decode_jpeg_image` (as the reader)."""
    import tensorflow as tf

    from caption_pipeline.data.images import decode_image, encode_jpeg
    from caption_pipeline.data.shards.records import decode_jpeg_image

    jpeg = encode_jpeg(decode_image(data, name=name).image, size, quality=jpeg_quality)
    return decode_jpeg_image(tf.constant(jpeg), size).numpy()


def preprocessing_cases(image, size: int) -> dict[str, bytes]:
    """Encoded variants of a Pillow image for the preprocessing check, made with Pillow:
    every case the graph handles apart from plain S x S JPEG (which the caption check covers)."""
    from PIL import Image

    rgb = image.convert("RGB")
    off = rgb.resize((3 * size + 7, 2 * size + 1), Image.Resampling.BICUBIC)  # Lanczos only
    large = rgb.resize((7 * size + 3, 4 * size), Image.Resampling.BICUBIC)  # box reduce first
    alpha = off.convert("RGBA")
    ramp = np.linspace(0, 255, off.size[0]).astype(np.uint8)  # transparent at the left
    alpha.putalpha(Image.fromarray(np.tile(ramp, (off.size[1], 1))))
    grey16 = (np.asarray(off.convert("L"), np.uint16) * 257).astype(np.uint16)

    def encode(img, fmt: str, **options) -> bytes:
        buffer = io.BytesIO()
        img.save(buffer, format=fmt, **options)
        return buffer.getvalue()

    def exif(orientation: int) -> bytes:
        tags = Image.Exif()
        tags[0x0112] = orientation
        return tags.tobytes()

    return {
        "off_size_jpeg": encode(off, "JPEG", quality=95),
        "large_jpeg": encode(large, "JPEG", quality=95),
        "exif_rotated_jpeg": encode(
            off.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=95, exif=exif(6)
        ),
        "exif_rotated_png": encode(off.transpose(Image.Transpose.ROTATE_270), "PNG", exif=exif(8)),
        "model_size_png": encode(rgb.resize((size, size)), "PNG"),
        "grey_jpeg": encode(off.convert("L"), "JPEG", quality=95),
        "grey_png": encode(off.convert("L"), "PNG"),
        "cmyk_jpeg": encode(off.convert("CMYK"), "JPEG", quality=95),
        "alpha_png": encode(alpha, "PNG"),
        "palette_transparency_png": encode(off.convert("P"), "PNG", transparency=0),
        "grey_16_bit_png": encode(Image.fromarray(grey16), "PNG"),
    }


def check_preprocessing(exported: ExportedCaptioner, expected: InProcessCaptions) -> dict[str, Any]:
    """The graph's preprocessing against the Python path (`python_pixels`) on the
    `preprocessing_cases` of `expected`: pixels within PIXEL_TOLERANCE and every beam's
    caption equal. Returns the per-case pixel differences; a DataError names the cases that
    differ."""
    names, data = list(expected.cases), list(expected.cases.values())
    pixels = exported.preprocess(data)
    difference = np.abs(pixels - expected.case_pixels).reshape(len(names), -1)
    differences = {
        name: {"max": float(difference[i].max()), "mean": round(float(difference[i].mean()), 4)}
        for i, name in enumerate(names)
    }
    over = {name: d["max"] for name, d in differences.items() if d["max"] > PIXEL_TOLERANCE}
    if over:
        raise DataError(
            f"export self-check (preprocessing): the graph's pixels differ from "
            f"the Python path's by more than {PIXEL_TOLERANCE} levels: {over}"
        )
    out = exported.caption(data, exported.default_beam_size)
    found = {i: [str(c) for c in beams] for i, beams in enumerate(out["captions"])}
    try:
        compare_captions(
            found,
            dict(enumerate(expected.case_captions)),
            "preprocessing, SavedModel vs Python path",
        )
    except DataError as error:
        raise DataError(f"{error} (cases by image number: {names})") from None
    logger.info(
        "Export self-check: %d preprocessing cases, pixels within %d, every beam equal",
        len(names),
        PIXEL_TOLERANCE,
    )
    return {
        "cases": differences,
        "images": len(names),
        "equal": len(names),
        "pixel_tolerance": PIXEL_TOLERANCE,
    }


def check_tflite(
    model: bytes, exported: ExportedCaptioner, test_images: HeldOutImages, count: int
) -> dict[str, Any]:
    """The TFLite model and the SavedModel's `caption_pixels` on `count` test images: equal
    word ids, scores within 1e-3."""
    import tensorflow as tf

    from caption_pipeline.data.shards.records import decode_jpeg_image

    if count < 1:
        return {"images": 0}
    ids, images = held_out_images(test_images, count)
    size = int(exported.info["image_size"])
    pixels = np.stack([decode_jpeg_image(tf.constant(jpeg), size).numpy() for jpeg in images])
    lite = run_tflite(model, pixels)
    saved = exported.caption_pixels(pixels)
    differ = [
        image_id
        for b, image_id in enumerate(ids)
        if not np.array_equal(lite["ids"][b], saved["ids"][b])
        or not np.allclose(lite["scores"][b], saved["scores"][b], atol=1e-3)
    ]
    if differ:
        raise DataError(
            f"export self-check (TFLite vs SavedModel): test images {differ} "
            f"get other captions or scores"
        )
    logger.info("TFLite self-check: %d test images, same captions as the SavedModel", len(ids))
    return {"images": len(ids), "equal": len(ids)}


def compare_captions(
    exported: Mapping[int, Sequence[str]], reference: Mapping[int, Sequence[str]], what: str
) -> dict[str, Any]:
    """Per image id, the beams of the export against the in-process ones. Raises a DataError
    naming the first images that differ."""
    missing = sorted(set(reference) - set(exported))
    differ = sorted(
        i for i in reference if i in exported and list(exported[i]) != list(reference[i])
    )
    if missing or differ:
        examples = "; ".join(
            f"image {i}: exported {list(exported[i])[:1]} vs in-process {list(reference[i])[:1]}"
            for i in differ[:3]
        )
        raise DataError(
            f"export self-check ({what}): {len(differ)} of {len(reference)} images "
            f"differ, {len(missing)} missing. {examples}"
        )
    return {"images": len(reference), "equal": len(reference)}
