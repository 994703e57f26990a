"""segmentation_models' squeeze-and-excitation networks in Keras 3: ``seresnet50/101/152``,
``seresnext50/101`` and ``senet154`` (classification_models 1.0's ``senet`` module, a port of Cadene's
pretrained-models).

Each unit is a bottleneck whose output goes through channel squeeze-and-excitation (global average
pool, 1x1 convolution to 1/16 of the channels, ReLU, 1x1 convolution back, sigmoid, product)
before the sum with the shortcut and a ReLU; BatchNorm has epsilon 1e-5, convolutions have no bias
(the SE ones do); the input is torch-style normalized (as keras.applications' DenseNet, unlike
classification_models' ResNets, which normalize their own). The three families differ in the
bottleneck:

- SE-ResNet: 1x1 (stride of the unit) -> 3x3 -> 1x1, widths a quarter of the output;
- SE-ResNeXt (32x4d): 1x1 -> 3x3 in 32 groups (stride of the unit) -> 1x1, widths half the output;
- SENet154: a stem of three 3x3 convolutions, 1x1 -> 3x3 in 64 groups -> 1x1, and 3x3 projections
  of the shortcut after the first unit.

classification_models names none of these layers (Keras numbered them as it made them), so sm
gives its skip layers as indices; tfseg names every layer (``stage{s}_unit{u}_conv1`` ...) and the
skips are the last unit's output of each stride (``stage{s}_unit{n}_relu``), the layers sm's
indices point at. sm's ImageNet files load by the order the numbered names record
(:func:`tfseg.models.sm_resnet.load_weights`), each grouped convolution joining its slices.
"""

from __future__ import annotations

import keras

from tfseg.errors import ModelError
from tfseg.models.sm_resnet import finish, model_input, relu, squeeze_excite, units, variant

# name -> (units per stage, block kind, groups, 3x3 stem)
VARIANTS = {
    "seresnet50": ((3, 4, 6, 3), "seresnet", 1, False),
    "seresnet101": ((3, 4, 23, 3), "seresnet", 1, False),
    "seresnet152": ((3, 8, 36, 3), "seresnet", 1, False),
    "seresnext50": ((3, 4, 6, 3), "seresnext", 32, False),
    "seresnext101": ((3, 4, 23, 3), "seresnext", 32, False),
    "senet154": ((3, 8, 36, 3), "senet", 64, True),
}


class _Maker:
    """Makes the layers and keeps the weighted ones in the order made (the order of sm's numbers)."""

    def __init__(self):
        self.order: list = []

    def _keep(self, layer):
        self.order.append(layer)
        return layer

    def conv(self, filters, size, name, strides=1, groups=1, bias=False):
        return self._keep(keras.layers.Conv2D(filters, size, strides=strides, groups=groups, use_bias=bias,
                                              kernel_initializer="he_uniform", name=name))

    def bn(self, name):
        return self._keep(keras.layers.BatchNormalization(momentum=0.99, epsilon=1e-5, name=name))


def _pad(name):
    return keras.layers.ZeroPadding2D(1, name=name)


def _se(make: _Maker, x, p: str):
    return squeeze_excite(x, p, lambda filters, name: make.conv(filters, 1, name, bias=True))


def _unit(make: _Maker, x, filters: int, kind: str, groups: int, strides: int, first: bool, p: str):
    """One SE bottleneck with ``filters`` output channels (``p`` = ``stage{s}_unit{u}_``)."""
    if kind == "seresnet":
        width, mid_strides = filters // 4, 1
        y = make.conv(width, 1, p + "conv1", strides=strides)(x)
    else:
        width = filters // 2 if kind == "seresnext" else filters
        mid_strides = strides
        y = make.conv(filters // 2 if kind == "senet" else width, 1, p + "conv1")(x)
    y = relu(p + "relu1")(make.bn(p + "bn1")(y))
    y = _pad(p + "pad2")(y)
    y = make.conv(width, 3, p + "conv2", strides=mid_strides, groups=groups)(y)
    y = relu(p + "relu2")(make.bn(p + "bn2")(y))
    y = make.bn(p + "bn3")(make.conv(filters, 1, p + "conv3")(y))
    shortcut = x
    if strides != 1 or x.shape[-1] != filters:
        if kind == "senet" and not first:
            shortcut = make.conv(filters, 3, p + "sc", strides=strides)(_pad(p + "sc_pad")(x))
        else:
            shortcut = make.conv(filters, 1, p + "sc", strides=strides)(x)
        shortcut = make.bn(p + "sc_bn")(shortcut)
    y = _se(make, y, p)
    return relu(p + "relu")(keras.layers.Add(name=p + "add")([y, shortcut]))


def SMSENet(  # noqa: N802 - a model constructor, named as keras.applications' are
    name: str,
    include_top: bool = False,
    weights: str | None = None,
    input_tensor=None,
    input_shape=None,
) -> keras.Model:
    """classification_models' SE network ``name`` (a key of :data:`VARIANTS`) without its classifier.

    Args:
        name: ``seresnet50``, ``seresnet101``, ``seresnet152``, ``seresnext50``, ``seresnext101`` or
            ``senet154``.
        include_top: must be False (tfseg builds encoders only).
        weights: None, ``imagenet`` (sm's file, downloaded once into ``~/.keras/models``) or the path
            of a weights file: sm's HDF5 file, or a ``.weights.h5`` saved from this model.
        input_tensor: optional symbolic tensor to build on; else ``input_shape`` (default (None, None, 3)).

    Returns:
        ``keras.Model`` named ``name``: [B, H, W, C] -> [B, H/32, W/32, 2048]. Like sm's, it expects
        torch-style normalized input (``sm.get_preprocessing`` divides by 255 and standardizes with the
        ImageNet mean and std); tfseg's encoder table applies that inside the encoder.

    Raises:
        ModelError: unknown name, ``include_top``, a weights file that is missing or does not fit.
    """
    if name not in VARIANTS:
        raise ModelError(f"SMSENet: name={name!r}; expected one of {sorted(VARIANTS)}")
    counts, kind, groups, stem3x3 = VARIANTS[name]
    make = _Maker()
    x = image = model_input("SMSENet", include_top, input_tensor, input_shape, name="input")
    if stem3x3:
        for i, (filters, strides) in enumerate(((64, 2), (64, 1), (128, 1))):
            x = make.conv(filters, 3, f"conv0_{i + 1}", strides=strides)(_pad(f"pad0_{i + 1}")(x))
            x = relu("relu0" if i == 2 else f"relu0_{i + 1}")(make.bn(f"bn0_{i + 1}")(x))
    else:
        x = make.conv(64, 7, "conv0", strides=2)(keras.layers.ZeroPadding2D(3, name="pad0")(x))
        x = relu("relu0")(make.bn("bn0")(x))
    x = keras.layers.MaxPooling2D(3, strides=2, name="pooling0")(_pad("pooling0_pad")(x))
    for stage, unit, strides, prefix in units(counts):
        x = _unit(make, x, 256 * 2**stage, kind, groups, strides, stage == 0 and unit == 0, prefix)
    return finish(image, input_tensor, x, name, weights, order=make.order, by_name=False)


def features(name: str) -> dict[int, str]:
    """sm's skip layers of ``name`` by stride: the stem's last ReLU, then each stride's last unit output."""
    counts = VARIANTS[name][0]
    return {2: "relu0", **{2 ** (s + 2): f"stage{s + 1}_unit{counts[s]}_relu" for s in range(3)}}


SEResNet50, SEResNet101, SEResNet152, SEResNeXt50, SEResNeXt101, SENet154 = (
    variant(SMSENet, n, t) for n, t in zip(VARIANTS, ("SEResNet50", "SEResNet101", "SEResNet152", "SEResNeXt50",
                                                      "SEResNeXt101", "SENet154")))
