"""The pixels of a COCO-like image, drawn from its plan (`plans.ImagePlan`), and its JPEG.

What is drawn is chosen for COCO's file sizes and the encoder's cost, not for looks: a smooth
colour gradient with a cloudy texture and the plan's blurred elliptic blobs, drawn at 1/8 of
the size and upsampled (bicubic), plus luminance grain at full size. At JPEG quality 90 the
smooth picture alone is 33 kB (20-55); the grain, log-normal around 22 grey levels, brings the
mean file to 161 kB (sd 32, 84-313 kB over 400 images), COCO's ~160 kB (train2017: 18 GB /
118,287 files), so that a rehearsal's shards weigh what COCO's would. Rendering plus encoding
runs at about 80 images/s per core (numpy at 1/8 size, Pillow's resize and encoder), measured
on this project's 2-core CPU machine.

The pixels come from their own random stream (`plans.PIXEL_STREAM`), so they depend only on
the seed and the plan: any worker process draws the same image.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

from caption_pipeline.data.coco_like.plans import PIXEL_STREAM, ImagePlan, image_rng

JPEG_QUALITY = 90
_LOW_RES = 8  # gradient, texture and blobs are drawn at 1/8 of the size, then upsampled
_GRAIN_MEDIAN, _GRAIN_SPREAD, _GRAIN_RANGE = 22.0, 0.45, (6.0, 64.0)  # grey levels, log-normal


def render_image(plan: ImagePlan, seed: int) -> np.ndarray:
    """The image's pixels, [H, W, 3] uint8 (or [H, W] when grayscale)."""
    rng = image_rng(seed, plan.split, plan.index, PIXEL_STREAM)
    w, h = plan.width, plan.height
    lw, lh = -(-w // _LOW_RES), -(-h // _LOW_RES)
    # Low-resolution pixel centres, in image pixels: [1, lw, 1] and [lh, 1, 1].
    xs = ((np.arange(lw) + 0.5) * _LOW_RES)[None, :, None]
    ys = ((np.arange(lh) + 0.5) * _LOW_RES)[:, None, None]
    low = (
        rng.uniform(40, 215, 3)
        + rng.uniform(-90, 90, 3) * xs / w
        + rng.uniform(-90, 90, 3) * ys / h
    )  # [lh, lw, 3] gradient
    low = low + rng.normal(0.0, rng.uniform(4, 16), (lh, lw, 3))  # cloudy texture
    for blob in plan.blobs:
        cos, sin = math.cos(blob.angle), math.sin(blob.angle)
        dx, dy = xs[..., 0] - blob.cx, ys[..., 0] - blob.cy  # [1, lw], [lh, 1]
        d = np.hypot((dx * cos + dy * sin) / blob.rx, (dy * cos - dx * sin) / blob.ry)
        edge = np.minimum((d - 1.0) * blob.sharpness, 50.0)  # exp overflows past ~700
        inside = (1.0 / (1.0 + np.exp(edge)))[..., None]  # [lh, lw, 1]
        low = low * (1.0 - inside) + np.array(blob.colour) * inside
    small = Image.fromarray(np.clip(low, 0, 255).astype(np.uint8))
    smooth = np.asarray(small.resize((w, h), Image.Resampling.BICUBIC), np.float32)  # [h, w, 3]
    if plan.grayscale:
        smooth = smooth @ np.array([0.299, 0.587, 0.114], np.float32)  # [h, w]
    sigma = np.clip(_GRAIN_MEDIAN * math.exp(rng.normal(0.0, _GRAIN_SPREAD)), *_GRAIN_RANGE)
    grain = rng.standard_normal((h, w), dtype=np.float32) * np.float32(sigma)
    pixels = smooth + (grain if plan.grayscale else grain[..., None])
    return np.clip(pixels, 0, 255).astype(np.uint8)


def encode_jpeg(pixels: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    """[H, W, 3] or [H, W] uint8 pixels as JPEG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()
