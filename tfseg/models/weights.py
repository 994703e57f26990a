"""Pretrained encoder weights: ImageNet or a local file, adapted to any number of input channels.

keras.applications only loads pretrained weights into a 3-channel model. tfseg builds that
3-channel model, then copies its weights layer by layer into the real encoder, adapting the first
convolution's kernel ``[k, k, 3, F] -> [k, k, C, F]`` as segmentation_models_pytorch's
``in_channels`` does: C = 1 sums the RGB kernels; otherwise channel i takes RGB channel ``i % 3``
and the kernel is scaled by ``3 / C``. For caffe-style encoders (VGG, ResNet v1, trained on BGR)
the kernel is flipped to RGB order first, so the model always takes RGB (or gray) input.

A weights file is loaded as Keras loads it (by topology); a Keras 2 HDF5 file (``.h5``) that does not
fit that way is matched by layer name (:func:`tfseg.models.sm_port.load_by_name`): segmentation_models'
and the ``efficientnet`` package's EfficientNet files (no input ``Normalization``, which tfseg sets from
the encoder table), or a whole sm model's file (its decoder's layers are left aside). Every weighted layer
of the encoder must be in it with the right shapes.
"""

from __future__ import annotations

import os
import warnings

import keras
import numpy as np

from tfseg.errors import ModelError, first_line
from tfseg.models.encoders import adapt_constants
from tfseg.models.sm_port import is_keras2_h5, load_by_name


def adapt_first_kernel(kernel: np.ndarray, channels: int, bgr: bool = False) -> np.ndarray:
    """Adapt a pretrained first-convolution kernel to ``channels`` input channels.

    Args:
        kernel: float [kh, kw, 3, F] (RGB, or BGR when ``bgr``).
        channels: wanted input channels C >= 1.
        bgr: the kernel expects BGR input; it is flipped to RGB first.

    Returns:
        float [kh, kw, C, F]: C = 1 sums over RGB; C = 3 is the (RGB-ordered) kernel; otherwise
        channel i is RGB channel ``i % 3`` scaled by ``3 / C``.
    """
    if kernel.ndim != 4 or kernel.shape[2] != 3:
        raise ValueError(f"expected a [kh, kw, 3, F] kernel, got shape {kernel.shape}")
    if bgr:
        kernel = kernel[:, :, ::-1, :]
    if channels == 1:
        return kernel.sum(axis=2, keepdims=True)
    if channels == 3:
        return np.ascontiguousarray(kernel)
    idx = [i % 3 for i in range(channels)]
    return kernel[:, :, idx, :] * (3.0 / channels)


def _pretrained_source(name: str, spec, weights: str) -> keras.Model:
    """The 3-channel keras.applications model holding ``weights`` ("imagenet" or a file path)."""
    if weights != "imagenet":
        if not os.path.isfile(weights):
            raise ModelError(
                f"encoder_weights={weights!r}: no such file; expected null, 'imagenet' or the path "
                f"of a {spec.model_name} weights file (.h5 / .weights.h5)"
            )
    shape = (None, None, 3) if spec.exact else (max(spec.min_size, 75), max(spec.min_size, 75), 3)
    own = ":" in spec.constructor  # tfseg's constructors (sm's networks) load files their own way
    source = None
    try:
        if weights == "imagenet" or own:
            with warnings.catch_warnings():  # the weights of a model without its top do not depend on the size
                warnings.filterwarnings("ignore", message=r"`?input_shape`? is undefined or non-square",
                                        category=UserWarning)
                return spec.make(include_top=False, weights=weights, input_shape=shape)
        source = spec.make(include_top=False, weights=None, input_shape=shape)
        source.load_weights(weights)  # what keras.applications does with a file
        return source
    except ModelError:
        raise
    except Exception as err:  # download failures surface as Exception from keras' get_file
        first = f"{type(err).__name__}: {first_line(err)}"
        if weights == "imagenet":
            raise ModelError(
                f"could not download ImageNet weights for {name} (offline?); pass "
                f"encoder_weights=<path to .h5/.weights.h5 file> ({first})"
            ) from None
        if source is None or not is_keras2_h5(weights):
            raise ModelError(
                f"encoder_weights={weights!r}: could not load it into {spec.model_name} ({first})"
            ) from None
    # A Keras 2 HDF5 file that Keras' topological load does not fit (the efficientnet package's
    # EfficientNet, as sm saves and publishes it, lacks keras.applications' input Normalization; a whole
    # sm model holds a decoder too): its layers of the encoder's names, every one required.
    try:
        load_by_name(source, weights, spec.model_name)
    except ModelError as err:
        text = str(err).removeprefix(weights)  # the message starts with the file's path
        raise ModelError(
            f"encoder_weights={weights!r}{text} (Keras' topological load failed too: {first})"
        ) from None
    return source


def load_pretrained(backbone: keras.Model, name: str, spec, weights: str, channels: int) -> None:
    """Copy pretrained weights into ``backbone`` (the keras.applications model built with C channels).

    Args:
        backbone: keras.applications model built with ``weights=None`` on C-channel input.
        name: encoder name (for messages).
        spec: its :class:`tfseg.models.encoders.EncoderSpec`.
        weights: ``imagenet`` or the path of a weights file for the 3-channel model.
        channels: C, the input channels of ``backbone``.

    Raises:
        ModelError: offline ImageNet download, missing or incompatible weights file.
    """
    source = _pretrained_source(name, spec, weights)
    src = [layer for layer in source.layers if layer.weights]
    dst = [layer for layer in backbone.layers if layer.weights]
    if len(src) != len(dst):
        raise ModelError(
            f"encoder_weights for {name}: {len(src)} weighted layers in the pretrained model, "
            f"{len(dst)} in the encoder"
        )
    adapted = False
    for s, d in zip(src, dst):
        if isinstance(d, keras.layers.Normalization):
            continue  # EfficientNet's built-in normalization is set from the table, not the file
        values = s.get_weights()
        if not adapted and channels != 3 and all(v.shape == (3,) for v in values):
            # a per-channel layer on the input itself (sm ResNets' ``bn_data``): adapted like the
            # normalization constants, C = 1 takes the RGB mean, otherwise channels repeat cyclically
            values = [np.asarray(adapt_constants(v, channels), dtype=v.dtype) for v in values]
        if not adapted:
            for i, v in enumerate(values):
                if v.ndim == 4 and v.shape[2] == 3:
                    values[i] = adapt_first_kernel(v, channels, spec.bgr)
                    adapted = True
                    break
        try:
            d.set_weights(values)
        except ValueError as err:
            raise ModelError(
                f"encoder_weights for {name}: layer {d.name} does not match the pretrained "
                f"layer {s.name} ({err})"
            ) from None
