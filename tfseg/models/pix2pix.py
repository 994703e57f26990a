"""``pix2pix_unet``: the TensorFlow image-segmentation tutorial's model (Oxford-IIIT Pet).

The encoder is MobileNetV2 (from the encoder table, :func:`tfseg.models.encoders.build_encoder`,
so ImageNet weights, weight files and any input channel count work as for every encoder), cut
as the tutorial's ``down_stack``: the outputs ``block_1_expand_relu`` (stride 2),
``block_3_expand_relu`` (4), ``block_6_expand_relu`` (8), ``block_13_expand_relu`` (16) and
``block_16_project`` (32). The decoder is pix2pix's ``upsample`` block (Conv2DTranspose 3x3 stride 2
without bias, initialised N(0, 0.02), BatchNorm, optional Dropout, ReLU) with 512, 256, 128 and 64
filters, each followed by concatenation with the skip, and a last Conv2DTranspose 3x3 stride 2 to
``classes``. At 128x128x3 with 3 classes it has 6,504,227 parameters, as the tutorial's summary.

Normalization: the model maps its 0..255 input to [-1, 1] (MobileNetV2's ImageNet preprocessing,
from the encoder table); the tutorial fed [0, 1] images to the ImageNet encoder.

The tutorial's model outputs logits: use ``activation: linear`` for that (the loss then takes
``from_logits``); ``auto`` adds softmax (or sigmoid for one class) in a float32 output layer.

Freezing: the tutorial freezes the encoder (``down_stack.trainable = False``), so this builder
does too by default: ``options: {freeze: true}``. ``options: {freeze: false}`` trains it; a true
``encoder_freeze`` also freezes it. The frozen encoder's BatchNorm runs in inference mode.
``cfg.dropout`` > 0 adds pix2pix's dropout to every decoder block (pix2pix used 0.5).

Options: ``freeze`` (true), ``filters`` (decoder widths, default [512, 256, 128, 64]).
Input height and width: multiples of 32.
"""

from __future__ import annotations

import keras

from tfseg.config import ModelConfig
from tfseg.errors import ModelError
from tfseg.models import ARCHS
from tfseg.models.common import check_input_shape, flag, int_list, read_options, segmentation_head
from tfseg.models.encoders import build_encoder

ARCH = "pix2pix_unet"
BACKBONE = "mobilenetv2"
SKIP_LAYERS = ("block_1_expand_relu", "block_3_expand_relu", "block_6_expand_relu", "block_13_expand_relu",
               "block_16_project")
DEFAULT_OPTIONS = {"freeze": flag(True), "filters": int_list((512, 256, 128, 64), length=4)}

SIZE_MULTIPLE = 32
MIN_SIZE = 32
# For the shared model contract (tests/test_models_contract.py).
TEST_SIZE = 32
TEST_OPTIONS = {"filters": [16, 16, 16, 16]}


def down_stack(input_shape, weights: str | None) -> keras.Model:
    """The tutorial's ``down_stack``: MobileNetV2 up to ``block_16_project``, named ``encoder``.

    Args:
        input_shape: (H, W, C); the model takes float32 0..255 and normalizes inside.
        weights: None, ``imagenet`` or a keras.applications MobileNetV2 weights file.

    Returns:
        Model with outputs at strides 2, 4, 8, 16, 32 (96, 144, 192, 576, 320 channels).
    """
    full = build_encoder(BACKBONE, input_shape, weights)
    return keras.Model(full.input, [full.get_layer(name).output for name in SKIP_LAYERS], name="encoder")


def upsample(x, filters: int, dropout: float, name: str):
    """pix2pix's ``upsample`` block: [B, h, w, C] -> [B, 2h, 2w, filters]."""
    x = keras.layers.Conv2DTranspose(filters, 3, strides=2, padding="same", use_bias=False,
                                     kernel_initializer=keras.initializers.RandomNormal(0.0, 0.02),
                                     name=f"{name}_deconv")(x)
    x = keras.layers.BatchNormalization(name=f"{name}_bn")(x)
    if dropout:
        x = keras.layers.Dropout(dropout, name=f"{name}_dropout")(x)
    return keras.layers.Activation("relu", name=f"{name}_relu")(x)


@ARCHS.register(ARCH)
def build_pix2pix_unet(cfg: ModelConfig) -> keras.Model:
    """Build the tutorial's MobileNetV2 + pix2pix U-Net.

    Args:
        cfg: ``input_shape`` [H, W, C] (multiples of 32), ``classes``, ``activation`` (``linear``
            = the tutorial's logits), ``backbone`` (must be mobilenetv2), ``encoder_weights``,
            ``encoder_freeze``, ``dropout``, ``options``: ``freeze`` (true), ``filters``.

    Returns:
        A model from float32 [B, H, W, C] in 0..255 to float32 [B, H, W, classes].

    Raises:
        ModelError: another backbone, an unknown option, a bad size, weights that cannot load.
    """
    opts = read_options(ARCH, cfg.options, DEFAULT_OPTIONS)
    if cfg.backbone != BACKBONE:
        raise ModelError(f"{ARCH}: backbone={cfg.backbone!r}; the tutorial's model has a MobileNetV2 encoder "
                         f"(expected {BACKBONE!r}; arch unet takes any encoder)")
    filters = tuple(opts["filters"])
    h, w, c = check_input_shape(cfg.input_shape or (), SIZE_MULTIPLE, ARCH, min_size=MIN_SIZE)

    inputs = keras.Input((h, w, c), name="image")
    encoder = down_stack((h, w, c), cfg.encoder_weights)
    encoder.trainable = not (opts["freeze"] or cfg.encoder_freeze)
    *skips, x = encoder(inputs)
    for i, (f, skip) in enumerate(zip(filters, reversed(skips)), start=1):
        x = upsample(x, f, cfg.dropout, f"up{i}")
        x = keras.layers.Concatenate(name=f"up{i}_concat")([x, skip])
    outputs = segmentation_head(x, cfg.classes, cfg.activation, kernel_size=3, transpose_stride=2)
    return keras.Model(inputs, outputs, name=ARCH)
