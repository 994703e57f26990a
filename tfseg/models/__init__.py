"""The model zoo: one file per architecture, each builder registered by name in :data:`ARCHS`.

``build_model(cfg.model)`` is the one way in. A builder takes the :class:`ModelConfig` and returns
an uncompiled functional ``keras.Model`` whose last layer (named ``output``) is float32.

Models use ``keras.ops``/``keras.layers`` only, so they build and train on the TensorFlow, JAX
or PyTorch backend.
"""

from __future__ import annotations

import importlib

import keras

from tfseg.config import ModelConfig
from tfseg.models.sm_port import load_sm_weights as load_sm_weights  # segmentation_models' files, by name
from tfseg.registry import Registry

ARCHS: Registry = Registry("arch")

# Modules whose import registers architectures. An architecture file registers itself with
# ``@ARCHS.register("name")``; add its module here.
_ARCH_MODULES = (
    "tfseg.models.unet",
    "tfseg.models.fpn",
    "tfseg.models.linknet",
    "tfseg.models.pspnet",
    "tfseg.models.deeplabv3plus",
    "tfseg.models.unetplusplus",
    "tfseg.models.pix2pix",
    "tfseg.models.unet_original",
    "tfseg.models.unet1024",
    "tfseg.models.unet_small",
    "tfseg.models.ternaus",
)
_loaded = False


def _load_archs() -> None:
    global _loaded
    if _loaded:
        return
    for name in _ARCH_MODULES:  # a missing or broken architecture file is an error, not a smaller zoo
        importlib.import_module(name)
    _loaded = True


def arch_names() -> list[str]:
    """Every registered architecture name."""
    _load_archs()
    return ARCHS.names()


def build_model(cfg: ModelConfig) -> keras.Model:
    """Build the model that ``cfg`` describes.

    Args:
        cfg: the ``model`` section; ``cfg.input_shape`` and ``cfg.classes`` must be resolved
            (``load_config`` fills them from the data section).

    Returns:
        An uncompiled ``keras.Model`` mapping float32 images [B, H, W, C] with values in 0..255
        (the model owns its normalization) to float32 [B, H', W', classes] (probabilities, or
        logits when ``activation`` is ``linear``).

    Raises:
        ModelError: unknown arch (listing the valid ones), impossible input size, bad weights.
    """
    if cfg.arch.startswith("sm."):
        from tfseg.models.sm_bridge import build_sm_model

        model = build_sm_model(cfg)
    else:
        _load_archs()
        model = ARCHS.get(cfg.arch)(cfg)
    if cfg.bn_momentum is not None:
        set_bn_momentum(model, cfg.bn_momentum)
    return model


def set_bn_momentum(model: keras.Model, momentum: float) -> int:
    """Set the momentum of every BatchNormalization layer of ``model`` (nested encoders included);
    it is part of each layer's config, so a saved model keeps it. Returns how many layers."""
    from tfseg.models.common import all_layers

    layers = [layer for layer in all_layers(model) if isinstance(layer, keras.layers.BatchNormalization)]
    for layer in layers:
        layer.momentum = float(momentum)
    return len(layers)
