"""Pretrained encoder weights: ImageNet or a local file, adapted to any number of input channels.

keras.applications only loads pretrained weights into a 3-channel model. tfseg builds that
3-channel model, then copies its weights layer by layer into the real encoder, adapting the first
convolution's kernel ``[k, k, 3, F] -> [k, k, C, F]`` as segmentation_models_pytorch's
``in_channels`` does: C = 1 sums the RGB kernels; otherwise channel i takes RGB channel ``i % 3``
and the kernel is scaled by ``3 / C``. For caffe-style encoders (VGG, ResNet v1, trained on BGR)
the kernel is flipped to RGB order first, so the model always takes RGB (or gray) input.
"""

from __future__ import annotations

import os

import keras
import numpy as np

from tfseg.errors import ModelError
from tfseg.models.encoders import adapt_constants


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
    try:
        return spec.make(
            include_top=False,
            weights=weights,
            input_shape=(None, None, 3)
            if spec.exact
            else (max(spec.min_size, 75), max(spec.min_size, 75), 3),
        )
    except ModelError:
        raise
    except Exception as err:  # download failures surface as Exception from keras' get_file
        if weights == "imagenet":
            raise ModelError(
                f"could not download ImageNet weights for {name} (offline?); pass "
                f"encoder_weights=<path to .h5/.weights.h5 file> ({type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''})"
            ) from None
        raise ModelError(
            f"encoder_weights={weights!r}: could not load it into {spec.model_name} "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
        ) from None


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
