"""On-graph augmentations: small named ops composed from the ``augment.ops`` list of params.yaml.

Every op is a pure graph function ``op(image, mask, seed, **params) -> (image, mask)``:

* ``image``: float32 [H, W, C], values 0..255 (C = 1 or 3);
* ``mask``: integer (uint8/int32/int64) [H, W, 1], class indices;
* ``seed``: int32/int64 [2], the stateless seed (``tf.random.stateless_*``), so that the same seed
  gives the same result eagerly, inside ``Dataset.map`` and on every run.

Geometric ops move image and mask together: the image is sampled bilinearly, the mask with nearest
neighbour, so a mask never takes a value that was not in it (fill value 0 = background where the
op brings in pixels from outside, or ``border: reflect`` to mirror both). Photometric ops leave the
mask unchanged and clip the image to 0..255.

``compose`` checks a list such as ``[{name: flip_left_right, p: 0.5}, {name: gamma, range: [0.8, 1.2]}]``
once (unknown op or parameter -> :class:`ConfigError` naming ``augment.ops[i]``) and returns
``fn(image, mask, seed=None) -> (image, mask)``. docs/augment.md lists every op and its parameters;
the ops themselves live in :mod:`tfseg.data.augment_ops`.

Speed: ops that only move pixels (flips, rot90, crops) run on uint8 when they come first, and a run
of consecutive affine colour ops (brightness, contrast, saturation, hue) is fused into one colour
matrix applied in a single pass and clipped once (:func:`linear_color_map`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import tensorflow as tf

from tfseg.data.geometry import apply_dihedral, is_square
from tfseg.errors import ConfigError
from tfseg.registry import Registry, unknown_name_message


@dataclass(frozen=True)
class AugmentOp:
    """One registered op: its graph function, kind and parameter checks."""

    name: str
    fn: Callable
    kind: str  # "geometric" (moves image and mask) or "color" (image only)
    checks: Mapping[str, Callable[[str, Any], Any]]
    needs_rgb: bool = False
    keeps_shape: bool = True
    exact: bool = False  # only moves pixels: runs on the stored dtype (uint8) before the float cast
    linear: Callable | None = None  # affine colour op: (seed, mean, channels, **params) -> (M, b)
    dihedral: Callable | None = None  # flip/rot90: (seed, square, t, a, b, **params) -> (t, a, b)
    needs_mean: bool = False

    def defaults(self) -> dict[str, Any]:
        """The op's parameters and their defaults (``p`` is handled by :func:`compose`)."""
        if self.dihedral is not None:
            return self.defaults_of(self.dihedral, 5)
        return self.defaults_of(self.linear or self.fn, 3)

    @staticmethod
    def defaults_of(fn: Callable, skip: int) -> dict[str, Any]:
        params = list(inspect.signature(fn).parameters.items())[skip:]
        return {k: v.default for k, v in params}


AUGMENTS: Registry[AugmentOp] = Registry("augment op", ConfigError)


def register(name: str, kind: str, checks: Mapping[str, Callable] | None = None, **flags):
    """Decorator: register ``fn(image, mask, seed, **params)`` as augmentation ``name``."""

    def decorator(fn: Callable) -> Callable:
        AUGMENTS.register(name, AugmentOp(name, fn, kind, dict(checks or {}), **flags))
        return fn

    return decorator


# ------------------------------------------------------------------------------------------------
# Parameter checks: each takes (where, value) and returns the normalised value or raises.
# ------------------------------------------------------------------------------------------------


def _number(lo: float | None = None, hi: float | None = None):
    def check(where: str, value):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}={value!r}: expected a number")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise ConfigError(f"{where}={value!r}: expected a number in [{lo}, {hi}]")
        return float(value)

    return check


def _int(lo: int = 1):
    def check(where: str, value):
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            raise ConfigError(f"{where}={value!r}: expected an integer >= {lo}")
        return value

    return check


def _range(lo: float | None = None, hi: float | None = None):
    """A pair [low, high] with lo <= low <= high <= hi."""

    def check(where: str, value):
        ok = (isinstance(value, (list, tuple)) and len(value) == 2
              and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value))
        if ok:
            a, b = float(value[0]), float(value[1])
            ok = a <= b and (lo is None or a >= lo) and (hi is None or b <= hi)
        if not ok:
            raise ConfigError(f"{where}={value!r}: expected [low, high] with {lo} <= low <= high <= {hi}")
        return (a, b)

    return check


def _size(where: str, value):
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        raise ConfigError(f"{where}={value!r}: expected [height, width], positive integers")
    return (int(value[0]), int(value[1]))


def _choice(*choices: str):
    def check(where: str, value):
        if value not in choices:
            raise ConfigError(f"{where}={value!r}: expected one of {list(choices)}")
        return value

    return check


# ------------------------------------------------------------------------------------------------
# Random helpers
# ------------------------------------------------------------------------------------------------


def _uniform(seed, lo: float, hi: float, shape=()) -> tf.Tensor:
    return tf.random.stateless_uniform(shape, seed, minval=lo, maxval=hi, dtype=tf.float32)


def _seeds(seed, n: int) -> tf.Tensor:
    return tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=n)


def _clip(image: tf.Tensor) -> tf.Tensor:
    return tf.clip_by_value(image, 0.0, 255.0)


def register_linear(name: str, checks: Mapping[str, Callable], needs_mean: bool = False,
                    needs_rgb: bool = False):
    """Register ``linear(seed, mean, channels, **params) -> (M [C, C], b [C])`` as colour op
    ``name``; ``mean`` is the image's channel mean [C] (only computed for ``needs_mean`` ops)."""

    def decorator(linear: Callable) -> Callable:
        def fn(image, mask, seed, **params):
            channels = image.shape[-1] or tf.shape(image)[-1]
            mean = channel_mean(image) if needs_mean else None
            return apply_color_map(image, *linear(seed, mean, channels, **params)), mask

        fn.__doc__ = linear.__doc__
        AUGMENTS.register(name, AugmentOp(name, fn, "color", dict(checks), needs_rgb=needs_rgb,
                                          linear=linear, needs_mean=needs_mean))
        return linear

    return decorator


def register_dihedral(name: str, state: Callable):
    """Register a flip/rot90 op: ``state(seed, square, t, a, b) -> (t, a, b)`` gives the op's action
    on the symmetry "transpose if t, then reverse axis 0 if a and axis 1 if b" (bool scalars;
    ``square``: H == W). The decorated function only lends its name and docstring."""

    def decorator(doc_fn: Callable) -> Callable:
        def fn(image, mask, seed):
            image, mask = tf.convert_to_tensor(image), tf.convert_to_tensor(mask)
            no = tf.constant(False)
            return apply_dihedral(image, mask, *state(seed, is_square(image), no, no, no))

        fn.__doc__ = doc_fn.__doc__
        AUGMENTS.register(name, AugmentOp(name, fn, "geometric", {}, exact=True, dihedral=state))
        return fn

    return decorator


def channel_mean(image) -> tf.Tensor:
    """Mean of each channel [C] of image [H, W, C], estimated on every 4th row and column: a full
    reduction costs more than the whole colour map on CPU, and the estimate is within a gray level
    on natural images."""
    return tf.reduce_mean(image[::4, ::4], axis=[0, 1])


def apply_color_map(image, matrix, bias):
    """clip(image @ matrix + bias, 0, 255) for image float32 [H, W, C], matrix [C, C], bias [C].

    Written as a 1x1 convolution + BiasAdd + Relu6 on the map scaled by 6/255, then x 255/6
    (42.5, exact): Grappler fuses the first three into one oneDNN kernel, so the pixels are
    read twice instead of four times (matmul, BiasAdd, minimum, maximum): ~25 % less CPU per
    512x512 image in tf.data (bench/input_pipeline.py). Equal to the plain formula within
    float32 rounding (~5e-5 on 0..255); the range stays exactly 0..255.
    """
    channels = image.shape[-1] or tf.shape(image)[-1]
    scale = 6.0 / 255.0
    kernel = tf.reshape(tf.cast(matrix, tf.float32) * scale, [1, 1, channels, channels])
    out = tf.nn.conv2d(image[None], kernel, strides=1, padding="VALID")
    out = tf.nn.relu6(tf.nn.bias_add(out, tf.cast(bias, tf.float32) * scale))[0] * (255.0 / 6.0)
    out.set_shape(image.shape)
    return out


# ------------------------------------------------------------------------------------------------
# Composition
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """A checked entry of ``augment.ops``: the op, its probability and its full parameters."""

    op: AugmentOp
    p: float
    params: Mapping[str, Any]


def check_ops(ops: Sequence[Mapping[str, Any]], channels: int | None = None,
              key: str = "augment.ops") -> list[Step]:
    """Check an ``augment.ops`` list and fill in defaults; called once, before any data flows.

    Args:
        ops: entries ``{name: ..., p: probability (default 1), ...parameters}``.
        channels: image channels, when known: RGB-only ops (hue, saturation) need 3.
        key: the config key named in errors.

    Returns:
        One :class:`Step` per entry.

    Raises:
        ConfigError: one line naming ``augment.ops[i]``: unknown op (listing the valid ones),
            unknown parameter (listing the op's), or a value out of range.
    """
    if isinstance(ops, (str, bytes, Mapping)) or not isinstance(ops, Sequence):
        raise ConfigError(f"{key}={ops!r}: expected a list of {{name: ..., p: ...}} entries")
    steps = []
    for i, entry in enumerate(ops):
        where = f"{key}[{i}]"
        if not isinstance(entry, Mapping) or "name" not in entry:
            raise ConfigError(f"{where}={entry!r}: expected a mapping with a `name` "
                              f"(one of {AUGMENTS.names()})")
        name = entry["name"]
        if name not in AUGMENTS:
            raise ConfigError(f"{where}: " + unknown_name_message("name", name, AUGMENTS.names()))
        op = AUGMENTS.get(name)
        defaults = op.defaults()
        params = dict(defaults)
        for param, value in entry.items():
            if param == "name":
                continue
            if param != "p" and param not in defaults:
                raise ConfigError(f"{where}.{param}: unknown parameter of {name}; "
                                  + unknown_name_message("parameter", param, ["p", *defaults]))
            if param != "p":
                params[param] = op.checks[param](f"{where}.{param}", value) if param in op.checks else value
        p = _number(0, 1)(f"{where}.p", entry.get("p", 1.0))
        if not op.keeps_shape and p != 1.0:
            raise ConfigError(f"{where}.p={p}: {name} changes the image size, so it must run on every "
                              "example (p: 1)")
        if op.needs_rgb and channels is not None and channels != 3:
            raise ConfigError(f"{where}: {name} needs RGB images, but data.channels={channels}")
        steps.append(Step(op, p, params))
    return steps


def compose(ops: Sequence[Mapping[str, Any]] | Sequence[Step], channels: int | None = None):
    """Build ``fn(image, mask, seed=None) -> (image, mask)`` applying ``ops`` in order.

    Each op runs with its probability ``p``; the seed is split once per op, so an op's draw does
    not depend on which ops ran before it. Works eagerly and inside ``Dataset.map``.

    Args:
        ops: the ``augment.ops`` list (or the steps of :func:`check_ops`).
        channels: image channels when known (checks RGB-only ops early).

    Returns:
        A function taking image [H, W, C] in 0..255 (float32, or uint8: leading pixel-moving ops
        such as flips then run on uint8, which is cheaper), mask integer [H, W, 1] and a seed
        int32/int64 [2] (None draws one from the global generator: not reproducible); it returns
        image float32 [H, W, C] in 0..255 and the mask in its dtype.
    """
    steps = [s if isinstance(s, Step) else None for s in ops]
    if not all(steps):
        steps = check_ops(ops, channels)

    def augment(image, mask, seed=None):
        image, mask = tf.convert_to_tensor(image), tf.convert_to_tensor(mask)
        if seed is None:
            seed = tf.random.uniform([2], maxval=2**31 - 1, dtype=tf.int64)
        if steps:  # step i draws its parameters from seeds[i]; all coins come from seeds[-1]
            seeds = _seeds(seed, len(steps) + 1)
            coins = tf.random.stateless_uniform([len(steps)], seeds[-1]) < [s.p for s in steps]
        i = 0
        while i < len(steps):
            step = steps[i]
            if not step.op.exact and image.dtype != tf.float32:
                image = tf.cast(image, tf.float32)
            if step.op.dihedral is not None:  # a run of flips/rot90: pixels moved once
                j = i
                while j < len(steps) and steps[j].op.dihedral is not None:
                    j += 1
                image, mask = dihedral_map(image, mask, steps[i:j], seeds[i:j], coins[i:j])
                i = j
                continue
            if step.op.linear is not None:  # a run of affine colour ops: one pass over the pixels
                j = i
                while j < len(steps) and steps[j].op.linear is not None:
                    j += 1
                image = linear_color_map(image, steps[i:j], seeds[i:j], coins[i:j])
                i = j
                continue
            run = lambda im, m, s=step, sd=seeds[i]: s.op.fn(im, m, sd, **s.params)
            if step.p >= 1.0:
                image, mask = run(image, mask)
            elif step.p > 0.0:
                image, mask = tf.cond(coins[i], lambda r=run, im=image, m=mask: r(im, m),
                                      lambda im=image, m=mask: (im, m))
            i += 1
        return tf.cast(image, tf.float32), mask

    return augment


def linear_color_map(image, steps: Sequence[Step], seeds, coins) -> tf.Tensor:
    """Apply consecutive affine colour steps as one map ``clip(x @ M + b)``.

    Step k draws its (M_k, b_k) from ``seeds[k]``; where ``coins[k]`` is False it contributes the
    identity, and when no coin is True the pixels are not touched at all. The product is exact
    except that values are clipped to 0..255 once, at the end, not after every op.

    Args:
        image: float32 [H, W, C] in 0..255. steps: steps whose op has ``linear``.
        seeds: int64 [len(steps), 2]. coins: bool [len(steps)].

    Returns:
        float32 [H, W, C] in 0..255.
    """
    channels = image.shape[-1] or tf.shape(image)[-1]
    eye = tf.eye(channels)
    matrix, bias = eye, tf.zeros([channels])
    mean = None
    uses_mean = [k for k, s in enumerate(steps) if s.op.needs_mean and s.p > 0.0]
    if uses_mean:  # the mean only matters to steps that run: skip the reduction when none does
        if all(steps[k].p >= 1.0 for k in uses_mean):
            mean = channel_mean(image)
        else:
            mean = tf.cond(tf.reduce_any(tf.gather(coins, uses_mean)), lambda: channel_mean(image),
                           lambda: tf.zeros([channels]))
    for k, step in enumerate(steps):
        if step.p <= 0.0:
            continue
        m, b = step.op.linear(seeds[k], mean, channels, **step.params)
        if step.p < 1.0:
            m, b = tf.where(coins[k], m, eye), tf.where(coins[k], b, tf.zeros_like(b))
        matrix, bias = matrix @ m, tf.linalg.matvec(m, bias, transpose_a=True) + b  # bias @ m + b
        if mean is not None:  # the mean of the (unclipped) image after this step
            mean = tf.linalg.matvec(m, mean, transpose_a=True) + b
    if all(s.p >= 1.0 for s in steps):
        return apply_color_map(image, matrix, bias)
    return tf.cond(tf.reduce_any(coins), lambda: apply_color_map(image, matrix, bias), lambda: image)


def dihedral_map(image, mask, steps: Sequence[Step], seeds, coins):
    """Apply consecutive flip/rot90 steps as one symmetry of the square (:func:`apply_dihedral`).

    Step k draws from ``seeds[k]`` exactly as when it runs alone and is skipped where ``coins[k]``
    is False, so the result is identical (bit for bit) to the steps one by one.

    Args:
        image: [H, W, C] (uint8 or float32). mask: integer [H, W, 1].
        steps: steps whose op has ``dihedral``. seeds: int64 [len(steps), 2]. coins: bool [len(steps)].

    Returns:
        (image, mask), dtypes and shapes kept.
    """
    square = is_square(image)
    t = a = b = tf.constant(False)
    for k, step in enumerate(steps):
        if step.p <= 0.0:
            continue
        nt, na, nb = step.op.dihedral(seeds[k], square, t, a, b, **step.params)
        if step.p < 1.0:
            nt, na, nb = (tf.where(coins[k], new, old) for new, old in ((nt, t), (na, a), (nb, b)))
        t, a, b = nt, na, nb
    return apply_dihedral(image, mask, t, a, b)


# The ops register themselves in AUGMENTS when imported (kept apart to keep files small).
from tfseg.data import augment_ops  # noqa: E402,F401
