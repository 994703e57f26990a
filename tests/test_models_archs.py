"""The non-encoder-table architectures: unet_original, unet1024, unet_small, TernausNet, pix2pix.

Parameter counts are checked against the references' published or independently computed
figures; shapes, size rules and option errors on tiny inputs. The registry-wide contract (save/load,
mixed precision, a training step) is tests/test_models_contract.py.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

from tfseg.config import ModelConfig
from tfseg.errors import ModelError
from tfseg.models import arch_names, build_model
from tfseg.models import unet_original as uo
from tfseg.models.common import freeze_encoder, unfreeze_encoder
from tfseg.models.torch_weights import vgg_conv_layers


def _cfg(arch, shape, classes=1, **kw):
    kw.setdefault("encoder_weights", None)
    return ModelConfig(arch=arch, input_shape=shape, classes=classes, **kw)


def _layers(model, cls):
    return [layer for layer in model.layers if type(layer) is cls]


def _conv(i, o, k=3):
    return k * k * i * o + o


def test_all_registered():
    required = {"unet", "fpn", "linknet", "pspnet", "deeplabv3plus", "unetplusplus", "pix2pix_unet", "unet_original",
                "unet1024", "unet_small", "ternaus_unet11", "ternaus_unet16"}
    missing = required - set(arch_names())
    assert not missing, f"architectures not registered: {sorted(missing)}"


# ---------------------------------------------------------------- unet_original


def test_unet_original_has_the_papers_31030658_parameters_and_572_to_388():
    model = build_model(_cfg("unet_original", (572, 572, 1), classes=2, activation="linear"))
    assert model.count_params() == 31_030_658
    assert model.output_shape == (None, 388, 388, 2)
    assert model.get_layer("up1_crop").output.shape[1:] == (392, 392, 64)  # the paper's figure 1
    assert not _layers(model, keras.layers.BatchNormalization)


def test_unet_original_size_rule_572_to_388():
    assert uo.output_size(572) == 388
    assert uo.output_size(188) == 4
    assert [s for s in range(150, 260) if uo.valid_input_size(s)] == [188, 204, 220, 236, 252]
    assert uo.crop_margins() == [8, 32, 80, 176]
    with pytest.raises(ModelError, match="nearest sizes that work are 556 and 572"):
        uo.output_size(570)


def test_unet_original_takes_any_valid_size_and_center_crops():
    model = build_model(_cfg("unet_original", (None, None, 1), options={"filters": [2, 2, 2, 2, 2]}))
    out = model(np.zeros((1, 204, 220, 1), "float32"))
    assert tuple(out.shape) == (1, 204 - 184, 220 - 184, 1)
    # The output pixel (i, j) sees the input window centred on (i + 92, j + 92): a change outside
    # the receptive field of the centre output pixel leaves it unchanged.
    x = np.random.default_rng(0).uniform(0, 255, (1, 204, 204, 1)).astype("float32")
    y0 = np.asarray(model(x))
    x2 = x.copy()
    x2[0, 0, 0, 0] += 100.0  # far corner
    y2 = np.asarray(model(x2))
    assert np.allclose(y0[0, 10, 10], y2[0, 10, 10])


@pytest.mark.parametrize("shape, message", [
    ((500, 572, 1), "input height 500 does not fit .* nearest sizes that work are 492 and 508"),
    ((572, 100, 1), "input width 100 is too small; the smallest size that works is 188"),
])
def test_unet_original_bad_size_names_nearest(shape, message):
    with pytest.raises(ModelError, match=message):
        build_model(_cfg("unet_original", shape))


def test_unet_original_batchnorm_option_and_unknown_option():
    model = build_model(_cfg("unet_original", (188, 188, 1), options={"batchnorm": True,
                                                                       "filters": [4, 4, 4, 4, 4]}))
    assert len(_layers(model, keras.layers.BatchNormalization)) == 18
    with pytest.raises(ModelError, match=r"unknown option 'batch_norm' \(did you mean 'batchnorm'\?\)"):
        build_model(_cfg("unet_original", (188, 188, 1), options={"batch_norm": True}))


# ---------------------------------------------------------------- unet1024


def _unet1024_params(c, classes, filters=(8, 16, 32, 64, 128, 256, 512), center=1024):
    total, prev = 0, c
    for f in filters:  # two conv-BN per level (BN: gamma, beta, mean, variance)
        total += _conv(prev, f) + _conv(f, f) + 8 * f
        prev = f
    total += _conv(prev, center) + _conv(center, center) + 8 * center
    prev = center
    for f in reversed(filters):  # concat then three conv-BN
        total += _conv(prev + f, f) + 2 * _conv(f, f) + 12 * f
        prev = f
    return total + _conv(prev, classes, 1)


def test_unet1024_follows_get_unet_1024():
    model = build_model(_cfg("unet1024", (128, 128, 3)))
    assert len(_layers(model, keras.layers.MaxPooling2D)) == 7
    assert len(_layers(model, keras.layers.UpSampling2D)) == 7
    assert model.count_params() == _unet1024_params(3, 1) == 34_637_337
    assert model.output_shape == (None, 128, 128, 1)


def test_unet1024_levels_option_and_size_multiple():
    model = build_model(_cfg("unet1024", (64, 64, 1), options={"filters": [2, 2, 2, 2, 2, 2], "center": 4}))
    assert len(_layers(model, keras.layers.MaxPooling2D)) == 6
    assert model.output_shape == (None, 64, 64, 1)
    with pytest.raises(ModelError, match="input height 192 is not divisible by 128; the nearest sizes that "
                                         "work are 128 and 256"):
        build_model(_cfg("unet1024", (192, 256, 3)))


# ---------------------------------------------------------------- unet_small


def test_unet_small_matches_the_reference_unet():
    model = build_model(_cfg("unet_small", (16, 16, 3)))
    # usuyama/pytorch-unet UNet(n_class=1): 7,782,913 parameters.
    assert model.count_params() == 7_782_913
    ups = _layers(model, keras.layers.UpSampling2D)
    assert len(ups) == 3 and all(layer.interpolation == "bilinear" for layer in ups)
    assert len(_layers(model, keras.layers.MaxPooling2D)) == 3
    assert model.layers[-1].get_config()["activation"] == "sigmoid"
    with pytest.raises(ModelError, match="input height 12 is not divisible by 8"):
        build_model(_cfg("unet_small", (12, 16, 3)))


# ---------------------------------------------------------------- TernausNet


@pytest.mark.parametrize("arch, options, expected", [
    ("ternaus_unet11", {}, 22_927_393),                      # TernausNet UNet11 (torch count)
    ("ternaus_unet16", {}, 29_306_465),                      # UNet16, bilinear decoder
    ("ternaus_unet16", {"is_deconv": True}, 32_202_337),     # UNet16, ConvTranspose(4, 2)
])
def test_ternaus_parameter_counts_equal_the_torch_models(arch, options, expected):
    assert build_model(_cfg(arch, (32, 32, 3), options=options)).count_params() == expected


@pytest.mark.parametrize("arch, is_deconv, dec4_out", [
    ("ternaus_unet11", True, 4), ("ternaus_unet11", False, 4),
    ("ternaus_unet16", True, 8), ("ternaus_unet16", False, 8),
])
def test_ternaus_decoder_shapes(arch, is_deconv, dec4_out):
    nf = 4
    options = {"num_filters": nf, "is_deconv": is_deconv}
    model = build_model(_cfg(arch, (64, 32, 2), classes=3, options=options))
    assert model.output_shape == (None, 64, 32, 3)
    assert model.get_layer("dec4_concat").output.shape[1:3] == (8, 4)
    dec4 = model.get_layer("dec4_relu" if is_deconv else "dec4_conv2").output
    assert tuple(dec4.shape) == (None, 16, 8, dec4_out * nf)
    assert bool(_layers(model, keras.layers.Conv2DTranspose)) == is_deconv
    assert len(_layers(model, keras.layers.UpSampling2D)) == (0 if is_deconv else 5)
    assert len(vgg_conv_layers(model)) == (8 if arch.endswith("11") else 13)
    y = np.asarray(model(np.random.default_rng(1).uniform(0, 255, (1, 64, 32, 2)).astype("float32")))
    assert np.allclose(y.sum(-1), 1.0, atol=1e-5)


@pytest.mark.parametrize("arch", ["ternaus_unet11", "ternaus_unet16"])
def test_ternaus_encoder_freeze(arch):
    model = build_model(_cfg(arch, (32, 32, 3), encoder_freeze=True, options={"num_filters": 2}))
    frozen = {layer.name for layer in model.layers if not layer.trainable}
    assert frozen and all(name.startswith("encoder") for name in frozen)
    assert all(not layer.trainable for layer in vgg_conv_layers(model))
    assert model.get_layer("dec1_conv").trainable
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    vgg = sum(layer.count_params() for layer in vgg_conv_layers(model))
    assert trainable == model.count_params() - vgg
    unfreeze_encoder(model)
    assert all(layer.trainable for layer in vgg_conv_layers(model))
    freeze_encoder(model)  # train.freeze_encoder_epochs' first stage finds the same layers (encoder_layers)
    assert not any(layer.trainable for layer in vgg_conv_layers(model))
    assert model.get_layer("dec1_conv").trainable


def test_ternaus_unet16_takes_keras_vgg16_weights_through_the_encoder_table(tmp_path):
    vgg16 = keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3))
    path = tmp_path / "vgg16.weights.h5"
    vgg16.save_weights(path)
    model = build_model(_cfg("ternaus_unet16", (32, 32, 3), encoder_weights=str(path),
                             options={"num_filters": 2}))
    layers = vgg_conv_layers(model)
    np.testing.assert_array_equal(layers[5].kernel.numpy(), vgg16.get_layer("block3_conv2").kernel.numpy())
    # caffe weights expect BGR: the first kernel is flipped so the model takes RGB
    bgr = vgg16.get_layer("block1_conv1").kernel.numpy()
    np.testing.assert_array_equal(layers[0].kernel.numpy(), bgr[:, :, ::-1])


def test_ternaus_option_errors():
    with pytest.raises(ModelError, match="num_filters=0: expected a positive integer"):
        build_model(_cfg("ternaus_unet11", (32, 32, 3), options={"num_filters": 0}))
    with pytest.raises(ModelError, match="is_deconv='yes': expected true or false"):
        build_model(_cfg("ternaus_unet16", (32, 32, 3), options={"is_deconv": "yes"}))
    with pytest.raises(ModelError, match="Keras has no ImageNet VGG11 weights"):
        build_model(_cfg("ternaus_unet11", (32, 32, 3), encoder_weights="imagenet"))
    with pytest.raises(ModelError, match=r"unknown option 'filters'.*one of \['is_deconv', 'num_filters'\]"):
        build_model(_cfg("ternaus_unet11", (32, 32, 3), options={"filters": 3}))


# ---------------------------------------------------------------- pix2pix_unet


def test_pix2pix_has_the_tutorials_6504227_parameters_and_frozen_encoder():
    model = build_model(_cfg("pix2pix_unet", (128, 128, 3), classes=3, activation="linear"))
    assert model.count_params() == 6_504_227
    assert model.output_shape == (None, 128, 128, 3)
    encoder = model.get_layer("encoder")
    assert not encoder.trainable
    assert [tuple(t.shape[1:]) for t in encoder.outputs] == [(64, 64, 96), (32, 32, 144), (16, 16, 192),
                                                             (8, 8, 576), (4, 4, 320)]
    # Trainable: the decoder only (the tutorial's 4,662,243 minus the BatchNorm moving statistics).
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    assert trainable == 6_504_227 - 1_841_984 - 2 * (512 + 256 + 128 + 64)
    assert model.get_layer("output").get_config()["activation"] == "linear"


def test_pix2pix_options():
    model = build_model(_cfg("pix2pix_unet", (64, 96, 1), classes=1, dropout=0.5,
                             options={"freeze": False, "filters": [8, 8, 8, 8]}))
    assert model.get_layer("encoder").trainable
    assert model.output_shape == (None, 64, 96, 1)
    assert len(_layers(model, keras.layers.Dropout)) == 4
    frozen = build_model(_cfg("pix2pix_unet", (32, 32, 3), encoder_freeze=True, options={"freeze": False}))
    assert not frozen.get_layer("encoder").trainable
    with pytest.raises(ModelError, match="backbone=.resnet50.; the tutorial.s model has a MobileNetV2"):
        build_model(_cfg("pix2pix_unet", (32, 32, 3), backbone="resnet50"))
    with pytest.raises(ModelError, match=r"unknown option 'frozen' \(did you mean 'freeze'\?\)"):
        build_model(_cfg("pix2pix_unet", (32, 32, 3), options={"frozen": True}))
    with pytest.raises(ModelError, match="input width 100 is not divisible by 32"):
        build_model(_cfg("pix2pix_unet", (64, 100, 3)))


def test_unet_encoder_features_picks_the_skip_strides():
    from tfseg.models.unet import Unet

    # VGG has a full-resolution block: (16, 8, 4, 2, 1) skips from it too, as sm's encoder_features can
    model = Unet("vgg16", input_shape=(64, 64, 3), encoder_weights=None, encoder_features=(16, 8, 4, 2, 1))
    concat = model.get_layer("decoder_stage4_concat")
    assert [tuple(t.shape[1:]) for t in concat.input] == [(64, 64, 32), (64, 64, 64)]
    default = Unet("vgg16", input_shape=(64, 64, 3), encoder_weights=None)
    assert "decoder_stage4_concat" not in {layer.name for layer in default.layers}
    # fewer strides than blocks: the last blocks upsample without a skip
    short = Unet("efficientnetb0", input_shape=(64, 64, 3), encoder_weights=None, encoder_features=[16, 8])
    assert {layer.name for layer in short.layers if layer.name.endswith("_concat")} == {
        "decoder_stage0_concat", "decoder_stage1_concat"}


def test_unet_encoder_features_takes_sms_layer_names():
    """sm.Unet's encoder_features are layer names: the same names give the same model as the strides."""
    from tfseg.models.unet import Unet

    names = ("block6a_expand_activation", "block4a_expand_activation", "block3a_expand_activation")
    by_name = Unet("efficientnetb0", input_shape=(64, 64, 3), encoder_weights=None, encoder_features=names)
    by_stride = Unet("efficientnetb0", input_shape=(64, 64, 3), encoder_weights=None, encoder_features=(16, 8, 4))
    assert by_name.count_params() == by_stride.count_params()
    concats = sorted(layer.name for layer in by_name.layers if layer.name.endswith("_concat"))
    assert concats == ["decoder_stage0_concat", "decoder_stage1_concat", "decoder_stage2_concat"]
    skips = [tuple(by_name.get_layer(c).input[1].shape[1:]) for c in concats]
    assert skips == [(4, 4, 672), (8, 8, 240), (16, 16, 144)]  # the named layers' outputs


@pytest.mark.parametrize("backbone, features, bad", [
    ("efficientnetb0", ["block6a_activation"], "'block6a_activation'"),  # a layer, but not one of the features
    ("efficientnetb0", (16, 8, 4, 2, 1), "1"),  # EfficientNet has no stride-1 feature
    ("convnexttiny", (16, 8, 4, 2), "2"),  # nor ConvNeXt a stride-2 one
])
def test_unet_encoder_features_rejects_what_the_encoder_lacks(backbone, features, bad):
    from tfseg.models.unet import Unet

    with pytest.raises(ModelError, match=rf"unet: encoder_features=.*: {bad} is not a feature of {backbone}; "
                                         r"expected 'default', or strides from \[") as err:
        Unet(backbone, input_shape=(64, 64, 3), encoder_weights=None, encoder_features=features)
    if backbone == "efficientnetb0":
        assert "or their layer names (16: 'block6a_expand_activation', 8: 'block4a_expand_activation'" in str(err.value)


@pytest.mark.parametrize("arch", ["unet_original", "unet1024", "unet_small"])
def test_from_scratch_archs_refuse_an_encoder_weights_file(arch, tmp_path):
    # the config's default (imagenet) and null do not apply and build; a file would go unused: an error
    shape = {"unet_original": (188, 188, 1), "unet1024": (128, 128, 1), "unet_small": (16, 16, 1)}[arch]
    for weights in (None, "imagenet"):
        assert build_model(_cfg(arch, shape, encoder_weights=weights)).output_shape[-1] == 1
    path = tmp_path / "encoder.weights.h5"
    path.write_bytes(b"")
    with pytest.raises(ModelError, match=rf"{arch}: encoder_weights='.*encoder.weights.h5', but {arch} is trained "
                                         r"from scratch and has no pretrained encoder"):
        build_model(_cfg(arch, shape, encoder_weights=str(path)))
    # it trained with every weight trainable, silently
    with pytest.raises(ModelError, match=rf"^{arch}: encoder_freeze=true, but {arch} is trained from scratch and has "
                                         r"no pretrained encoder to freeze; expected false$"):
        build_model(_cfg(arch, shape, encoder_freeze=True))
