"""A fixed linear projection of region features, fitted on train images: their principal axes.

A frozen encoder's features are computed once and stored (`caption_pipeline.training.features`). For
NASNetLarge that is 121 regions x 4032 float16 numbers, 0.98 MB per image and 115 GB for COCO
2017's train split. The decoder's first use of them is linear anyway: the attention's key
projection W_f f and the initial state's W_h mean(f) (`model.attention`, `model.decoder`). A
fixed linear map P in front of them, fitted once, loses only what lies outside P's span:

    y = (f - mu) P      f [D] one region's features, mu [D] their mean, P [D, K], y [K]

With P the K leading eigenvectors of the features' covariance C = E[(f - mu)(f - mu)^T] (PCA),
y keeps the largest share of the features' variance any K-dimensional linear map can keep,
sum of the K leading eigenvalues / trace(C), which `fit_projection` reports. The map is the
encoder's "feature_projection" Dense layer (kernel P, bias -mu P), so the stored features, the
saved captioner and the export all see one encoder, projected.

The moments are summed over every region of the first `images` train images in shard order
(float64: 4032^2 numbers, 130 MB): the covariance of 4032 numbers is well determined by a few
thousand images x 121 regions, and costs that many encoder calls, ~2 % of COCO's 118k. Train
images only: val and test features are projected with the map train chose.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from caption_pipeline.errors import DataError

if TYPE_CHECKING:
    import keras

    from caption_pipeline.data.shards.shard_set import ShardSet

logger = logging.getLogger(__name__)


@dataclass
class Moments:
    """Running first and second moments of D-dimensional rows, in float64."""

    dim: int
    count: int = 0
    total: np.ndarray = field(init=False)  # [D]  sum of rows
    outer: np.ndarray = field(init=False)  # [D, D]  sum of row^T row

    def __post_init__(self):
        self.total = np.zeros(self.dim)
        self.outer = np.zeros((self.dim, self.dim))

    def add(self, rows: np.ndarray) -> None:
        """rows [N, D], any float dtype."""
        rows = np.asarray(rows, dtype=np.float64)
        self.count += len(rows)
        self.total += rows.sum(axis=0)
        self.outer += rows.T @ rows

    def principal_axes(self, k: int) -> tuple[np.ndarray, np.ndarray, float]:
        """(P [D, K] the K leading eigenvectors of the covariance, mu [D], the fraction of the
        variance they keep). Each axis's sign is fixed (largest entry positive), so that the
        same moments always give the same map."""
        if self.count < 2:
            raise DataError(
                f"model.feature_projection: {self.count} feature rows are too few "
                "to fit a projection"
            )
        mean = self.total / self.count
        covariance = (self.outer - self.count * np.outer(mean, mean)) / (self.count - 1)
        values, vectors = np.linalg.eigh(covariance)  # ascending
        values, vectors = values[::-1], vectors[:, ::-1]
        axes = vectors[:, :k]
        signs = np.sign(axes[np.abs(axes).argmax(axis=0), np.arange(k)])
        axes = axes * np.where(signs == 0, 1.0, signs)
        total = float(np.clip(values, 0, None).sum())
        kept = float(np.clip(values[:k], 0, None).sum() / total) if total > 0 else 1.0
        return axes, mean, kept


def fit_projection(
    encoder: keras.Model, shards: ShardSet, *, images: int, batch_size: int
) -> float:
    """Fit `encoder`'s "feature_projection" layer (in place) on the features of the first
    `images` train images of `shards`; returns the fraction of their variance it keeps."""
    from caption_pipeline.data.shards.reader import make_image_dataset
    from caption_pipeline.model.encoder import PROJECTION, regions_model

    layer = encoder.get_layer(PROJECTION)
    k = int(layer.units)
    if not isinstance(images, int) or images < 1:
        raise DataError(
            f"parameters features.projection_images: must be an integer >= 1, got {images!r}"
        )
    features = regions_model(encoder)
    moments = Moments(int(features.output_shape[-1]))
    batches = make_image_dataset(
        shards, "train", batch_size=batch_size, image_size=int(encoder.input.shape[1])
    )
    seen = 0
    for batch in batches.take(math.ceil(images / batch_size)):
        pixels = batch["image"].numpy()[: images - seen]
        regions = np.asarray(features.predict_on_batch(pixels))  # [B, R, D]
        moments.add(regions.reshape(-1, regions.shape[-1]))
        seen += len(pixels)
    if moments.count < k:
        raise DataError(
            f"model.feature_projection: {k} axes need at least {k} region "
            f"feature rows; {seen} train images gave {moments.count}"
        )
    axes, mean, kept = moments.principal_axes(k)
    layer.set_weights([axes.astype("float32"), (-mean @ axes).astype("float32")])
    logger.info(
        "Feature projection %d -> %d fitted on %d train images (%d regions): it keeps "
        "%.1f%% of their variance",
        moments.dim,
        k,
        seen,
        moments.count,
        100 * kept,
    )
    return kept
