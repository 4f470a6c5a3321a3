"""Training's image preprocessing as TensorFlow ops, for the exported graph.

Training images went through `images.decode_image` (EXIF orientation, alpha over white,
16-bit grey scaled, any mode to 8-bit RGB) and `images.encode_jpeg` (Pillow's Lanczos resize
to S x S after an integer box reduction, `images.REDUCING_GAP`, then JPEG at the shard set's
quality), and the reader decoded that JPEG. `decode_images` does the same inside the graph, so
a client of the SavedModel (TF Serving, another language) needs no Pillow:

  1. format by magic bytes; anything but JPEG, PNG, GIF or BMP is refused by name, and so is
     a GIF with transparency (TensorFlow's GIF decoder does not say which pixels it covers);
     a canvas of more than `max_pixels` (its width and height read from the header, before
     anything is decoded: a small file can claim a huge canvas) is refused, as
     `images.decode_image` refuses it;
  2. EXIF orientation from the JPEG APP1 "Exif" segment or the PNG eXIf chunk, walked with
     string ops (`jpeg_orientation`, `png_orientation`, `tiff_orientation`), applied as
     Pillow's transposes (`transpose_upright`);
  3. JPEG decoded with libjpeg's accurate integer DCT, as Pillow decodes (TensorFlow's
     default fast DCT is up to 15 levels off); CMYK and grey JPEG converted by libjpeg as
     Pillow converts them; PNG decoded with alpha (tRNS included) and composited over white
     with Pillow's integer formula (`over_white`); 16-bit PNG decoded as 16 bits and reduced
     as Pillow does (grey: scaled 0..65535 -> 0..255 and rounded, as `images.to_rgb`;
     colour: the high byte, as Pillow's ";16B" unpackers);
  4. resized to S x S as Pillow does (`pillow_resize`): `Image.reduce` by
     int(side / S / REDUCING_GAP) with Pillow's fixed-point division (`box_reduce`), then
     Lanczos-3 with Pillow's 22-bit integer coefficients and rounding, columns first;
  5. the JPEG round trip at the shard set's quality (libjpeg with Pillow's defaults: 4:2:0,
     baseline, islow DCT), decoded as the reader decodes. Every image takes it, an upright
     S x S JPEG (a shard image, or one like it) too: the shard writer re-encodes every source
     image, whatever its size, so a model-size JPEG sent here is treated as training would
     have treated it as a source file.

Each step repeats the integer arithmetic of the code it mirrors rather than approximating it
in float, so the result is bit-exact: measured against the Python path (`decode_image` ->
`encode_jpeg` -> `shards.records.decode_jpeg_image`, see `export_check.python_pixels`), 0 grey
levels apart on every case of tests/test_export.py and of the export self-check (all 8 EXIF
orientations in JPEG and PNG, RGBA, LA, palette + tRNS, grey, CMYK, 16-bit grey / RGB / RGBA,
GIF, BMP, off-size, box-reduced 7x, model-size PNG and JPEG). Floats are float64 where a sum
of integer products must stay exact (below 2**53).
"""

from __future__ import annotations

import numpy as np

from caption_pipeline.data.images import DEFAULT_MAX_PIXELS, JPEG_QUALITY, REDUCING_GAP

# Pillow's resampling precision: coefficients are integers scaled by 2**22.
_PRECISION_BITS = 32 - 8 - 2
_JPEG = b"\xff\xd8\xff"
_PNG = b"\x89PNG\r\n\x1a\n"
_ORIENTATION_TAG = 0x0112
LANCZOS_SUPPORT = 3.0  # Pillow's Lanczos kernel: sinc(x) sinc(x / 3) for |x| < 3


def decode_images(
    images, size: int, jpeg_quality: int = JPEG_QUALITY, max_pixels: int = DEFAULT_MAX_PIXELS
):
    """Encoded images string [B] -> float32 [B, S, S, 3] in 0..255, as training saw them.

    jpeg_quality: the shard set's JPEG quality; max_pixels: the largest canvas decoded. A bad
    image fails the whole call with InvalidArgumentError "image i ...".
    """
    import tensorflow as tf

    def one(args):
        index, data = args
        return preprocess(data, index, size, jpeg_quality, max_pixels)

    indices = tf.range(tf.shape(images)[0])
    return tf.map_fn(
        one, (indices, images), fn_output_signature=tf.TensorSpec([size, size, 3], tf.float32)
    )


def preprocess(data, index, size: int, jpeg_quality: int, max_pixels: int = DEFAULT_MAX_PIXELS):
    """One encoded image string [] -> float32 [S, S, 3]; see the module docstring."""
    import tensorflow as tf

    head = tf.strings.substr(data, 0, 8)
    is_jpeg = tf.equal(tf.strings.substr(data, 0, 3), _JPEG)
    is_png = tf.equal(head, _PNG)
    is_gif = tf.equal(tf.strings.substr(data, 0, 4), b"GIF8")
    known = tf.reduce_any(
        tf.stack([is_jpeg, is_png, is_gif, tf.equal(tf.strings.substr(data, 0, 2), b"BM")])
    )
    format_check = tf.debugging.Assert(
        known,
        [
            "image",
            index,
            "is not a JPEG, PNG, GIF or BMP image (convert WebP, TIFF, HEIC ... "
            # As numbers: raw bytes in an error message would not decode as UTF-8.
            "first); its first bytes are",
            _reader(data)[0](0, 8),
        ],
        summarize=8,
    )
    # TensorFlow's GIF decoder does not say which pixels are transparent, so they cannot be
    # put over white as images.to_rgb does: refused rather than captioned on arbitrary colours.
    transparent_gif = tf.cond(is_gif, lambda: gif_transparency(data), lambda: False)
    gif_check = tf.debugging.Assert(
        tf.logical_not(transparent_gif),
        [
            "image",
            index,
            "is a GIF with transparency, which the graph cannot composite over "
            "white: convert it to PNG first",
        ],
    )
    with tf.control_dependencies([format_check, gif_check]):
        orientation = tf.case(
            [(is_jpeg, lambda: jpeg_orientation(data)), (is_png, lambda: png_orientation(data))],
            default=lambda: tf.constant(1),
        )
        jpeg_shape = tf.cond(
            is_jpeg, lambda: tf.io.extract_jpeg_shape(data), lambda: tf.zeros([3], tf.int32)
        )  # [H, W, components]
    width, height = canvas_size(data, jpeg_shape, is_jpeg, is_png, is_gif)
    size_check = tf.debugging.Assert(
        width * height <= max_pixels,
        [
            "image",
            index,
            "is",
            width,
            "x",
            height,
            "pixels, more than max_pixels",
            max_pixels,
            "(a decompression bomb?)",
        ],
    )
    with tf.control_dependencies([size_check]):  # nothing is decoded before the check
        data = tf.identity(data)
    # A JPEG is decoded as Pillow decodes it, with libjpeg's accurate integer DCT (the fast
    # one is up to 15 levels off), then goes through the steps the shard writer applied.
    pixels = tf.case(
        [
            (is_png, lambda: decode_png(data)),
            (is_jpeg, lambda: tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE")),
        ],
        default=lambda: tf.io.decode_image(data, channels=3, expand_animations=False),
    )
    pixels = transpose_upright(tf.ensure_shape(pixels, [None, None, 3]), orientation)
    shape = tf.shape(pixels)
    at_size = tf.reduce_all(tf.equal(shape[:2], size))
    pixels = tf.cond(at_size, lambda: pixels, lambda: pillow_resize(pixels, size))
    pixels = tf.io.decode_jpeg(tf.io.encode_jpeg(pixels, quality=jpeg_quality), channels=3)
    return tf.ensure_shape(tf.cast(pixels, tf.float32), [size, size, 3])


# --- reading headers with string ops ----------------------------------------------------------


def canvas_size(data, jpeg_shape, is_jpeg, is_png, is_gif):
    """(width, height) int64 [] of an image's canvas, from its header alone: the JPEG frame
    header (`jpeg_shape`, [H, W, C] from `tf.io.extract_jpeg_shape`), the PNG IHDR chunk
    (big-endian uint32 at bytes 16 and 20), the GIF logical screen (little-endian uint16 at
    bytes 6 and 8) or the BMP info header (little-endian int32 at bytes 18 and 22; a negative
    height is a top-down bitmap)."""
    import tensorflow as tf

    read, _ = _reader(data)

    def number(pos, n: int, little: bool):
        raw = tf.cast(read(pos, n), tf.int64)
        weights = tf.constant([256**i for i in range(n)], tf.int64)
        return tf.reduce_sum(raw * (weights if little else weights[::-1]))

    def signed32(value):
        return tf.abs(tf.where(value >= 2**31, value - 2**32, value))

    jpeg = tf.cast(jpeg_shape, tf.int64)
    sizes = tf.case(
        [
            (is_jpeg, lambda: tf.stack([jpeg[1], jpeg[0]])),
            (is_png, lambda: tf.stack([number(16, 4, False), number(20, 4, False)])),
            (is_gif, lambda: tf.stack([number(6, 2, True), number(8, 2, True)])),
        ],
        default=lambda: tf.stack([signed32(number(18, 4, True)), signed32(number(22, 4, True))]),
    )
    return sizes[0], sizes[1]


def _reader(data):
    """(read(pos, n) -> int32 [n] zero-padded past the end, length) for a string []."""
    import tensorflow as tf

    length = tf.strings.length(data)
    padded = tf.strings.join([data, b"\0" * 16])

    def read(pos, n: int):
        pos = tf.clip_by_value(pos, 0, length)
        raw = tf.io.decode_raw(tf.strings.substr(padded, pos, n), tf.uint8)
        return tf.reshape(tf.cast(raw, tf.int32), [n])  # n <= 16: the padding holds them

    return read, length


def _number(raw, little):
    """Bytes int32 [n] as one unsigned integer, little or big endian."""
    import tensorflow as tf

    n = raw.shape[0]
    weights = tf.constant([256**i for i in range(n)], tf.int64)
    raw = tf.cast(raw, tf.int64)
    value = tf.where(little, tf.reduce_sum(raw * weights), tf.reduce_sum(raw * weights[::-1]))
    return tf.cast(tf.minimum(value, 2**30), tf.int32)  # offsets past 1 GB: out of range


def jpeg_orientation(data):
    """EXIF orientation int32 [] of a JPEG (1 when absent), walking its marker segments up to
    the first scan. Pillow reads the first APP1 segment that starts with "Exif\\0\\0"; so does
    this."""
    import tensorflow as tf

    read, length = _reader(data)

    def cond(pos, tiff, done):
        return tf.logical_and(tf.logical_not(done), pos + 4 <= length)

    def body(pos, tiff, done):
        marker = read(pos, 4)  # 0xFF, kind, segment length (big endian, itself included)
        kind = marker[1]
        exif = tf.logical_and(
            tf.logical_and(tf.equal(kind, 0xE1), tf.less(tiff, 0)),
            tf.equal(tf.strings.substr(data, tf.minimum(pos + 4, length), 6), b"Exif\0\0"),
        )
        tiff = tf.where(exif, pos + 10, tiff)
        done = tf.logical_or(
            tf.not_equal(marker[0], 0xFF), tf.logical_or(tf.equal(kind, 0xDA), tf.equal(kind, 0xD9))
        )
        return pos + 2 + marker[2] * 256 + marker[3], tiff, done

    _, tiff, _ = tf.while_loop(cond, body, (tf.constant(2), tf.constant(-1), tf.constant(False)))
    return tf.cond(tiff >= 0, lambda: tiff_orientation(data, tiff), lambda: tf.constant(1))


def png_orientation(data):
    """EXIF orientation int32 [] of a PNG's eXIf chunk (1 when absent); Pillow reads it
    wherever it is, before or after the pixels."""
    import tensorflow as tf

    read, length = _reader(data)

    def cond(pos, tiff):
        return tf.logical_and(tf.less(tiff, 0), pos + 8 <= length)

    def body(pos, tiff):
        chunk = _number(read(pos, 4), False)
        kind = tf.strings.substr(data, pos + 4, 4)
        tiff = tf.where(tf.equal(kind, b"eXIf"), pos + 8, tiff)
        return tf.where(tf.equal(kind, b"IEND"), length, pos + 12 + chunk), tiff

    _, tiff = tf.while_loop(cond, body, (tf.constant(8), tf.constant(-1)))
    return tf.cond(tiff >= 0, lambda: tiff_orientation(data, tiff), lambda: tf.constant(1))


def tiff_orientation(data, tiff):
    """Tag 0x0112 of IFD0 of the TIFF structure at byte `tiff` of `data`; 1 when absent or
    out of 1..8 (a broken EXIF block is not a broken image, as in images._orientation)."""
    import tensorflow as tf

    read, length = _reader(data)
    little = tf.reduce_all(tf.equal(read(tiff, 2), [ord("I"), ord("I")]))
    ifd = tiff + _number(read(tiff + 4, 4), little)
    count = tf.minimum(_number(read(ifd, 2), little), 1000)
    start = tf.clip_by_value(ifd + 2, 0, length)
    raw = tf.io.decode_raw(tf.strings.substr(data, start, count * 12), tf.uint8)
    entries = tf.reshape(tf.cast(raw[: tf.size(raw) // 12 * 12], tf.int32), [-1, 12])  # [N, 12]
    tags = tf.where(
        little, entries[:, 0] + 256 * entries[:, 1], entries[:, 0] * 256 + entries[:, 1]
    )
    values = tf.where(
        little, entries[:, 8] + 256 * entries[:, 9], entries[:, 8] * 256 + entries[:, 9]
    )  # a SHORT, left in its 4 bytes
    found = tf.equal(tags, _ORIENTATION_TAG)
    value = tf.reduce_max(tf.where(found, values, -1))
    return tf.where(tf.logical_and(value >= 1, value <= 8), value, 1)


def gif_transparency(data):
    """bool []: a GIF's graphic control extension (21 F9 04) sets the transparency flag."""
    import tensorflow as tf

    raw = tf.cast(tf.io.decode_raw(data, tf.uint8), tf.int32)
    found = tf.logical_and(
        tf.logical_and(tf.equal(raw[:-3], 0x21), tf.equal(raw[1:-2], 0xF9)),
        tf.logical_and(tf.equal(raw[2:-1], 4), tf.equal(raw[3:] % 2, 1)),
    )
    return tf.reduce_any(found)


# --- pixels -----------------------------------------------------------------------------------


def decode_png(data):
    """PNG string [] -> uint8 [H, W, 3]: 16 bits reduced as Pillow reduces them, then any
    transparency (alpha channel or tRNS) composited over white."""
    import tensorflow as tf

    read, _ = _reader(data)
    depth, colour = read(24, 1)[0], read(25, 1)[0]  # IHDR bit depth, colour type

    def sixteen():
        wide = tf.cast(tf.io.decode_png(data, channels=4, dtype=tf.uint16), tf.int32)
        grey = tf.cast(tf.round(tf.cast(wide, tf.float64) * (255.0 / 65535.0)), tf.int32)
        # Grey without alpha is Pillow's "I;16" (scaled by images.to_rgb); others the high byte.
        return tf.where(tf.equal(colour, 0), grey, wide // 256)

    rgba = tf.cond(
        tf.equal(depth, 16), sixteen, lambda: tf.cast(tf.io.decode_png(data, channels=4), tf.int32)
    )
    return over_white(rgba)


def over_white(rgba):
    """int32 [H, W, 4] -> uint8 [H, W, 3]: `Image.alpha_composite` onto opaque white in
    Pillow's own integer arithmetic (7-bit precision, shift-division by 255): bit-exact."""
    import tensorflow as tf

    rgb, alpha = rgba[..., :3], rgba[..., 3:]
    # coef1 = a * 128, coef2 = (255 - a) * 128 once the destination is opaque.
    mixed = rgb * alpha * 128 + 255 * (255 - alpha) * 128 + (0x80 << 7)  # >= 0: // is >>
    mixed = (mixed // 256 + mixed) // 256
    return tf.cast(mixed // 128, tf.uint8)


def transpose_upright(pixels, orientation):
    """[H, W, C] as Pillow's transpose for EXIF `orientation` (images._UPRIGHT) shows it."""
    import tensorflow as tf

    def flip_x():
        return pixels[:, ::-1]

    branches = [
        lambda: pixels,  # 0 (not used) and 1: upright
        lambda: pixels,
        flip_x,  # 2 FLIP_LEFT_RIGHT
        lambda: pixels[::-1, ::-1],  # 3 ROTATE_180
        lambda: pixels[::-1],  # 4 FLIP_TOP_BOTTOM
        lambda: tf.transpose(pixels, [1, 0, 2]),  # 5 TRANSPOSE
        lambda: tf.image.rot90(pixels, 3),  # 6 ROTATE_270 (counter-clockwise)
        lambda: tf.transpose(pixels, [1, 0, 2])[::-1, ::-1],  # 7 TRANSVERSE
        lambda: tf.image.rot90(pixels, 1),  # 8 ROTATE_90
    ]
    return tf.switch_case(tf.clip_by_value(orientation, 0, 8), branches)


def pillow_resize(pixels, size: int):
    """uint8 [H, W, 3] -> uint8 [S, S, 3] as `Image.resize((S, S), LANCZOS,
    reducing_gap=REDUCING_GAP)`: `Image.reduce` by (int(W / S / gap) or 1, int(H / S / gap)
    or 1) over the blocks (the last ones partial), then Lanczos over the reduced image's
    box [0, W / fx] x [0, H / fy], columns first, each pass rounded to 8 bits."""
    import tensorflow as tf

    shape = tf.shape(pixels)
    height, width = shape[0], shape[1]

    def factor(side):  # int(side / S / gap) or 1
        ratio = tf.cast(side, tf.float64) / size / REDUCING_GAP
        return tf.maximum(tf.cast(tf.floor(ratio), tf.int32), 1)

    fy, fx = factor(height), factor(width)
    reduced = tf.cond(
        tf.logical_or(fx > 1, fy > 1),
        lambda: box_reduce(pixels, fy, fx),
        lambda: tf.cast(pixels, tf.float64),
    )
    box_w = tf.cast(width, tf.float64) / tf.cast(fx, tf.float64)
    box_h = tf.cast(height, tf.float64) / tf.cast(fy, tf.float64)
    reduced_shape = tf.shape(reduced)
    cols = _pillow_weights(reduced_shape[1], box_w, size)  # [S, W'] integers
    rows = _pillow_weights(reduced_shape[0], box_h, size)  # [S, H']
    wide = _fixed_point(tf.einsum("hwc,sw->hsc", reduced, cols))  # [H', S, 3]
    return tf.cast(_fixed_point(tf.einsum("hsc,rh->rsc", wide, rows)), tf.uint8)


def box_reduce(pixels, fy, fx):
    """uint8 [H, W, C] -> float64 [ceil(H / fy), ceil(W / fx), C]: each fy x fx block (partial
    at the right and bottom edges) averaged as Pillow's Reduce.c does, bit-exact: n pixels
    summed, (sum + n // 2) * multiplier >> 24, multiplier = uint32(float32(2**32) /
    float32(256 n))."""
    import tensorflow as tf

    shape = tf.shape(pixels)
    out_h, out_w = -(-shape[0] // fy), -(-shape[1] // fx)
    pad = [[0, out_h * fy - shape[0]], [0, out_w * fx - shape[1]], [0, 0]]
    values = tf.pad(tf.cast(pixels, tf.float64), pad)
    ones = tf.pad(tf.ones_like(pixels[..., :1], tf.float64), pad)

    def blocks(x):
        return tf.reduce_sum(tf.reshape(x, [out_h, fy, out_w, fx, -1]), axis=[1, 3])

    count = blocks(ones)  # [H', W', 1] pixels per block
    multiplier = tf.floor(
        tf.cast(tf.constant(2.0**32, tf.float32) / tf.cast(256.0 * count, tf.float32), tf.float64)
    )
    amended = blocks(values) + tf.floor(count / 2)
    return tf.floor(amended * multiplier / 2.0**24)  # exact: the product is below 2**32


def _pillow_weights(in_size, extent, out_size: int):
    """[out_size, in_size] float64: Pillow's `precompute_coeffs` for Lanczos over the source
    box [0, extent] of an in_size-pixel line, normalized, then as its 22-bit integers."""
    import tensorflow as tf

    scale = extent / out_size
    filterscale = tf.maximum(scale, 1.0)
    support = LANCZOS_SUPPORT * filterscale
    centre = (tf.range(out_size, dtype=tf.float64) + 0.5) * scale  # [S]
    first = tf.maximum(tf.floor(centre - support + 0.5), 0.0)[:, None]
    last = tf.minimum(tf.floor(centre + support + 0.5), tf.cast(in_size, tf.float64))[:, None]
    j = tf.range(tf.cast(in_size, tf.float64))[None, :]
    x = (j - centre[:, None] + 0.5) / filterscale

    def sinc(v):
        pv = np.pi * v
        small, one = tf.equal(v, 0.0), tf.ones_like(v)
        return tf.where(small, one, tf.sin(pv) / tf.where(small, one, pv))

    inside = tf.logical_and(tf.logical_and(j >= first, j < last), tf.abs(x) < LANCZOS_SUPPORT)
    weights = tf.where(inside, sinc(x) * sinc(x / LANCZOS_SUPPORT), tf.zeros_like(x))
    weights = weights / tf.reduce_sum(weights, axis=1, keepdims=True)
    scaled = weights * (1 << _PRECISION_BITS)
    return tf.where(scaled < 0, tf.math.ceil(scaled - 0.5), tf.floor(scaled + 0.5))


def _fixed_point(sums):
    """Sums of pixels x 22-bit coefficients (exact in float64) -> 8-bit levels as Pillow
    rounds them: (sum + 2**21) >> 22, clipped to 0..255."""
    import tensorflow as tf

    levels = tf.floor((sums + (1 << (_PRECISION_BITS - 1))) / (1 << _PRECISION_BITS))
    return tf.clip_by_value(levels, 0.0, 255.0)
