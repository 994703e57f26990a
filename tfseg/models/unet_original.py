"""``unet_original``: the U-Net of Ronneberger, Fischer and Brox (2015), valid convolutions.

The paper's network: two unpadded 3x3 convolutions + ReLU per level, 2x2 max pooling, 64 to 1024
channels over 5 levels, 2x2 up-convolutions that halve the channels, the contracting path's maps
center-cropped and concatenated, a final 1x1 convolution. A 572x572 input gives a 388x388 output.
With ``options: {batchnorm: true}`` a BatchNormalization follows every convolution (the Carvana
post's variant). ``cfg.dropout`` adds dropout after the last contracting level, as the paper did.

Sizes. Every valid 3x3 convolution removes 2 pixels and every pooling needs an even size, so an
input size ``s`` works exactly when ``s % 16 == 12`` and ``s >= 188``; the output is then
``s - 184`` pixels (572 -> 388, 188 -> 4). :func:`output_size` and :func:`valid_input_size` say
this in code; the training pipeline center-crops the masks to :func:`output_size`
(``tfseg.data.pipeline``'s ``mask_crop``).

Trained from scratch: there is no pretrained encoder, so ``encoder_weights`` and
``encoder_freeze`` do not apply (and :func:`tfseg.models.common.freeze_encoder` finds nothing).
"""

from __future__ import annotations

import keras

from tfseg.config import ModelConfig
from tfseg.errors import ModelError
from tfseg.models import ARCHS
from tfseg.models.common import check_from_scratch, flag, int_list, read_options, segmentation_head

ARCH = "unet_original"
FILTERS = (64, 128, 256, 512, 1024)
DEFAULT_OPTIONS = {"batchnorm": flag(False), "filters": int_list(FILTERS, length=len(FILTERS))}

# Size rule for len(FILTERS) = 5 levels: s = 16 b + 124 with bottom size b >= 4.
_STEP = 16
_REMAINDER = 12
MIN_SIZE = 188
SIZE_LOSS = 184

# For the shared model contract (tests/test_models_contract.py): the smallest size, small filters.
TEST_SIZE = MIN_SIZE
TEST_OPTIONS = {"filters": [4, 4, 8, 8, 16]}


def output_size(input_size: int) -> int:
    """Output side of ``unet_original`` for an input side ``input_size`` (572 -> 388).

    Raises:
        ModelError: when ``input_size`` does not work (see :func:`valid_input_size`).
    """
    check_size(input_size, "size")
    return input_size - SIZE_LOSS


def valid_input_size(size: int) -> bool:
    """True when ``size % 16 == 12`` and ``size >= 188``: every stage then keeps even sizes."""
    return size >= MIN_SIZE and size % _STEP == _REMAINDER


def nearest_valid_sizes(size: int) -> tuple[int, int]:
    """The valid input sizes just below (at least 188) and just above ``size``."""
    upper = max(MIN_SIZE, size + (_REMAINDER - size) % _STEP)
    if upper == size:
        upper += _STEP
    lower = max(MIN_SIZE, upper - _STEP)
    return lower, upper


def check_size(size: int | None, label: str) -> None:
    """Raise a one-line ModelError naming the nearest sizes when ``size`` does not work."""
    if size is None or valid_input_size(int(size)):
        return
    if size < MIN_SIZE:
        raise ModelError(f"{ARCH}: input {label} {size} is too small; the smallest size that works is "
                         f"{MIN_SIZE} (output {MIN_SIZE - SIZE_LOSS})")
    lower, upper = nearest_valid_sizes(int(size))
    raise ModelError(f"{ARCH}: input {label} {size} does not fit its valid convolutions (a size works "
                     f"when size % 16 == 12 and size >= 188); the nearest sizes that work are {lower} "
                     f"and {upper}")


def _conv(x, filters: int, batchnorm: bool, name: str):
    x = keras.layers.Conv2D(filters, 3, padding="valid", use_bias=not batchnorm,
                            kernel_initializer="he_normal", name=f"{name}_conv")(x)
    if batchnorm:
        x = keras.layers.BatchNormalization(name=f"{name}_bn")(x)
    return keras.layers.Activation("relu", name=f"{name}_relu")(x)


def crop_margins(levels: int = len(FILTERS)) -> list[int]:
    """Pixels to remove from each skip (deepest first) before concatenation: [8, 32, 80, 176].

    They do not depend on the input size (any valid size gives the same margins), so the model
    also builds with ``None`` height/width.
    """
    size, skips = MIN_SIZE, []
    for _ in range(levels - 1):
        size -= 4
        skips.append(size)
        size //= 2
    size -= 4
    margins = []
    for skip in reversed(skips):
        size *= 2
        margins.append(skip - size)
        size -= 4
    return margins


@ARCHS.register(ARCH)
def build_unet_original(cfg: ModelConfig) -> keras.Model:
    """Build the 2015 U-Net.

    Args:
        cfg: ``cfg.input_shape`` [H, W, C] with H and W valid (``size % 16 == 12``, at least 188),
            ``cfg.classes``, ``cfg.activation``, ``cfg.dropout`` (after the deepest level), and
            ``cfg.options``: ``batchnorm`` (bool, default False), ``filters`` (5 ints, default
            64..1024).

    Returns:
        A model from float32 [B, H, W, C] in 0..255 to float32 [B, H - 184, W - 184, classes].

    Raises:
        ModelError: unknown option, wrong filters, or an input size that does not fit.
    """
    check_from_scratch(ARCH, cfg.encoder_weights, cfg.encoder_freeze)
    opts = read_options(ARCH, cfg.options, DEFAULT_OPTIONS)
    filters = tuple(opts["filters"])
    if cfg.input_shape is None or len(cfg.input_shape) != 3:
        raise ModelError(f"{ARCH}: input_shape must be [height, width, channels], got {cfg.input_shape}")
    h, w, c = cfg.input_shape
    check_size(h, "height")
    check_size(w, "width")
    bn = opts["batchnorm"]
    margins = crop_margins(len(filters))

    inputs = keras.Input((h, w, c), name="image")
    x = keras.layers.Rescaling(1.0 / 255.0, name="normalize")(inputs)
    skips = []
    for level, f in enumerate(filters[:-1], start=1):
        x = _conv(x, f, bn, f"down{level}_1")
        x = _conv(x, f, bn, f"down{level}_2")
        skips.append(x)
        x = keras.layers.MaxPooling2D(2, name=f"down{level}_pool")(x)
    x = _conv(x, filters[-1], bn, "bottom_1")
    x = _conv(x, filters[-1], bn, "bottom_2")
    if cfg.dropout:
        x = keras.layers.Dropout(cfg.dropout, name="bottom_dropout")(x)
    for level in range(len(filters) - 1, 0, -1):
        f = filters[level - 1]
        x = keras.layers.Conv2DTranspose(f, 2, strides=2, kernel_initializer="he_normal",
                                         name=f"up{level}_upconv")(x)
        m = margins[len(filters) - 1 - level] // 2
        skip = keras.layers.Cropping2D(m, name=f"up{level}_crop")(skips[level - 1])
        x = keras.layers.Concatenate(name=f"up{level}_concat")([skip, x])
        x = _conv(x, f, bn, f"up{level}_1")
        x = _conv(x, f, bn, f"up{level}_2")
    outputs = segmentation_head(x, cfg.classes, cfg.activation, kernel_size=1)
    return keras.Model(inputs, outputs, name=ARCH)
