"""Every architecture's ``model.options`` and the sm-style constructors' arguments: a value of the wrong type
or range is one line, ``<arch>: option <name>=<value>: expected ...``, never Python's TypeError/ValueError."""

from __future__ import annotations

import re

import keras
import numpy as np
import pytest

from tfseg.cli import main
from tfseg.config import ModelConfig
from tfseg.errors import ModelError
from tfseg.models import arch_names, build_model
from tfseg.models.common import read_options, resolve_activation

# One small valid input size per architecture (the options are checked before anything is built).
SIZES = {"unet_original": 188, "pspnet": 48, "unet1024": 128, "unet_small": 16}


def _cfg(arch: str, options: dict, **kwargs) -> ModelConfig:
    size = SIZES.get(arch, 64)
    fields = dict(arch=arch, backbone="mobilenetv2", input_shape=(size, size, 3), classes=1,
                  encoder_weights=None, options=options)
    return ModelConfig(**{**fields, **kwargs})


@pytest.mark.parametrize("arch, options, message", [
    # the user-tester's commands: TypeError, ValueError or a silently accepted value before
    ("unet_small", {"filters": 16},
     "unet_small: option filters=16: expected a list of at least 2 positive integers, e.g. [64, 128, 256, 512]"),
    ("unet_original", {"filters": 64},
     "unet_original: option filters=64: expected a list of 5 positive integers, e.g. [64, 128, 256, 512, 1024]"),
    ("unet1024", {"filters": 8},
     "unet1024: option filters=8: expected a list of one or more positive integers, e.g. [8, 16, 32, 64, 128, 256, "
     "512]"),
    ("unet1024", {"center": "big"}, "unet1024: option center='big': expected a positive integer"),
    ("pix2pix_unet", {"filters": 5},
     "pix2pix_unet: option filters=5: expected a list of 4 positive integers, e.g. [512, 256, 128, 64]"),
    ("unet_original", {"batchnorm": "yes please"}, "unet_original: option batchnorm='yes please': expected true or "
                                                   "false"),
    ("unet_small", {"batchnorm": 1}, "unet_small: option batchnorm=1: expected true or false"),
    ("unet_small", {"filters": [4, 8.5]}, "unet_small: option filters=[4, 8.5]: expected a list of at least 2"),
    # bool("no") is True: these built with BatchNorm before
    ("fpn", {"pyramid_use_batchnorm": "no"}, "fpn: option pyramid_use_batchnorm='no': expected null or true or false"),
    ("pspnet", {"psp_use_batchnorm": "no"}, "pspnet: option psp_use_batchnorm='no': expected null or true or false"),
    ("pspnet", {"downsample_factor": 8.0}, "pspnet: option downsample_factor=8.0: expected one of [4, 8, 16]"),
    ("ternaus_unet11", {"num_filters": 2.5}, "ternaus_unet11: option num_filters=2.5: expected a positive integer"),
])
def test_a_bad_option_value_is_one_line_in_one_format(arch, options, message):
    with pytest.raises(ModelError) as err:
        build_model(_cfg(arch, options))
    assert str(err.value).startswith(message), str(err.value)


def _option_names(arch: str) -> list[str]:
    """The options an architecture takes, as its unknown-option error lists them."""
    try:
        build_model(_cfg(arch, {"no_such_option": 1}))
    except ModelError as err:
        text = str(err)
    if "takes no options" in text:
        return []
    return re.findall(r"'(\w+)'", text.split("Expected one of")[1])


@pytest.mark.parametrize("arch", arch_names())
def test_every_option_of_every_architecture_is_checked(arch):
    """A mapping is no valid value of any typed option: each says so in the one format, before building."""
    names = [n for n in _option_names(arch) if n != "encoder_features"]  # a name, stride or list: checked later
    for name in names:
        with pytest.raises(ModelError) as err:
            build_model(_cfg(arch, {name: {"x": 1}}))
        assert str(err.value).startswith(f"{arch}: option {name}={{'x': 1}}: expected "), str(err.value)
    assert names or arch in ("linknet", "unet", "unetplusplus")  # linknet has no options, the unets only features


def test_read_options_infers_the_type_of_a_plain_default():
    defaults = {"width": 8, "scale": 0.5, "mode": "a", "on": False, "sizes": (2, 3)}
    assert read_options("x", {"width": 4, "sizes": [1, 1]}, defaults)["sizes"] == [1, 1]
    for name, value, expected in [("width", "8", "an integer"), ("scale", "0.5", "a number"), ("mode", 1, "a string"),
                                  ("on", "true", "true or false"), ("sizes", [1], "a list of 2 positive integers")]:
        with pytest.raises(ModelError, match=re.escape(f"x: option {name}={value!r}: expected {expected}")):
            read_options("x", {name: value}, defaults)
    with pytest.raises(ModelError, match=r"x: options=\[1\]: expected a mapping"):
        read_options("x", [1], defaults)


def test_the_cli_exits_2_with_one_line_naming_model_options(capsys):
    assert main(["models", "--set", "model.arch=unet1024", "--set", 'model.options={center: "big"}']) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["tfseg models: error: --set model.options={center: \"big\"}: unet1024: option center='big': "
                   "expected a positive integer"]


# ------------------------------------------------------------------------------------------------
# sm-style constructors (tfseg.models.unet.Unet, fpn.FPN, linknet.Linknet, pspnet.PSPNet)
# ------------------------------------------------------------------------------------------------


def test_constructor_argument_typos_get_the_nearest_name():
    from tfseg.models.fpn import FPN
    from tfseg.models.linknet import Linknet
    from tfseg.models.unet import Unet

    with pytest.raises(ModelError, match=r"^FPN: unknown argument 'pyramid_filters' \(did you mean "
                                         r"'pyramid_block_filters'\?\). Expected one of \['backbone_name', "):
        FPN("mobilenetv2", pyramid_filters=128)
    with pytest.raises(ModelError, match=r"^Linknet: unknown argument 'decoder_filter' \(did you mean "
                                         r"'decoder_filters'\?\)"):
        Linknet("mobilenetv2", decoder_filter=(16,))
    with pytest.raises(ModelError, match=r"^Unet: too many positional arguments; it takes \['backbone_name'"):
        Unet("vgg16", (64, 64, 3), 1, "sigmoid", None, None, False, "default", "upsampling", (8,), True, "extra")


def test_constructors_check_weights_and_classes_before_building(tmp_path):
    from tfseg.models.pspnet import PSPNet
    from tfseg.models.unet import Unet

    missing = tmp_path / "missing.h5"
    with pytest.raises(ModelError, match=f"^unet: weights='{re.escape(str(missing))}': no such file; expected null "
                                         "or the path of this model's weights file"):
        Unet("mobilenetv2", input_shape=(64, 64, 3), encoder_weights=None, weights=str(missing))
    with pytest.raises(ModelError, match=r"^unet: classes=0: expected an integer >= 1 \(the output channels"):
        Unet("mobilenetv2", input_shape=(64, 64, 3), encoder_weights=None, classes=0)
    with pytest.raises(ModelError, match=r"^pspnet: classes=2.0: expected an integer >= 1"):
        PSPNet("mobilenetv2", input_shape=(48, 48, 3), encoder_weights=None, classes=2.0)


@pytest.mark.parametrize(("build", "message"), [
    # each of these built: "no" froze the encoder and "False" kept BatchNorm (a string is true), a float filter
    # count was cut, and the rest were Keras' or Python's own errors that did not name the argument
    ("Unet(encoder_freeze='no')", "unet: encoder_freeze='no': expected true or false"),
    ("Unet(decoder_use_batchnorm='False')", "unet: decoder_use_batchnorm='False': expected true or false"),
    ("Linknet(decoder_use_batchnorm='no')", "linknet: decoder_use_batchnorm='no': expected true or false"),
    ("FPN(encoder_freeze=1)", "fpn: encoder_freeze=1: expected true or false"),
    ("Unet(decoder_filters=(64, 32, -1, 8, 4))", "unet: decoder_filters=[64, 32, -1, 8, 4]: expected a list of one or "
                                                 "more decoder blocks' filters, each a positive integer, e.g. "),
    ("Unet(decoder_filters=16)", "unet: decoder_filters=16: expected a list of one or more"),
    ("Unet(decoder_filters=(None, 128, 64, 32, 16))", "unet: decoder_filters=[None, 128, 64, 32, 16]: expected"),
    ("Unet(decoder_filters=(256.5, 128, 64, 32, 16))", "unet: decoder_filters=[256.5, 128, 64, 32, 16]: expected"),
    ("Linknet(decoder_filters=(None, 0))", "linknet: decoder_filters=[None, 0]: expected a list of one or more "
                                           "decoder blocks' filters, each a positive integer or None, e.g. (None, "),
    ("Unet(input_shape=(64.0, 64, 3))", "unet: input_shape=[64.0, 64, 3]: expected (height, width, channels) of "
                                        "positive integers, height and width None for any size"),
    ("PSPNet(input_shape=(96, 96))", "pspnet: input_shape=[96, 96]: expected (height, width, channels)"),
])
def test_constructor_flags_filters_and_shapes_are_checked(build, message):
    from tfseg.models.fpn import FPN  # noqa: F401 - named in build
    from tfseg.models.linknet import Linknet  # noqa: F401
    from tfseg.models.pspnet import PSPNet  # noqa: F401
    from tfseg.models.unet import Unet  # noqa: F401

    call = build.replace("(", "('mobilenetv2', encoder_weights=None, input_shape=(64, 64, 3), ", 1)
    if "input_shape=" in build:
        call = build.replace("(", "('mobilenetv2', encoder_weights=None, ", 1)
    with pytest.raises(ModelError) as err:
        eval(call)
    assert str(err.value).startswith(message), str(err.value)


def test_constructors_take_numpy_numbers_as_sm_does():
    """classes=mask.max() + 1 is a numpy integer in a notebook; it said `classes=np.int64(2): expected an integer`."""
    from tfseg.models.unet import Unet

    model = Unet("mobilenetv2", input_shape=np.array([64, 64, 3]), classes=np.int64(2), activation="softmax",
                 encoder_weights=None, decoder_filters=np.array([16, 8, 8, 8, 8]), encoder_freeze=np.bool_(True))
    assert model.output_shape == (None, 64, 64, 2)
    assert not model.get_layer("encoder").trainable
    assert [layer.filters for layer in model.layers if layer.name == "decoder_stage0a_conv"] == [16]


def test_a_weights_file_of_another_model_is_one_line(tmp_path):
    from tfseg.models.linknet import Linknet

    args = dict(input_shape=(32, 32, 3), encoder_weights=None, decoder_filters=(8,))
    path = tmp_path / "three_classes.weights.h5"
    Linknet("mobilenetv2", classes=3, activation="softmax", **args).save_weights(path)
    model = Linknet("mobilenetv2", classes=3, activation="softmax", weights=str(path), **args)
    assert model.count_params() > 0  # its own file loads
    with pytest.raises(ModelError, match=f"^linknet: weights='{re.escape(str(path))}': could not load it into "
                                         "linknet_mobilenetv2 "):
        Linknet("mobilenetv2", classes=1, weights=str(path), **args)


@pytest.mark.parametrize("activation, classes, message", [
    ("sigmod", 1, "Received: activation='sigmod' (did you mean 'sigmoid'?). Expected one of ['auto', 'sigmoid', "
                  "'softmax', 'linear'] or null (= linear)"),
    ("softmx", 3, "Received: activation='softmx' (did you mean 'softmax'?)"),
    ("relu", 1, "Received: activation='relu': a Keras activation, but tfseg's losses, metrics and predict read a "
                "model's output as probabilities (sigmoid, softmax) or logits (linear or null)"),
    ("tanh", 2, "Received: activation='tanh': a Keras activation"),
    ("softmax", 1, "Received: activation='softmax' with classes=1: a softmax over one channel is 1.0 at every pixel; "
                   "expected 'sigmoid' (or 'auto') for one class"),
])
def test_activations_say_what_they_expect(activation, classes, message):
    with pytest.raises(ModelError) as err:
        resolve_activation(activation, classes)
    assert str(err.value).startswith(message), str(err.value)


@pytest.mark.parametrize("activation, classes, keras_name", [
    (None, 1, "linear"), ("linear", 3, "linear"), ("sigmoid", 1, "sigmoid"), ("sigmoid", 3, "sigmoid"),
    ("softmax", 2, "softmax"), ("auto", 1, "sigmoid"), ("auto", 4, "softmax"),
])
def test_the_activations_segmentation_models_notebooks_use_are_taken(activation, classes, keras_name):
    assert resolve_activation(activation, classes) == keras_name


def test_an_sm_arch_in_the_wrong_case_suggests_the_right_one():
    with pytest.raises(ModelError, match=r"^Received: arch='sm.unet' \(did you mean 'sm.Unet'\?\). Expected one of "
                                         r"\['sm.FPN', 'sm.Linknet', 'sm.PSPNet', 'sm.Unet'\]"):
        build_model(ModelConfig(arch="sm.unet", backbone="vgg16", input_shape=(64, 64, 3), classes=1))
    with pytest.raises(ModelError, match=r"^Received: arch='Unet' \(did you mean 'unet'\?\)"):
        build_model(ModelConfig(arch="Unet", backbone="vgg16", input_shape=(64, 64, 3), classes=1))


def test_a_valid_option_still_builds():
    model = build_model(_cfg("unet_small", {"filters": [4, 8], "batchnorm": True}, input_shape=(16, 16, 1)))
    assert model.output_shape == (None, 16, 16, 1)
    assert any(isinstance(layer, keras.layers.BatchNormalization) for layer in model.layers)
    assert np.isfinite(model.predict(np.zeros((1, 16, 16, 1), "float32"), verbose=0)).all()
