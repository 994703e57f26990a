"""DeepLabV3+ (``deeplabv3plus``): structure, the keras.io example's parameter count, options, null sizes, training.

The reference is the keras.io example "Multiclass semantic segmentation using DeepLabV3+"
(keras-team/keras-io, examples/vision/md/deeplabv3_plus.md): ResNet50 cut at ``conv4_block6_2_relu``
(ASPP, stride 16) and ``conv2_block3_2_relu`` (low level, stride 4), 512x512x3 input, 20 classes; its
``model.summary()`` prints Total params: 11,857,236 (Trainable 11,824,500, Non-trainable 32,736).
The registry-wide contract (save/load, mixed precision, a training step, frozen encoder, weights files)
is tests/test_models_contract.py.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

from tests.test_models_fpn_linknet_pspnet import count as _count
from tfseg.config import ModelConfig
from tfseg.errors import ModelError
from tfseg.models import build_model

SMALL = {"aspp_filters": 16, "low_level_filters": 8, "decoder_filters": 16}
KERAS_IO_LAYERS = ["conv4_block6_2_relu", "conv2_block3_2_relu"]
KERAS_IO_TOTAL, KERAS_IO_TRAINABLE, KERAS_IO_NON_TRAINABLE = 11_857_236, 11_824_500, 32_736


def _build(backbone="mobilenetv2", shape=(64, 64, 3), classes=3, activation="auto", **options):
    return build_model(ModelConfig(arch="deeplabv3plus", backbone=backbone, input_shape=shape, classes=classes,
                                   activation=activation, encoder_weights=None, options=options))


def _shape(model, name):
    return tuple(model.get_layer(name).output.shape)


def test_structure_aspp_branches_rates_and_output_size():
    model = _build(shape=(64, 96, 3), classes=3)  # the defaults: 256 filters, rates 6, 12, 18, low level 48
    encoder = model.get_layer("encoder")
    assert [tuple(t.shape) for t in encoder.outputs] == [(None, 4, 6, 576), (None, 16, 24, 144)]  # strides 16, 4
    assert [layer.name for layer in encoder.layers][-1] == "block_13_expand_relu"  # cut after the ASPP feature
    assert _shape(model, "aspp_pool_avg") == (None, 1, 1, 576)
    assert _shape(model, "aspp_pool_relu") == (None, 1, 1, 256)
    assert model.get_layer("aspp_1x1_conv").kernel_size == (1, 1)
    atrous = [layer for layer in model.layers if layer.name.startswith("aspp_rate") and layer.name.endswith("_conv")]
    assert [(layer.name, layer.kernel_size, layer.dilation_rate) for layer in atrous] == [
        (f"aspp_rate{r}_conv", (3, 3), (r, r)) for r in (6, 12, 18)]
    for branch in ("aspp_1x1", "aspp_rate6", "aspp_rate12", "aspp_rate18"):
        assert _shape(model, f"{branch}_relu") == (None, 4, 6, 256)
    assert _shape(model, "aspp_concat") == (None, 4, 6, 1024)
    assert _shape(model, "aspp_project_pool_conv") == (None, 1, 1, 256)
    assert _shape(model, "aspp_project_add") == (None, 4, 6, 256)  # the pooled branch broadcast over 4x6
    assert _shape(model, "decoder_upsampling") == (None, 16, 24, 256)
    assert model.get_layer("decoder_upsampling").interpolation == "bilinear"
    assert _shape(model, "decoder_low_level_relu") == (None, 16, 24, 48)
    assert _shape(model, "decoder_concat") == (None, 16, 24, 304)
    assert _shape(model, "decoder_conv2_relu") == (None, 16, 24, 256)
    assert model.get_layer("final_upsampling").size == (4, 4)
    assert model.get_layer("head_conv").kernel_size == (1, 1)
    assert model.output_shape == (None, 64, 96, 3)
    assert model.count_params() == 6_525_953 + 2 * (256 + 1)  # docs/models.md: 6,525,953 with 1 class
    assert not any(isinstance(layer, keras.layers.SeparableConv2D) for layer in model.layers)
    assert not any(isinstance(layer, keras.layers.Dropout) for layer in model.layers)
    out = keras.ops.convert_to_numpy(model(np.random.default_rng(0).uniform(0, 255, (2, 64, 96, 3)), training=False))
    assert out.shape == (2, 64, 96, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out.sum(-1), 1.0, atol=1e-5)


def test_split_projection_equals_projecting_the_tiled_concatenation():
    """keras.io and smp tile the pooled branch to h x w, concatenate the five branches and project them by
    one 1x1 conv; tfseg projects the pooled vector apart and adds it by broadcasting. Same numbers."""
    model = _build(**SMALL)
    probe = keras.Model(model.input, [model.get_layer(name).output for name in
                                      ("aspp_concat", "aspp_pool_relu", "aspp_project_add")])
    x = np.random.default_rng(1).uniform(0, 255, (2, 64, 64, 3)).astype("float32")
    spatial, pooled, added = (keras.ops.convert_to_numpy(t) for t in probe(x, training=True))
    assert pooled.std() > 0 and spatial.shape == (2, 4, 4, 4 * 16)
    tiled = np.broadcast_to(pooled, (*spatial.shape[:3], pooled.shape[-1]))
    kernel = np.concatenate([keras.ops.convert_to_numpy(model.get_layer(name).kernel)[0, 0]
                             for name in ("aspp_project_conv", "aspp_project_pool_conv")])  # [5 * 16, 16]
    assert kernel.shape == (5 * 16, 16)
    expected = np.concatenate([spatial, tiled], axis=-1) @ kernel
    np.testing.assert_allclose(added, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_keras_io_example_parameter_count():
    """The keras.io model: ResNet50 (tfseg's ``resnet50v1``) cut at its two layers, 512x512x3, 20 classes.

    tfseg has 256 parameters fewer: keras.io's image-pooling 1x1 convolution (``conv2d`` in its summary,
    65,792 = 256 x 256 + 256) has a bias, which the BatchNormalization right after it cancels (it subtracts
    the batch mean, so the bias gets no gradient and stays 0); tfseg's ``aspp_pool_conv`` has none, as the
    paper's image pooling and smp's ``ASPPPooling``. Every other layer has keras.io's count; keras.io's
    projection ``conv2d_5`` (327,680) is tfseg's ``aspp_project_conv`` + ``aspp_project_pool_conv``.
    """
    model = _build("resnet50v1", (512, 512, 3), classes=20, encoder_features=KERAS_IO_LAYERS)
    assert model.output_shape == (None, 512, 512, 20)
    assert model.count_params() == KERAS_IO_TOTAL - 256 == 11_856_980
    assert _count(model.trainable_weights) == KERAS_IO_TRAINABLE - 256
    assert _count(model.non_trainable_weights) == KERAS_IO_NON_TRAINABLE
    assert not model.get_layer("aspp_pool_conv").use_bias

    encoder = model.get_layer("encoder")
    assert [tuple(t.shape) for t in encoder.outputs] == [(None, 32, 32, 256), (None, 128, 128, 64)]
    assert encoder.layers[-1].name == "conv4_block6_2_relu"  # keras.io's graph ends there too
    head = {layer.name: layer.count_params() for layer in model.layers if layer.name != "encoder"}
    keras_io = {  # the summary's Param # of its layers after ResNet50's, under tfseg's names
        "aspp_pool_conv": 65_792 - 256, "aspp_pool_bn": 1_024,
        "aspp_1x1_conv": 65_536, "aspp_rate6_conv": 589_824, "aspp_rate12_conv": 589_824,
        "aspp_rate18_conv": 589_824, "aspp_1x1_bn": 1_024, "aspp_rate6_bn": 1_024, "aspp_rate12_bn": 1_024,
        "aspp_rate18_bn": 1_024, "aspp_project_conv": 1_024 * 256, "aspp_project_pool_conv": 256 * 256,
        "aspp_project_bn": 1_024, "decoder_low_level_conv": 3_072, "decoder_low_level_bn": 192,
        "decoder_conv1_conv": 700_416, "decoder_conv1_bn": 1_024, "decoder_conv2_conv": 589_824,
        "decoder_conv2_bn": 1_024, "head_conv": 5_140,
    }
    assert keras_io["aspp_project_conv"] + keras_io["aspp_project_pool_conv"] == 327_680  # keras.io's conv2d_5
    assert {name: n for name, n in head.items() if n} == keras_io
    assert encoder.count_params() == KERAS_IO_TOTAL - sum(keras_io.values()) - 256


@pytest.mark.parametrize("backbone, shape, options, message", [
    ("mobilenetv2", (64, 64, 3), {"aspp_filter": 64}, r"unknown option 'aspp_filter' \(did you mean 'aspp_filters'"),
    ("mobilenetv2", (64, 64, 3), {"decoder_filters": 0}, "option decoder_filters=0: expected a positive integer"),
    ("mobilenetv2", (64, 64, 3), {"low_level_filters": True}, "option low_level_filters=True: expected a positive"),
    ("mobilenetv2", (64, 64, 3), {"atrous_rates": [6, 6]}, "option atrous_rates=.*distinct positive integers"),
    ("mobilenetv2", (64, 64, 3), {"atrous_rates": []}, "option atrous_rates=.*distinct positive integers"),
    ("mobilenetv2", (64, 64, 3), {"aspp_dropout": 1.0}, r"aspp_dropout=1.0: expected null or a rate in \[0, 1\)"),
    ("mobilenetv2", (64, 64, 3), {"separable": "yes"}, "option separable='yes': expected true or false"),
    ("mobilenetv2", (64, 64, 3), {"encoder_features": [16]}, r"encoder_features=\[16\]: expected 'default' or \["),
    ("mobilenetv2", (64, 64, 3), {"encoder_features": [8, 4]},
     "the ASPP feature is at stride 8, not 16 or 32 .output stride 8 needs a dilated encoder"),
    ("mobilenetv2", (64, 64, 3), {"encoder_features": [16, 16]}, "low-level feature is at stride 16, not 2, 4 or 8"),
    ("mobilenetv2", (64, 64, 3), {"encoder_features": [64, 4]}, "mobilenetv2 has no features at stride 64"),
    ("mobilenetv2", (64, 64, 3), {"encoder_features": [16, "block_3_expand_rel"]},
     "'block_3_expand_rel' is not a layer of the mobilenetv2 encoder.*'block_3_expand_relu'"),
    ("resnet50v1", (64, 64, 3), {"encoder_features": ["conv3_block4_out", "conv2_block3_2_relu"]},
     "the ASPP feature 'conv3_block4_out' is at stride 8, not 16 or 32"),
    ("mobilenetv2", (72, 64, 3), {},
     "input height 72 is not divisible by 16; the nearest sizes that work are 64 and 80"),
    ("resnet50v1", (64, 40, 3), {"encoder_features": KERAS_IO_LAYERS},
     "input width 40 is not divisible by 16; the nearest sizes that work are 32 and 48"),
    ("mobilenetv2", (16, 64, 3), {}, "input height 16 is too small; the smallest size that works is 32"),
    ("inceptionv3", (None, None, 3), {}, "inceptionv3 needs a fixed input size"),
])
def test_option_and_size_errors_are_one_line_model_errors(backbone, shape, options, message):
    with pytest.raises(ModelError, match=message) as err:
        _build(backbone, shape, **options)
    assert "\n" not in str(err.value)


def test_null_height_width_fully_convolutional_equals_static_and_survives_save_load(tmp_path):
    fixed = _build(shape=(64, 64, 3), **SMALL)
    model = _build(shape=(None, None, 3), **SMALL)
    assert model.input_shape == (None, None, None, 3) and model.output_shape == (None, None, None, 3)
    model.set_weights(fixed.get_weights())
    rng = np.random.default_rng(2)
    x = rng.uniform(0, 255, (2, 64, 64, 3)).astype("float32")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(model(x, training=False)),
                               keras.ops.convert_to_numpy(fixed(x, training=False)), rtol=1e-5, atol=1e-6)
    big = rng.uniform(0, 255, (1, 96, 160, 3)).astype("float32")  # a larger tile, not square
    pred = keras.ops.convert_to_numpy(model(big, training=False))
    assert pred.shape == (1, 96, 160, 3)
    path = tmp_path / "deeplab-any-size.keras"
    model.save(path)
    loaded = keras.models.load_model(path)  # no custom_objects: built-in layers only
    np.testing.assert_allclose(keras.ops.convert_to_numpy(loaded(big, training=False)), pred, rtol=0, atol=1e-6)


def test_layer_names_with_null_size_have_their_strides_measured_and_survive_save_load(tmp_path):
    model = _build("resnet50v1", (None, None, 3), classes=2, encoder_features=KERAS_IO_LAYERS, **SMALL)
    encoder = model.get_layer("encoder")
    assert [t.shape[-1] for t in encoder.outputs] == [256, 64]
    assert encoder.layers[-1].name == "conv4_block6_2_relu"
    assert model.get_layer("decoder_upsampling").size == (4, 4) and model.get_layer("final_upsampling").size == (4, 4)
    x = np.random.default_rng(4).uniform(0, 255, (1, 64, 96, 3)).astype("float32")
    pred = keras.ops.convert_to_numpy(model(x, training=False))
    assert pred.shape == (1, 64, 96, 2)
    model.save(tmp_path / "deeplab-keras-io-layers.keras")
    loaded = keras.models.load_model(tmp_path / "deeplab-keras-io-layers.keras")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(loaded(x, training=False)), pred, rtol=0, atol=1e-6)


def test_separable_with_dropout_trains_a_few_steps_and_lowers_the_loss():
    keras.utils.set_random_seed(0)
    model = _build(classes=3, separable=True, aspp_dropout=0.1, atrous_rates=[2, 4], **SMALL)
    separable = {layer.name: layer.dilation_rate for layer in model.layers
                 if isinstance(layer, keras.layers.SeparableConv2D)}
    assert separable == {"aspp_rate2_conv": (2, 2), "aspp_rate4_conv": (4, 4), "decoder_conv1_conv": (1, 1),
                         "decoder_conv2_conv": (1, 1)}
    assert isinstance(model.get_layer("aspp_1x1_conv"), keras.layers.Conv2D)
    assert model.get_layer("aspp_dropout").rate == 0.1
    rng = np.random.default_rng(3)
    x = rng.uniform(0, 255, (4, 64, 64, 3)).astype("float32")
    yy, xx = np.mgrid[:64, :64]
    y = np.stack([(xx > yy).astype("int32") + (xx + yy > 64 + k) for k in range(4)])[..., None]  # classes 0..2
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy", run_eagerly=True)
    losses = [float(model.train_on_batch(x, y)) for _ in range(5)]
    assert np.isfinite(losses).all() and min(losses[2:]) < losses[0] - 1e-3, losses
