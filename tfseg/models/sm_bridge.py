"""``model.arch: sm.<Name>``: build the model through segmentation_models itself, when installed.

For comparing with tfseg's own twins (``unet``, ``fpn``, ``linknet``, ``pspnet``) and for
reproducing a notebook exactly. segmentation_models 1.0.1 runs on Keras 3 with
``SM_FRAMEWORK=tf.keras`` (set here unless already set, before its first import); its DenseNet
backbones do not build under Keras 3, and models with its EfficientNet backbones load only once
segmentation_models is imported (their files name its ``FixedDropout`` and ``swish``; tfseg's own
models need nothing): :func:`tfseg.inference.load_model` imports it when a file names its modules.

The sm model is wrapped so that it follows tfseg's model contract: it takes float RGB images in
0..255, like every tfseg model, and applies ``sm.get_preprocessing(name)`` inside (a nested model
named ``preprocess``, :func:`sm_preprocessing`), so sm's encoder, with sm's own weights, sees what it
sees in a segmentation_models notebook: caffe-style encoders (``vgg16``, ``vgg19``) get keras' caffe
mode, the channels flipped to BGR and the BGR ImageNet mean subtracted; torch-style ones (EfficientNet,
DenseNet, SE-ResNet50+, SE-ResNeXt, SENet154) ``(x/255 - mean)/std``; tf-style ones (MobileNet,
Inception) ``x/127.5 - 1``; classification_models' ResNets, SE-ResNet18/34 and ResNeXts none (they
normalize their own input with ``bn_data``). Its output passes through a float32 layer named ``output``.
The preprocessing is made of Keras' own layers (slicing, concatenation, normalization), so the wrapper
adds nothing that ``keras.models.load_model`` needs ``custom_objects`` for.
"""

from __future__ import annotations

import os

import keras

from tfseg.config import ModelConfig
from tfseg.errors import ModelError, first_line
from tfseg.models.common import resolve_activation
from tfseg.models.encoders import ENCODERS, adapt_constants
from tfseg.registry import unknown_name_message

SM_ARCHS = ("FPN", "Linknet", "PSPNet", "Unet")


def import_sm():
    """Import segmentation_models on Keras 3 (``SM_FRAMEWORK=tf.keras``).

    Raises:
        ModelError: when it is not installed.
    """
    os.environ.setdefault("SM_FRAMEWORK", "tf.keras")
    try:
        import segmentation_models as sm
    except ImportError as err:
        raise ModelError(f"model.arch sm.*: segmentation_models is not importable ({err}); install it with "
                         "pip install 'segmentation-models==1.0.1' (tfseg's dev extra)") from None
    return sm


def build_sm_model(cfg: ModelConfig) -> keras.Model:
    """Build ``cfg.arch`` = ``sm.<Name>`` with segmentation_models and wrap it in tfseg's contract.

    Args:
        cfg: the model section; ``backbone``, ``input_shape``, ``classes``, ``activation``,
            ``encoder_weights``, ``encoder_freeze`` and (Unet) the decoder keys are passed on;
            ``options`` go to the sm constructor as keyword arguments.

    Returns:
        ``keras.Model`` float32 [B, H, W, C] in 0..255 -> float32 [B, H, W, classes].

    Raises:
        ModelError: unknown sm architecture, sm not installed, or sm refusing the arguments.
    """
    name = cfg.arch[len("sm."):]
    if name not in SM_ARCHS:
        raise ModelError(unknown_name_message("arch", cfg.arch, [f"sm.{a}" for a in SM_ARCHS]))
    sm = import_sm()
    shape = tuple(cfg.input_shape) if cfg.input_shape else (None, None, 3)
    classes = int(cfg.classes or 1)
    kwargs = {
        "input_shape": shape,
        "classes": classes,
        "activation": resolve_activation(cfg.activation, classes),
        "encoder_weights": cfg.encoder_weights,
        "encoder_freeze": cfg.encoder_freeze,
    }
    if name == "Unet":
        kwargs.update(decoder_block_type=cfg.decoder_block_type, decoder_filters=tuple(cfg.decoder_filters),
                      decoder_use_batchnorm=cfg.decoder_use_batchnorm)
    kwargs.update(cfg.options or {})
    try:
        inner = getattr(sm, name)(cfg.backbone, **kwargs)
    except (ValueError, KeyError, TypeError) as err:
        first = first_line(err)
        raise ModelError(f"sm.{name}({cfg.backbone!r}): {first}") from None
    except Exception as err:  # keras' get_file raises a bare Exception when the download fails
        if cfg.encoder_weights != "imagenet":
            raise
        first = first_line(err)
        raise ModelError(f"sm.{name}({cfg.backbone!r}): could not download ImageNet weights (offline?); pass "
                         f"encoder_weights=<path to the backbone's .h5 weights file> or null "
                         f"({type(err).__name__}: {first})") from None

    image = keras.Input(shape, name="image")
    x = image
    preprocess = sm_preprocessing(cfg.backbone, shape[-1])
    if preprocess is not None:
        x = preprocess(x)
    x = inner(x)
    output = keras.layers.Activation("linear", dtype="float32", name="output")(x)
    return keras.Model(image, output, name=f"sm_{name.lower()}_{cfg.backbone}")


def sm_preprocessing(backbone: str, channels: int = 3) -> keras.Model | None:
    """``sm.get_preprocessing(backbone)`` as a functional model of Keras layers (it needs no sm import).

    The constants are the encoder table's (:data:`tfseg.models.encoders.ENCODERS`), whose families are
    segmentation_models' own (checked for every sm backbone by ``tests/test_sm_bridge.py``): caffe
    (``bgr``) flips RGB to BGR and subtracts the BGR mean, as keras' ``preprocess_input(mode="caffe")``;
    torch and tf normalize per channel. With ``channels`` != 3 (sm then has no pretrained weights and
    its preprocessing is undefined) the constants are adapted as for tfseg's encoders and nothing is
    flipped.

    Args:
        backbone: segmentation_models backbone name (``vgg16``, ``efficientnetb0``, ``mobilenetv2``, ...).
        channels: input channels.

    Returns:
        ``keras.Model`` named ``preprocess`` from float32 [B, H, W, channels] RGB in 0..255 to float32
        [B, H, W, channels], what sm's encoder takes; None when the network normalizes its own input
        (classification_models' ResNets, SE-ResNet18/34, ResNeXts).

    Raises:
        ModelError: a backbone the encoder table does not have (the message lists those it has).
    """
    spec = ENCODERS.get(backbone)
    if spec.norm is None:
        return None
    mean, std = (adapt_constants(values, channels) for values in spec.norm)
    image = keras.Input((None, None, channels), name="image")
    x = image
    if spec.bgr and channels == 3:
        # x[..., ::-1] of keras' caffe mode: channel c alone is the input cropped by (c, 2 - c) along the
        # last axis (Cropping2D's second spatial axis when it reads the tensor as channels_first).
        x = keras.layers.Concatenate(name="preprocess_bgr")(
            [keras.layers.Cropping2D(((0, 0), (c, 2 - c)), data_format="channels_first",
                                     name=f"preprocess_{'rgb'[c]}")(image) for c in (2, 1, 0)]
        )
        mean, std = mean[::-1], std[::-1]
    x = keras.layers.Normalization(mean=mean, variance=[s * s for s in std], name="preprocess_normalize")(x)
    return keras.Model(image, x, name="preprocess")
