"""Decoder blocks shared by the architectures, named as segmentation_models names them.

The layer names match segmentation_models (``decoder_stage0a_conv``, ``decoder_stage0a_bn``,
``decoder_stage0a_relu`` ...), so a model reads the same in ``summary()`` and weights port by name.
``keras.layers`` only.
"""

from __future__ import annotations

import keras


def conv_bn_act(
    x,
    filters: int,
    kernel_size: int | tuple[int, int] = 3,
    *,
    activation: str | None = "relu",
    use_batchnorm: bool = True,
    strides: int = 1,
    dilation_rate: int = 1,
    separable: bool = False,
    padding: str = "same",
    kernel_initializer: str = "he_uniform",
    use_bias: bool | None = None,
    name: str | None = None,
):
    """Conv2D -> BatchNormalization (optional) -> activation (optional): segmentation_models' ``Conv2dBn``.

    Args:
        x: features [B, H, W, F_in].
        filters: output channels.
        kernel_size: convolution size.
        activation: Keras activation name, or None for none.
        use_batchnorm: add BatchNormalization (the convolution then has no bias).
        strides: convolution stride.
        dilation_rate: atrous rate (DeepLab's ASPP).
        separable: a depthwise-separable convolution (``SeparableConv2D``, no BatchNorm between its
            depthwise and pointwise parts; both initialized with ``kernel_initializer``).
        padding: ``same`` or ``valid``.
        kernel_initializer: convolution initializer (segmentation_models uses ``he_uniform`` in its
            decoders; its ``Conv2dBn`` default is ``glorot_uniform``).
        use_bias: override the bias (default: no bias when there is batchnorm).
        name: block name; the layers are ``<name>_conv``, ``<name>_bn``, ``<name>_<activation>``.

    Returns:
        [B, H/strides, W/strides, filters].
    """
    bias = (not use_batchnorm) if use_bias is None else use_bias
    common = dict(strides=strides, dilation_rate=dilation_rate, padding=padding, use_bias=bias,
                  name=f"{name}_conv" if name else None)
    if separable:
        conv = keras.layers.SeparableConv2D(filters, kernel_size, depthwise_initializer=kernel_initializer,
                                            pointwise_initializer=kernel_initializer, **common)
    else:
        conv = keras.layers.Conv2D(filters, kernel_size, kernel_initializer=kernel_initializer, **common)
    x = conv(x)
    if use_batchnorm:
        x = keras.layers.BatchNormalization(name=f"{name}_bn" if name else None)(x)
    if activation:
        x = keras.layers.Activation(activation, name=f"{name}_{activation}" if name else None)(x)
    return x


def conv3x3_bn_relu(x, filters: int, use_batchnorm: bool, name: str):
    """segmentation_models' ``Conv3x3BnReLU``: 3x3 same conv (he_uniform), BN, ReLU."""
    return conv_bn_act(x, filters, 3, activation="relu", use_batchnorm=use_batchnorm, name=name)


def decoder_upsampling_block(x, skip, filters: int, stage: int, use_batchnorm: bool = True, *,
                             name: str | None = None):
    """U-Net decoder block: UpSampling2D x2 -> concat skip(s) -> two conv3x3-BN-ReLU.

    Args:
        x: [B, H, W, F] deeper features.
        skip: [B, 2H, 2W, S] encoder features, a list of such (UNet++'s nodes), or None.
        filters: output channels.
        stage: block index (names ``decoder_stage{stage}...``).
        use_batchnorm: BN after each convolution.
        name: the layers' name prefix instead of ``decoder_stage{stage}``.

    Returns:
        [B, 2H, 2W, filters].
    """
    name = name or f"decoder_stage{stage}"
    skips = [] if skip is None else list(skip) if isinstance(skip, (list, tuple)) else [skip]
    x = keras.layers.UpSampling2D(size=2, name=f"{name}_upsampling")(x)
    if skips:
        x = keras.layers.Concatenate(axis=-1, name=f"{name}_concat")([x, *skips])
    x = conv3x3_bn_relu(x, filters, use_batchnorm, name=f"{name}a")
    return conv3x3_bn_relu(x, filters, use_batchnorm, name=f"{name}b")


def decoder_transpose_block(x, skip, filters: int, stage: int, use_batchnorm: bool = True):
    """U-Net decoder block: Conv2DTranspose 4x4 stride 2 -> BN -> ReLU -> concat skip -> conv3x3-BN-ReLU.

    Args and shapes as :func:`decoder_upsampling_block`.
    """
    x = keras.layers.Conv2DTranspose(
        filters,
        4,
        strides=2,
        padding="same",
        use_bias=not use_batchnorm,
        name=f"decoder_stage{stage}a_transpose",
    )(x)
    if use_batchnorm:
        x = keras.layers.BatchNormalization(name=f"decoder_stage{stage}a_bn")(x)
    x = keras.layers.Activation("relu", name=f"decoder_stage{stage}a_relu")(x)
    if skip is not None:
        x = keras.layers.Concatenate(axis=-1, name=f"decoder_stage{stage}_concat")([x, skip])
    return conv3x3_bn_relu(x, filters, use_batchnorm, name=f"decoder_stage{stage}b")


DECODER_BLOCKS = {"upsampling": decoder_upsampling_block, "transpose": decoder_transpose_block}
