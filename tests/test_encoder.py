"""Image encoders: NASNet from a local weights file (the code path of an offline COCO run),
clear errors for missing or mismatching weights, and the compact CNN."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from keras import ops

from caption_pipeline.errors import DataError
from caption_pipeline.model import ModelConfig, build_encoder, load_weights_file
from caption_pipeline.params import from_conf


def two_images(size: int) -> np.ndarray:
    return np.random.default_rng(0).uniform(0, 255, (2, size, size, 3)).astype("float32")


@pytest.fixture(scope="module")
def nasnet_large_weights(tmp_path_factory):
    """A NASNetLarge with random weights: its weights file and its output on two images."""
    keras.utils.set_random_seed(1)
    source = keras.applications.NASNetLarge(
        include_top=False, weights=None, input_shape=(331, 331, 3)
    )
    path = tmp_path_factory.mktemp("weights") / "nasnet_large.weights.h5"
    source.save_weights(path)
    scaled = keras.applications.nasnet.preprocess_input(two_images(331))
    expected = ops.convert_to_numpy(source(scaled, training=False))
    del source
    return path, expected


def test_nasnet_large_loads_a_local_weights_file(nasnet_large_weights):
    path, expected = nasnet_large_weights
    keras.utils.set_random_seed(2)  # different random init: equality proves the file was read
    encoder = build_encoder("nasnet_large", 331, weights=str(path))
    regions = ops.convert_to_numpy(encoder(two_images(331), training=False))
    assert regions.shape == (2, 121, 4032)
    np.testing.assert_allclose(regions, expected.reshape(2, 121, 4032), rtol=1e-4, atol=1e-4)


def test_missing_weights_file_is_a_clear_error(tmp_path):
    missing = tmp_path / "nasnet_mobile_no_top.h5"
    with pytest.raises(DataError, match=f"{missing}.*does not exist"):
        build_encoder("nasnet_mobile", 224, weights=str(missing))


def test_weights_of_the_other_nasnet_are_a_clear_error(nasnet_large_weights, tmp_path):
    # Large into Mobile: Keras itself would load this silently (the file has MORE variables).
    large_path, _ = nasnet_large_weights
    with pytest.raises(DataError, match=f"{large_path}.*does not fit"):
        build_encoder("nasnet_mobile", 224, weights=str(large_path))
    # Mobile into Large.
    mobile_path = tmp_path / "nasnet_mobile.weights.h5"
    keras.applications.NASNetMobile(
        include_top=False, weights=None, input_shape=(224, 224, 3)
    ).save_weights(mobile_path)
    with pytest.raises(DataError, match=f"{mobile_path}.*does not fit"):
        build_encoder("nasnet_large", 331, weights=str(mobile_path))


def test_files_that_are_not_weights_are_a_clear_error(tmp_path):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    garbage = tmp_path / "garbage.weights.h5"
    garbage.write_text("not an HDF5 file")
    with pytest.raises(DataError, match=f"{garbage}.*not a readable HDF5"):
        load_weights_file(model, str(garbage))
    legacy_garbage = tmp_path / "garbage.h5"
    legacy_garbage.write_text("not an HDF5 file")
    with pytest.raises(DataError, match=f"{legacy_garbage}.*does not fit"):
        load_weights_file(model, str(legacy_garbage))
    wrong_kind = tmp_path / "weights.npz"
    wrong_kind.write_bytes(b"")
    with pytest.raises(DataError, match=f"{wrong_kind}.*not a Keras weights file"):
        load_weights_file(model, str(wrong_kind))
    # and the happy path of the same helper
    saved = tmp_path / "dense.weights.h5"
    model.save_weights(saved)
    other = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    load_weights_file(other, str(saved))
    np.testing.assert_array_equal(
        ops.convert_to_numpy(other.weights[0]), ops.convert_to_numpy(model.weights[0])
    )


def test_nasnet_preprocessing_is_keras_preprocess_input():
    encoder_scale = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0)  # as in nasnet_backbone
    images = two_images(8)
    np.testing.assert_allclose(
        ops.convert_to_numpy(encoder_scale(images)),
        keras.applications.nasnet.preprocess_input(images.copy()),
        rtol=1e-6,
        atol=1e-6,
    )


def test_compact_encoder_grid_and_position_channels():
    encoder = build_encoder("compact", 128)
    assert encoder.output_shape == (None, 64, 128)  # 8x8 regions of 128 features
    coordinates = encoder.get_layer("coordinates")
    grid = ops.convert_to_numpy(coordinates(np.zeros((1, 3, 4, 1), "float32")))
    np.testing.assert_allclose(grid[0, :, 0, 1], [-1, 0, 1], atol=1e-6)  # rows
    np.testing.assert_allclose(grid[0, 0, :, 2], [-1, -1 / 3, 1 / 3, 1], atol=1e-6)  # columns
    with pytest.raises(DataError, match="compact encoder has no ImageNet weights"):
        build_encoder("compact", 128, weights="imagenet")
    fine = build_encoder("compact", 128, compact_pool_last=False)
    assert fine.output_shape == (None, 256, 128)  # no pooling after the last block: 16x16
    assert fine.count_params() == encoder.count_params()  # same layers, finer grid


def test_context_blocks_let_a_region_see_its_whole_object():
    """Issue 25: on the 16x16 grid a region sees 38 px without context blocks, so a change
    44 px away leaves its features as they were; with dilations (2, 4) it sees 134 px and they
    change. The grid and feature size stay, and the view grows by the blocks' layers alone."""
    plain = build_encoder("compact", 128, compact_pool_last=False)
    context = build_encoder("compact", 128, compact_pool_last=False, compact_context=(2, 4))
    assert context.output_shape == plain.output_shape == (None, 256, 128)
    assert context.count_params() - plain.count_params() == 2 * (9 * 128 * 128 + 4 * 128)
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 255, (1, 128, 128, 3)).astype("float32")
    far = image.copy()
    far[0, 60:68, 108:116] = 255.0 - far[0, 60:68, 108:116]  # 44 px right of region (7, 8)
    region = 7 * 16 + 8  # its cell: rows 56..63, columns 64..71

    def change(encoder):
        before, after = (ops.convert_to_numpy(encoder(x))[0, region] for x in (image, far))
        return float(np.abs(after - before).max())

    assert change(plain) == 0.0
    assert change(context) > 1e-3
    with pytest.raises(DataError, match="compact_context"):
        from_conf(ModelConfig, "model", vocab_size=5, compact_context=[2, 0])


def test_a_block_of_two_convs_widens_each_regions_view():
    """Issue 25: a block is a width or a list of widths. [32, 64, [96, 128], [128, 128]] runs
    two convs at 32x32 and at 16x16: a region of the 16x16 grid then sees 62 px, not 38, so
    a change 26 px right of its cell reaches it. One-conv blocks keep their layer names."""
    plain = build_encoder("compact", 128, compact_pool_last=False)
    deep = build_encoder(
        "compact", 128, compact_filters=(32, 64, (96, 128), (128, 128)), compact_pool_last=False
    )
    assert deep.output_shape == plain.output_shape == (None, 256, 128)
    assert {"conv0", "conv1", "conv2_0", "conv2_1", "conv3_0", "conv3_1"} <= {
        layer.name for layer in deep.layers
    }
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 255, (1, 128, 128, 3)).astype("float32")
    far = image.copy()
    far[0, 60:68, 94:98] = 255.0 - far[0, 60:68, 94:98]  # 26 px right of region (7, 8)
    region = 7 * 16 + 8  # its cell: rows 56..63, columns 64..71
    changes = {
        name: float(np.abs(ops.convert_to_numpy(e(far) - e(image))[0, region]).max())
        for name, e in (("plain", plain), ("deep", deep))
    }
    assert changes["plain"] == 0.0
    assert changes["deep"] > 1e-3
    config = from_conf(ModelConfig, "model", vocab_size=5, compact_filters=[8, [8, 16]])
    assert config.compact_filters == (8, (8, 16))
    for bad in ([8, []], [8, [8, 0]], [8, "wide"], []):
        with pytest.raises(DataError, match="compact_filters"):
            from_conf(ModelConfig, "model", vocab_size=5, compact_filters=bad)


def test_a_strided_stem_keeps_the_grid_with_a_quarter_of_the_first_convs_outputs():
    """compact_strided_stem: the first block halves the grid by its conv's stride, not by
    pooling after it; the grid, the layers' weights and the last block are as without. A
    single block that does not pool (no pooling after the last) stays at stride 1."""
    pooled = build_encoder("compact", 64, compact_filters=(8, (16, 16)), compact_pool_last=False)
    strided = build_encoder(
        "compact",
        64,
        compact_filters=(8, (16, 16)),
        compact_pool_last=False,
        compact_strided_stem=True,
    )
    assert strided.output_shape == pooled.output_shape == (None, 32 * 32, 16)
    assert strided.count_params() == pooled.count_params()
    assert strided.get_layer("conv0").output.shape[1:3] == (32, 32)
    assert pooled.get_layer("conv0").output.shape[1:3] == (64, 64)
    assert "pool0" not in {layer.name for layer in strided.layers}
    one = build_encoder(
        "compact", 64, compact_filters=(8,), compact_pool_last=False, compact_strided_stem=True
    )
    assert one.output_shape == (None, 64 * 64, 8)
    config = from_conf(ModelConfig, "model", vocab_size=5, image_size=64, compact_strided_stem=True)
    assert config.build_encoder(None).get_layer("conv0").output.shape[1:3] == (32, 32)


def test_compact_encoder_loads_a_weights_file(tmp_path):
    trained = build_encoder("compact", 64, compact_filters=(8, 8))
    images = np.random.default_rng(0).uniform(0, 255, (2, 64, 64, 3)).astype("float32")
    trained.save_weights(tmp_path / "encoder.weights.h5")
    loaded = build_encoder("compact", 64, str(tmp_path / "encoder.weights.h5"), (8, 8))
    np.testing.assert_allclose(
        loaded.predict_on_batch(images), trained.predict_on_batch(images), rtol=1e-6
    )
    with pytest.raises(DataError, match="does not fit"):
        build_encoder("compact", 64, str(tmp_path / "encoder.weights.h5"), (8, 16))


def test_other_sizes_are_resized_to_the_backbone():
    encoder = build_encoder("nasnet_mobile", 128)
    assert encoder.output_shape == (None, 49, 1056)  # 7x7 at NASNetMobile's 224 px
