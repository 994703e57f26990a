"""segmentation_models' ResNets and ResNeXts in Keras 3: ``resnet18`` ... ``resnet152``, ``resnext50``, ``resnext101``.

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

ResNeXt50 and ResNeXt101 (``sm.Unet("resnext50")``) come from the same library and share the stem
and the names, but their units are post-activation bottlenecks: 1x1 convolution -> BN -> ReLU, a
3x3 convolution in 32 groups -> BN -> ReLU, 1x1 convolution to twice the width -> BN, the sum with
the (projected, ``sc`` + ``sc_bn``) shortcut and a ReLU (``stage{s}_unit{u}_relu``); widths 128,
256, 512, 1024; no final BatchNorm. classification_models builds each grouped convolution from 32
sliced ``Conv2D`` layers with generated names (``conv2d_17`` ...); tfseg uses one ``Conv2D(groups=32)``
named ``stage{s}_unit{u}_conv2`` and, reading sm's file, joins the 32 kernels of each unit in the
order the generated names number them.

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
IMAGENET_SENET = {
    "seresnet50": ("seresnet50_imagenet_1000_no_top.h5", "043777781b0d5ca756474d60bf115ef1"),
    "seresnet101": ("seresnet101_imagenet_1000_no_top.h5", "1c373b0c196918713da86951d1239007"),
    "seresnet152": ("seresnet152_imagenet_1000_no_top.h5", "f58d4c1a511c7445ab9a2c2b83ee4e7b"),
    "seresnext50": ("seresnext50_imagenet_1000_no_top.h5", "b0f23d2e1cd406d67335fb92d85cc279"),
    "seresnext101": ("seresnext101_imagenet_1000_no_top.h5", "e48708cbe40071cc3356016c37f6c9c7"),
    "senet154": ("senet154_imagenet_1000_no_top.h5", "d854ff2cd7e6a87b05a8124cd283e0f2"),
    "seresnet18": ("seresnet18_imagenet_1000_no_top.h5", "a46e5cd4114ac946ecdc58741e8d92ea"),
    "seresnet34": ("seresnet34_imagenet_1000_no_top.h5", "3348fd049f1f9ad307c070ff2b6ec4cb"),
}
SE_DEPTHS = (18, 34)  # classification_models' pre-activation SE-ResNets
RESNEXT_DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
RESNEXT_GROUPS = 32
IMAGENET_RESNEXT = {
    50: ("resnext50_imagenet_1000_no_top.h5", "7ade5c8aac9194af79b1724229bdaa50"),
    101: ("resnext101_imagenet_1000_no_top.h5", "91fe0126320e49f6ee607a0719828c7e"),
}


def _bn(name: str, scale: bool = True):
    return keras.layers.BatchNormalization(momentum=0.99, epsilon=2e-5, scale=scale, name=name)


def _conv(filters: int, size: int, strides: int, name: str, init: str = "he_uniform"):
    return keras.layers.Conv2D(filters, size, strides=strides, use_bias=False, kernel_initializer=init, name=name)


def _stem(image, init: str):
    """classification_models' stem on ``image``: input BN without scale, 7x7/2 convolution, BN, ReLU, 3x3/2
    max pool."""
    x = _bn("bn_data", scale=False)(image)
    x = keras.layers.ZeroPadding2D(3, name="pad0")(x)
    x = _conv(64, 7, 2, "conv0", init)(x)
    x = relu("relu0")(_bn("bn0")(x))
    x = keras.layers.ZeroPadding2D(1, name="pooling0_pad")(x)
    return keras.layers.MaxPooling2D(3, strides=2, name="pooling0")(x)


def model_input(constructor: str, include_top: bool, input_tensor, input_shape, name: str = "data"):
    """The input of a classification_models network built as an encoder (``include_top`` must be False)."""
    if include_top:
        raise ModelError(f"{constructor}: include_top=True is not supported; tfseg builds it as an encoder")
    return input_tensor if input_tensor is not None else keras.Input(input_shape or (None, None, 3), name=name)


def finish(image, input_tensor, output, name: str, weights: str | None, **load_options) -> keras.Model:
    """The ``keras.Model`` named ``name`` from ``image`` (or the sources of ``input_tensor``) to ``output``,
    with ``weights`` loaded (:func:`load_weights`) when given."""
    inputs = keras.utils.get_source_inputs(image) if input_tensor is not None else image
    model = keras.Model(inputs, output, name=name)
    if weights is not None:
        load_weights(model, name, weights, **load_options)
    return model


def relu(name: str):
    """A ReLU layer named ``name``."""
    return keras.layers.Activation("relu", name=name)


def units(counts):
    """The residual units of a network with ``counts`` units per stage, in order: (stage, unit, strides,
    name prefix), stage and unit from 0; the first unit of every stage but the first has stride 2
    (the stem's max pooling halves before the first)."""
    for stage, count in enumerate(counts):
        for unit in range(count):
            yield stage, unit, (2 if unit == 0 and stage > 0 else 1), f"stage{stage + 1}_unit{unit + 1}_"


SE_REDUCTION = 16
SE_LAYERS = ("se_reduce", "se_expand")  # the SE convolutions: classification_models leaves them unnamed


def squeeze_excite(x, prefix: str, conv=None):
    """classification_models' channel squeeze-and-excitation (``{prefix}se_*``): global average pool, 1x1
    convolution to 1/16 of the channels, ReLU, 1x1 convolution back, sigmoid, product with ``x``.
    ``conv(filters, name)`` makes the two convolutions (default: ``Conv2D`` with bias, he_uniform)."""
    def default(filters, name):
        return keras.layers.Conv2D(filters, 1, kernel_initializer="he_uniform", name=name)

    conv = conv or default
    channels = x.shape[-1]
    s = keras.layers.GlobalAveragePooling2D(keepdims=True, name=prefix + "se_pool")(x)
    s = relu(prefix + "se_relu")(conv(channels // SE_REDUCTION, prefix + SE_LAYERS[0])(s))
    s = keras.layers.Activation("sigmoid", name=prefix + "se_sigmoid")(conv(channels, prefix + SE_LAYERS[1])(s))
    return keras.layers.Multiply(name=prefix + "se_mul")([x, s])


def _unit(x, filters: int, p: str, strides: int, bottleneck: bool, project: bool, attention: bool = False):
    """One pre-activation residual unit (layers ``{p}*``), with SE before the sum when ``attention``
    (SE-ResNet18/34)."""
    y = relu(p + "relu1")(_bn(p + "bn1")(x))
    out = filters * 4 if bottleneck else filters
    shortcut = _conv(out, 1, strides, p + "sc")(y) if project else x
    if bottleneck:
        y = _conv(filters, 1, 1, p + "conv1")(y)
        y = relu(p + "relu2")(_bn(p + "bn2")(y))
        y = keras.layers.ZeroPadding2D(1, name=p + "pad2")(y)
        y = _conv(filters, 3, strides, p + "conv2")(y)
        y = relu(p + "relu3")(_bn(p + "bn3")(y))
        y = _conv(out, 1, 1, p + "conv3")(y)
    else:
        y = keras.layers.ZeroPadding2D(1, name=p + "pad1")(y)
        y = _conv(filters, 3, strides, p + "conv1")(y)
        y = relu(p + "relu2")(_bn(p + "bn2")(y))
        y = keras.layers.ZeroPadding2D(1, name=p + "pad2")(y)
        y = _conv(filters, 3, 1, p + "conv2")(y)
    if attention:
        y = squeeze_excite(y, p)
    return keras.layers.Add(name=p + "add")([y, shortcut])


def SMResNet(  # noqa: N802 - a model constructor, named as keras.applications' are
    depth: int,
    include_top: bool = False,
    weights: str | None = None,
    input_tensor=None,
    input_shape=None,
    attention: bool = False,
) -> keras.Model:
    """classification_models' ResNet-``depth`` (SE-ResNet with ``attention``) without its classifier, on
    0..255 input.

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
    if attention and depth not in SE_DEPTHS:
        raise ModelError(f"SMResNet: attention=True (SE-ResNet) is for depth {' or '.join(map(str, SE_DEPTHS))}; "
                         f"got {depth} (seresnet50 and deeper are tfseg.models.sm_senet's)")
    counts, bottleneck = DEPTHS[depth]
    image = model_input("SMResNet", include_top, input_tensor, input_shape)
    x = _stem(image, "he_uniform")
    for stage, unit, strides, prefix in units(counts):
        x = _unit(x, 64 * 2**stage, prefix, strides, bottleneck, project=unit == 0, attention=attention)
    x = relu("relu1")(_bn("bn1")(x))
    return finish(image, input_tensor, x, f"{'se' if attention else ''}resnet{depth}", weights)


def _resnext_unit(x, filters: int, p: str, strides: int, project: bool):
    """One ResNeXt bottleneck (layers ``{p}*``), post-activation, 32-group 3x3."""
    y = _conv(filters, 1, 1, p + "conv1", "glorot_uniform")(x)
    y = relu(p + "relu1")(_bn(p + "bn1")(y))
    y = keras.layers.ZeroPadding2D(1, name=p + "pad2")(y)
    y = keras.layers.Conv2D(filters, 3, strides=strides, groups=RESNEXT_GROUPS, use_bias=False,
                            kernel_initializer="glorot_uniform", name=p + "conv2")(y)
    y = relu(p + "relu2")(_bn(p + "bn2")(y))
    y = _bn(p + "bn3")(_conv(filters * 2, 1, 1, p + "conv3", "glorot_uniform")(y))
    shortcut = _bn(p + "sc_bn")(_conv(filters * 2, 1, strides, p + "sc", "glorot_uniform")(x)) if project else x
    return relu(p + "relu")(keras.layers.Add(name=p + "add")([y, shortcut]))


def SMResNeXt(  # noqa: N802 - a model constructor, named as keras.applications' are
    depth: int,
    include_top: bool = False,
    weights: str | None = None,
    input_tensor=None,
    input_shape=None,
) -> keras.Model:
    """classification_models' ResNeXt-``depth`` (32x4d) without its classifier, on 0..255 input.

    Args and errors as :func:`SMResNet` (depth 50 or 101; sm's files ``resnext{depth}_imagenet_1000_no_top.h5``).

    Returns:
        ``keras.Model`` named ``resnext{depth}``: [B, H, W, C] -> [B, H/32, W/32, 2048].
    """
    if depth not in RESNEXT_DEPTHS:
        raise ModelError(f"SMResNeXt: depth={depth!r}; expected one of {sorted(RESNEXT_DEPTHS)}")
    image = model_input("SMResNeXt", include_top, input_tensor, input_shape)
    x = _stem(image, "glorot_uniform")
    for stage, unit, strides, prefix in units(RESNEXT_DEPTHS[depth]):
        x = _resnext_unit(x, 128 * 2**stage, prefix, strides, project=unit == 0)
    return finish(image, input_tensor, x, f"resnext{depth}", weights)


def _weights_path(model_name: str, weights: str) -> str:
    """The file for ``weights``: sm's ImageNet file for ``model_name`` (downloaded once, md5 checked), or the path."""
    files = {f"resnet{d}": v for d, v in IMAGENET.items()} | {f"resnext{d}": v for d, v in IMAGENET_RESNEXT.items()}
    files |= IMAGENET_SENET
    if weights == "imagenet":
        name, md5 = files[model_name]
        return keras.utils.get_file(name, WEIGHTS_URL + name, cache_subdir="models", file_hash=md5)
    if not os.path.isfile(weights):
        raise ModelError(f"encoder_weights={weights!r}: no such file; expected null, 'imagenet' or the path of "
                         f"an sm {model_name} weights file (.h5, e.g. {files[model_name][0]})")
    return weights


def _h5_layers(path: str) -> dict[str, list]:
    """Layer name -> its weight arrays, in file order, from a Keras HDF5 weights or model file."""
    import h5py

    def text(v):
        return v.decode() if isinstance(v, bytes) else str(v)

    with h5py.File(path, "r") as f:
        group = f["model_weights"] if "model_weights" in f else f
        layers = {}
        for name in map(text, group.attrs.get("layer_names", [])):
            g = group.get(name)
            layers[name] = [g[text(w)][()] for w in g.attrs.get("weight_names", [])] if g is not None else []
        return layers


_GENERATED = {keras.layers.Conv2D: "conv2d", keras.layers.BatchNormalization: "batch_normalization"}


def load_weights(model: keras.Model, model_name: str, weights: str, order=None, by_name: bool = True) -> None:
    """Load ``imagenet`` (sm's file for ``model_name``, downloaded) or a weights file into ``model``.

    sm's HDF5 files hold classification_models' layers: named ones (the ResNets' and ResNeXts' own
    layers) and ones Keras named when they were made (``conv2d_17``, ``batch_normalization_4``: the
    32 slices of each ResNeXt grouped convolution, the SE-ResNets' SE convolutions, every layer of the
    SE networks), whose numbers give the order they were made in. With ``by_name`` the model's layers
    are matched by name and only its grouped and SE convolutions take generated-name layers (a
    grouped one ``groups`` kernels at a time, joined along the output channels); otherwise each
    layer of ``order`` (the model's weighted layers in the order classification_models makes them)
    takes the next generated-name layer of its type. A ``.weights.h5`` file saved from tfseg's model
    loads as Keras loads it.

    Raises:
        ModelError: missing file, or a file whose layers do not fit the model (naming the first).
    """
    import re

    import numpy as np

    path = _weights_path(model_name, weights)
    if path.endswith(".weights.h5"):
        model.load_weights(path)
        return
    stored = _h5_layers(path)
    order = [layer for layer in (order or model.layers) if layer.weights]
    file_name = f"{model_name}_imagenet_1000_no_top.h5"
    queues: dict[str, list] = {kind: [] for kind in _GENERATED.values()}
    for name in stored:
        m = re.fullmatch(r"(conv2d|batch_normalization)(?:_(\d+))?", name)
        if m and stored[name]:
            queues[m.group(1)].append((int(m.group(2) or 0), name))
    for queue in queues.values():
        queue.sort()

    def generated(layer) -> bool:  # grouped convolutions and SE convolutions are unnamed in sm's files
        return not by_name or getattr(layer, "groups", 1) > 1 or layer.name.endswith(SE_LAYERS)

    missing = [layer.name for layer in order if not generated(layer) and not stored.get(layer.name)]
    if missing:
        raise ModelError(f"encoder_weights={weights!r}: {path} has no weights for layer {missing[0]!r} of {model_name} "
                         f"({len(missing)} layers missing); expected sm's {file_name}")
    for kind in queues:
        needed = sum(getattr(layer, "groups", 1) for layer in order
                     if generated(layer) and _GENERATED.get(type(layer)) == kind)
        if len(queues[kind]) != needed:
            raise ModelError(f"encoder_weights={weights!r}: {path} has {len(queues[kind])} generated-name {kind} "
                             f"layers, {model_name} takes {needed}; expected sm's {file_name}")
    taken = {kind: 0 for kind in queues}
    for layer in order:
        if not generated(layer):
            values = stored[layer.name]
        else:
            kind, n = _GENERATED[type(layer)], getattr(layer, "groups", 1)
            parts = [stored[name] for _, name in queues[kind][taken[kind]:taken[kind] + n]]
            taken[kind] += n
            values = parts[0] if n == 1 else [np.concatenate([part[0] for part in parts], axis=-1)]
        try:
            layer.set_weights(values)
        except ValueError as err:
            raise ModelError(f"encoder_weights={weights!r}: {path} does not fit layer {layer.name!r} of {model_name} "
                             f"({err}); expected sm's {file_name}") from None


def variant(family, key, title: str, **options):
    """``title``: ``family(key, ...)`` as a keras.applications-style constructor (``include_top``,
    ``weights``, ``input_tensor``, ``input_shape``), which the encoder table calls."""
    def build(include_top=False, weights=None, input_tensor=None, input_shape=None):
        return family(key, include_top, weights, input_tensor, input_shape, **options)

    build.__name__ = build.__qualname__ = title
    build.__doc__ = (f"segmentation_models' {title} (:func:`{family.__name__}` with {key!r}"
                     + "".join(f", {k}={v!r}" for k, v in options.items()) + ").")
    return build


ResNet18, ResNet34, ResNet50, ResNet101, ResNet152 = (variant(SMResNet, d, f"ResNet{d}") for d in DEPTHS)
SEResNet18, SEResNet34 = (variant(SMResNet, d, f"SEResNet{d}", attention=True) for d in SE_DEPTHS)
ResNeXt50, ResNeXt101 = (variant(SMResNeXt, d, f"ResNeXt{d}") for d in RESNEXT_DEPTHS)
