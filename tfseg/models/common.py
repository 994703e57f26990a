"""Pieces every architecture shares: input checks, the output head, freezing.

``keras.ops`` and ``keras.layers`` only (no ``tf.``), so models build on any Keras backend.
"""

from __future__ import annotations

import functools
import inspect
import numbers
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import keras

from tfseg.errors import ModelError, first_line
from tfseg.registry import nearest

# What a tfseg model's output may be: the losses, metrics and predict read it as probabilities or logits.
OUTPUT_ACTIVATIONS = ("auto", "sigmoid", "softmax", "linear")


def check_classes(classes, arch: str | None = None) -> int:
    """``classes`` as an int >= 1 (output channels: 1 for a binary mask, N for N classes).

    Raises:
        ModelError: "unet: classes=0: expected an integer >= 1 ..." (``arch`` names the model when given).
    """
    if not _is_integral(classes) or classes < 1:
        where = f"{arch}: " if arch else ""
        raise ModelError(f"{where}classes={show(classes)}: expected an integer >= 1 (the output channels: 1 for a "
                         "binary mask with sigmoid, N >= 2 for N classes with softmax)")
    return int(classes)


def resolve_activation(activation: str | None, classes: int) -> str:
    """Map the config's activation to a Keras one.

    Args:
        activation: ``auto`` (sigmoid for 1 class, softmax otherwise), ``sigmoid``, ``softmax``
            (2 classes or more), ``linear`` (logits) or None (= linear, as segmentation_models).
        classes: number of output channels, >= 1.

    Raises:
        ModelError: an unknown name (with the nearest one), a Keras activation that gives neither
            probabilities nor logits (``relu``, ``tanh``: segmentation_models takes any Keras name, but
            tfseg's losses, metrics and predict read the output as one or the other), softmax over one
            channel (1.0 everywhere), or ``classes`` below 1.
    """
    classes = check_classes(classes)
    if activation in (None, "linear"):
        return "linear"
    if activation == "auto":
        return "sigmoid" if classes == 1 else "softmax"
    if activation == "sigmoid":
        return activation
    if activation == "softmax":
        if classes == 1:
            raise ModelError("Received: activation='softmax' with classes=1: a softmax over one channel is 1.0 at "
                             "every pixel; expected 'sigmoid' (or 'auto') for one class")
        return activation
    if isinstance(activation, str) and _is_keras_activation(activation):
        raise ModelError(f"Received: activation={activation!r}: a Keras activation, but tfseg's losses, metrics "
                         "and predict read a model's output as probabilities (sigmoid, softmax) or logits "
                         f"(linear or null). Expected one of {list(OUTPUT_ACTIVATIONS)}")
    hint = nearest(activation, OUTPUT_ACTIVATIONS) if isinstance(activation, str) else None
    did_you_mean = f" (did you mean {hint!r}?)" if hint else ""
    raise ModelError(f"Received: activation={activation!r}{did_you_mean}. Expected one of "
                     f"{list(OUTPUT_ACTIVATIONS)} or null (= linear)")


def _is_keras_activation(name: str) -> bool:
    try:
        keras.activations.get(name)
    except (ValueError, TypeError):
        return False
    return True


def check_arguments(function: Callable) -> Callable:
    """Decorate a segmentation_models-style constructor (``Unet``, ``FPN``...) so that an argument it does
    not take is a one-line ModelError with the nearest name, not Python's bare TypeError:
    ``FPN: unknown argument 'pyramid_filters' (did you mean 'pyramid_block_filters'?). Expected one of [...]``.
    """
    signature = inspect.signature(function)
    names = [name for name, p in signature.parameters.items() if p.kind is not p.VAR_KEYWORD]

    @functools.wraps(function)
    def checked(*args, **kwargs):
        try:
            signature.bind(*args, **kwargs)
        except TypeError as err:
            unknown = [key for key in kwargs if key not in signature.parameters]
            if unknown:
                hint = nearest(unknown[0], names)
                did_you_mean = f" (did you mean {hint!r}?)" if hint else ""
                raise ModelError(f"{function.__name__}: unknown argument {unknown[0]!r}{did_you_mean}. Expected one "
                                 f"of {names}") from None
            raise ModelError(f"{function.__name__}: {err}; it takes {names}") from None
        return function(*args, **kwargs)

    return checked


def check_weights_path(weights, arch: str) -> None:
    """The constructors' ``weights=`` is null or an existing file: checked before anything is built.

    Raises:
        ModelError: "unet: weights='missing.h5': no such file; expected null or ...".
    """
    if weights is None:
        return
    if not isinstance(weights, (str, os.PathLike)):
        raise ModelError(f"{arch}: weights={weights!r}: expected null or the path of this model's weights file "
                         "(.weights.h5 from model.save_weights, or a .keras file)")
    if not os.path.isfile(weights):
        raise ModelError(f"{arch}: weights={str(weights)!r}: no such file; expected null or the path of this "
                         "model's weights file (.weights.h5 from model.save_weights, or a .keras file)")


def load_model_weights(model: keras.Model, weights, arch: str) -> None:
    """Load the whole model's ``weights`` file (the constructors' ``weights=``, as segmentation_models').

    Raises:
        ModelError: one line naming the file: not a path, no such file (as for ``encoder_weights``), or a
            file Keras cannot load into this model (another architecture, backbone, ``classes``...).
    """
    check_weights_path(weights, arch)
    try:
        model.load_weights(weights)
    except Exception as err:  # Keras raises ValueError, KeyError, OSError... for a file of another model
        raise ModelError(f"{arch}: weights={str(weights)!r}: could not load it into {model.name} "
                         f"({type(err).__name__}: {first_line(err)}); a segmentation_models file loads with "
                         "tfseg.models.load_sm_weights(model, path)") from None


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


def check_from_scratch(arch: str, encoder_weights: str | None, encoder_freeze: bool = False) -> None:
    """An architecture without a pretrained encoder takes ``encoder_weights`` null or ``imagenet`` (the
    config's default, which does not apply to it); a weights file would be silently unused, and
    ``encoder_freeze`` would freeze nothing, so either is an error."""
    if encoder_freeze:
        raise ModelError(f"{arch}: encoder_freeze=true, but {arch} is trained from scratch and has no pretrained "
                         "encoder to freeze; expected false")
    if encoder_weights not in (None, "imagenet"):
        raise ModelError(f"{arch}: encoder_weights={encoder_weights!r}, but {arch} is trained from scratch and has "
                         "no pretrained encoder to load it into; expected null (or imagenet, which does not apply)")


@dataclass(frozen=True)
class Option:
    """An architecture option: its default and the values it takes.

    Attributes:
        default: the value when ``model.options`` does not set it.
        expected: what a value must be, for the message (``"true or false"``).
        accepts: whether a value (not None) is valid.
        nullable: whether null (None) is valid too.
    """

    default: Any
    expected: str
    accepts: Callable[[Any], bool] = field(default=lambda value: True, repr=False)
    nullable: bool = False

    def valid(self, value) -> bool:
        return (value is None and self.nullable) or (value is not None and self.accepts(value))


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_integral(value) -> bool:
    """An int or a numpy integer (``mask.max() + 1``), not a bool: what a Python argument may count with."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_flag(value) -> bool:
    """True or False, also numpy's."""
    return isinstance(value, bool) or (type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_"))


def _as_sequence(value):
    """A numpy array as a list; anything else as it is."""
    return value.tolist() if type(value).__module__ == "numpy" and getattr(value, "ndim", 0) == 1 else value


def check_sm_arguments(arch: str, *, input_shape=None, encoder_freeze=False, decoder_filters=None,
                       decoder_use_batchnorm=True, filters_nullable: bool = False) -> dict:
    """The segmentation_models-style constructors' shared arguments, checked as ``read_options`` checks a params
    file's (``"no"`` is not false, ``256.5`` is not a filter count), and normalized: ``input_shape`` and
    ``decoder_filters`` as tuples of ints (numpy integers taken), the flags as bools.

    Raises:
        ModelError: one line naming the argument, e.g. "unet: encoder_freeze='no': expected true or false".
    """
    out: dict = {}
    for name, value in (("encoder_freeze", encoder_freeze), ("decoder_use_batchnorm", decoder_use_batchnorm)):
        if not _is_flag(value):
            raise ModelError(f"{arch}: {name}={show(value)}: expected true or false")
        out[name] = bool(value)
    input_shape, decoder_filters = _as_sequence(input_shape), _as_sequence(decoder_filters)
    if input_shape is not None:
        shape = tuple(input_shape) if isinstance(input_shape, (list, tuple)) else None
        if (shape is None or len(shape) != 3 or not all(v is None or (_is_integral(v) and v >= 1) for v in shape)
                or shape[2] is None):
            raise ModelError(f"{arch}: input_shape={show(input_shape)}: expected (height, width, channels) of "
                             "positive integers, height and width None for any size, e.g. (None, None, 3)")
        out["input_shape"] = tuple(None if v is None else int(v) for v in shape)
    if decoder_filters is not None:
        entry = "a positive integer or None" if filters_nullable else "a positive integer"
        if (not isinstance(decoder_filters, (list, tuple)) or not decoder_filters
                or not all((v is None and filters_nullable) or (_is_integral(v) and v >= 1)
                           for v in decoder_filters)):
            raise ModelError(f"{arch}: decoder_filters={show(decoder_filters)}: expected a list of one or more "
                             f"decoder blocks' filters, each {entry}, e.g. "
                             f"{'(None, None, None, None, 16)' if filters_nullable else '(256, 128, 64, 32, 16)'}")
        out["decoder_filters"] = tuple(None if v is None else int(v) for v in decoder_filters)
    return out


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _null_or(nullable: bool, text: str) -> str:
    return f"null or {text}" if nullable else text


def flag(default: bool | None, nullable: bool = False) -> Option:
    """A boolean option: YAML ``true`` / ``false`` only (not ``"yes"``, not 1)."""
    return Option(default, _null_or(nullable, "true or false"), lambda v: isinstance(v, bool), nullable)


def positive_int(default: int | None, nullable: bool = False) -> Option:
    """An integer >= 1 (filters, widths); not a bool, not a float."""
    return Option(default, _null_or(nullable, "a positive integer"), lambda v: _is_int(v) and v >= 1, nullable)


def int_list(default: Sequence[int], *, length: int | None = None, min_length: int = 1,
             distinct: bool = False) -> Option:
    """A list of positive integers: exactly ``length`` of them, or at least ``min_length``."""
    count = f"{length}" if length is not None else (f"at least {min_length}" if min_length > 1 else "one or more")
    text = f"a list of {count}{' distinct' if distinct else ''} positive integers, e.g. {list(default)}"

    def accepts(value) -> bool:
        if not isinstance(value, (list, tuple)) or not all(_is_int(v) and v >= 1 for v in value):
            return False
        if distinct and len(set(value)) != len(value):
            return False
        return len(value) == length if length is not None else len(value) >= min_length

    return Option(tuple(default), text, accepts)


def choice(default, values: Sequence) -> Option:
    """One of ``values``, of the same type (``8`` for a factor of [4, 8, 16], not ``8.0`` or ``"8"``)."""
    values = list(values)
    return Option(default, f"one of {values}", lambda v: any(type(v) is type(c) and v == c for c in values))


def dropout_rate(default: float | None = None) -> Option:
    """A dropout rate in [0, 1), or null (the default: the model's ``dropout``)."""
    return Option(default, "null or a rate in [0, 1)", lambda v: _is_number(v) and 0 <= v < 1, nullable=True)


def any_value(default, expected: str) -> Option:
    """An option the architecture checks itself (``encoder_features``: a name, a stride or a list)."""
    return Option(default, expected, lambda v: True, nullable=True)


def option_for(default) -> Option:
    """The :class:`Option` of a plain default: its type says what a value must be."""
    if isinstance(default, Option):
        return default
    if isinstance(default, bool):
        return flag(default)
    if _is_int(default):
        return Option(default, "an integer", _is_int)
    if isinstance(default, float):
        return Option(default, "a number", _is_number)
    if isinstance(default, str):
        return Option(default, "a string", lambda v: isinstance(v, str))
    if isinstance(default, (list, tuple)) and default and all(_is_int(v) for v in default):
        return int_list(default, length=len(default))
    return any_value(default, "any value")


def show(value) -> str:
    """A value as the user wrote it in YAML or Python: tuples as lists."""
    return repr(list(value)) if isinstance(value, tuple) else repr(value)


def option_error(arch: str, name: str, value, expected: str) -> ModelError:
    """The one message format of a bad option: ``unet_small: option filters=16: expected a list of ...``."""
    return ModelError(f"{arch}: option {name}={show(value)}: expected {expected}")


def read_options(arch: str, options: Mapping[str, Any] | None, defaults: Mapping[str, Any]) -> dict:
    """Merge ``cfg.options`` over an architecture's ``defaults``, checking every name and value.

    Args:
        arch: architecture name, for the message.
        options: the config's ``model.options`` (None or a mapping).
        defaults: every option the architecture takes: an :class:`Option` (``positive_int(256)``,
            ``flag(False)``, ``int_list(...)``, ``choice(...)``, ``dropout_rate()``), or a plain default whose
            type says what a value must be (a bool takes true or false; an int an integer; a tuple of
            ints a list of as many positive integers).

    Returns:
        A new dict with every key of ``defaults``: the value given, else the default.

    Raises:
        ModelError: one line: an unknown name ("fpn: unknown option 'pyramid_filters' (did you mean
            'pyramid_block_filters'?). Expected one of [...]") or a value of the wrong type or range
            ("unet1024: option center='big': expected a positive integer").
    """
    if options is not None and not isinstance(options, Mapping):
        raise ModelError(f"{arch}: options={show(options)}: expected a mapping of option names to values, "
                         "e.g. {filters: [64, 128, 256, 512]}")
    options = dict(options or {})
    specs = {name: option_for(default) for name, default in defaults.items()}
    for key in options:
        if key not in specs:
            hint = nearest(key, specs)
            did_you_mean = f" (did you mean {hint!r}?)" if hint else ""
            if not specs:
                raise ModelError(f"{arch}: unknown option {key!r}; {arch} takes no options")
            raise ModelError(f"{arch}: unknown option {key!r}{did_you_mean}. Expected one of "
                             f"{sorted(specs)}")
        if not specs[key].valid(options[key]):
            raise option_error(arch, key, options[key], specs[key].expected)
    return {**{name: spec.default for name, spec in specs.items()}, **options}
