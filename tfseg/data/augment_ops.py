"""The augmentation ops themselves, registered in :data:`tfseg.data.augment.AUGMENTS`.

Each is ``op(image, mask, seed, **params) -> (image, mask)`` (image float32 [H, W, C] 0..255, mask
integer [H, W, 1], seed int [2]); the affine colour ops (brightness, contrast, saturation, hue) are
written as their colour map ``(M, b)`` so that :func:`tfseg.data.augment.compose` can fuse them.
Parameters are documented in docs/augment.md.
"""

from __future__ import annotations

import math

import tensorflow as tf

from tfseg.data.augment import (
    _choice,
    _clip,
    _int,
    _number,
    _range,
    _seeds,
    _size,
    _uniform,
    register,
    register_dihedral,
    register_linear,
)
from tfseg.data.geometry import affine_matrix, crop, crop_offsets, pad_to, remap, transform

# ------------------------------------------------------------------------------------------------
# Geometric ops
# ------------------------------------------------------------------------------------------------


# flip_left_right, flip_up_down and rot90 are the 8 symmetries of the square (the dihedral group).
# Each is written as its action on a state (t, a, b) meaning "transpose if t, then reverse axis 0
# if a and axis 1 if b"; compose() chains a run of them into one state and moves the pixels once
# (apply_dihedral): at most one transpose and one reverse, however many such ops are listed.


def _flip_left_right_state(seed, square, t, a, b):
    return t, a, ~b


def _flip_up_down_state(seed, square, t, a, b):
    return t, ~a, b


def _rot90_state(seed, square, t, a, b):
    k = tf.random.stateless_uniform([], seed, minval=1, maxval=4, dtype=tf.int32)
    k = tf.where(square, k, 2)  # non-square: only 180 degrees keeps the shape
    # k=1: transpose(reverse(y, [1])); k=2: reverse(y, [0, 1]); k=3: reverse(transpose(y), [1]);
    # a transpose swaps the reversed axes: transpose(R_ab(T^t x)) = R_ba(T^(t+1) x).
    return (tf.where(k == 2, t, ~t), tf.where(k == 1, ~b, tf.where(k == 2, ~a, b)),
            tf.where(k == 1, a, tf.where(k == 2, ~b, ~a)))


@register_dihedral("flip_left_right", _flip_left_right_state)
def flip_left_right(image, mask, seed):
    """Mirror image and mask horizontally (the op always flips; ``p`` decides whether it runs)."""


@register_dihedral("flip_up_down", _flip_up_down_state)
def flip_up_down(image, mask, seed):
    """Mirror image and mask vertically."""


@register_dihedral("rot90", _rot90_state)
def rot90(image, mask, seed):
    """Rotate both counter-clockwise by k x 90 degrees, k uniform in {1, 2, 3}; non-square inputs
    only by 180."""


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


@register("random_crop", "geometric", {"size": _size, "fill": _number(0, 255)}, keeps_shape=False, exact=True)
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


# Brightness, contrast, saturation and hue are affine colour maps x -> x @ M + b (x a pixel as a
# row vector of C channels). Each is written as its (M, b); compose() multiplies the maps of
# consecutive such ops and applies the product in one pass, clipped once (see linear_color_map).
_LUMA = (0.299, 0.587, 0.114)  # Rec. 601 luma
_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))



@register_linear("brightness", {"delta": _number(0, 1)})
def brightness(seed, mean, channels, delta=0.2):
    """Add a uniform offset in +-delta x 255."""
    return tf.eye(channels), tf.fill([channels], _uniform(seed, -delta, delta) * 255.0)


@register_linear("contrast", {"range": _range(0, 10)}, needs_mean=True)
def contrast(seed, mean, channels, range=(0.8, 1.2)):  # noqa: A002
    """Scale each channel's distance from its mean by a factor in ``range`` (as tf.image.adjust_contrast;
    the mean is taken on every 4th row and column, see ``channel_mean``)."""
    f = _uniform(seed, *range)
    return f * tf.eye(channels), (1.0 - f) * mean


@register_linear("saturation", {"range": _range(0, 10)}, needs_rgb=True)
def saturation(seed, mean, channels, range=(0.7, 1.3)):  # noqa: A002
    """Blend each pixel with its gray (Rec. 601 luma) by a factor in ``range``: 0 = gray,
    1 = unchanged, > 1 = more saturated (PIL ImageEnhance.Color, torchvision). RGB only."""
    f = _uniform(seed, *range)
    luma = tf.constant(_LUMA)[:, None] * tf.ones([1, 3])  # column j of x @ luma = gray
    return (1.0 - f) * luma + f * tf.eye(3), tf.zeros([3])


@register_linear("hue", {"delta": _number(0, 0.5)}, needs_rgb=True)
def hue(seed, mean, channels, delta=0.05):
    """Turn the hue by a fraction of the colour circle in +-delta: a rotation of the chroma
    (I-Q) plane of YIQ, which keeps the luma and leaves gray pixels gray. RGB only."""
    theta = _uniform(seed, -delta, delta) * (2.0 * math.pi)
    cos, sin = tf.cos(theta), tf.sin(theta)
    rot = tf.stack([[1.0, 0.0, 0.0], [0.0, cos, -sin], [0.0, sin, cos]])
    yiq = tf.constant(_YIQ)
    return tf.transpose(tf.linalg.inv(yiq) @ rot @ yiq), tf.zeros([3])


@register("gamma", "color", {"range": _range(0.01, 10)})
def gamma(image, mask, seed, range=(0.8, 1.2)):  # noqa: A002
    """255 x (image / 255) ** g, g uniform in ``range``."""
    g = _uniform(seed, *range)
    # exp(g log x) vectorizes; tf.pow with a float exponent is about 10x slower on CPU.
    out = 255.0 * tf.exp(g * tf.math.log(tf.maximum(image, 1e-3) / 255.0))
    return _clip(tf.where(image > 0.0, out, 0.0)), mask


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
