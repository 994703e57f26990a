"""``unet``: segmentation_models' U-Net on a keras.applications encoder.

:func:`Unet` takes the same arguments as ``segmentation_models.Unet`` so that a notebook ports by
changing its import::

    from tfseg.models.unet import Unet          # was: from segmentation_models import Unet
    model = Unet("efficientnetb5", input_shape=(512, 512, 3), classes=1, encoder_weights="imagenet")

It has the same skip layers (strides 16, 8, 4, 2 of the encoder), the same decoder (five x2 blocks,
upsampling or transpose, named as segmentation_models names them), VGG's extra 512-filter center
block, and a 3x3 ``final_conv``; the trainable parameter counts match segmentation_models'
(``tests/test_sm_parity.py``). Differences, all deliberate:

- the model takes float images in 0..255 and normalizes them inside (no ``get_preprocessing``);
- the encoder is one nested layer named ``encoder``, so ``encoder_freeze`` and
  :func:`tfseg.models.common.unfreeze_encoder` also work after ``keras.models.load_model``; a
  frozen encoder's BatchNormalization runs in inference mode (segmentation_models leaves them
  trainable);
- any number of input channels, also with pretrained weights (:mod:`tfseg.models.weights`);
- the last layer, named ``output``, is float32 under mixed precision.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras

from tfseg.config import ModelConfig
from tfseg.errors import ModelError
from tfseg.models import ARCHS
from tfseg.models.blocks import DECODER_BLOCKS, conv3x3_bn_relu
from tfseg.models.common import (
    any_value,
    check_arguments,
    check_classes,
    check_sm_arguments,
    check_weights_path,
    freeze_encoder,
    load_model_weights,
    read_options,
    resolve_activation,
    segmentation_head,
)
from tfseg.models.encoders import available_strides, encoder_on_input, get_encoder_spec

ARCH = "unet"
SIZE_MULTIPLE = 32
# Shared model contract (tests/test_models_contract.py): tiny test size and encoders to test.
TEST_SIZE = 64
TEST_BACKBONES = ("mobilenetv2", "efficientnetb0", "vgg16")
SKIP_STRIDES = (16, 8, 4, 2)
FEATURES_EXPECTED = "'default', or encoder strides deepest first, or their layer names"


@check_arguments
def Unet(  # noqa: N802 - the segmentation_models name, so notebooks port by changing the import
    backbone_name: str = "vgg16",
    input_shape: Sequence[int | None] = (None, None, 3),
    classes: int = 1,
    activation: str = "sigmoid",
    weights: str | None = None,
    encoder_weights: str | None = "imagenet",
    encoder_freeze: bool = False,
    encoder_features: str | Sequence[int] = "default",
    decoder_block_type: str = "upsampling",
    decoder_filters: Sequence[int] = (256, 128, 64, 32, 16),
    decoder_use_batchnorm: bool = True,
) -> keras.Model:
    """Build segmentation_models' U-Net.

    Args:
        backbone_name: encoder name (:func:`tfseg.models.encoders.encoder_names`).
        input_shape: (height, width, channels); height and width divisible by 32, or None.
        classes: output channels.
        activation: ``sigmoid``, ``softmax``, ``linear`` (logits) or ``auto``.
        weights: path of weights for the whole model, loaded at the end.
        encoder_weights: None, ``imagenet`` or the path of a keras.applications weights file.
        encoder_freeze: freeze the encoder (its BatchNorm then runs in inference mode).
        encoder_features: ``default`` (strides 16, 8, 4, 2, those the encoder has: ConvNeXt has no 2)
            or the encoder strides to skip from, deepest first, e.g. ``(16, 8, 4, 2, 1)`` for VGG's
            full-resolution block, or segmentation_models' layer names for them (sm's own
            ``encoder_features``, e.g. ``('block6a_expand_activation', 'block4a_expand_activation')``).
        decoder_block_type: ``upsampling`` (UpSampling2D + two convs) or ``transpose``
            (Conv2DTranspose + one conv).
        decoder_filters: filters of the decoder blocks, deepest first; one x2 block each.
        decoder_use_batchnorm: BatchNorm in the decoder.

    Returns:
        Uncompiled ``keras.Model``: float32 [B, H, W, C] in 0..255 -> float32
        [B, H * 2**len(decoder_filters) / 32, ..., classes] (H x W for five blocks).

    Raises:
        ModelError: unknown backbone or block type, a stride the encoder lacks in ``encoder_features``,
            input size not divisible by 32, bad weights.
    """
    classes = check_classes(classes, ARCH)
    checked = check_sm_arguments(ARCH, input_shape=input_shape, encoder_freeze=encoder_freeze,
                                 decoder_filters=decoder_filters, decoder_use_batchnorm=decoder_use_batchnorm)
    input_shape, decoder_filters = checked["input_shape"], checked["decoder_filters"]
    encoder_freeze, decoder_use_batchnorm = checked["encoder_freeze"], checked["decoder_use_batchnorm"]
    check_weights_path(weights, ARCH)
    resolve_activation(activation, classes)
    if decoder_block_type not in DECODER_BLOCKS:
        raise ModelError(f"Received: decoder_block_type={decoder_block_type!r}. Expected one of "
                         f"{sorted(DECODER_BLOCKS)}")
    if not decoder_filters:
        raise ModelError("unet: decoder_filters must name at least one block, e.g. [256, 128, 64, 32, 16]")
    strides = skip_strides(backbone_name, encoder_features)[: len(decoder_filters)]

    image, (x, *skips), encoder = encoder_on_input(backbone_name, input_shape, encoder_weights,
                                                   (32, *strides), arch=ARCH, multiple=SIZE_MULTIPLE)

    if _ends_with_pooling(encoder):  # VGG: segmentation_models adds a 512-filter center block
        x = conv3x3_bn_relu(x, 512, decoder_use_batchnorm, name="center_block1")
        x = conv3x3_bn_relu(x, 512, decoder_use_batchnorm, name="center_block2")
    block = DECODER_BLOCKS[decoder_block_type]
    for stage, filters in enumerate(decoder_filters):
        skip = skips[stage] if stage < len(skips) else None
        x = block(x, skip, int(filters), stage, decoder_use_batchnorm)
    output = segmentation_head(x, classes, activation, kernel_size=3, name="final_conv")
    model = keras.Model(image, output, name=f"unet_{backbone_name}")
    if encoder_freeze:
        freeze_encoder(model)
    if weights is not None:
        load_model_weights(model, weights, ARCH)
    return model


def skip_strides(backbone_name: str, encoder_features, arch: str = ARCH) -> tuple[int, ...]:
    """The encoder strides to skip from: ``default``, or the strides given, or segmentation_models'
    layer names (sm's own ``encoder_features``), each one a feature the encoder has (unetplusplus
    shares it; ``arch`` names the architecture in the error)."""
    if isinstance(encoder_features, str) and encoder_features == "default":
        return available_strides(backbone_name, SKIP_STRIDES)
    spec = get_encoder_spec(backbone_name)
    features = {s: f for s, f in spec.features.items() if s < 32}
    names = {f: s for f, s in spec.layer_names.items() if s < 32}  # sm's layer names
    entries = [encoder_features] if isinstance(encoder_features, (str, int)) else list(encoder_features)
    strides = []
    for entry in entries:
        if isinstance(entry, str) and entry in names:
            strides.append(names[entry])
        elif not isinstance(entry, bool) and isinstance(entry, int) and entry in features:
            strides.append(entry)
        else:
            by_stride = ", ".join(f"{s}: {f!r}" for f, s in sorted(names.items(), key=lambda fs: -fs[1]))
            raise ModelError(
                f"{arch}: encoder_features={encoder_features!r}: {entry!r} is not a feature of {backbone_name}; "
                f"expected 'default', or strides from {sorted(features, reverse=True)}, deepest first"
                + (f", or their layer names ({by_stride})" if by_stride else "")
            )
    return tuple(strides)


def _ends_with_pooling(encoder: keras.Model) -> bool:
    """Whether the encoder's deepest output comes straight from a MaxPooling2D layer."""
    history = getattr(encoder.outputs[0], "_keras_history", None)
    return history is not None and isinstance(history[0], keras.layers.MaxPooling2D)


@ARCHS.register(ARCH)
def build_unet(cfg: ModelConfig) -> keras.Model:
    """The ``unet`` architecture from the ``model`` config section (see :func:`Unet`).

    ``cfg.options`` may set ``encoder_features`` (strides, deepest first).
    """
    options = read_options(ARCH, cfg.options, {"encoder_features": any_value("default", FEATURES_EXPECTED)})
    return Unet(
        cfg.backbone,
        input_shape=tuple(cfg.input_shape) if cfg.input_shape else (None, None, 3),
        classes=int(cfg.classes or 1),
        activation=cfg.activation,
        encoder_weights=cfg.encoder_weights,
        encoder_freeze=cfg.encoder_freeze,
        encoder_features=options["encoder_features"],
        decoder_block_type=cfg.decoder_block_type,
        decoder_filters=tuple(cfg.decoder_filters),
        decoder_use_batchnorm=cfg.decoder_use_batchnorm,
    )
