"""``pspnet``: the Pyramid Scene Parsing Network of segmentation_models (``sm.PSPNet``).

The encoder is cut at stride ``downsample_factor`` (4, 8 or 16; sm's feature layers). A pyramid
pooling module pools that feature map to 1x1, 2x2, 3x3 and 6x6 bins (average or max), reduces
each with a 1x1 conv-BN-ReLU (``psp_conv_filters``) and upsamples it back (bilinear); the four
are concatenated with the feature map, reduced by a 1x1 conv-BN-ReLU (``aggregation``), then a
3x3 convolution gives ``classes`` logits that are upsampled bilinearly by ``downsample_factor``.
Only the encoder layers up to the cut belong to the model, as in sm (PSPNet on mobilenetv2 at
factor 8 has 1.6 M parameters, not 2.3 M).

The pooling windows come from the feature map's size, so height and width must be known and
multiples of ``6 * downsample_factor`` (48 for the default 8).

Options (``cfg.options``), with sm's names and defaults:
    downsample_factor: 8 (4, 8 or 16).
    psp_conv_filters: 512.
    psp_pooling_type: ``avg`` or ``max``.
    psp_use_batchnorm: null = ``cfg.decoder_use_batchnorm``.
    psp_dropout: null = ``cfg.dropout``; SpatialDropout2D rate before the head.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras

from tfseg.config import ModelConfig
from tfseg.errors import ModelError
from tfseg.models import ARCHS
from tfseg.models.blocks import conv_bn_act
from tfseg.models.common import (
    check_arguments,
    check_classes,
    check_sm_arguments,
    check_weights_path,
    choice,
    dropout_rate,
    flag,
    freeze_encoder,
    load_model_weights,
    positive_int,
    read_options,
    resolve_activation,
)
from tfseg.models.encoders import encoder_on_input

ARCH = "pspnet"
DEFAULT_OPTIONS = {
    "downsample_factor": choice(8, [4, 8, 16]),
    "psp_conv_filters": positive_int(512),
    "psp_pooling_type": choice("avg", ["avg", "max"]),
    "psp_use_batchnorm": flag(None, nullable=True),
    "psp_dropout": dropout_rate(),
}
BINS = (1, 2, 3, 6)
# Shared model contract (tests/test_models_contract.py): the smallest size for factor 8, encoders,
# small options.
TEST_SIZE = 48
TEST_BACKBONES = ("mobilenetv2", "resnet50", "vgg16")
TEST_OPTIONS = {"psp_conv_filters": 64}


def pyramid_pooling(x, filters: int = 512, pooling_type: str = "avg", use_batchnorm: bool = True):
    """PSP module: pool to 1, 2, 3, 6 bins, 1x1 conv-BN-ReLU, upsample, concatenate with ``x``.

    Args:
        x: feature map [B, h, w, C] with h and w multiples of 6 (known, not None).
    Returns:
        [B, h, w, C + 4 * filters].
    """
    h, w = x.shape[1], x.shape[2]
    pool = keras.layers.MaxPooling2D if pooling_type == "max" else keras.layers.AveragePooling2D
    levels = [x]
    for level in BINS:
        size = (h // level, w // level)
        y = pool(size, strides=size, padding="same", name=f"psp_level{level}_pooling")(x)
        y = conv_bn_act(y, filters, 1, use_batchnorm=use_batchnorm, name=f"psp_level{level}")
        y = keras.layers.UpSampling2D(size, interpolation="bilinear", name=f"psp_level{level}_upsampling")(y)
        levels.append(y)
    return keras.layers.Concatenate(axis=-1, name="psp_concat")(levels)


@ARCHS.register(ARCH)
def build_pspnet(cfg: ModelConfig) -> keras.Model:
    """Build sm's PSPNet on the encoder ``cfg.backbone``.

    Args:
        cfg: the model section; architecture options in ``cfg.options`` (see the module docstring).

    Returns:
        ``keras.Model`` from float32 [B, H, W, C] images in 0..255 to float32 [B, H, W, classes].

    Raises:
        ModelError: unknown or invalid option, input size unknown or not a multiple of
            ``6 * downsample_factor``, unknown backbone.
    """
    opts = read_options(ARCH, cfg.options, DEFAULT_OPTIONS)
    factor = opts["downsample_factor"]
    shape = tuple(cfg.input_shape or (None, None, 3))
    if len(shape) == 3 and (shape[0] is None or shape[1] is None):
        raise ModelError(f"pspnet: input_shape={list(shape)} needs a fixed height and width (the pooling "
                         f"windows depend on them), multiples of 6 * downsample_factor = {6 * factor}")
    filters = opts["psp_conv_filters"]
    use_bn = cfg.decoder_use_batchnorm if opts["psp_use_batchnorm"] is None else opts["psp_use_batchnorm"]
    dropout = cfg.dropout if opts["psp_dropout"] is None else opts["psp_dropout"]
    classes = int(cfg.classes or 1)

    # The encoder is pruned after the layer of stride ``factor``.
    image, (feature,), _ = encoder_on_input(cfg.backbone, shape, cfg.encoder_weights, (factor,), arch=ARCH,
                                            multiple=6 * factor)
    x = pyramid_pooling(feature, filters, opts["psp_pooling_type"], bool(use_bn))
    x = conv_bn_act(x, filters, 1, use_batchnorm=bool(use_bn), name="aggregation")
    if dropout:
        x = keras.layers.SpatialDropout2D(dropout, name="spatial_dropout")(x)
    # sm's order: the head convolves at 1/factor resolution, then the logits are upsampled (factor^2
    # fewer FLOPs than convolving at full resolution). Upsampling and activation run in float32, as
    # segmentation_head's activation does, so the output stays float32 under mixed precision.
    x = keras.layers.Conv2D(classes, 3, padding="same", kernel_initializer="glorot_uniform",
                            name="final_conv")(x)
    x = keras.layers.UpSampling2D(factor, interpolation="bilinear", dtype="float32",
                                  name="final_upsampling")(x)
    output = keras.layers.Activation(resolve_activation(cfg.activation, classes), dtype="float32",
                                     name="output")(x)
    model = keras.Model(image, output, name=f"pspnet_{cfg.backbone}")
    return freeze_encoder(model) if cfg.encoder_freeze else model


@check_arguments
def PSPNet(  # noqa: N802 - the segmentation_models name, so notebooks port by changing the import
    backbone_name: str = "vgg16",
    input_shape: Sequence[int] = (384, 384, 3),
    classes: int = 21,
    activation: str | None = "softmax",
    weights: str | None = None,
    encoder_weights: str | None = "imagenet",
    encoder_freeze: bool = False,
    downsample_factor: int = 8,
    psp_conv_filters: int = 512,
    psp_pooling_type: str = "avg",
    psp_use_batchnorm: bool = True,
    psp_dropout: float | None = None,
) -> keras.Model:
    """``segmentation_models.PSPNet`` with the same arguments and defaults: a notebook ports by its import.

    Args:
        backbone_name: encoder name (``tfseg.models.encoders.encoder_names()``).
        input_shape: (H, W, C); H and W fixed multiples of ``6 * downsample_factor``.
        classes: output channels.
        activation: ``sigmoid``, ``softmax``, ``linear``/None (logits) or ``auto``.
        weights: optional path of full-model weights to load after building.
        encoder_weights: None, ``imagenet`` or a weights file path.
        encoder_freeze: freeze the encoder (BatchNorm in inference mode).
        downsample_factor, psp_conv_filters, psp_pooling_type, psp_use_batchnorm, psp_dropout: as sm.

    Returns:
        The same model as ``build_model`` with ``arch: pspnet``.
    """
    classes = check_classes(classes, ARCH)
    checked = check_sm_arguments(ARCH, input_shape=input_shape, encoder_freeze=encoder_freeze)
    input_shape, encoder_freeze = checked["input_shape"], checked["encoder_freeze"]
    check_weights_path(weights, ARCH)
    cfg = ModelConfig(arch=ARCH, backbone=backbone_name, input_shape=tuple(input_shape), classes=classes,
                      activation=activation or "linear", encoder_weights=encoder_weights,
                      encoder_freeze=encoder_freeze,
                      options={"downsample_factor": downsample_factor, "psp_conv_filters": psp_conv_filters,
                               "psp_pooling_type": psp_pooling_type, "psp_use_batchnorm": psp_use_batchnorm,
                               "psp_dropout": psp_dropout})
    model = build_pspnet(cfg)
    if weights is not None:
        load_model_weights(model, weights, ARCH)
    return model
