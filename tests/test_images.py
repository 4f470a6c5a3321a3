"""caption_pipeline.data.images: decoding by content, orientation, modes, refusals, JPEG
encoding."""

from __future__ import annotations

import io
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from caption_pipeline.data.images import (
    ImageError,
    check_image,
    check_images,
    decode_image,
    encode_jpeg,
    load_rgb_image,
)
from caption_pipeline.errors import DataError

RED, BLUE = (220, 20, 20), (20, 20, 220)


def jpeg_bytes(image: Image.Image, **save_args) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95, **save_args)
    return buffer.getvalue()


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def red_left_blue_right(width: int = 40, height: int = 20) -> Image.Image:
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, : width // 2] = RED
    pixels[:, width // 2 :] = BLUE
    return Image.fromarray(pixels)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height 8-bit RGB pixels but holds almost no data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def close_to(pixel, expected, tolerance: int = 6) -> bool:
    return all(abs(int(a) - int(b)) <= tolerance for a, b in zip(pixel, expected, strict=True))


def test_exif_rotation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: shown turned 90 degrees clockwise
    path = tmp_path / "rotated.jpg"
    path.write_bytes(jpeg_bytes(red_left_blue_right(40, 20), exif=exif))

    decoded = decode_image(path)

    assert decoded.orientation == 6
    assert decoded.image.size == (20, 40)
    # The stored left (red) edge is the top after a clockwise turn.
    assert close_to(decoded.image.getpixel((10, 2)), RED, 30)
    assert close_to(decoded.image.getpixel((10, 37)), BLUE, 30)
    assert check_image(str(path)).size == (20, 40)


@pytest.mark.parametrize(
    ("image", "stored_as", "expected"),
    [
        (Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "CMYK", (255, 0, 0)),
        (Image.new("L", (16, 16), 128), "L", (128, 128, 128)),
        (Image.new("1", (16, 16), 1), "L", (255, 255, 255)),  # JPEG keeps bilevel as gray
    ],
    ids=["cmyk", "grayscale", "bilevel"],
)
def test_jpeg_modes_become_rgb(image, stored_as, expected):
    decoded = decode_image(jpeg_bytes(image))
    assert (decoded.format, decoded.mode, decoded.image.mode) == ("JPEG", stored_as, "RGB")
    assert close_to(decoded.image.getpixel((8, 8)), expected)


def test_sixteen_bit_png_behind_jpg_name_is_scaled_not_clipped(tmp_path):
    levels = np.array([[0, 257 * 100, 30000, 65535]], np.uint16)
    path = tmp_path / "deep.jpg"
    path.write_bytes(png_bytes(Image.fromarray(levels)))

    decoded = decode_image(path)

    assert (decoded.format, decoded.mode) == ("PNG", "I;16")
    assert decoded.image.mode == "RGB"
    red = np.asarray(decoded.image)[0, :, 0]
    assert red.tolist() == [0, 100, round(30000 / 257), 255]


def test_int32_and_float_images_are_scaled(tmp_path):
    ints = Image.fromarray(np.array([[0, 32896, 65535]], np.int32))
    floats = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32))
    for name, image in (("ints.tif", ints), ("floats.tif", floats)):
        image.save(tmp_path / name)
        gray = np.asarray(load_rgb_image(tmp_path / name))[0, :, 0]
        assert gray.tolist() == [0, 128, 255], name


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        (Image.new("RGBA", (8, 8), (255, 0, 0, 0)), (255, 255, 255)),  # transparent: white
        (Image.new("RGBA", (8, 8), (255, 0, 0, 255)), (255, 0, 0)),
        (Image.new("LA", (8, 8), (0, 128)), (127, 127, 127)),  # half-transparent black
    ],
    ids=["transparent", "opaque", "gray-alpha"],
)
def test_alpha_is_composited_over_white(image, expected):
    rgb = load_rgb_image(png_bytes(image))
    assert close_to(rgb.getpixel((4, 4)), expected, 1)


def test_palette_png_decodes_by_content():
    palette = Image.new("RGB", (8, 8), BLUE).convert("P", palette=Image.Palette.ADAPTIVE)
    decoded = decode_image(png_bytes(palette), name="palette.jpg")
    assert (decoded.format, decoded.mode) == ("PNG", "P")
    assert close_to(decoded.image.getpixel((0, 0)), BLUE, 1)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "empty"),
        (b"this is a caption, not an image\n", "not_an_image"),
        ("half", "truncated"),
        ("no-end-marker", "truncated"),
        ("header-only", "truncated"),
    ],
)
def test_bad_files_raise_image_error_with_reason_and_name(tmp_path, content, reason):
    whole = jpeg_bytes(red_left_blue_right(64, 64))
    cut = {"half": len(whole) // 2, "no-end-marker": len(whole) - 2, "header-only": 30}
    path = tmp_path / "000000000042.jpg"
    path.write_bytes(whole[: cut[content]] if isinstance(content, str) else content)

    with pytest.raises(ImageError) as info:
        load_rgb_image(path)

    assert info.value.reason == reason
    assert "000000000042.jpg" in str(info.value)
    assert isinstance(info.value, DataError)
    assert check_image(str(path)).reason == reason


def test_damaged_pixel_data_is_corrupt():
    data = bytearray(png_bytes(Image.new("RGB", (16, 16), RED)))
    data[data.index(b"IDAT") + 6] ^= 0xFF  # flip bits inside the compressed pixels
    with pytest.raises(ImageError, match="^damaged.png: corrupt") as info:
        load_rgb_image(bytes(data), name="damaged.png")
    assert info.value.reason == "corrupt"


def test_image_error_survives_pickling_across_processes():
    error = pickle.loads(pickle.dumps(ImageError("truncated", "a.jpg", "cut")))
    assert (error.reason, error.source, error.detail, str(error)) == (
        "truncated",
        "a.jpg",
        "cut",
        "a.jpg: truncated (cut)",
    )


def test_missing_and_unreadable_paths(tmp_path):
    with pytest.raises(ImageError, match="nowhere.jpg: missing") as info:
        load_rgb_image(tmp_path / "nowhere.jpg")
    assert info.value.reason == "missing"
    (tmp_path / "folder.jpg").mkdir()
    assert check_image(str(tmp_path / "folder.jpg")).reason == "unreadable"


def test_decompression_bomb_is_refused_before_decoding():
    # 8000 x 8000 = 64 Mpx: over our 50 Mpx default, under Pillow's own limit.
    with pytest.raises(ImageError) as info:
        load_rgb_image(png_header_only(8000, 8000), name="bomb.png")
    assert (info.value.reason, info.value.source) == ("too_large", "bomb.png")
    assert "8000x8000" in str(info.value)
    # 60000 x 60000 is refused by Pillow's own check, reported the same way.
    with pytest.raises(ImageError) as info:
        load_rgb_image(png_header_only(60000, 60000))
    assert info.value.reason == "too_large"


def test_max_pixels_is_a_parameter():
    small = jpeg_bytes(Image.new("RGB", (20, 10)))
    assert load_rgb_image(small, max_pixels=200).size == (20, 10)
    with pytest.raises(ImageError, match="too_large"):
        load_rgb_image(small, max_pixels=199)


def test_encode_jpeg_resizes_to_a_square_rgb_jpeg():
    image = Image.new("CMYK", (300, 200), (0, 255, 255, 0))

    data = encode_jpeg(image, 64)

    decoded = Image.open(io.BytesIO(data))
    assert (decoded.format, decoded.mode, decoded.size) == ("JPEG", "RGB", (64, 64))
    assert close_to(np.asarray(decoded).reshape(-1, 3).mean(axis=0), (255, 0, 0), 8)
    assert Image.open(io.BytesIO(encode_jpeg(image, None))).size == (300, 200)
    with pytest.raises(ValueError, match="size"):
        encode_jpeg(image, 0)


def test_check_images_on_a_process_pool_matches_one_process(tmp_path):
    paths = []
    for i in range(6):
        path = tmp_path / f"{i}.jpg"
        path.write_bytes(jpeg_bytes(Image.new("RGB", (10 + i, 8), RED)))
        paths.append(str(path))
    Path(paths[3]).write_bytes(b"")

    pooled = check_images(paths, workers=2, chunk_size=2)

    assert pooled == check_images(paths, workers=1)
    assert [c.path for c in pooled] == paths
    assert [c.reason for c in pooled] == [None, None, None, "empty", None, None]
    assert pooled[5].size == (15, 8)
