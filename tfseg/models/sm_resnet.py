"""segmentation_models' ResNets in Keras 3: ``resnet18``, ``resnet34``, ``resnet50``, ``resnet101``, ``resnet152``.

``sm.Unet("resnet34")`` does not take its encoder from keras.applications (which has no ResNet18 or
ResNet34, and whose ResNet50 is another network) but from classification_models 1.0: a
pre-activation ResNet ported from MXNet. Its stem is an input BatchNorm without scale (``bn_data``,
which normalizes raw 0..255 pixels, so sm's preprocessing for it is the identity), a 7x7 stride-2
convolution and a 3x3 max pooling; each residual unit runs BatchNorm -> ReLU -> convolution (basic
units of two 3x3 convolutions for 18 and 34 layers, bottlenecks of 1x1, 3x3 and 1x1 for 50 and
more), the first unit of each stage projecting its shortcut from the pre-activated input with a
1x1 convolution; convolutions have no bias; BatchNorm has epsilon 2e-5. A final BatchNorm and ReLU
(``bn1``, ``relu1``) end the network.

tfseg builds the same graph under the same layer names, so that

- sm's feature layers are found by name (``relu0``, ``stage{2,3,4}_unit1_relu1``);
- sm's ImageNet weight files (``resnet34_imagenet_1000_no_top.h5``: Keras HDF5 weights, matched here
  by layer name) load into it, and ``sm.Unet("resnet34", encoder_weights="imagenet")`` ports
  with the same weights;
- ``tfseg.models.unet.Unet("resnet34", ...)`` has sm's parameter count exactly.

The functions take keras.applications' arguments, so the encoder table (:mod:`tfseg.models.encoders`)
builds them like any keras.applications model.
"""

from __future__ import annotations

import os

import keras

from tfseg.errors import ModelError

# depth -> (units per stage, bottleneck units)
DEPTHS = {18: ((2, 2, 2, 2), False), 34: ((3, 4, 6, 3), False), 50: ((3, 4, 6, 3), True),
          101: ((3, 4, 23, 3), True), 152: ((3, 8, 36, 3), True)}  # fmt: skip
# ImageNet weights without the classifier, as segmentation_models downloads them (file name, md5).
WEIGHTS_URL = "https://github.com/qubvel/classification_models/releases/download/0.0.1/"
IMAGENET = {
    18: ("resnet18_imagenet_1000_no_top.h5", "318e3ac0cd98d51e917526c9f62f0b50"),
    34: ("resnet34_imagenet_1000_no_top.h5", "8caaa0ad39d927cb8ba5385bf945d582"),
    50: ("resnet50_imagenet_1000_no_top.h5", "db3b217156506944570ac220086f09b6"),
    101: ("resnet101_imagenet_1000_no_top.h5", "1016e7663980d5597a4e224d915c342d"),
    152: ("resnet152_imagenet_1000_no_top.h5", "5867b94098df4640918941115db93734"),
}


def _bn(name: str, scale: bool = True):
    return keras.layers.BatchNormalization(momentum=0.99, epsilon=2e-5, scale=scale, name=name)


def _conv(filters: int, size: int, strides: int, name: str):
    return keras.layers.Conv2D(filters, size, strides=strides, use_bias=False, kernel_initializer="he_uniform",
                               name=name)


def _relu(name: str):
    return keras.layers.Activation("relu", name=name)


def _unit(x, filters: int, stage: int, unit: int, strides: int, bottleneck: bool, project: bool):
    """One pre-activation residual unit (``stage{stage}_unit{unit}_*``)."""
    p = f"stage{stage}_unit{unit}_"
    y = _relu(p + "relu1")(_bn(p + "bn1")(x))
    out = filters * 4 if bottleneck else filters
    shortcut = _conv(out, 1, strides, p + "sc")(y) if project else x
    if bottleneck:
        y = _conv(filters, 1, 1, p + "conv1")(y)
        y = _relu(p + "relu2")(_bn(p + "bn2")(y))
        y = keras.layers.ZeroPadding2D(1, name=p + "pad2")(y)
        y = _conv(filters, 3, strides, p + "conv2")(y)
        y = _relu(p + "relu3")(_bn(p + "bn3")(y))
        y = _conv(out, 1, 1, p + "conv3")(y)
    else:
        y = keras.layers.ZeroPadding2D(1, name=p + "pad1")(y)
        y = _conv(filters, 3, strides, p + "conv1")(y)
        y = _relu(p + "relu2")(_bn(p + "bn2")(y))
        y = keras.layers.ZeroPadding2D(1, name=p + "pad2")(y)
        y = _conv(filters, 3, 1, p + "conv2")(y)
    return keras.layers.Add(name=p + "add")([y, shortcut])


def SMResNet(  # noqa: N802 - a model constructor, named as keras.applications' are
    depth: int,
    include_top: bool = False,
    weights: str | None = None,
    input_tensor=None,
    input_shape=None,
) -> keras.Model:
    """classification_models' ResNet-``depth`` without its classifier, on 0..255 input.

    Args:
        depth: 18, 34, 50, 101 or 152.
        include_top: must be False (tfseg builds encoders only).
        weights: None, ``imagenet`` (sm's file, downloaded once into ``~/.keras/models``) or the
            path of a weights file: sm's HDF5 file (matched by layer name) or a ``.weights.h5`` saved
            from this model.
        input_tensor: optional symbolic tensor to build on; else ``input_shape`` (default (None, None, 3)).

    Returns:
        ``keras.Model`` named ``resnet{depth}``: [B, H, W, C] -> [B, H/32, W/32, 512 or 2048].

    Raises:
        ModelError: unknown depth, ``include_top``, a weights file that is missing or lacks a layer.
    """
    if depth not in DEPTHS:
        raise ModelError(f"SMResNet: depth={depth!r}; expected one of {sorted(DEPTHS)}")
    if include_top:
        raise ModelError("SMResNet: include_top=True is not supported; tfseg uses ResNets as encoders")
    image = input_tensor if input_tensor is not None else keras.Input(input_shape or (None, None, 3), name="data")
    units, bottleneck = DEPTHS[depth]
    x = _bn("bn_data", scale=False)(image)
    x = keras.layers.ZeroPadding2D(3, name="pad0")(x)
    x = _conv(64, 7, 2, "conv0")(x)
    x = _relu("relu0")(_bn("bn0")(x))
    x = keras.layers.ZeroPadding2D(1, name="pooling0_pad")(x)
    x = keras.layers.MaxPooling2D(3, strides=2, name="pooling0")(x)
    for stage, count in enumerate(units):
        for unit in range(count):
            strides = 2 if unit == 0 and stage > 0 else 1
            x = _unit(x, 64 * 2**stage, stage + 1, unit + 1, strides, bottleneck, project=unit == 0)
    x = _relu("relu1")(_bn("bn1")(x))
    inputs = keras.utils.get_source_inputs(image) if input_tensor is not None else image
    model = keras.Model(inputs, x, name=f"resnet{depth}")
    if weights is not None:
        load_weights(model, depth, weights)
    return model


def load_weights(model: keras.Model, depth: int, weights: str) -> None:
    """Load ``imagenet`` (sm's file for ``depth``, downloaded) or a weights file into ``model``."""
    if weights == "imagenet":
        name, md5 = IMAGENET[depth]
        path = keras.utils.get_file(name, WEIGHTS_URL + name, cache_subdir="models", file_hash=md5)
    elif not os.path.isfile(weights):
        raise ModelError(f"encoder_weights={weights!r}: no such file; expected null, 'imagenet' or the path of "
                         f"an sm resnet{depth} weights file (.h5, e.g. {IMAGENET[depth][0]})")
    else:
        path = weights
    if path.endswith(".weights.h5"):
        model.load_weights(path)
        return
    import h5py

    with h5py.File(path, "r") as f:
        group = f["model_weights"] if "model_weights" in f else f
        names = {n.decode() if isinstance(n, bytes) else str(n) for n in group.attrs.get("layer_names", [])}
    missing = [layer.name for layer in model.layers if layer.weights and layer.name not in names]
    if missing:
        raise ModelError(f"encoder_weights={weights!r}: {path} has no weights for layer {missing[0]!r} of "
                         f"resnet{depth} ({len(missing)} layers missing); expected sm's {IMAGENET[depth][0]}")
    model.load_weights(path, by_name=True)


def _variant(depth: int):
    def build(include_top=False, weights=None, input_tensor=None, input_shape=None):
        return SMResNet(depth, include_top, weights, input_tensor, input_shape)

    build.__name__ = build.__qualname__ = f"ResNet{depth}"
    build.__doc__ = f"segmentation_models' ResNet{depth} (:func:`SMResNet` with depth={depth})."
    return build


ResNet18, ResNet34, ResNet50, ResNet101, ResNet152 = (_variant(d) for d in DEPTHS)
