"""``unet_small``: the small U-Net of the LGG brain-MRI segmentation post.

Reference followed: the ``UNet`` of usuyama/pytorch-unet (``pytorch_unet.py``), the vanilla U-Net
that matches the issue's description of the LGG post's model (the post itself could not be
read here): double 3x3 same convolutions + ReLU at 64, 128, 256 and 512 filters with three 2x2 max
poolings between them, then three times: bilinear 2x upsampling, concatenation with the skip,
double conv (256, 128, 64), and a 1x1 convolution to the classes (sigmoid for the one-class
tumour mask). With 3 input channels and 1 class both have 7,782,913 parameters.

Differences: Keras' bilinear upsampling uses half-pixel centres (PyTorch's ``align_corners=False``)
where the reference used ``align_corners=True``; ``options: {batchnorm: true}`` adds BatchNorm after
every convolution (not in the reference). Sizes: multiples of 8. Trained from scratch:
``encoder_weights`` and ``encoder_freeze`` do not apply.
"""

from __future__ import annotations

import keras

from tfseg.config import ModelConfig
from tfseg.models import ARCHS
from tfseg.models.common import (
    check_from_scratch,
    check_input_shape,
    flag,
    int_list,
    read_options,
    segmentation_head,
)

ARCH = "unet_small"
FILTERS = (64, 128, 256, 512)
DEFAULT_OPTIONS = {"filters": int_list(FILTERS, min_length=2), "batchnorm": flag(False)}

# For the shared model contract (tests/test_models_contract.py).
TEST_SIZE = 16
TEST_OPTIONS = {"filters": [4, 8, 8, 16]}


def _double_conv(x, filters: int, batchnorm: bool, name: str):
    for i in (1, 2):
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=not batchnorm,
                                name=f"{name}_{i}_conv")(x)
        if batchnorm:
            x = keras.layers.BatchNormalization(name=f"{name}_{i}_bn")(x)
        x = keras.layers.Activation("relu", name=f"{name}_{i}_relu")(x)
    return x


@ARCHS.register(ARCH)
def build_unet_small(cfg: ModelConfig) -> keras.Model:
    """Build the brain-MRI post's U-Net.

    Args:
        cfg: ``cfg.input_shape`` [H, W, C] with H and W multiples of ``2 ** (len(filters) - 1)``
            (8 by default), ``cfg.classes``, ``cfg.activation``, ``cfg.dropout`` (before the
            decoder), ``cfg.options``: ``filters`` (default 64, 128, 256, 512), ``batchnorm``
            (default False).

    Returns:
        A model from float32 [B, H, W, C] in 0..255 to float32 [B, H, W, classes].

    Raises:
        ModelError: unknown option, bad filters, or a size that is not a multiple.
    """
    check_from_scratch(ARCH, cfg.encoder_weights, cfg.encoder_freeze)
    opts = read_options(ARCH, cfg.options, DEFAULT_OPTIONS)
    filters = tuple(opts["filters"])
    multiple = 2 ** (len(filters) - 1)
    h, w, c = check_input_shape(cfg.input_shape or (), multiple, ARCH, min_size=multiple)
    bn = opts["batchnorm"]

    inputs = keras.Input((h, w, c), name="image")
    x = keras.layers.Rescaling(1.0 / 255.0, name="normalize")(inputs)
    skips = []
    for level, f in enumerate(filters[:-1], start=1):
        x = _double_conv(x, f, bn, f"down{level}")
        skips.append(x)
        x = keras.layers.MaxPooling2D(2, name=f"down{level}_pool")(x)
    x = _double_conv(x, filters[-1], bn, f"down{len(filters)}")
    if cfg.dropout:
        x = keras.layers.Dropout(cfg.dropout, name="center_dropout")(x)
    for level in range(len(filters) - 1, 0, -1):
        x = keras.layers.UpSampling2D(2, interpolation="bilinear", name=f"up{level}_upsample")(x)
        x = keras.layers.Concatenate(name=f"up{level}_concat")([x, skips[level - 1]])
        x = _double_conv(x, filters[level - 1], bn, f"up{level}")
    outputs = segmentation_head(x, cfg.classes, cfg.activation, kernel_size=1)
    return keras.Model(inputs, outputs, name=ARCH)
