"""``model.arch: sm.<Name>``: build the model through segmentation_models itself, when installed.

For comparing with tfseg's own twins (``unet``, ``fpn``, ``linknet``, ``pspnet``) and for
reproducing a notebook exactly. segmentation_models 1.0.1 runs on Keras 3 with
``SM_FRAMEWORK=tf.keras`` (set here unless already set, before its first import); its DenseNet
backbones do not build under Keras 3, and models with its EfficientNet backbones need
segmentation_models' ``FixedDropout`` in ``custom_objects`` to load (tfseg's own models do not).

The sm model is wrapped so that it follows tfseg's model contract: it takes float images in 0..255
and normalizes them inside with the table's constants for that encoder name (segmentation_models'
own models expect ``sm.get_preprocessing(name)`` outside; caffe-style encoders such as VGG get
the per-channel mean subtracted but no RGB->BGR flip), and its output passes through a float32
layer named ``output``. Backbones whose table row has no constants get none: classification_models'
ResNets, SE-ResNet18/34 and ResNeXts normalize their own input (``bn_data``).
"""

from __future__ import annotations

import os

import keras

from tfseg.config import ModelConfig
from tfseg.errors import ModelError, first_line
from tfseg.models.common import resolve_activation
from tfseg.models.encoders import ENCODERS, adapt_constants

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
        raise ModelError(f"Received: arch={cfg.arch!r}. Expected one of {['sm.' + a for a in SM_ARCHS]}")
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
    norm = ENCODERS.get(cfg.backbone).norm if cfg.backbone in ENCODERS else None
    if norm is not None:
        mean, std = norm
        channels = shape[-1]
        x = keras.layers.Normalization(mean=adapt_constants(mean, channels),
                                       variance=[s * s for s in adapt_constants(std, channels)],
                                       name="preprocess")(x)
    x = inner(x)
    output = keras.layers.Activation("linear", dtype="float32", name="output")(x)
    return keras.Model(image, output, name=f"sm_{name.lower()}_{cfg.backbone}")
