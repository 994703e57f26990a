"""``fpn``: the Feature Pyramid Network of segmentation_models (``sm.FPN``), same layers and names.

The deepest encoder feature (stride 32) is merged top-down with the skips at strides 16, 8, 4
and 2 (each through a 1x1 convolution to ``pyramid_block_filters`` and a 2x nearest upsampling),
every pyramid level gets two 3x3 conv-BN-ReLU (``segmentation_filters``), the levels are brought
to the finest one (nearest upsampling), summed or concatenated, and a last 3x3 conv-BN-ReLU and a
bilinear upsampling by ``upsampling`` give full resolution before the head.

Options (``cfg.options``), with sm's names and defaults:
    pyramid_block_filters: 256; filters of the top-down pathway.
    segmentation_filters: null = ``pyramid_block_filters // 2`` (128), as sm.
    pyramid_use_batchnorm: null = ``cfg.decoder_use_batchnorm``.
    pyramid_aggregation: ``concat`` (sm's default) or ``sum``.
    pyramid_dropout: null = ``cfg.dropout``; SpatialDropout2D rate on the aggregated pyramid.
    upsampling: 2 (sm: pyramid levels at strides 16, 8, 4 and 2, then a 2x upsampling) or 4
        (levels at strides 16, 8 and 4, then 4x, the final factor segmentation_models_pytorch's
        FPN uses; the segmentation blocks and ``final_stage`` then run at 1/4 resolution, not 1/2).

Input height and width must be multiples of 32.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras

from tfseg.config import ModelConfig
from tfseg.errors import ModelError
from tfseg.models import ARCHS
from tfseg.models.blocks import conv3x3_bn_relu
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
    segmentation_head,
)
from tfseg.models.encoders import available_strides, encoder_on_input

ARCH = "fpn"
DEFAULT_OPTIONS = {
    "pyramid_block_filters": positive_int(256),
    "segmentation_filters": positive_int(None, nullable=True),
    "pyramid_use_batchnorm": flag(None, nullable=True),
    "pyramid_aggregation": choice("concat", ["concat", "sum"]),
    "pyramid_dropout": dropout_rate(),
    "upsampling": choice(2, [2, 4]),
}
SIZE_MULTIPLE = 32
# Shared model contract (tests/test_models_contract.py): tiny test size, encoders, small options.
TEST_SIZE = 64
TEST_BACKBONES = ("mobilenetv2", "efficientnetb0", "resnet50")
TEST_OPTIONS = {"pyramid_block_filters": 64}


def _pyramid_block(x, skip, filters: int, stage: int):
    """One top-down step: 1x1 convs to ``filters``, 2x nearest upsampling of ``x``, sum with ``skip``.

    Args:
        x: coarser pyramid level [B, h, w, Cx].
        skip: encoder feature [B, 2h, 2w, Cs].
    Returns:
        [B, 2h, 2w, filters].
    """
    if x.shape[-1] != filters:
        x = keras.layers.Conv2D(filters, 1, kernel_initializer="he_uniform",
                                name=f"fpn_stage_p{stage}_pre_conv")(x)
    skip = keras.layers.Conv2D(filters, 1, kernel_initializer="he_uniform",
                               name=f"fpn_stage_p{stage}_conv")(skip)
    x = keras.layers.UpSampling2D(2, name=f"fpn_stage_p{stage}_upsampling")(x)
    return keras.layers.Add(name=f"fpn_stage_p{stage}_add")([x, skip])


def fpn_decoder(top, skips: Sequence, *, pyramid_filters: int = 256, segmentation_filters: int = 128,
                use_batchnorm: bool = True, aggregation: str = "concat", dropout: float | None = None):
    """The FPN decoder, up to (not including) the final upsampling and head.

    Args:
        top: deepest encoder feature [B, H/32, W/32, C].
        skips: encoder features from coarse to fine, each at twice the previous resolution
            (strides 16, 8, 4, 2 for sm's FPN; 16, 8, 4 with ``upsampling=4``).
    Returns:
        [B, H/s, W/s, segmentation_filters] at the stride s of the finest skip.
    """
    levels, x = [], top
    stage = 5
    for skip in skips:
        x = _pyramid_block(x, skip, pyramid_filters, stage)
        levels.append((stage, x))
        stage -= 1
    finest = levels[-1][0]
    heads = []
    for stage, level in levels:
        s = conv3x3_bn_relu(level, segmentation_filters, use_batchnorm, name=f"segm_stage{stage}a")
        s = conv3x3_bn_relu(s, segmentation_filters, use_batchnorm, name=f"segm_stage{stage}b")
        if stage != finest:
            s = keras.layers.UpSampling2D(2 ** (stage - finest), interpolation="nearest",
                                          name=f"upsampling_stage{stage}")(s)
        heads.append(s)
    heads.reverse()  # finest first, as sm concatenates [s2, s3, s4, s5]
    if aggregation == "sum":
        x = keras.layers.Add(name="aggregation_sum")(heads)
    else:
        x = keras.layers.Concatenate(axis=-1, name="aggregation_concat")(heads)
    if dropout:
        x = keras.layers.SpatialDropout2D(dropout, name="pyramid_dropout")(x)
    return conv3x3_bn_relu(x, segmentation_filters, use_batchnorm, name="final_stage")


@ARCHS.register(ARCH)
def build_fpn(cfg: ModelConfig) -> keras.Model:
    """Build sm's FPN on the encoder ``cfg.backbone``.

    Args:
        cfg: the model section; architecture options in ``cfg.options`` (see the module docstring).

    Returns:
        ``keras.Model`` from float32 [B, H, W, C] images in 0..255 to float32 [B, H, W, classes].

    Raises:
        ModelError: unknown or invalid option, input size not a multiple of 32, unknown backbone.
    """
    opts = read_options(ARCH, cfg.options, DEFAULT_OPTIONS)
    filters = opts["pyramid_block_filters"]
    seg_filters = opts["segmentation_filters"] or filters // 2
    use_bn = opts["pyramid_use_batchnorm"]
    use_bn = cfg.decoder_use_batchnorm if use_bn is None else use_bn
    dropout = cfg.dropout if opts["pyramid_dropout"] is None else opts["pyramid_dropout"]
    skip_strides = (16, 8, 4, 2) if opts["upsampling"] == 2 else (16, 8, 4)
    if available_strides(cfg.backbone, skip_strides) != skip_strides:
        raise ModelError(f"fpn: encoder {cfg.backbone} has no stride-2 features for sm's upsampling: 2; "
                         "set model.options.upsampling: 4 (FPN(..., upsampling=4) in Python; pyramid levels at "
                         "strides 16, 8 and 4)")

    image, (top, *skips), _ = encoder_on_input(cfg.backbone, cfg.input_shape, cfg.encoder_weights,
                                               (32, *skip_strides), arch=ARCH, multiple=SIZE_MULTIPLE)
    x = fpn_decoder(top, skips, pyramid_filters=filters, segmentation_filters=seg_filters,
                    use_batchnorm=bool(use_bn), aggregation=opts["pyramid_aggregation"], dropout=dropout)
    x = keras.layers.UpSampling2D(opts["upsampling"], interpolation="bilinear", name="final_upsampling")(x)
    output = segmentation_head(x, int(cfg.classes or 1), cfg.activation, kernel_size=3, name="head_conv")
    model = keras.Model(image, output, name=f"fpn_{cfg.backbone}")
    return freeze_encoder(model) if cfg.encoder_freeze else model


@check_arguments
def FPN(  # noqa: N802 - the segmentation_models name, so notebooks port by changing the import
    backbone_name: str = "vgg16",
    input_shape: Sequence[int | None] = (None, None, 3),
    classes: int = 21,
    activation: str | None = "softmax",
    weights: str | None = None,
    encoder_weights: str | None = "imagenet",
    encoder_freeze: bool = False,
    encoder_features: str = "default",
    pyramid_block_filters: int = 256,
    pyramid_use_batchnorm: bool = True,
    pyramid_aggregation: str = "concat",
    pyramid_dropout: float | None = None,
    *,
    segmentation_filters: int | None = None,
    upsampling: int = 2,
) -> keras.Model:
    """``segmentation_models.FPN`` with the same arguments and defaults: a notebook ports by its import.

    Args:
        backbone_name: encoder name (``tfseg.models.encoders.encoder_names()``).
        input_shape: (H, W, C); H and W multiples of 32 or None.
        classes: output channels.
        activation: ``sigmoid``, ``softmax``, ``linear``/None (logits) or ``auto``.
        weights: optional path of full-model weights to load after building.
        encoder_weights: None, ``imagenet`` or a weights file path.
        encoder_freeze: freeze the encoder (BatchNorm in inference mode).
        encoder_features: only ``default`` (sm's layers, by stride) is supported.
        pyramid_block_filters, pyramid_use_batchnorm, pyramid_aggregation, pyramid_dropout: as sm.
        segmentation_filters, upsampling: tfseg extras (see the module docstring).

    Returns:
        The same model as ``build_model`` with ``arch: fpn``.
    """
    classes = check_classes(classes, ARCH)
    checked = check_sm_arguments(ARCH, input_shape=input_shape, encoder_freeze=encoder_freeze)
    input_shape, encoder_freeze = checked["input_shape"], checked["encoder_freeze"]
    check_weights_path(weights, ARCH)
    if encoder_features != "default":
        raise ModelError(f"fpn: encoder_features={encoder_features!r} is not supported; tfseg takes sm's "
                         "default feature layers of each encoder ('default')")
    cfg = ModelConfig(arch=ARCH, backbone=backbone_name, input_shape=tuple(input_shape), classes=classes,
                      activation=activation or "linear", encoder_weights=encoder_weights,
                      encoder_freeze=encoder_freeze,
                      options={"pyramid_block_filters": pyramid_block_filters,
                               "segmentation_filters": segmentation_filters,
                               "pyramid_use_batchnorm": pyramid_use_batchnorm,
                               "pyramid_aggregation": pyramid_aggregation,
                               "pyramid_dropout": pyramid_dropout, "upsampling": upsampling})
    model = build_fpn(cfg)
    if weights is not None:
        load_model_weights(model, weights, ARCH)
    return model
