"""``ternaus_unet11`` and ``ternaus_unet16``: TernausNet (Iglovikov & Shvets, 2018).

A U-Net whose encoder is the convolutional part of VGG11 (``ternaus_unet11``, the paper's model)
or VGG16 (``ternaus_unet16``), as in ternaus/TernausNet ``unet_models.py``. The decoder, with
``nf = num_filters`` (32):

    center = DecoderBlock(pool(conv5))              mid 16 nf, out 8 nf
    dec5   = DecoderBlock([center, conv5])          mid 16 nf, out 8 nf
    dec4   = DecoderBlock([dec5, conv4])            mid 16 nf, out 4 nf (UNet11) / 8 nf (UNet16)
    dec3   = DecoderBlock([dec4, conv3])            mid  8 nf, out 2 nf
    dec2   = DecoderBlock([dec3, conv2])            mid  4 nf, out nf
    dec1   = ConvRelu([dec2, conv1])                nf
    final  = 1x1 conv to classes

A DecoderBlock is conv3x3-ReLU then a stride-2 ConvTranspose + ReLU (``is_deconv: true``; kernel
3 in UNet11's ``DecoderBlock``, kernel 4 in UNet16's ``DecoderBlockV2``) or, with
``is_deconv: false``, bilinear 2x upsampling then two conv3x3-ReLU. The reference defaults are
kept: UNet11 deconvolution, UNet16 bilinear.

Encoder weights (``cfg.encoder_weights``):
    * a torchvision ``vgg11``/``vgg16`` state dict (``.pth`` or ``.npz``, see
      :mod:`tfseg.models.torch_weights`): the paper's recipe. A whole TernausNet checkpoint works
      too: the loader finds the key prefix (``features.`` or TernausNet's ``encoder.``) and takes
      the encoder's convolutions only (the decoder keeps its initialisation).
    * ``imagenet`` or a keras.applications VGG16 weights file: ``ternaus_unet16`` only (Keras has
      no VGG11), through the encoder table (:mod:`tfseg.models.encoders`), whose VGG16 is nested as
      one layer named ``encoder`` and normalizes caffe-style (``x - mean``). A torchvision state
      dict loaded onto it has torchvision's normalization folded into its first convolution
      (exact away from the 1-pixel border, where zero padding differs by under 0.01).
    * null: random initialisation.

The reference UNet11 has one output channel; here both take ``classes`` (1x1 head) and the output
activation of ``cfg.activation`` (the reference returns logits, or log-softmax for UNet16 with
several classes: use ``activation: linear`` for logits).

``ternaus_unet11`` builds its own VGG11 (layers ``encoder_block1_conv1`` ...), normalizing as
torchvision. ``encoder_freeze`` freezes the VGG layers.

Input height and width: multiples of 32.
"""

from __future__ import annotations

import keras

from tfseg.config import ModelConfig
from tfseg.errors import ModelError
from tfseg.models import ARCHS
from tfseg.models.common import check_input_shape, flag, freeze_encoder, positive_int, read_options, segmentation_head
from tfseg.models.encoders import TORCH, adapt_constants, build_encoder

# Convolutions per VGG11 block (torchvision ``cfgs["A"]``); VGG16 comes from the encoder table.
VGG_BLOCKS = {"vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512))}
# (mid, out) multiples of num_filters for center, dec5, dec4, dec3, dec2.
DECODER = {
    "vgg11": ((16, 8), (16, 8), (16, 4), (8, 2), (4, 1)),
    "vgg16": ((16, 8), (16, 8), (16, 8), (8, 2), (4, 1)),
}
DECONV_KERNEL = {"vgg11": 3, "vgg16": 4}
DEFAULT_OPTIONS = {
    "ternaus_unet11": {"num_filters": positive_int(32), "is_deconv": flag(True)},
    "ternaus_unet16": {"num_filters": positive_int(32), "is_deconv": flag(False)},
}
TORCH_SUFFIXES = (".pth", ".pt", ".npz")

SIZE_MULTIPLE = 32
MIN_SIZE = 32
# For the shared model contract (tests/test_models_contract.py); valid for both TernausNets.
TEST_SIZE = 32
TEST_OPTIONS = {"num_filters": 4}


def torch_normalization(channels: int, name: str = "normalize") -> keras.layers.Layer:
    """torchvision's ImageNet input normalization for 0..255 input: ``(x/255 - mean) / std``.

    Args:
        channels: input channels; the RGB constants are adapted as the encoder table adapts them
            (:func:`tfseg.models.encoders.adapt_constants`: 1 channel takes their mean).
    """
    mean, std = TORCH
    return keras.layers.Normalization(mean=adapt_constants(mean, channels),
                                      variance=[s * s for s in adapt_constants(std, channels)], name=name)


def vgg_features(x, vgg: str, prefix: str = "encoder_"):
    """VGG convolutional blocks (3x3 same conv + ReLU, 2x2 max pool between blocks).

    Layer names follow keras.applications' VGG16 (``block1_conv1`` ...) after ``prefix``.

    Args:
        x: normalized image [B, H, W, C], H and W multiples of 32.
        vgg: a key of :data:`VGG_BLOCKS` (``vgg11``).

    Returns:
        The five block outputs before pooling (strides 1, 2, 4, 8, 16) and the last block pooled
        (stride 32).
    """
    features = []
    for b, widths in enumerate(VGG_BLOCKS[vgg], start=1):
        if b > 1:
            x = keras.layers.MaxPooling2D(2, name=f"{prefix}block{b - 1}_pool")(x)
        for i, f in enumerate(widths, start=1):
            x = keras.layers.Conv2D(f, 3, padding="same", activation="relu",
                                    name=f"{prefix}block{b}_conv{i}")(x)
        features.append(x)
    x = keras.layers.MaxPooling2D(2, name=f"{prefix}block5_pool")(x)
    return features, x


def _conv_relu(x, filters: int, name: str):
    return keras.layers.Conv2D(filters, 3, padding="same", activation="relu", name=name)(x)


def decoder_block(x, mid: int, out: int, is_deconv: bool, kernel: int, name: str):
    """TernausNet's DecoderBlock: [B, h, w, C] -> [B, 2h, 2w, out]."""
    if is_deconv:
        x = _conv_relu(x, mid, f"{name}_conv")
        x = keras.layers.Conv2DTranspose(out, kernel, strides=2, padding="same", name=f"{name}_deconv")(x)
        return keras.layers.Activation("relu", name=f"{name}_relu")(x)
    x = keras.layers.UpSampling2D(2, interpolation="bilinear", name=f"{name}_upsample")(x)
    x = _conv_relu(x, mid, f"{name}_conv1")
    return _conv_relu(x, out, f"{name}_conv2")


def ternaus_decoder(features, top, vgg: str, num_filters: int, is_deconv: bool):
    """The TernausNet decoder over the VGG ``features`` (strides 1..16) and ``top`` (stride 32).

    Returns:
        [B, H, W, num_filters], the input of the 1x1 head.
    """
    blocks = DECODER[vgg]
    kernel = DECONV_KERNEL[vgg]
    mid, out = blocks[0]
    x = decoder_block(top, mid * num_filters, out * num_filters, is_deconv, kernel, "center")
    for level, (mid, out) in zip((5, 4, 3, 2), blocks[1:]):
        x = keras.layers.Concatenate(name=f"dec{level}_concat")([x, features[level - 1]])
        x = decoder_block(x, mid * num_filters, out * num_filters, is_deconv, kernel, f"dec{level}")
    x = keras.layers.Concatenate(name="dec1_concat")([x, features[0]])
    return _conv_relu(x, num_filters, "dec1_conv")


def _torch_file(weights: str | None) -> bool:
    return isinstance(weights, str) and weights.lower().endswith(TORCH_SUFFIXES)


def _build(cfg: ModelConfig, arch: str, vgg: str) -> keras.Model:
    opts = read_options(arch, cfg.options, DEFAULT_OPTIONS[arch])
    nf = opts["num_filters"]
    h, w, c = check_input_shape(cfg.input_shape or (), SIZE_MULTIPLE, arch, min_size=MIN_SIZE)
    weights = cfg.encoder_weights
    if weights is not None and not _torch_file(weights) and vgg == "vgg11":
        raise ModelError(f"{arch}: encoder_weights={weights!r}; Keras has no ImageNet VGG11 weights. "
                         "Expected null or a torchvision vgg11 state dict file (.pth or .npz)")

    inputs = keras.Input((h, w, c), name="image")
    if vgg == "vgg11":  # tfseg's own VGG11 (Keras has none), normalized as torchvision
        x = torch_normalization(c)(inputs)
        features, top = vgg_features(x, vgg)
    else:  # keras.applications VGG16 from the encoder table (caffe-style normalization inside)
        encoder = build_encoder("vgg16", (h, w, c), None if _torch_file(weights) else weights,
                                strides=(32, 16, 8, 4, 2, 1))
        top, *deep_first = encoder(inputs)
        features = deep_first[::-1]
    x = ternaus_decoder(features, top, vgg, nf, opts["is_deconv"])
    outputs = segmentation_head(x, cfg.classes, cfg.activation, kernel_size=1)
    model = keras.Model(inputs, outputs, name=arch)
    if _torch_file(weights):
        from tfseg.models.torch_weights import load_torch_vgg_state_dict

        # torchvision's normalization is folded into the first convolution where the model normalizes
        # otherwise (VGG16's caffe-style ``preprocess``), as it is when the loader is called on a built model
        load_torch_vgg_state_dict(model, weights, arch=vgg)
    if cfg.encoder_freeze:
        freeze_encoder(model)
    return model


@ARCHS.register("ternaus_unet11")
def build_ternaus_unet11(cfg: ModelConfig) -> keras.Model:
    """TernausNet-11: VGG11 encoder, the paper's model.

    Args:
        cfg: ``input_shape`` [H, W, C] (multiples of 32), ``classes``, ``activation``,
            ``encoder_weights`` (null, or a torchvision vgg11 or TernausNet ``.pth``/``.npz``), ``encoder_freeze``,
            ``options``: ``num_filters`` (32), ``is_deconv`` (true).

    Returns:
        A model from float32 [B, H, W, C] in 0..255 to float32 [B, H, W, classes].
    """
    return _build(cfg, "ternaus_unet11", "vgg11")


@ARCHS.register("ternaus_unet16")
def build_ternaus_unet16(cfg: ModelConfig) -> keras.Model:
    """TernausNet-16: VGG16 encoder (options ``num_filters`` 32, ``is_deconv`` false)."""
    return _build(cfg, "ternaus_unet16", "vgg16")
