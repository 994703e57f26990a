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
``fn(image, mask, seed=None) -> (image, mask)``. docs/augment.md lists every op and its parameters.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import tensorflow as tf

from tfseg.data.geometry import affine_matrix, crop, crop_offsets, pad_to, remap, transform
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

    def defaults(self) -> dict[str, Any]:
        """The op's parameters and their defaults (``p`` is handled by :func:`compose`)."""
        sig = inspect.signature(self.fn)
        return {k: v.default for k, v in list(sig.parameters.items())[3:]}


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


# ------------------------------------------------------------------------------------------------
# Geometric ops
# ------------------------------------------------------------------------------------------------


@register("flip_left_right", "geometric")
def flip_left_right(image, mask, seed):
    """Mirror image and mask horizontally (the op always flips; ``p`` decides whether it runs)."""
    return tf.reverse(image, axis=[1]), tf.reverse(mask, axis=[1])


@register("flip_up_down", "geometric")
def flip_up_down(image, mask, seed):
    """Mirror image and mask vertically."""
    return tf.reverse(image, axis=[0]), tf.reverse(mask, axis=[0])


@register("rot90", "geometric")
def rot90(image, mask, seed):
    """Rotate both by k x 90 degrees, k uniform in {1, 2, 3}; non-square inputs only by 180."""
    k = tf.random.stateless_uniform([], seed, minval=1, maxval=4, dtype=tf.int32)
    shape = tf.shape(image)
    k = tf.where(tf.equal(shape[0], shape[1]), k, 2)
    out_image, out_mask = tf.image.rot90(image, k), tf.image.rot90(mask, k)
    out_image.set_shape(image.shape)  # k is 2 unless H == W, so the shape is kept
    out_mask.set_shape(mask.shape)
    return out_image, out_mask


@register("shift_scale_rotate", "geometric",
          {"shift": _number(0, 1), "scale": _number(0, 0.99), "rotate": _number(0, 180),
           "shear": _number(0, 45), "border": _choice("constant", "reflect"), "fill": _number(0, 255)})
def shift_scale_rotate(image, mask, seed, shift=0.0625, scale=0.1, rotate=45.0, shear=0.0,
                       border="constant", fill=0.0):
    """Random affine (albumentations ShiftScaleRotate ranges): shift in +-shift x size, zoom
    in 1 +- scale, rotation in +-rotate degrees, shear in +-shear degrees."""
    s = _seeds(seed, 5)
    shape = tf.shape(image)
    h, w = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
    matrix = affine_matrix(
        shape[0], shape[1],
        angle=_uniform(s[0], -rotate, rotate) * (math.pi / 180.0),
        scale=_uniform(s[1], 1.0 - scale, 1.0 + scale),
        shift_x=_uniform(s[2], -shift, shift) * w,
        shift_y=_uniform(s[3], -shift, shift) * h,
        shear=_uniform(s[4], -shear, shear) * (math.pi / 180.0))
    return transform(image, mask, matrix, border, fill)


@register("random_crop", "geometric", {"size": _size, "fill": _number(0, 255)}, keeps_shape=False)
def random_crop(image, mask, seed, size=(256, 256), fill=0.0):
    """Crop a random ``size`` [h, w] window from both (padded with ``fill``/0 when smaller).

    Changes the output size, so it runs on every example (``p`` must be 1)."""
    image, mask = pad_to(image, mask, size, fill)
    offset = crop_offsets(seed, tf.shape(image)[:2], tf.constant(size, tf.int32))
    return crop(image, mask, offset, size)


@register("random_resized_crop", "geometric", {"scale": _range(0.01, 1.0), "ratio": _range(0.1, 10.0)})
def random_resized_crop(image, mask, seed, scale=(0.5, 1.0), ratio=(0.75, 1.3333)):
    """Crop a random box of area ``scale`` x image area and aspect ``ratio`` (log-uniform), resized
    back to the input size (image bilinear, mask nearest)."""
    s = _seeds(seed, 4)
    shape = tf.shape(image)
    h, w = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
    area = _uniform(s[0], scale[0], scale[1])
    aspect = tf.exp(_uniform(s[1], math.log(ratio[0]), math.log(ratio[1])))
    bh = tf.minimum(tf.sqrt(area / aspect), 1.0)  # fractions of the height and width
    bw = tf.minimum(tf.sqrt(area * aspect), 1.0)
    y0, x0 = _uniform(s[2], 0.0, 1.0) * (1.0 - bh), _uniform(s[3], 0.0, 1.0) * (1.0 - bw)
    # output pixel (x, y) samples input point (x0*(w-1) + x*bw*(w-1)/(w-1), ...): an axis-aligned affine.
    sx, sy = bw, bh
    matrix = tf.stack([sx, 0.0, x0 * (w - 1.0), 0.0, sy, y0 * (h - 1.0), 0.0, 0.0])
    return transform(image, mask, matrix, "reflect")


@register("elastic", "geometric", {"grid": _int(2), "sigma": _number(0, 1000),
                                   "border": _choice("constant", "reflect")})
def elastic(image, mask, seed, grid=3, sigma=10.0, border="reflect"):
    """Elastic deformation of the original U-Net paper: random displacements on a coarse
    ``grid`` x ``grid`` lattice (normal, ``sigma`` pixels), bicubic-upsampled to every pixel."""
    shape = tf.shape(image)
    h, w = shape[0], shape[1]
    coarse = tf.random.stateless_normal([1, grid, grid, 2], seed, stddev=sigma)
    flow = tf.image.resize(coarse, [h, w], method="bicubic")[0]
    ys, xs = tf.meshgrid(tf.range(h, dtype=tf.float32), tf.range(w, dtype=tf.float32), indexing="ij")
    return remap(image, mask, xs + flow[..., 0], ys + flow[..., 1], border)


# ------------------------------------------------------------------------------------------------
# Photometric ops (image only)
# ------------------------------------------------------------------------------------------------


@register("brightness", "color", {"delta": _number(0, 1)})
def brightness(image, mask, seed, delta=0.2):
    """Add a uniform offset in +-delta x 255."""
    return _clip(image + _uniform(seed, -delta, delta) * 255.0), mask


@register("contrast", "color", {"range": _range(0, 10)})
def contrast(image, mask, seed, range=(0.8, 1.2)):  # noqa: A002
    """Scale each channel's distance from its mean by a factor in ``range``."""
    return _clip(tf.image.adjust_contrast(image, _uniform(seed, *range))), mask


@register("saturation", "color", {"range": _range(0, 10)}, needs_rgb=True)
def saturation(image, mask, seed, range=(0.7, 1.3)):  # noqa: A002
    """Multiply the HSV saturation by a factor in ``range`` (RGB only)."""
    return _clip(tf.image.adjust_saturation(image / 255.0, _uniform(seed, *range)) * 255.0), mask


@register("hue", "color", {"delta": _number(0, 0.5)}, needs_rgb=True)
def hue(image, mask, seed, delta=0.05):
    """Rotate the hue by a fraction of the colour circle in +-delta (RGB only)."""
    return _clip(tf.image.adjust_hue(image / 255.0, _uniform(seed, -delta, delta)) * 255.0), mask


@register("gamma", "color", {"range": _range(0.01, 10)})
def gamma(image, mask, seed, range=(0.8, 1.2)):  # noqa: A002
    """255 x (image / 255) ** g, g uniform in ``range``."""
    return _clip(255.0 * tf.pow(image / 255.0, _uniform(seed, *range))), mask


@register("gaussian_noise", "color", {"std": _range(0, 255)})
def gaussian_noise(image, mask, seed, std=(0.0, 10.0)):
    """Add per-pixel normal noise whose standard deviation (0..255 units) is uniform in ``std``."""
    s = _seeds(seed, 2)
    sigma = _uniform(s[0], *std)
    return _clip(image + tf.random.stateless_normal(tf.shape(image), s[1]) * sigma), mask


@register("gaussian_blur", "color", {"sigma": _range(0.01, 20)})
def gaussian_blur(image, mask, seed, sigma=(0.1, 2.0)):
    """Blur with a Gaussian whose sigma (pixels) is uniform in ``sigma`` (separable, reflect)."""
    radius = max(1, math.ceil(3.0 * sigma[1]))
    s = _uniform(seed, *sigma)
    x = tf.range(-radius, radius + 1, dtype=tf.float32)
    k = tf.exp(-0.5 * tf.square(x / s))
    k = k / tf.reduce_sum(k)
    channels = image.shape[-1] or tf.shape(image)[-1]
    kx = tf.tile(tf.reshape(k, [1, -1, 1, 1]), [1, 1, channels, 1])
    ky = tf.reshape(kx, [-1, 1, channels, 1])
    x = tf.pad(image[None], [[0, 0], [radius, radius], [radius, radius], [0, 0]], mode="REFLECT")
    x = tf.nn.depthwise_conv2d(x, kx, [1, 1, 1, 1], "VALID")
    x = tf.nn.depthwise_conv2d(x, ky, [1, 1, 1, 1], "VALID")[0]
    x.set_shape(image.shape)
    return _clip(x), mask


@register("cutout", "color", {"holes": _int(1), "size": _range(0.0, 1.0), "fill": _number(0, 255)})
def cutout(image, mask, seed, holes=8, size=(0.05, 0.1), fill=0.0):
    """Coarse dropout: fill ``holes`` rectangles (sides a fraction ``size`` of the image's) with
    ``fill``; the mask is left as it is (albumentations CoarseDropout's default)."""
    s = _seeds(seed, 4)
    shape = tf.shape(image)
    h, w = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
    hh, hw = _uniform(s[0], *size, shape=[holes]) * h, _uniform(s[1], *size, shape=[holes]) * w
    y0, x0 = _uniform(s[2], 0.0, 1.0, [holes]) * (h - hh), _uniform(s[3], 0.0, 1.0, [holes]) * (w - hw)
    ys = tf.range(h)[None, :, None]
    xs = tf.range(w)[None, None, :]
    inside = ((ys >= y0[:, None, None]) & (ys < (y0 + hh)[:, None, None])
              & (xs >= x0[:, None, None]) & (xs < (x0 + hw)[:, None, None]))
    hole = tf.reduce_any(inside, axis=0)[..., None]
    return tf.where(hole, tf.cast(fill, image.dtype), image), mask


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
        A function taking image float32 [H, W, C] in 0..255, mask integer [H, W, 1] and a seed
        int32/int64 [2] (None draws one from the global generator: not reproducible).
    """
    steps = [s if isinstance(s, Step) else None for s in ops]
    if not all(steps):
        steps = check_ops(ops, channels)

    def augment(image, mask, seed=None):
        image, mask = tf.convert_to_tensor(image), tf.convert_to_tensor(mask)
        if not steps:
            return image, mask
        if seed is None:
            seed = tf.random.uniform([2], maxval=2**31 - 1, dtype=tf.int64)
        seeds = _seeds(seed, 2 * len(steps))
        for i, step in enumerate(steps):
            op_seed = seeds[2 * i + 1]
            run = lambda im, m, s=step, sd=op_seed: s.op.fn(im, m, sd, **s.params)
            if step.p >= 1.0:
                image, mask = run(image, mask)
            elif step.p > 0.0:
                coin = tf.random.stateless_uniform([], seeds[2 * i]) < step.p
                image, mask = tf.cond(coin, lambda r=run, im=image, m=mask: r(im, m),
                                      lambda im=image, m=mask: (im, m))
        return image, mask

    return augment
