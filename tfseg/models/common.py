"""Pieces every architecture shares: input checks, the output head, freezing.

``keras.ops`` and ``keras.layers`` only (no ``tf.``), so models build on any Keras backend.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import keras

from tfseg.errors import ModelError
from tfseg.registry import nearest


def resolve_activation(activation: str | None, classes: int) -> str:
    """Map the config's activation to a Keras one.

    Args:
        activation: ``auto`` (sigmoid for 1 class, softmax otherwise), ``sigmoid``, ``softmax``,
            ``linear`` (logits) or None (= linear).
        classes: number of output channels.
    """
    if activation in (None, "linear"):
        return "linear"
    if activation == "auto":
        return "sigmoid" if classes == 1 else "softmax"
    if activation in ("sigmoid", "softmax"):
        return activation
    raise ModelError(f"Received: activation={activation!r}. Expected one of ['auto', 'sigmoid', 'softmax', "
                     "'linear']")


def check_input_shape(input_shape: Sequence[int | None], multiple: int, arch: str,
                      min_size: int | None = None) -> tuple[int | None, int | None, int]:
    """Check that height and width can be taken by an architecture that downsamples by ``multiple``.

    Raises:
        ModelError: one line saying the nearest sizes that work, e.g. "unet: input height 500 is not
            divisible by 32; the nearest sizes that work are 480 and 512".
    """
    if len(input_shape) != 3:
        raise ModelError(f"{arch}: input_shape must be [height, width, channels], got {list(input_shape)}")
    h, w, c = input_shape
    if c is None or int(c) < 1:
        raise ModelError(f"{arch}: input channels must be a positive integer, got {c!r}")
    for label, size in (("height", h), ("width", w)):
        if size is None:
            continue
        if min_size is not None and size < min_size:
            raise ModelError(f"{arch}: input {label} {size} is too small; the smallest size that works is "
                             f"{min_size}")
        if size % multiple:
            smallest = -(-(min_size or multiple) // multiple) * multiple  # smallest multiple >= min_size
            lower = size // multiple * multiple
            upper = max((size // multiple + 1) * multiple, smallest)
            if lower < smallest:
                raise ModelError(f"{arch}: input {label} {size} is not divisible by {multiple}; the nearest "
                                 f"size that works is {upper}")
            raise ModelError(f"{arch}: input {label} {size} is not divisible by {multiple}; the nearest "
                             f"sizes that work are {lower} and {upper}")
    return h, w, int(c)


def segmentation_head(x, classes: int, activation: str, *, kernel_size: int = 3, name: str = "final",
                      transpose_stride: int | None = None):
    """Final convolution to ``classes`` channels and the output activation, in float32.

    The activation runs as its own float32 layer named ``output`` so that the model's output stays
    float32 under ``mixed_float16`` / ``mixed_bfloat16`` (the loss then sees full precision).

    Args:
        x: decoder features [B, H, W, F].
        classes: output channels.
        activation: ``auto``/``sigmoid``/``softmax``/``linear``.
        kernel_size: of the final convolution.
        name: name of the final convolution layer.
        transpose_stride: when set, the final layer is a Conv2DTranspose with this stride (the
            pix2pix tutorial's last layer).
    """
    act = resolve_activation(activation, classes)
    if transpose_stride:
        x = keras.layers.Conv2DTranspose(classes, kernel_size, strides=transpose_stride, padding="same",
                                         name=name)(x)
    else:
        x = keras.layers.Conv2D(classes, kernel_size, padding="same", use_bias=True,
                                kernel_initializer="glorot_uniform", name=name)(x)
    return keras.layers.Activation(act, dtype="float32", name="output")(x)


def all_layers(model: keras.Model):
    """Every layer of ``model``, depth first, the layers of nested models (encoders) included."""
    for layer in model.layers:
        yield layer
        if hasattr(layer, "layers"):
            yield from all_layers(layer)


def set_trainable(layers, trainable: bool) -> None:
    """Freeze or unfreeze ``layers``; BatchNormalization stays in inference mode when frozen.

    In Keras 3 a BatchNormalization layer with ``trainable=False`` runs in inference mode (it
    uses and keeps its moving statistics), which is what fine-tuning a pretrained encoder needs.
    """
    for layer in layers:
        layer.trainable = trainable


def encoder_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """Layers of a tfseg model that form its encoder: the nested model named ``encoder`` (the
    encoder table's) or layers named ``encoder_*`` (TernausNet's own VGG11). Derived from names,
    so it holds for a model just built and for one reloaded with ``keras.models.load_model``."""
    return [layer for layer in model.layers if layer.name == "encoder" or layer.name.startswith("encoder_")]


def freeze_encoder(model: keras.Model) -> keras.Model:
    """Freeze the encoder of a tfseg model (decoder warm-up, the first stage of fine-tuning)."""
    set_trainable(encoder_layers(model), False)
    return model


def unfreeze_encoder(model: keras.Model) -> keras.Model:
    """Make every layer trainable again (the second stage: train all). Recompile afterwards."""
    set_trainable(model.layers, True)
    return model


def check_from_scratch(arch: str, encoder_weights: str | None) -> None:
    """An architecture without a pretrained encoder takes ``encoder_weights`` null or ``imagenet`` (the
    config's default, which does not apply to it); a weights file would be silently unused, so it is an
    error."""
    if encoder_weights not in (None, "imagenet"):
        raise ModelError(f"{arch}: encoder_weights={encoder_weights!r}, but {arch} is trained from scratch and has "
                         "no pretrained encoder to load it into; expected null (or imagenet, which does not apply)")


def read_options(arch: str, options: Mapping[str, Any] | None, defaults: Mapping[str, Any]) -> dict:
    """Merge ``cfg.options`` over an architecture's ``defaults``; an unknown key lists the valid ones.

    Args:
        arch: architecture name, for the message.
        options: the config's ``model.options`` (None or a mapping).
        defaults: every option the architecture takes, with its default.

    Returns:
        A new dict with every key of ``defaults``.

    Raises:
        ModelError: e.g. "fpn: unknown option 'pyramid_filters' (did you mean 'pyramid_block_filters'?).
            Expected one of ['pyramid_aggregation', 'pyramid_block_filters', ...]".
    """
    options = dict(options or {})
    for key in options:
        if key not in defaults:
            hint = nearest(key, defaults)
            did_you_mean = f" (did you mean {hint!r}?)" if hint else ""
            if not defaults:
                raise ModelError(f"{arch}: unknown option {key!r}; {arch} takes no options")
            raise ModelError(f"{arch}: unknown option {key!r}{did_you_mean}. Expected one of "
                             f"{sorted(defaults)}")
    return {**defaults, **options}
