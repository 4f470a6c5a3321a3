"""Image decoding shared by ingestion, sharding, the CLI and the server.

Every image goes through `decode_image`: decoded by content (a PNG named `.jpg` is fine),
EXIF orientation applied, any Pillow mode turned into 8-bit RGB, and bad data refused with
an `ImageError` whose `reason` is a short code the ingestion report counts by.
"""

from __future__ import annotations

import io
import multiprocessing
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from caption_pipeline.errors import DataError

# Larger images are refused: a small file can claim a huge canvas (decompression bomb).
DEFAULT_MAX_PIXELS = 50_000_000

# Reason codes of ImageError, as counted in the ingestion report.
REASONS = (
    "missing",
    "unreadable",
    "empty",
    "truncated",
    "corrupt",
    "not_an_image",
    "too_large",
    "unsupported_mode",
)

# First bytes of the formats a camera or dataset plausibly holds: data that starts like an
# image but does not open is a damaged image, not some other kind of file.
_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF8", b"BM", b"RIFF", b"II*\x00", b"MM\x00*")

# EXIF orientation tag value -> the transpose that shows the image upright.
_ORIENTATION_TAG = 0x0112
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
# Resizes for the shards box-reduce by int(ratio / REDUCING_GAP) first, then apply Lanczos:
# fast for big downscales, and by Pillow's documentation indistinguishable from Lanczos alone
# in most cases at a gap of 3. image_graph.pillow_resize repeats it in the exported graph.
REDUCING_GAP = 3.0
JPEG_QUALITY = 90  # shard images' default (parameters shard.jpeg_quality)


class ImageError(DataError):
    """An image that cannot be used; `reason` is one of REASONS, `source` names the file."""

    def __init__(self, reason: str, source: str, detail: str = "") -> None:
        self.reason = reason
        self.source = source
        self.detail = detail
        super().__init__(f"{source}: {reason}" + (f" ({detail})" if detail else ""))

    def __reduce__(self):  # picklable, so it can cross from a worker process
        return type(self), (self.reason, self.source, self.detail)


@dataclass(frozen=True)
class DecodedImage:
    """An upright 8-bit RGB image and what it was stored as."""

    image: Image.Image
    format: str  # content format as Pillow names it: "JPEG", "PNG", ...
    mode: str  # Pillow mode it was stored in: "RGB", "CMYK", "L", "I;16", ...
    orientation: int  # EXIF orientation applied (1 = none)


def decode_image(
    source: str | os.PathLike | bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    name: str | None = None,
) -> DecodedImage:
    """Fully decode an image file or its bytes; raise ImageError when it is unusable."""
    label = name or ("<bytes>" if isinstance(source, bytes) else str(source))
    data = source if isinstance(source, bytes) else _read(source, label)
    if not data:
        raise ImageError("empty", label, "0 bytes")
    image = _open(data, label, max_pixels)
    try:
        image.load()
    except Exception as exc:  # decoders raise many types; all mean "bad data"
        raise _decode_error(exc, data, label) from None
    try:
        rgb = to_rgb(image)
    except (ValueError, OSError) as exc:  # modes Pillow cannot convert, e.g. LAB
        raise ImageError("unsupported_mode", label, f"{image.mode}: {exc}") from None
    orientation = _orientation(image)  # after load: PNG keeps EXIF after the pixels
    if orientation in _UPRIGHT:
        rgb = rgb.transpose(_UPRIGHT[orientation])
    return DecodedImage(rgb, image.format or "", image.mode, orientation)


def load_rgb_image(
    source: str | os.PathLike | bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    name: str | None = None,
) -> Image.Image:
    """The upright 8-bit RGB image in a file or bytes; ImageError when unusable."""
    return decode_image(source, max_pixels=max_pixels, name=name).image


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode as 8-bit RGB: high bit depths scaled (not clipped), alpha over white."""
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES or image.mode in ("I", "F"):
        gray = _scale_to_uint8(np.asarray(image), image.mode)
        return Image.fromarray(gray, "L").convert("RGB")
    if image.has_transparency_data:
        # Transparent pixels hold arbitrary colours (often black): show them as a viewer would.
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def encode_jpeg(image: Image.Image, size: int | None, quality: int = JPEG_QUALITY) -> bytes:
    """JPEG bytes of `image` as RGB, resized to size x size (None keeps its size)."""
    if size is not None and size < 1:
        raise ValueError(f"encode_jpeg: size must be a positive integer or None, got {size}")
    if not 1 <= quality <= 100:
        raise ValueError(f"encode_jpeg: quality must be in 1..100, got {quality}")
    rgb = to_rgb(image)
    if size is not None and rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.LANCZOS, reducing_gap=REDUCING_GAP)
    buffer = io.BytesIO()
    rgb.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


@dataclass(frozen=True)
class ImageCheck:
    """Outcome of fully decoding one image file; small and picklable for process pools."""

    path: str
    width: int = 0  # after EXIF orientation
    height: int = 0
    format: str = ""
    mode: str = ""
    orientation: int = 1
    reason: str | None = None  # ImageError reason, None when the image is usable
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.reason is None

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height


def check_image(path: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageCheck:
    """Decode one image file fully; bad data is returned as a reason, never raised."""
    try:
        decoded = decode_image(path, max_pixels=max_pixels)
    except ImageError as err:
        return ImageCheck(path, reason=err.reason, detail=err.detail)
    width, height = decoded.image.size
    return ImageCheck(path, width, height, decoded.format, decoded.mode, decoded.orientation)


def check_images(
    paths: Sequence[str],
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    workers: int | None = None,
    chunk_size: int = 64,
    desc: str = "decode images",
) -> list[ImageCheck]:
    """check_image over many files, in order, on a process pool with a progress bar.

    Workers are started with "forkserver" (or "spawn"), never forked from this process,
    which may hold TensorFlow's threads; they import only this module's dependencies.
    """
    workers = available_cpus() if workers is None else workers
    if workers < 1 or chunk_size < 1:
        raise ValueError(f"check_images: workers {workers}, chunk_size {chunk_size}: need >= 1")
    # A pool costs about a second to start: not worth it for one chunk of work.
    workers = min(workers, -(-len(paths) // chunk_size))
    with tqdm(total=len(paths), desc=desc, unit="img") as progress:
        if workers <= 1:
            results = []
            for path in paths:
                results.append(check_image(path, max_pixels))
                progress.update()
            return results
        pool = ProcessPoolExecutor(workers, mp_context=_pool_context())
        try:
            results = []
            for check in pool.map(check_image, paths, repeat(max_pixels), chunksize=chunk_size):
                results.append(check)
                progress.update()
            return results
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def available_cpus() -> int:
    """CPU cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _pool_context() -> multiprocessing.context.BaseContext:
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")


def _read(path: str | os.PathLike, label: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise ImageError("missing", label, "no such file") from None
    except OSError as exc:  # a folder, no permission, an I/O error
        raise ImageError("unreadable", label, exc.strerror or type(exc).__name__) from None


def _open(data: bytes, label: str, max_pixels: int) -> Image.Image:
    """Open lazily (header only) and refuse oversized canvases before decoding pixels."""
    try:
        with warnings.catch_warnings():
            # Pillow's own limit only warns below twice its size; ours is checked below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageError("too_large", label, str(exc)) from None
    except Image.UnidentifiedImageError:
        if data.startswith(_MAGIC):
            raise ImageError("corrupt", label, "image header cannot be read") from None
        raise ImageError("not_an_image", label, f"content starts with {data[:8]!r}") from None
    except Exception as exc:
        raise _decode_error(exc, data, label) from None
    width, height = image.size
    if width * height > max_pixels:
        raise ImageError("too_large", label, f"{width}x{height} pixels, limit {max_pixels}")
    return image


def _orientation(image: Image.Image) -> int:
    """EXIF orientation, 1 when absent or unreadable (a broken EXIF block is not a broken image)."""
    try:
        return int(image.getexif().get(_ORIENTATION_TAG, 1))
    except Exception:
        return 1


def _decode_error(exc: Exception, data: bytes, label: str) -> ImageError:
    message = str(exc) or type(exc).__name__
    if "truncated" in message.lower() or isinstance(exc, EOFError):
        return ImageError("truncated", label, f"{message}; file is {len(data)} bytes")
    return ImageError("corrupt", label, message)


def _scale_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """Gray levels of a 16-bit, 32-bit integer or float image mapped onto 0..255."""
    values = np.nan_to_num(values.astype(np.float64))
    if mode in _SIXTEEN_BIT_MODES:
        low, high = 0.0, 65535.0
    elif mode == "I" and values.min() >= 0 and values.max() <= 65535:
        low, high = 0.0, 65535.0  # "I" images come from 16-bit files
    elif mode == "F" and values.min() >= 0 and values.max() <= 1:
        low, high = 0.0, 1.0  # float images are conventionally 0..1
    else:
        low, high = float(values.min()), float(values.max())
    scaled = (values - low) * (255.0 / max(high - low, 1e-12))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
