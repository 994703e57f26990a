"""``linknet``: the LinkNet of segmentation_models (``sm.Linknet``), same layers and names.

LinkNet (Chaurasia and Culurciello, 2017) adds, rather than concatenates, each encoder skip to a
light decoder block: 1x1 conv to a quarter of the input channels, 2x upsampling (nearest, or a
4x4 stride-2 transposed convolution with ``decoder_block_type: transpose``), 3x3 conv, 1x1 conv
to the skip's channels, then the sum with the skip. sm's version (and this one) uses 4 skips, at
strides 16, 8, 4 and 2 (those the encoder has: ConvNeXt has no 2), and one block per entry of
``decoder_filters``; a block with a skip takes the skip's channel count, so only the entries past
the skips (the last one, 16 by default; the last two on ConvNeXt) are used -- sm's
``decoder_filters=(None, None, None, None, 16)`` and the config's default ``[256, 128, 64, 32, 16]``
give the same model. When the encoder ends with max pooling (VGG), two
3x3 conv-BN-ReLU with 512 filters (``center_block1/2``) come first, as in sm.

Shared settings come from the config fields ``decoder_filters``, ``decoder_use_batchnorm`` and
``decoder_block_type``; LinkNet takes no ``options`` and has no dropout. Input height and width
must be multiples of 32.
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
    freeze_encoder,
    load_model_weights,
    read_options,
    segmentation_head,
)
from tfseg.models.encoders import available_strides, encoder_on_input

ARCH = "linknet"
DEFAULT_OPTIONS: dict = {}
SIZE_MULTIPLE = 32
# Shared model contract (tests/test_models_contract.py): tiny test size and encoders (vgg16: center block).
TEST_SIZE = 64
TEST_BACKBONES = ("mobilenetv2", "vgg16", "efficientnetb0")
SKIP_STRIDES = (16, 8, 4, 2)


def linknet_block(x, skip, filters: int | None, stage: int, use_batchnorm: bool = True,
                  block_type: str = "upsampling"):
    """One LinkNet decoder block: [B, h, w, C] -> [B, 2h, 2w, F], F = skip channels or ``filters``.

    Args:
        x: decoder input [B, h, w, C].
        skip: encoder feature [B, 2h, 2w, F] added to the result, or None.
        filters: output channels when there is no skip.
        stage: block index, used in the layer names (``decoder_stage{stage}a`` ...).
        block_type: ``upsampling`` (nearest 2x + 3x3 conv) or ``transpose`` (4x4 stride-2 transpose).
    """
    quarter = x.shape[-1] // 4
    out_filters = skip.shape[-1] if skip is not None else filters
    if out_filters is None:
        raise ModelError(f"linknet: decoder_filters[{stage}] is null but block {stage} has no encoder skip "
                         "to take its channel count from; give a number")
    x = conv_bn_act(x, quarter, 1, use_batchnorm=use_batchnorm, name=f"decoder_stage{stage}a")
    if block_type == "transpose":
        x = keras.layers.Conv2DTranspose(quarter, 4, strides=2, padding="same", use_bias=not use_batchnorm,
                                         name=f"decoder_stage{stage}b_transpose")(x)
        if use_batchnorm:
            x = keras.layers.BatchNormalization(name=f"decoder_stage{stage}b_bn")(x)
        x = keras.layers.Activation("relu", name=f"decoder_stage{stage}b_relu")(x)
    else:
        x = keras.layers.UpSampling2D(2, name=f"decoder_stage{stage}_upsampling")(x)
        x = conv_bn_act(x, quarter, 3, use_batchnorm=use_batchnorm, name=f"decoder_stage{stage}b")
    x = conv_bn_act(x, out_filters, 1, use_batchnorm=use_batchnorm, name=f"decoder_stage{stage}c")
    if skip is not None:
        x = keras.layers.Add(name=f"decoder_stage{stage}_add")([x, skip])
    return x


def linknet_decoder(top, skips: Sequence, decoder_filters: Sequence[int | None], *,
                    use_batchnorm: bool = True, block_type: str = "upsampling", center: bool = False):
    """LinkNet decoder: one block per entry of ``decoder_filters``, each doubling the resolution.

    Args:
        top: deepest encoder feature [B, H/32, W/32, C].
        skips: encoder features at strides 16, 8, 4, 2 (coarse to fine).
        center: add sm's two 512-filter center convolutions first (encoders ending in max pooling).
    Returns:
        [B, H*2^n/32, W*2^n/32, decoder_filters[-1] or skip channels], n = len(decoder_filters).
    """
    x = top
    if center:
        x = conv_bn_act(x, 512, 3, use_batchnorm=use_batchnorm, name="center_block1")
        x = conv_bn_act(x, 512, 3, use_batchnorm=use_batchnorm, name="center_block2")
    for i, filters in enumerate(decoder_filters):
        skip = skips[i] if i < len(skips) else None
        x = linknet_block(x, skip, filters, i, use_batchnorm, block_type)
    return x


def ends_with_pooling(encoder: keras.Model) -> bool:
    """True when the encoder's deepest output (stride 32) comes from max pooling (VGG), where sm's
    Linknet adds its center block."""
    history = getattr(encoder.outputs[0], "_keras_history", None)
    return history is not None and isinstance(history[0], keras.layers.MaxPooling2D)


@ARCHS.register(ARCH)
def build_linknet(cfg: ModelConfig) -> keras.Model:
    """Build sm's Linknet on the encoder ``cfg.backbone``.

    Args:
        cfg: the model section (``decoder_filters``, ``decoder_use_batchnorm``, ``decoder_block_type``).

    Returns:
        ``keras.Model`` from float32 [B, H, W, C] images in 0..255 to float32
        [B, H*2^n/32, W*2^n/32, classes], n = len(decoder_filters) (full resolution for 5 blocks).

    Raises:
        ModelError: an option was given, input size not a multiple of 32, bad decoder settings.
    """
    read_options(ARCH, cfg.options, DEFAULT_OPTIONS)
    if cfg.decoder_block_type not in ("upsampling", "transpose"):
        raise ModelError(f"linknet: decoder_block_type={cfg.decoder_block_type!r}; expected one of "
                         "['transpose', 'upsampling']")
    filters = list(cfg.decoder_filters)
    if not 1 <= len(filters) <= 5:
        raise ModelError(f"linknet: decoder_filters={filters} has {len(filters)} entries; expected 1 to 5 "
                         "(one per 2x upsampling, 5 = full resolution)")

    image, (top, *skips), encoder = encoder_on_input(cfg.backbone, cfg.input_shape, cfg.encoder_weights,
                                                     (32, *available_strides(cfg.backbone, SKIP_STRIDES)),
                                                     arch=ARCH, multiple=SIZE_MULTIPLE)
    x = linknet_decoder(top, skips, filters, use_batchnorm=cfg.decoder_use_batchnorm,
                        block_type=cfg.decoder_block_type, center=ends_with_pooling(encoder))
    output = segmentation_head(x, int(cfg.classes or 1), cfg.activation, kernel_size=3, name="final_conv")
    model = keras.Model(image, output, name=f"linknet_{cfg.backbone}")
    return freeze_encoder(model) if cfg.encoder_freeze else model


@check_arguments
def Linknet(  # noqa: N802 - the segmentation_models name, so notebooks port by changing the import
    backbone_name: str = "vgg16",
    input_shape: Sequence[int | None] = (None, None, 3),
    classes: int = 1,
    activation: str | None = "sigmoid",
    weights: str | None = None,
    encoder_weights: str | None = "imagenet",
    encoder_freeze: bool = False,
    encoder_features: str = "default",
    decoder_block_type: str = "upsampling",
    decoder_filters: Sequence[int | None] = (None, None, None, None, 16),
    decoder_use_batchnorm: bool = True,
) -> keras.Model:
    """``segmentation_models.Linknet`` with the same arguments and defaults: a notebook ports by its import.

    Args:
        backbone_name: encoder name (``tfseg.models.encoders.encoder_names()``).
        input_shape: (H, W, C); H and W multiples of 32 or None.
        classes: output channels.
        activation: ``sigmoid``, ``softmax``, ``linear``/None (logits) or ``auto``.
        weights: optional path of full-model weights to load after building.
        encoder_weights: None, ``imagenet`` or a weights file path.
        encoder_freeze: freeze the encoder (BatchNorm in inference mode).
        encoder_features: only ``default`` (sm's layers, by stride) is supported.
        decoder_block_type, decoder_filters, decoder_use_batchnorm: as sm; None entries of
            ``decoder_filters`` take the channels of the block's skip.

    Returns:
        The same model as ``build_model`` with ``arch: linknet``.
    """
    classes = check_classes(classes, ARCH)
    checked = check_sm_arguments(ARCH, input_shape=input_shape, encoder_freeze=encoder_freeze,
                                 decoder_filters=decoder_filters, decoder_use_batchnorm=decoder_use_batchnorm,
                                 filters_nullable=True)
    input_shape, decoder_filters = checked["input_shape"], checked["decoder_filters"]
    encoder_freeze, decoder_use_batchnorm = checked["encoder_freeze"], checked["decoder_use_batchnorm"]
    check_weights_path(weights, ARCH)
    if encoder_features != "default":
        raise ModelError(f"linknet: encoder_features={encoder_features!r} is not supported; tfseg takes sm's "
                         "default feature layers of each encoder ('default')")
    cfg = ModelConfig(arch=ARCH, backbone=backbone_name, input_shape=tuple(input_shape), classes=classes,
                      activation=activation or "linear", encoder_weights=encoder_weights,
                      encoder_freeze=encoder_freeze, decoder_block_type=decoder_block_type,
                      decoder_filters=tuple(decoder_filters), decoder_use_batchnorm=decoder_use_batchnorm)
    model = build_linknet(cfg)
    if weights is not None:
        load_model_weights(model, weights, ARCH)
    return model
