"""``unetplusplus``: UNet++ (Zhou et al. 2018), a U-Net whose skips are nested, densely connected decoders.

The model of segmentation_models_pytorch's ``UnetPlusPlus`` (the one Kaggle notebooks run), on the
encoder table's features at strides 2, 4, 8, 16 and 32, like ``unet``. Nodes are named as in the paper,
``X(i, j)`` -> layers ``decoder_x{i}_{j}_*``: ``i`` is the level (the node's stride is ``2**i``; ``X(i, 0)``
is the encoder's feature at that stride, ``X(5, 0)`` its stride-32 output) and ``j`` the node's place along
the skip pathway. Every node with ``j >= 1`` is

    X(i, j) = two conv3x3-BN-ReLU( concat( up2(X(i+1, j-1)), X(i, j-1), ..., X(i, 0) ) )

with nearest-neighbour x2 upsampling (``decoder_x{i}_{j}_upsampling``), the concatenation in smp's order
(the upsampled node, then the level's nodes newest first, the encoder feature last;
``decoder_x{i}_{j}_concat``) and the convolutions ``decoder_x{i}_{j}a`` and ``decoder_x{i}_{j}b``
(:func:`tfseg.models.blocks.decoder_upsampling_block`, the U-Net block with several skips; He-uniform, no bias
when there is BatchNorm).

- The nodes with ``i + j == 5`` are the decoder's path up: ``X(4, 1)``, ``X(3, 2)``, ``X(2, 3)``,
  ``X(1, 4)`` and ``X(0, 5)`` (the input size) have ``model.decoder_filters`` (256, 128, 64, 32, 16)
  filters; ``model.decoder_use_batchnorm`` puts BatchNorm in every node.
- The nodes inside the grid (``i + j < 5``, ``j >= 1``) have as many filters as the encoder's feature at
  their level, as smp's (``X(1, 1)`` to ``X(1, 3)`` of ``resnet34`` have 64, ``X(2, 1)``, ``X(2, 2)`` 64,
  ``X(3, 1)`` 128).
- A level the encoder has no feature at (ConvNeXt's stride 2, or the full-resolution level 0 of every
  encoder but VGG's with ``encoder_features: [16, 8, 4, 2, 1]``) has only its path-up node, which
  upsamples without a skip.
- Then the shared head: a 3x3 convolution to ``classes`` (``final_conv``, as smp's) and the float32
  ``output`` activation.

smp's ``x_{d}_{l}`` is ``X(4 - l, l - d + 1)`` here; with the same encoder channels the decoder and head
have smp's parameters, layer for layer (``tests/test_models_unetpp.py``). For VGG smp also builds a
center block of two 3x3 conv-BN-ReLU that its forward never calls: tfseg has none.

Options (``cfg.options``):
    encoder_features: ``default`` (strides 16, 8, 4, 2, those the encoder has) or the skip strides,
        deepest first and in a row from 16 (each level's nodes need the level below it), e.g.
        ``[16, 8, 4]`` (no stride-2 nodes) or ``[16, 8, 4, 2, 1]`` (VGG's full-resolution block); or
        segmentation_models' layer names for them, as ``unet`` takes.

Deep supervision (the paper's heads on ``X(0, 1..4)``) is not offered: it needs one output per head and
a loss on each, and tfseg's models have one output.
"""

from __future__ import annotations

import keras

from tfseg.config import ModelConfig
from tfseg.errors import ModelError
from tfseg.models import ARCHS
from tfseg.models.blocks import decoder_upsampling_block
from tfseg.models.common import any_value, freeze_encoder, read_options, segmentation_head
from tfseg.models.encoders import encoder_on_input
from tfseg.models.unet import FEATURES_EXPECTED, skip_strides

ARCH = "unetplusplus"
SIZE_MULTIPLE = 32
DEPTH = 5  # the level of the encoder's stride-32 output; the path up has DEPTH nodes
DEFAULT_OPTIONS = {"encoder_features": any_value("default", FEATURES_EXPECTED)}
# Shared model contract (tests/test_models_contract.py): tiny test size and encoders to test; resnet18 runs in
# the fast tier (the smallest decoder: smp's resnet18/34 one, 4.8M parameters), the others are slow.
TEST_SIZE = 64
TEST_BACKBONES = ("resnet18", "mobilenetv2", "vgg16")


def node_name(i: int, j: int) -> str:
    """Layer-name prefix of node ``X(i, j)``: ``decoder_x{i}_{j}``."""
    return f"decoder_x{i}_{j}"


def nested_decoder(features: dict, filters, use_batchnorm: bool = True) -> dict:
    """UNet++'s nested skip pathways over encoder features.

    Args:
        features: level ``i`` -> the encoder's feature [B, H / 2**i, W / 2**i, C_i]; level ``DEPTH`` (stride
            32) and a run of levels below it (4, 3, ... as deep as the skips go).
        filters: ``DEPTH`` filter counts of the path-up nodes ``X(DEPTH - 1, 1)`` ... ``X(0, DEPTH)``.
        use_batchnorm: BatchNorm after each convolution.

    Returns:
        Every node: ``(i, j)`` -> tensor, ``X(i, 0)`` the encoder's features; ``(0, DEPTH)`` is
        [B, H, W, filters[-1]].
    """
    nodes = {(i, 0): x for i, x in features.items()}
    for j in range(1, DEPTH + 1):  # column by column: X(i, j) takes X(i + 1, j - 1) from the column before
        for i in range(DEPTH - j, -1, -1):
            path_up = i + j == DEPTH
            if not path_up and (i, 0) not in nodes:  # no feature at this level: only its path-up node
                continue
            level = [nodes[(i, k)] for k in range(j - 1, -1, -1) if (i, k) in nodes]  # newest first, as smp
            width = int(filters[DEPTH - 1 - i]) if path_up else int(nodes[(i, 0)].shape[-1])
            nodes[(i, j)] = decoder_upsampling_block(nodes[(i + 1, j - 1)], level, width, 0, use_batchnorm,
                                                     name=node_name(i, j))
    return nodes


def _strides(cfg: ModelConfig, features) -> tuple[int, ...]:
    """The skip strides of ``encoder_features`` (unet's reading), checked to run 16, 8, 4, ... in a row."""
    strides = skip_strides(cfg.backbone, features, arch=ARCH)
    in_a_row = tuple(2 ** (DEPTH - 1 - k) for k in range(len(strides)))
    if not strides or strides != in_a_row:
        raise ModelError(f"{ARCH}: option encoder_features={features!r} gives strides {list(strides)}; expected "
                         "'default' or skip strides deepest first and in a row from 16, e.g. [16, 8, 4, 2] (each "
                         "level's nodes need the level below it)")
    return strides


@ARCHS.register(ARCH)
def build_unetplusplus(cfg: ModelConfig) -> keras.Model:
    """Build UNet++ on the encoder ``cfg.backbone``.

    Args:
        cfg: the model section; ``decoder_filters`` (five, deepest first) and ``decoder_use_batchnorm`` as
            for ``unet``; ``cfg.options`` may set ``encoder_features`` (see the module docstring).

    Returns:
        ``keras.Model`` from float32 [B, H, W, C] images in 0..255 to float32 [B, H, W, classes].

    Raises:
        ModelError: unknown option, ``decoder_filters`` not five positive integers, encoder features not in a
            row from 16, input size not a multiple of 32, unknown backbone.
    """
    opts = read_options(ARCH, cfg.options, DEFAULT_OPTIONS)
    filters = list(cfg.decoder_filters)
    if len(filters) != DEPTH or not all(isinstance(f, int) and not isinstance(f, bool) and f > 0 for f in filters):
        raise ModelError(f"{ARCH}: decoder_filters={filters!r}; expected {DEPTH} positive integers, one per x2 "
                         "block from stride 16 to the input size, e.g. [256, 128, 64, 32, 16]")
    if cfg.decoder_block_type != "upsampling":
        raise ModelError(f"{ARCH}: decoder_block_type={cfg.decoder_block_type!r}; expected 'upsampling' (UNet++ "
                         "upsamples by nearest neighbour, as smp's; 'transpose' is unet's)")
    strides = _strides(cfg, opts["encoder_features"])

    image, (deepest, *skips), _ = encoder_on_input(cfg.backbone, cfg.input_shape, cfg.encoder_weights,
                                                   (32, *strides), arch=ARCH, multiple=SIZE_MULTIPLE)
    features = {DEPTH: deepest, **{s.bit_length() - 1: x for s, x in zip(strides, skips)}}  # level = log2(stride)
    x = nested_decoder(features, filters, cfg.decoder_use_batchnorm)[(0, DEPTH)]
    output = segmentation_head(x, int(cfg.classes or 1), cfg.activation, kernel_size=3, name="final_conv")
    model = keras.Model(image, output, name=f"{ARCH}_{cfg.backbone}")
    return freeze_encoder(model) if cfg.encoder_freeze else model
