"""``unet1024``: the Carvana post's deep same-padding U-Net for 1024x1024 inputs.

Follows ``get_unet_1024`` of Peter Giannakopoulos' Kaggle-Carvana-Image-Masking-Challenge
(``model/u_net.py``): per level two 3x3 same convolutions, each BatchNorm + ReLU, then 2x2 max
pooling, with 8, 16, 32, 64, 128, 256, 512 filters (seven poolings: 1024 -> 8), a 1024-filter
center, then per level nearest-neighbour 2x upsampling, concatenation with the skip and *three*
3x3 convolutions (BatchNorm + ReLU), and a 1x1 convolution to the classes.

The issue that asked for this model describes it as "6 levels down"; the reference code has 7
(``down0b`` .. ``down4``), and that is what is built by default. ``options: {filters: [...]}``
chooses other level widths (``[16, 32, 64, 128, 256, 512]`` gives 6 levels), ``center`` the
center width.

Sizes: height and width must be multiples of ``2 ** len(filters)`` (128 by default).
Trained from scratch: ``encoder_weights``, ``encoder_freeze`` and ``dropout`` do not apply.
"""

from __future__ import annotations

import keras

from tfseg.config import ModelConfig
from tfseg.models import ARCHS
from tfseg.models.common import (
    check_from_scratch,
    check_input_shape,
    int_list,
    positive_int,
    read_options,
    segmentation_head,
)

ARCH = "unet1024"
FILTERS = (8, 16, 32, 64, 128, 256, 512)
DEFAULT_OPTIONS = {"filters": int_list(FILTERS), "center": positive_int(1024)}

# For the shared model contract (tests/test_models_contract.py): 2 small levels keep its
# training step cheap (tracing ~70 BatchNorm layers is slow); the 7-level default is checked in
# tests/test_models_archs.py.
TEST_SIZE = 8
TEST_OPTIONS = {"filters": [4, 8], "center": 8}


def _conv_bn_relu(x, filters: int, name: str):
    x = keras.layers.Conv2D(filters, 3, padding="same", name=f"{name}_conv")(x)
    x = keras.layers.BatchNormalization(name=f"{name}_bn")(x)
    return keras.layers.Activation("relu", name=f"{name}_relu")(x)


@ARCHS.register(ARCH)
def build_unet1024(cfg: ModelConfig) -> keras.Model:
    """Build the Carvana 1024 U-Net.

    Args:
        cfg: ``cfg.input_shape`` [H, W, C] with H and W multiples of ``2 ** len(filters)``,
            ``cfg.classes``, ``cfg.activation``, ``cfg.options``: ``filters`` (level widths,
            shallowest first; default 8..512), ``center`` (default 1024).

    Returns:
        A model from float32 [B, H, W, C] in 0..255 to float32 [B, H, W, classes].

    Raises:
        ModelError: unknown option, bad filters, or a size that is not a multiple.
    """
    check_from_scratch(ARCH, cfg.encoder_weights, cfg.encoder_freeze)
    opts = read_options(ARCH, cfg.options, DEFAULT_OPTIONS)
    filters, center = tuple(opts["filters"]), opts["center"]
    multiple = 2 ** len(filters)
    h, w, c = check_input_shape(cfg.input_shape or (), multiple, ARCH, min_size=multiple)

    inputs = keras.Input((h, w, c), name="image")
    x = keras.layers.Rescaling(1.0 / 255.0, name="normalize")(inputs)
    skips = []
    for level, f in enumerate(filters):
        x = _conv_bn_relu(x, f, f"down{level}_1")
        x = _conv_bn_relu(x, f, f"down{level}_2")
        skips.append(x)
        x = keras.layers.MaxPooling2D(2, name=f"down{level}_pool")(x)
    x = _conv_bn_relu(x, center, "center_1")
    x = _conv_bn_relu(x, center, "center_2")
    for level in range(len(filters) - 1, -1, -1):
        x = keras.layers.UpSampling2D(2, name=f"up{level}_upsample")(x)
        x = keras.layers.Concatenate(name=f"up{level}_concat")([skips[level], x])
        for i in (1, 2, 3):
            x = _conv_bn_relu(x, filters[level], f"up{level}_{i}")
    outputs = segmentation_head(x, cfg.classes, cfg.activation, kernel_size=1)
    return keras.Model(inputs, outputs, name=ARCH)
