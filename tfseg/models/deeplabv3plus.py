"""``deeplabv3plus``: DeepLabV3+ (Chen et al. 2018), atrous spatial pyramid pooling and a light decoder.

The model of the keras.io example "Multiclass semantic segmentation using DeepLabV3+" and of
segmentation_models_pytorch's ``DeepLabV3Plus``, on any encoder of the table:

- ASPP on the stride-16 feature: a 1x1 conv-BN-ReLU, one 3x3 atrous conv-BN-ReLU per rate of
  ``atrous_rates`` (6, 12, 18), and image pooling (global average pool, 1x1 conv-BN-ReLU), all of
  ``aspp_filters`` (256); they are concatenated and projected by a 1x1 conv-BN-ReLU to
  ``aspp_filters``, then an optional Dropout (``aspp_dropout``).
- Decoder: the ASPP output is upsampled bilinearly to stride 4 (x4) and concatenated with the
  stride-4 feature projected by a 1x1 conv-BN-ReLU to ``low_level_filters`` (48); two 3x3
  conv-BN-ReLU of ``decoder_filters`` (256); a bilinear upsampling to the input size (x4); the
  shared head (a 1x1 convolution to ``classes``, as keras.io and smp).

The image-pooling branch's value is one vector per image; DeepLab tiles it back to the feature
size before the concatenation, which needs the feature size when the model is built (keras.io's
``UpSampling2D``) or a custom layer. Here the projection's share of that branch (its
``aspp_filters`` rows of the 1x1 kernel) is a separate 1x1 convolution applied to the pooled
vector, added to the projection of the other branches by broadcasting (``Add`` of [B, h, w, F] and
[B, 1, 1, F]). A 1x1 convolution of a concatenation is the sum of the 1x1 convolutions of its
parts, so this is the same computation with the same parameters, in built-in layers only, and
``input_shape`` may have null height and width (fully-convolutional inference on big tiles).

Options (``cfg.options``):
    encoder_features: ``default`` = ``[16, 4]``, or ``[ASPP feature, low-level feature]``, each a
        stride of the encoder table or a layer name of the encoder: the table's (as unet takes sm's
        names) or any other, e.g. keras.io's ``[conv4_block6_2_relu, conv2_block3_2_relu]`` on
        ``resnet50v1``. The ASPP feature must be at stride 16 or 32, the low-level one at 2, 4 or 8.
    atrous_rates: [6, 12, 18]; distinct positive dilation rates, one 3x3 branch each.
    aspp_filters: 256; filters of every ASPP branch and of its projection.
    aspp_dropout: null = ``cfg.dropout``; Dropout rate after the projection (smp: 0.5, keras.io: none).
    low_level_filters: 48; the 1x1 projection of the low-level feature.
    decoder_filters: 256; the two 3x3 decoder convolutions (``model.decoder_filters``, unet's list,
        does not apply).
    separable: false (keras.io); true makes the atrous and decoder 3x3 convolutions depthwise-separable
        (SeparableConv2D, no BatchNorm between depthwise and pointwise), as smp does.

Output stride 16 (32 with the ASPP feature at stride 32), never 8: output stride 8 needs an encoder
whose last stages are dilated instead of strided, which keras.applications' models cannot give, so an
ASPP feature at stride 8 is an error rather than an encoder cut short. Input height and width must be
multiples of the ASPP feature's stride (16), or null.
"""

from __future__ import annotations

import math

import keras

from tfseg.config import ModelConfig
from tfseg.errors import ModelError
from tfseg.models import ARCHS
from tfseg.models.blocks import conv_bn_act
from tfseg.models.common import (
    any_value,
    check_input_shape,
    dropout_rate,
    flag,
    freeze_encoder,
    int_list,
    option_error,
    positive_int,
    read_options,
    segmentation_head,
)
from tfseg.models.encoders import encoder_on_input, get_encoder_spec

ARCH = "deeplabv3plus"
FEATURES_EXPECTED = "'default' or [ASPP feature, low-level feature], each a stride or a layer name, e.g. [16, 4]"
DEFAULT_OPTIONS = {
    "encoder_features": any_value("default", FEATURES_EXPECTED),
    "atrous_rates": int_list([6, 12, 18], distinct=True),
    "aspp_filters": positive_int(256),
    "aspp_dropout": dropout_rate(),
    "low_level_filters": positive_int(48),
    "decoder_filters": positive_int(256),
    "separable": flag(False),
}
DEFAULT_FEATURES = (16, 4)
ASPP_STRIDES = (16, 32)
LOW_LEVEL_STRIDES = (2, 4, 8)
PROBE_SIDE = 256  # input side at which a named layer's stride is measured when the input size is null
# Shared model contract (tests/test_models_contract.py): tiny test size, encoders, small options.
TEST_SIZE = 64
TEST_BACKBONES = ("mobilenetv2", "resnet50v1", "efficientnetb0")
TEST_OPTIONS = {"aspp_filters": 32, "low_level_filters": 16, "decoder_filters": 32}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_features(features) -> None:
    if features != "default" and not (isinstance(features, (list, tuple)) and len(features) == 2
                                      and all(_is_int(f) or isinstance(f, str) for f in features)):
        raise option_error(ARCH, "encoder_features", features, FEATURES_EXPECTED)


def conv_bn_relu(x, filters: int, kernel_size: int, *, rate: int = 1, separable: bool = False, name: str):
    """Conv (atrous with ``rate`` > 1; depthwise-separable with ``separable`` and kernel > 1) -> BN -> ReLU:
    layers ``<name>_conv`` (Conv2D or SeparableConv2D, no bias), ``<name>_bn``, ``<name>_relu``."""
    return conv_bn_act(x, filters, kernel_size, dilation_rate=rate, separable=separable,
                       name=name)


def aspp(x, filters: int = 256, rates=(6, 12, 18), *, separable: bool = False, dropout: float | None = None):
    """Atrous spatial pyramid pooling: 1x1, 3x3 atrous at each rate, image pooling; projected to ``filters``.

    The image-pooling branch [B, 1, 1, F] enters the 1x1 projection through its own 1x1 convolution
    (``aspp_project_pool_conv``), added by broadcasting to the projection of the concatenated spatial
    branches (``aspp_project_conv``): the projection of the concatenation with the pooled vector tiled
    to every position, without needing h and w (see the module docstring). Both parts start as one He
    uniform kernel over all ``(len(rates) + 2) * filters`` inputs would.

    Args:
        x: encoder feature [B, h, w, C]; h and w may be None.
    Returns:
        [B, h, w, filters].
    """
    fan_in = (len(rates) + 2) * filters  # of the single projection this one splits in two

    def part(channels):  # He uniform over the whole fan-in, for the part that sees ``channels`` of it
        return keras.initializers.VarianceScaling(2.0 * channels / fan_in, mode="fan_in", distribution="uniform")

    pooled = keras.layers.GlobalAveragePooling2D(keepdims=True, name="aspp_pool_avg")(x)
    pooled = conv_bn_relu(pooled, filters, 1, name="aspp_pool")
    branches = [conv_bn_relu(x, filters, 1, name="aspp_1x1")]
    for rate in rates:
        branches.append(conv_bn_relu(x, filters, 3, rate=rate, separable=separable, name=f"aspp_rate{rate}"))
    y = keras.layers.Concatenate(axis=-1, name="aspp_concat")(branches)
    y = keras.layers.Conv2D(filters, 1, use_bias=False, kernel_initializer=part(filters * len(branches)),
                            name="aspp_project_conv")(y)
    pooled = keras.layers.Conv2D(filters, 1, use_bias=False, kernel_initializer=part(filters),
                                 name="aspp_project_pool_conv")(pooled)
    y = keras.layers.Add(name="aspp_project_add")([y, pooled])
    y = keras.layers.BatchNormalization(name="aspp_project_bn")(y)
    y = keras.layers.Activation("relu", name="aspp_project_relu")(y)
    if dropout:
        y = keras.layers.Dropout(dropout, name="aspp_dropout")(y)
    return y


def _features_message(backbone: str, features, problem: str) -> str:
    spec = get_encoder_spec(backbone)
    names = ", ".join(f"{s}: {f!r}" for f, s in sorted(spec.layer_names.items(), key=lambda fs: -fs[1]))
    return (f"{ARCH}: option encoder_features={features!r}: {problem}; expected 'default' or [ASPP feature, "
            f"low-level feature], strides from {list(spec.strides)} or layer names of the {backbone} encoder"
            + (f" (the table's: {names})" if names else ""))


def _check_strides(backbone: str, features, strides) -> None:
    """The ASPP feature at stride 16 or 32, the low-level one at 2, 4 or 8."""
    entries = DEFAULT_FEATURES if features == "default" else features
    for (label, allowed, note), entry, stride in zip(
            (("ASPP", ASPP_STRIDES, "output stride 8 needs a dilated encoder, which keras.applications' models "
                                    "are not"), ("low-level", LOW_LEVEL_STRIDES, "DeepLabV3+ takes 4")),
            entries, strides):
        if stride not in allowed:
            which = "" if _is_int(entry) else f" {entry!r}"
            expected = ", ".join(map(str, allowed[:-1])) + f" or {allowed[-1]}"
            raise ModelError(_features_message(backbone, features, f"the {label} feature{which} is at stride "
                                                                   f"{stride}, not {expected} ({note})"))


def _encode(cfg: ModelConfig, features):
    """The model's input and its (ASPP, low-level) encoder features with their strides.

    Strides and the table's layer names take the table's features (:func:`encoder_on_input`). Other
    layer names are looked up in the whole encoder, their strides measured from their output shapes
    (at ``PROBE_SIDE`` where the input size is null), and the encoder is cut after them.

    Returns:
        (image, aspp feature [B, H/s, W/s, C], low-level feature [B, H/l, W/l, C'], (s, l)).
    """
    backbone = cfg.backbone
    spec = get_encoder_spec(backbone)
    shape = tuple(cfg.input_shape or (None, None, 3))
    refs = DEFAULT_FEATURES if features == "default" else tuple(spec.layer_names.get(f, f) for f in features)
    for ref in refs:
        if _is_int(ref) and ref not in spec.strides:
            raise ModelError(_features_message(backbone, features, f"{backbone} has no features at stride {ref}"))
    if all(_is_int(ref) for ref in refs):
        _check_strides(backbone, features, refs)
        image, (high, low), _ = encoder_on_input(backbone, shape, cfg.encoder_weights, refs, arch=ARCH,
                                                 multiple=refs[0])
        return image, high, low, refs

    # A layer the table does not name: build the whole encoder (its stride-32 output depends on every
    # layer), find the layers, measure their strides, then check the input size against the ASPP stride.
    table_strides = [ref for ref in refs if _is_int(ref)]
    image, _, encoder = encoder_on_input(backbone, shape, cfg.encoder_weights, (32, *table_strides), arch=ARCH,
                                         multiple=1)
    outputs = dict(zip(table_strides, encoder.outputs[1:]))
    tensors = []
    for ref in refs:
        if _is_int(ref):
            tensors.append(outputs[ref])
            continue
        try:
            tensors.append(encoder.get_layer(ref).output)
        except (ValueError, AttributeError) as err:
            raise ModelError(_features_message(backbone, features, f"{ref!r} is not a layer of the {backbone} "
                                                                   "encoder")) from err
    h, w, c = shape
    side = (h or PROBE_SIDE, w or PROBE_SIDE)
    cut = keras.Model(encoder.inputs, tensors, name="encoder")
    specs = cut.compute_output_spec(keras.KerasTensor((1, *side, c)))
    strides = tuple(2 ** round(math.log2(side[0] / out.shape[1])) for out in specs)
    _check_strides(backbone, features, strides)
    check_input_shape(shape, strides[0], ARCH, min_size=-(-spec.min_size // strides[0]) * strides[0])
    for ref, stride, out in zip(refs, strides, specs):
        if tuple(out.shape[1:3]) != (side[0] // stride, side[1] // stride):
            raise ModelError(_features_message(
                backbone, features, f"layer {ref!r} gives {out.shape[1]}x{out.shape[2]} maps at input "
                                    f"{side[0]}x{side[1]}, not input / {stride} (a valid-padded encoder: use "
                                    "the table's features, by stride)"))
    high, low = cut(image)
    return image, high, low, strides


@ARCHS.register(ARCH)
def build_deeplabv3plus(cfg: ModelConfig) -> keras.Model:
    """Build DeepLabV3+ on the encoder ``cfg.backbone``.

    Args:
        cfg: the model section; architecture options in ``cfg.options`` (see the module docstring).

    Returns:
        ``keras.Model`` from float32 [B, H, W, C] images in 0..255 to float32 [B, H, W, classes]; H and
        W may be None (any multiple of 16 then works).

    Raises:
        ModelError: unknown or invalid option, a feature the encoder lacks or at a stride DeepLabV3+
            cannot take, input size not a multiple of the ASPP feature's stride, unknown backbone.
    """
    opts = read_options(ARCH, cfg.options, DEFAULT_OPTIONS)
    _check_features(opts["encoder_features"])
    dropout = cfg.dropout if opts["aspp_dropout"] is None else opts["aspp_dropout"]
    separable = opts["separable"]

    image, high, low, (high_stride, low_stride) = _encode(cfg, opts["encoder_features"])
    x = aspp(high, opts["aspp_filters"], tuple(opts["atrous_rates"]), separable=separable, dropout=dropout)
    x = keras.layers.UpSampling2D(high_stride // low_stride, interpolation="bilinear", name="decoder_upsampling")(x)
    skip = conv_bn_relu(low, opts["low_level_filters"], 1, name="decoder_low_level")
    x = keras.layers.Concatenate(axis=-1, name="decoder_concat")([x, skip])
    x = conv_bn_relu(x, opts["decoder_filters"], 3, separable=separable, name="decoder_conv1")
    x = conv_bn_relu(x, opts["decoder_filters"], 3, separable=separable, name="decoder_conv2")
    x = keras.layers.UpSampling2D(low_stride, interpolation="bilinear", name="final_upsampling")(x)
    output = segmentation_head(x, int(cfg.classes or 1), cfg.activation, kernel_size=1, name="head_conv")
    model = keras.Model(image, output, name=f"{ARCH}_{cfg.backbone}")
    return freeze_encoder(model) if cfg.encoder_freeze else model
