"""Image encoders: an image batch [B, S, S, 3] (float, 0..255) -> region features [B, R, D].

Two families, chosen by name:

* ``nasnet_large`` / ``nasnet_mobile``: `keras.applications` NASNet without its classifier.
  NASNetLarge runs at 331 px and gives an 11x11 grid of 4032 features (R=121), NASNetMobile
  at 224 px gives 7x7 x 1056 (R=49). Images of another size are resized to the backbone's size
  first. Weights: "imagenet" (downloaded by Keras), a local weights file (offline clusters:
  the `.h5` Keras downloads, or a `.weights.h5` saved from the same architecture), or None.
* ``compact``: a small CNN for the embedded "shapes" data set, where no ImageNet-like weights
  exist: pretrained on its object masks (`caption_pipeline.training.encoder_pretraining`) and
  given as a weights file, or trained end to end with the decoder.

Either may end in a fixed linear projection of each region's features to `projection` numbers,
[B, R, D] -> [B, R, K]: a "feature_projection" Dense layer whose weights are not learnt but
fitted on the train images' features by `caption_pipeline.training.projection` (principal axes). A
frozen NASNetLarge's 4032 numbers per region are 0.98 MB of float16 per image, 115 GB for COCO
2017's train split; 512 of them are 8x less, and the decoder's work on them is cheaper too (see
docs/benchmarks.md, "Feature storage"). The layers before it are `regions_model(encoder)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import h5py
import keras
from keras import layers, ops

from caption_pipeline.errors import DataError

# name -> (keras.applications constructor, native input size in px)
NASNETS = {
    "nasnet_large": (keras.applications.NASNetLarge, 331),
    "nasnet_mobile": (keras.applications.NASNetMobile, 224),
}
ENCODERS = ("compact", *NASNETS)
BATCHNORM = ("train", "frozen")  # what training does to the BatchNormalization layers
PROJECTION = "feature_projection"  # the name of the fixed projection layer, when there is one


@dataclass(frozen=True)
class EncoderConfig:
    """The encoder part of `ModelConfig` (its `model.encoder*`, `image_size`, `compact_*` and
    `feature_projection` keys, which stay flat in conf/: `ModelConfig.encoder_config`)."""

    name: str  # compact | nasnet_mobile | nasnet_large
    image_size: int
    weights: str | None  # "imagenet" (NASNet), a local weights file, or None (random)
    trainable: bool | None  # None: train the compact CNN, freeze NASNet
    batchnorm: str  # train | frozen
    compact_filters: tuple[int | tuple[int, ...], ...]
    compact_pool_last: bool
    compact_context: tuple[int, ...]
    compact_strided_stem: bool
    feature_projection: int | None

    @property
    def trains(self) -> bool:
        """Whether the encoder is trained (`trainable`, or None: only the compact CNN)."""
        return self.name == "compact" if self.trainable is None else self.trainable

    def build(self, weights: str | None) -> keras.Model:
        """This architecture with `weights` (not necessarily `self.weights`: see
        `build_encoder`)."""
        return build_encoder(
            self.name,
            self.image_size,
            weights,
            self.compact_filters,
            self.compact_pool_last,
            self.feature_projection,
            self.compact_context,
            self.compact_strided_stem,
        )


def build_encoder(
    name: str,
    image_size: int,
    weights: str | None = None,
    compact_filters: tuple[int | tuple[int, ...], ...] = (32, 64, 128, 128),
    compact_pool_last: bool = True,
    projection: int | None = None,
    compact_context: tuple[int, ...] = (),
    compact_strided_stem: bool = False,
) -> keras.Model:
    """The encoder `name` as a model from images [B, image_size, image_size, 3] to [B, R, D]
    (D = `projection` when given; the projection's weights are then still to be fitted)."""
    images = keras.Input((image_size, image_size, 3), name="image")
    if name == "compact":
        if weights == "imagenet":
            raise DataError(
                "model.encoder_weights: the compact encoder has no ImageNet "
                "weights; give a weights file (e.g. from encoder pretraining) or null"
            )
        if weights is not None:
            _weights_path(weights)
        grid = compact_cnn(
            images, compact_filters, compact_pool_last, compact_context, compact_strided_stem
        )
    elif name in NASNETS:
        grid = nasnet_backbone(name, weights)(_to_native_size(images, NASNETS[name][1]))
    else:
        raise DataError(f"model.encoder: unknown encoder {name!r}; expected one of {ENCODERS}")
    # [B, H, W, D] -> [B, H*W, D]: the regions the decoder attends over, row by row.
    _, height, width, depth = grid.shape
    regions = layers.Reshape((height * width, depth), name="regions")(grid)
    if projection is not None:
        if not 1 <= projection <= depth:
            raise DataError(
                f"model.feature_projection: {projection}; expected 1 to the "
                f"encoder's {depth} features per region, or null"
            )
        regions = layers.Dense(projection, name=PROJECTION)(regions)
    encoder = keras.Model(images, regions, name=f"{name}_encoder")
    if name == "compact" and weights is not None:
        load_weights_file(encoder, weights)
    return encoder


def regions_model(encoder: keras.Model) -> keras.Model:
    """The layers of `encoder` up to its region features [B, R, D], before any projection:
    the same layers and weights, so that training or reading it is training or reading them."""
    if PROJECTION not in [layer.name for layer in encoder.layers]:
        return encoder
    return keras.Model(encoder.input, encoder.get_layer("regions").output, name=encoder.name)


def nasnet_backbone(name: str, weights: str | None) -> keras.Model:
    """NASNet without top at its native size, taking images in 0..255.

    `keras.applications.nasnet.preprocess_input` scales to [-1, 1] (x / 127.5 - 1); it is
    written here as a Rescaling layer so that it is part of the saved, compiled graph.
    """
    constructor, size = NASNETS[name]
    images = keras.Input((size, size, 3))
    scaled = layers.Rescaling(1.0 / 127.5, offset=-1.0, name="nasnet_preprocess")(images)
    if weights == "imagenet":
        try:
            backbone = constructor(
                include_top=False, weights="imagenet", input_shape=(size, size, 3)
            )
        except Exception as error:  # no internet, proxy, corrupt cache: all end here
            raise DataError(
                f"model.encoder_weights: could not get the ImageNet weights of {name} ({error}); "
                "on an offline machine, download them elsewhere and give the file's path instead"
            ) from None
    elif weights is None:
        backbone = constructor(include_top=False, weights=None, input_shape=(size, size, 3))
    else:
        _weights_path(weights)  # a missing file fails before the (slow) build
        backbone = constructor(include_top=False, weights=None, input_shape=(size, size, 3))
        load_weights_file(backbone, weights)
    return keras.Model(images, backbone(scaled), name=f"{name}_backbone")


def load_weights_file(model: keras.Model, path: str) -> None:
    """Load `path` into `model`, or raise a DataError that names the file and what is wrong.

    Keras silently loads a `.weights.h5` file holding MORE variables than the model (e.g.
    NASNetLarge weights into NASNetMobile), so the file's arrays are compared with the model's
    variables first.
    """
    file = _weights_path(path)
    if file.name.endswith(".weights.h5"):
        _check_array_shapes(model, file)
    try:
        model.load_weights(str(file))
    except Exception as error:
        reason = (str(error).strip() or type(error).__name__).splitlines()[0]
        raise DataError(
            f"model.encoder_weights: {file} does not fit {model.name}: {reason}"
        ) from None


def _weights_path(path: str) -> Path:
    file = Path(path)
    if not file.is_file():
        raise DataError(f"model.encoder_weights: weights file {file} does not exist")
    if not file.name.endswith(".h5"):
        raise DataError(
            f"model.encoder_weights: {file} is not a Keras weights file "
            "(expected a .weights.h5 or legacy .h5 file)"
        )
    return file


def _check_array_shapes(model: keras.Model, file: Path) -> None:
    shapes: list[tuple[int, ...]] = []
    try:
        with h5py.File(file, "r") as h5:
            h5.visititems(
                lambda _, item: (
                    shapes.append(item.shape) if isinstance(item, h5py.Dataset) else None
                )
            )
    except OSError as error:
        raise DataError(
            f"model.encoder_weights: {file} is not a readable HDF5 weights file ({error})"
        ) from None
    expected = sorted(tuple(v.shape) for v in model.weights)
    if sorted(shapes) != expected:
        raise DataError(
            f"model.encoder_weights: {file} does not fit {model.name}: the file holds "
            f"{len(shapes)} arrays ({sum(math.prod(s) for s in shapes):,} numbers), the model "
            f"has {len(expected)} variables ({sum(math.prod(s) for s in expected):,} numbers)"
        )


def compact_cnn(
    images: keras.KerasTensor,
    filters: tuple[int | tuple[int, ...], ...],
    pool_last: bool = True,
    context: tuple[int, ...] = (),
    strided_stem: bool = False,
) -> keras.KerasTensor:
    """Conv blocks, each halving the grid: 128 px and 4 blocks -> 8x8 x filters[-1]; without
    the last pooling (`pool_last=False`) a grid twice as fine, 16x16, of regions that each see
    38 px around their 8 px cell: attention can then point at a small object, not near it.

    A block is one width (one 3x3 conv + BN + ReLU) or several (that many convs in a row, then
    the pooling): a second conv at 32x32 and at 16x16 (`[32, 64, [96, 128], [128, 128]]`)
    widens each region's view from 38 to 62 px, more than the largest shape (val shape
    accuracy 0.83 against 0.70 after pretraining; docs/benchmarks.md, "An encoder that sees
    whole objects", also for why conf/base keeps one conv per block).

    `strided_stem`: the first block halves the grid by its first conv's stride (2) instead of
    max pooling after it: the same grid, with a quarter of the full-resolution activations
    (its BN, ReLU and pooling over 128 x 128 x 32 numbers per image in a train step).

    Coordinate channels enter the last block so that every region feature knows where it
    is: the shapes captions talk about left/right/above/below, and an attention-weighted sum
    of features would otherwise lose position.

    `context`: dilation rates of residual context blocks after the last one, at the grid's
    resolution (as in DeepLab's atrous convolutions): x <- x + ReLU(BN(conv3x3_d(x))). Each
    block with dilation d widens the view by 2 d cells (d = 2, 4 on the 16x16 grid of 8 px
    cells: 38 -> 134 px), and the residual keeps what the region saw of itself.
    """
    x = layers.Rescaling(1.0 / 127.5, offset=-1.0, name="compact_preprocess")(images)
    blocks = compact_blocks(filters)
    for block, widths in enumerate(blocks):
        if block == len(blocks) - 1:
            x = AddCoordinates(name="coordinates")(x)
        pools = pool_last or block < len(blocks) - 1
        strided = strided_stem and block == 0 and pools
        for k, width in enumerate(widths):
            # one conv per block keeps the names it always had (weights files load by them)
            name = f"{block}" if len(widths) == 1 else f"{block}_{k}"
            stride = 2 if strided and k == 0 else 1
            x = layers.Conv2D(
                width, 3, strides=stride, padding="same", use_bias=False, name=f"conv{name}"
            )(x)
            # momentum 0.9, not 0.99: the inference statistics keep up with the fast-changing
            # weights of a short training, so frozen features match what was trained.
            x = layers.BatchNormalization(momentum=0.9, name=f"bn{name}")(x)
            x = layers.ReLU(name=f"relu{name}")(x)
        if pools and not strided:
            x = layers.MaxPooling2D(2, name=f"pool{block}")(x)
    for block, rate in enumerate(context):
        y = layers.Conv2D(
            x.shape[-1],
            3,
            dilation_rate=rate,
            padding="same",
            use_bias=False,
            name=f"context{block}",
        )(x)
        y = layers.BatchNormalization(momentum=0.9, name=f"context_bn{block}")(y)
        y = layers.ReLU(name=f"context_relu{block}")(y)
        x = layers.Add(name=f"context_add{block}")([x, y])
    return x


def compact_blocks(filters) -> tuple[tuple[int, ...], ...]:
    """`model.compact_filters` as one tuple of conv widths per block: `[32, [64, 64]]` ->
    ((32,), (64, 64)). Raises DataError unless every width is an integer >= 1."""
    blocks = tuple(
        (spec,) if isinstance(spec, int) else tuple(spec)
        for spec in filters
        if isinstance(spec, int) or isinstance(spec, (list, tuple))
    )
    widths = [w for block in blocks for w in block]
    if (
        len(blocks) != len(filters)
        or not blocks
        or not all(block for block in blocks)
        or not all(isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in widths)
    ):
        raise DataError(
            "model.compact_filters: one entry per block, each a width >= 1 or a list of "
            f"them (that many convs), e.g. [32, 64, [96, 128]]; got {plain_filters(filters)}"
        )
    return blocks


def plain_filters(filters) -> list:
    """`filters` as it reads in YAML: lists, not tuples."""
    return [list(f) if isinstance(f, (list, tuple)) else f for f in filters]


def freeze_batchnorm(encoder: keras.Model) -> int:
    """Every BatchNormalization layer of `encoder` (nested models too) made trainable=False,
    which in Keras 3 is also inference mode: normalised by the moving statistics, which stay as
    they are, like gamma and beta. Fine-tuning a pretrained encoder in small batches wants this:
    batch statistics are noisy, and the decoder learnt the features of the learnt statistics
    (ImageNet's, for NASNet). The number of layers frozen."""
    frozen = [
        layer for layer in _nested_layers(encoder) if isinstance(layer, layers.BatchNormalization)
    ]
    for layer in frozen:
        layer.trainable = False
    return len(frozen)


def _nested_layers(model: keras.Model):
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):  # NASNet: encoder > backbone > keras.applications
            yield from _nested_layers(layer)


def _to_native_size(images: keras.KerasTensor, size: int) -> keras.KerasTensor:
    if images.shape[1] == size and images.shape[2] == size:
        return images
    return layers.Resizing(size, size, name="resize_to_backbone")(images)


@keras.saving.register_keras_serializable(package="caption_pipeline")
class AddCoordinates(layers.Layer):
    """[B, H, W, C] -> [B, H, W, C + 2]: appends each pixel's row and column in [-1, 1]."""

    def call(self, x):
        height, width = x.shape[1], x.shape[2]
        rows = ops.broadcast_to(ops.linspace(-1.0, 1.0, height)[:, None], (height, width))
        cols = ops.broadcast_to(ops.linspace(-1.0, 1.0, width)[None, :], (height, width))
        grid = ops.cast(ops.stack([rows, cols], axis=-1), x.dtype)  # [H, W, 2]
        grid = ops.broadcast_to(grid[None], (ops.shape(x)[0], height, width, 2))
        return ops.concatenate([x, grid], axis=-1)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], input_shape[-1] + 2)
