"""Encoders as a table: name -> model constructor, feature layers by stride, preprocessing.

Adding an encoder is adding one :class:`EncoderSpec` entry to :data:`ENCODERS`. The feature layers
are the ones segmentation_models uses (``backbones_factory.py``), named for keras.applications'
models; for the encoders segmentation_models lacks they follow the same rule (the last activation
before the next stride-2 layer). ``build_encoder`` returns a functional ``keras.Model`` named
``encoder`` that takes float images in 0..255 and owns their normalization, so an architecture
nests it as one layer: freezing it, saving it and loading it keep working after
``keras.models.load_model``.

Preprocessing is stored as per-channel ``mean``/``std`` in 0..255 units (RGB order):

- ``torch`` (DenseNet, EfficientNet, EfficientNetV2-B*, ConvNeXt): ``(x/255 - [.485, .456, .406]) /
  [.229, .224, .225]``.
- ``caffe`` (VGG, keras' ResNet v1): ``x - [123.68, 116.78, 103.94]``; these were trained on BGR input,
  so the first convolution's pretrained kernel is flipped to RGB order instead of flipping the image.
- ``tf`` (MobileNet v1/v2/v3, ResNet v2, Inception, Xception, NASNet): ``x / 127.5 - 1``.
- none (segmentation_models' ``resnet18`` ... ``resnet152``, ``seresnet18``, ``seresnet34``,
  ``resnext50``, ``resnext101``, :mod:`tfseg.models.sm_resnet`): the network's own input BatchNorm
  normalizes the 0..255 pixels.

The constructors are keras.applications' models, except segmentation_models' own networks
(:mod:`tfseg.models.sm_resnet`, :mod:`tfseg.models.sm_senet`: ``resnet18`` ... ``resnet152``,
``resnext50/101``, ``seresnet*``, ``seresnext50/101``, ``senet154`` mean what they mean in ``sm.Unet``);
keras.applications' ResNet v1 is ``resnet50v1``, ``resnet101v1``, ``resnet152v1``. Every
keras.applications image model is here, NASNetMobile and NASNetLarge (``nasnetmobile``, ``nasnetlarge``)
included: the first cell after each reduction cell also takes a tensor of twice its resolution, but the
last cell at each stride outputs that stride alone, and that is the skip (see the table's comment).

ConvNeXt's stem is a 4x4 convolution of stride 4, so it has no stride-2 features: U-Net and Linknet
then skip from strides 16, 8 and 4 (their last two blocks upsample without a skip, as
segmentation_models_pytorch does for such encoders), and FPN needs ``upsampling: 4``.

With C != 3 input channels the constants are adapted like the first convolution's kernel
(:mod:`tfseg.models.weights`): C = 1 takes their mean, otherwise they repeat cyclically.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import keras

from tfseg.errors import ModelError
from tfseg.models.sm_senet import features as senet_features
from tfseg.registry import Registry

TORCH = ((123.675, 116.28, 103.53), (58.395, 57.12, 57.375))
CAFFE = ((123.68, 116.779, 103.939), (1.0, 1.0, 1.0))
TF = ((127.5, 127.5, 127.5), (127.5, 127.5, 127.5))
TF128 = ((128.0, 128.0, 128.0), (128.0, 128.0, 128.0))


@dataclass(frozen=True)
class EncoderSpec:
    """One row of the encoder table.

    Attributes:
        constructor: attribute of ``keras.applications`` (e.g. ``EfficientNetB0``), or
            ``module:attribute`` for tfseg's own (``tfseg.models.sm_resnet:ResNet34``); called with
            keras.applications' arguments (``include_top``, ``weights``, ``input_tensor``/``input_shape``).
        features: stride -> feature layer for strides 2 (where the network has it), 4, 8, 16 (and 1
            for VGG): a layer name (its output), ``"name/input"`` (that layer's input, for a tensor no
            layer outputs, e.g. after ConvNeXt's residual sum, or one made by an auto-named layer),
            or an index into the keras.applications model's layers as segmentation_models uses for
            Inception. Stride 32 is always the model's output.
        norm: ((mean R, G, B), (std R, G, B)) in 0..255 units, applied inside the model; None when
            the network normalizes its own input.
        bgr: the pretrained weights expect BGR input (caffe style).
        builtin_norm: the keras model has its own Rescaling + Normalization (EfficientNet v1);
            tfseg sets that Normalization to ``norm`` instead of adding a layer.
        exact: feature maps are exactly input/stride (``False`` for valid-padded Inception, Xception
            and NASNet's stem: tfseg zero-pads them to input/stride, which needs a fixed input size).
        min_size: the smallest input side keras.applications accepts.
        kwargs: extra constructor arguments.
    """

    constructor: str
    features: dict = field(default_factory=dict)
    norm: tuple | None = TORCH
    bgr: bool = False
    builtin_norm: bool = False
    exact: bool = True
    min_size: int = 32
    kwargs: dict = field(default_factory=dict)

    @property
    def layer_names(self) -> dict[str, int]:
        """``{layer name: stride}`` of the features the table names by a layer of the encoder (sm's names)."""
        return {f: s for s, f in self.features.items() if isinstance(f, str) and "/" not in f}

    @property
    def model_name(self) -> str:
        """The constructor's name, for messages (``EfficientNetB0``, ``ResNet34``)."""
        return self.constructor.rsplit(":", 1)[-1]

    def resolve(self):
        """The constructor itself (a keras.applications function, or tfseg's)."""
        if ":" in self.constructor:
            module, attr = self.constructor.split(":")
            return getattr(importlib.import_module(module), attr)
        return getattr(keras.applications, self.constructor)

    def make(self, **kwargs) -> keras.Model:
        """Call the constructor with keras.applications' arguments (and the table's ``kwargs``)."""
        return self.resolve()(**kwargs, **self.kwargs)

    @property
    def strides(self) -> tuple[int, ...]:
        """Available feature strides, deepest first (32 is the encoder's output)."""
        return tuple(sorted({32, *self.features}, reverse=True))


ENCODERS: Registry[EncoderSpec] = Registry("backbone")

_EFF_V1 = {
    2: "block2a_expand_activation",
    4: "block3a_expand_activation",
    8: "block4a_expand_activation",
    16: "block6a_expand_activation",
}
for _i in range(8):
    ENCODERS.register(
        f"efficientnetb{_i}", EncoderSpec(f"EfficientNetB{_i}", _EFF_V1, TORCH, builtin_norm=True)
    )

# EfficientNetV2: (variant, block whose projection ends stride 2, block whose expansion ends stride 4, norm)
for _v, _x2, _x4, _norm in (("b0", "1a", "2b", TORCH), ("b1", "1b", "2c", TORCH), ("b2", "1b", "2c", TORCH),
                            ("b3", "1b", "2c", TORCH), ("s", "1b", "2d", TF128), ("m", "1c", "2e", TF128),
                            ("l", "1d", "2g", TF128)):  # fmt: skip
    _features = {2: f"block{_x2}_project_activation", 4: f"block{_x4}_expand_activation",
                 8: "block4a_expand_activation", 16: "block6a_expand_activation"}  # fmt: skip
    _kw = {"include_preprocessing": False}
    _spec = EncoderSpec(f"EfficientNetV2{_v.upper()}", _features, _norm, kwargs=_kw)
    ENCODERS.register(f"efficientnetv2{_v}", _spec)

ENCODERS.register(
    "mobilenet",
    EncoderSpec(
        "MobileNet",
        {2: "conv_pw_1_relu", 4: "conv_pw_3_relu", 8: "conv_pw_5_relu", 16: "conv_pw_11_relu"},
        TF,
    ),
)
ENCODERS.register(
    "mobilenetv2",
    EncoderSpec(
        "MobileNetV2",
        {
            2: "block_1_expand_relu",
            4: "block_3_expand_relu",
            8: "block_6_expand_relu",
            16: "block_13_expand_relu",
        },
        TF,
    ),
)
# MobileNetV3 (keras' include_preprocessing off: tfseg normalizes): the expansion activation of the
# first block of the next stride, as for MobileNetV2; those layers are auto-named (re_lu_2, ...), so
# they are reached as the input of the strided depthwise convolution's padding.
for _v, _blocks in (("Small", ("", "_1", "_3", "_8")), ("Large", ("_1", "_3", "_6", "_12"))):
    _features = {s: f"expanded_conv{b}_depthwise_pad/input" for s, b in zip((2, 4, 8, 16), _blocks)}
    ENCODERS.register(f"mobilenetv3{_v.lower()}",
                      EncoderSpec(f"MobileNetV3{_v}", _features, TF, kwargs={"include_preprocessing": False}))
# ConvNeXt: each stage's output (after its last residual sum) is the input of the next downsampling.
for _v in ("tiny", "small", "base", "large", "xlarge"):
    _features = {s: f"convnext_{_v}_downsampling_block_{i}/input" for i, s in enumerate((4, 8, 16))}
    _ctor = "ConvNeXt" + ("XLarge" if _v == "xlarge" else _v.capitalize())
    ENCODERS.register(f"convnext{_v}", EncoderSpec(_ctor, _features, TORCH, kwargs={"include_preprocessing": False}))
ENCODERS.register(
    "vgg16",
    EncoderSpec(
        "VGG16",
        {1: "block1_conv2", 2: "block2_conv2", 4: "block3_conv3", 8: "block4_conv3", 16: "block5_conv3"},
        CAFFE,
        bgr=True,
    ),
)
ENCODERS.register(
    "vgg19",
    EncoderSpec(
        "VGG19",
        {1: "block1_conv2", 2: "block2_conv2", 4: "block3_conv4", 8: "block4_conv4", 16: "block5_conv4"},
        CAFFE,
        bgr=True,
    ),
)
# segmentation_models' (classification_models') ResNets, under sm's names and feature layers.
_SM_RESNET = {2: "relu0", 4: "stage2_unit1_relu1", 8: "stage3_unit1_relu1", 16: "stage4_unit1_relu1"}
for _depth in (18, 34, 50, 101, 152):
    ENCODERS.register(f"resnet{_depth}", EncoderSpec(f"tfseg.models.sm_resnet:ResNet{_depth}", _SM_RESNET, None))
for _depth in (18, 34):
    ENCODERS.register(f"seresnet{_depth}", EncoderSpec(f"tfseg.models.sm_resnet:SEResNet{_depth}", _SM_RESNET, None))
for _depth in (50, 101):
    ENCODERS.register(f"resnext{_depth}", EncoderSpec(f"tfseg.models.sm_resnet:ResNeXt{_depth}", _SM_RESNET, None))
# segmentation_models' SE networks (tfseg.models.sm_senet): torch-style input, each stride's last unit.
for _name, _ctor in (("seresnet50", "SEResNet50"), ("seresnet101", "SEResNet101"), ("seresnet152", "SEResNet152"),
                     ("seresnext50", "SEResNeXt50"), ("seresnext101", "SEResNeXt101"), ("senet154", "SENet154")):
    ENCODERS.register(_name, EncoderSpec(f"tfseg.models.sm_senet:{_ctor}", senet_features(_name), TORCH))
for _depth, _b3, _b4 in ((50, 4, 6), (101, 4, 23), (152, 8, 36)):
    ENCODERS.register(
        f"resnet{_depth}v1",
        EncoderSpec(
            f"ResNet{_depth}",
            {2: "conv1_relu", 4: "conv2_block3_out", 8: f"conv3_block{_b3}_out", 16: f"conv4_block{_b4}_out"},
            CAFFE,
            bgr=True,
        ),
    )
    ENCODERS.register(
        f"resnet{_depth}v2",
        EncoderSpec(
            f"ResNet{_depth}V2",
            {
                2: "conv1_conv",
                4: "conv2_block3_preact_relu",
                8: f"conv3_block{_b3}_preact_relu",
                16: f"conv4_block{_b4}_preact_relu",
            },
            TF,
        ),
    )
for _depth in (121, 169, 201):
    ENCODERS.register(
        f"densenet{_depth}",
        EncoderSpec(
            f"DenseNet{_depth}", {2: "conv1_relu", 4: "pool2_conv", 8: "pool3_conv", 16: "pool4_conv"}, TORCH
        ),
    )
ENCODERS.register(
    "inceptionv3", EncoderSpec("InceptionV3", {2: 9, 4: 16, 8: 86, 16: 228}, TF, exact=False, min_size=75)
)
ENCODERS.register(
    "inceptionresnetv2",
    EncoderSpec("InceptionResNetV2", {2: 9, 4: 16, 8: 260, 16: 594}, TF, exact=False, min_size=75),
)
ENCODERS.register(
    "xception",
    EncoderSpec(
        "Xception",
        {
            2: "block2_sepconv2_act",
            4: "block3_sepconv2_act",
            8: "block4_sepconv2_act",
            16: "block13_sepconv2_act",
        },
        TF,
        exact=False,
        min_size=71,
    ),
)
# NASNet: at strides 2 to 16 the ReLU of the last cell's output (stem_bn1, the stem's first reduction cell,
# normal cells 3 and 8 (Mobile) or 5 and 12 (Large)) as the next reduction cell takes it; keras names that
# ReLU automatically, so it is reached as the input of that cell's 1x1 convolution. The stem convolution is
# valid-padded: stride 2 is one pixel short and zero-padded. Keras' cells compare static shapes to decide
# when to downsample their second input, so NASNet needs a fixed input size (exact=False asks for one).
for _v, _cells in (("Mobile", ("stem_1", "stem_2", "reduce_4", "reduce_8")),
                   ("Large", ("stem_1", "stem_2", "reduce_6", "reduce_12"))):
    _features = {s: f"reduction_conv_1_{c}/input" for s, c in zip((2, 4, 8, 16), _cells)}
    ENCODERS.register(f"nasnet{_v.lower()}", EncoderSpec(f"NASNet{_v}", _features, TF, exact=False, min_size=32))


def encoder_names() -> list[str]:
    """Every encoder name in the table."""
    return ENCODERS.names()


def available_strides(name: str, wanted: Sequence[int]) -> tuple[int, ...]:
    """The strides of ``wanted`` that encoder ``name`` has features at, in the same order (ConvNeXt has
    no stride 2: the default U-Net and Linknet skips (16, 8, 4, 2) become (16, 8, 4))."""
    have = get_encoder_spec(name).strides
    return tuple(s for s in wanted if s in have)


def get_encoder_spec(name: str) -> EncoderSpec:
    """Return the table row for ``name``; unknown names raise ModelError listing the valid ones."""
    return ENCODERS.get(name)


def adapt_constants(values: Sequence[float], channels: int) -> list[float]:
    """Per-channel RGB constants for ``channels`` input channels (1: their mean; else cyclic)."""
    values = [float(v) for v in values]
    if channels == 1:
        return [sum(values) / len(values)]
    return [values[i % len(values)] for i in range(channels)]


def build_encoder(
    name: str,
    input_shape: Sequence[int | None],
    weights: str | None = None,
    strides: Sequence[int] = (32, 16, 8, 4, 2),
) -> keras.Model:
    """Build the encoder ``name`` as a functional model named ``encoder``.

    Args:
        name: a key of :data:`ENCODERS` (e.g. ``efficientnetb0``).
        input_shape: (height, width, channels); height/width may be None for exact encoders.
        weights: None (random), ``imagenet`` (downloaded by keras.applications) or the path of a
            keras.applications weights file for the 3-channel model (``.h5`` / ``.weights.h5``).
        strides: feature strides to output, in this order (32 = the deepest features). Layers
            that no requested output needs are pruned (PSPNet takes only stride 8).

    Returns:
        ``keras.Model`` taking float32 [B, H, W, C] in 0..255 and returning one tensor per stride
        s, shaped [B, H/s, W/s, F_s]: a list when called on symbolic inputs (also for one
        stride); called eagerly with one stride, Keras returns the lone tensor.

    Raises:
        ModelError: unknown encoder or stride, too small or unfixed size for a non-exact
            encoder, weights that cannot be downloaded or loaded.
    """
    from tfseg.models.weights import load_pretrained

    spec = get_encoder_spec(name)
    h, w, c = input_shape
    for s in strides:
        if s not in spec.strides:
            raise ModelError(
                f"encoder {name} has no features at stride {s}; it has strides {list(spec.strides)}"
            )
    for label, size in (("height", h), ("width", w)):
        if size is not None and size < spec.min_size:
            raise ModelError(
                f"encoder {name}: input {label} {size} is too small; the smallest size that works "
                f"is {spec.min_size}"
            )
        if size is None and not spec.exact:
            raise ModelError(f"encoder {name} needs a fixed input size; got input_shape {list(input_shape)}")
    image = keras.Input((h, w, c), name="image")
    x = image
    if spec.norm is not None and not spec.builtin_norm:
        mean, std = spec.norm
        x = keras.layers.Normalization(
            mean=adapt_constants(mean, c),
            variance=[v * v for v in adapt_constants(std, c)],
            name="preprocess",
        )(image)
    backbone = spec.make(include_top=False, weights=None, input_tensor=x)
    if spec.builtin_norm:
        _set_builtin_norm(backbone, spec, c)
    if weights is not None:
        load_pretrained(backbone, name, spec, weights, c)
    layers = [layer for layer in backbone.layers if layer.name != "preprocess"]  # as indexed standalone
    outputs = []
    for s in strides:
        ref = spec.features.get(s) if s != 32 else None
        if ref is None:
            feat = backbone.output
        elif isinstance(ref, int):
            feat = layers[ref].output
        elif ref.endswith("/input"):
            feat = backbone.get_layer(ref.removesuffix("/input")).input
        else:
            feat = backbone.get_layer(ref).output
        if not spec.exact:
            feat = _align(feat, h // s, w // s, f"align_x{s}")
        outputs.append(feat)
    return keras.Model(image, outputs, name="encoder")


def encoder_on_input(
    name: str,
    input_shape: Sequence[int | None] | None,
    weights: str | None,
    strides: Sequence[int],
    *,
    arch: str,
    multiple: int,
) -> tuple[keras.KerasTensor, list, keras.Model]:
    """The start that the encoder-decoder architectures (unet, fpn, linknet, pspnet, deeplabv3plus, unetplusplus)
    share.

    Checks ``input_shape`` (default (None, None, 3)) for ``arch``: height and width multiples of
    ``multiple`` and at least the encoder's smallest size. Then builds the encoder (:func:`build_encoder`)
    and calls it on the model's input.

    Returns:
        (image, features, encoder): the model's ``keras.Input`` named ``image``, the encoder's
        features at ``strides`` in that order (a list), and the encoder model.

    Raises:
        ModelError: as :func:`tfseg.models.common.check_input_shape` and :func:`build_encoder`.
    """
    from tfseg.models.common import check_input_shape

    spec = get_encoder_spec(name)
    smallest = -(-spec.min_size // multiple) * multiple  # the smallest multiple the encoder can take
    shape = check_input_shape(tuple(input_shape or (None, None, 3)), multiple, arch, min_size=smallest)
    encoder = build_encoder(name, shape, weights, strides=strides)
    image = keras.Input(shape, name="image")
    return image, list(encoder(image)), encoder


def _set_builtin_norm(backbone: keras.Model, spec: EncoderSpec, channels: int) -> None:
    """Set keras' EfficientNet Normalization (after its Rescaling(1/255)) to the table's constants."""
    import numpy as np

    norm = next(layer for layer in backbone.layers if isinstance(layer, keras.layers.Normalization))
    mean, std = spec.norm
    m = np.array(adapt_constants(mean, channels), "float32") / 255.0
    v = (np.array(adapt_constants(std, channels), "float32") / 255.0) ** 2
    norm.set_weights([m, v, np.array(0, dtype=norm.weights[2].dtype)])
    norm.finalize_state()


def _align(x, h: int, w: int, name: str):
    """Zero-pad (or crop) a valid-padded feature map to [h, w], centred."""
    fh, fw = x.shape[1], x.shape[2]
    dh, dw = h - fh, w - fw
    if dh == 0 and dw == 0:
        return x
    if dh >= 0 and dw >= 0:
        return keras.layers.ZeroPadding2D(((dh // 2, dh - dh // 2), (dw // 2, dw - dw // 2)), name=name)(x)
    dh, dw = max(-dh, 0), max(-dw, 0)
    x = keras.layers.Cropping2D(((dh // 2, dh - dh // 2), (dw // 2, dw - dw // 2)), name=name + "_crop")(x)
    return _align(x, h, w, name)
