"""Geometry shared by the augmentations and the pipeline: warps, crops and pads that move an
image and its mask together (image bilinear, mask nearest, so masks keep their class values)."""

from __future__ import annotations

import tensorflow as tf


def transform(image, mask, matrix, fill_mode: str = "constant", fill: float = 0.0):
    """Warp image (bilinear) and mask (nearest) by a projective ``matrix`` (output -> input).

    Args:
        image: float32 [H, W, C]. mask: integer [H, W, 1].
        matrix: float32 [8], ``[a0, a1, a2, b0, b1, b2, c0, c1]`` mapping an output pixel (x, y)
            to the input point ``((a0 x + a1 y + a2) / k, (b0 x + b1 y + b2) / k)``,
            ``k = c0 x + c1 y + 1`` (tf.raw_ops.ImageProjectiveTransformV3 convention).
        fill_mode: ``constant`` (image ``fill``, mask 0) or ``reflect`` (both mirrored).
        fill: image value outside the input in constant mode, 0..255.

    Returns:
        (image float32 [H, W, C], mask [H, W, 1] of the mask's dtype).
    """
    size = tf.shape(image)[:2]
    matrix = tf.reshape(tf.cast(matrix, tf.float32), [1, 8])
    mode = fill_mode.upper()

    def warp(x, interpolation, value):
        out = tf.raw_ops.ImageProjectiveTransformV3(
            images=x[None], transforms=matrix, output_shape=size, fill_value=value,
            interpolation=interpolation, fill_mode=mode)[0]
        out.set_shape(x.shape)
        return out

    return warp(image, "BILINEAR", float(fill)), warp(mask, "NEAREST", 0.0)


def is_square(image) -> tf.Tensor:
    """bool scalar: H == W for image [H, W, ...] (a constant when the shape is static)."""
    h, w = image.shape[0], image.shape[1]
    if h is not None and w is not None:
        return tf.constant(h == w)
    shape = tf.shape(image)
    return tf.equal(shape[0], shape[1])


def apply_dihedral(image, mask, t, a, b):
    """Move image [H, W, C] and mask [H, W, 1] by "transpose if t, then reverse axis 0 if a and
    axis 1 if b" (bool scalars; t only when H == W): one branch of 8, at most one transpose and
    one reverse. The mask is moved as [H, W]: Eigen reverses a [H, W, 1] uint8 tensor about 7x
    slower than the same bytes as [H, W]. Dtypes and static shapes are kept."""
    flat_mask = tf.squeeze(mask, -1)

    def branch(transpose: bool, axes: list[int]):
        def go():
            out = []
            for x in (image, flat_mask):
                if transpose:
                    x = tf.transpose(x, [1, 0, 2] if x.shape.rank == 3 else [1, 0])
                out.append(tf.reverse(x, axes) if axes else tf.identity(x))
            return tuple(out)

        return go

    branches = [branch(tt, [ax for ax, on in ((0, aa), (1, bb)) if on])
                for tt in (False, True) for aa in (False, True) for bb in (False, True)]
    index = tf.cast(t, tf.int32) * 4 + tf.cast(a, tf.int32) * 2 + tf.cast(b, tf.int32)
    out_image, out_mask = tf.switch_case(index, branches)
    out_mask = tf.expand_dims(out_mask, -1)
    out_image.set_shape(image.shape)  # t only for square images, so the shape is kept
    out_mask.set_shape(mask.shape)
    return out_image, out_mask


def affine_matrix(height, width, angle, scale, shift_x, shift_y, shear=0.0) -> tf.Tensor:
    """Output->input matrix of a rotation/scale/shear about the image center, then a shift.

    Args:
        height, width: image size (scalars). angle, shear: radians. scale: > 0 (1 = none).
        shift_x, shift_y: shift of the content in pixels (positive: right/down).

    Returns:
        float32 [8], for :func:`transform`.
    """
    cx = (tf.cast(width, tf.float32) - 1.0) / 2.0
    cy = (tf.cast(height, tf.float32) - 1.0) / 2.0
    cos, sin = tf.cos(angle), tf.sin(angle)
    # forward: p_out = c + t + scale * R(angle) @ Shear(shear) @ (p_in - c); invert it.
    fwd = scale * tf.stack([[cos, -sin], [sin, cos]]) @ tf.stack(
        [[tf.ones_like(shear), -tf.sin(shear)], [tf.zeros_like(shear), tf.cos(shear)]])
    inv = tf.linalg.inv(fwd)
    ox, oy = cx + shift_x, cy + shift_y
    a2 = cx - inv[0, 0] * ox - inv[0, 1] * oy
    b2 = cy - inv[1, 0] * ox - inv[1, 1] * oy
    return tf.stack([inv[0, 0], inv[0, 1], a2, inv[1, 0], inv[1, 1], b2, 0.0, 0.0])


def crop_offsets(seed, have, want) -> tf.Tensor:
    """Random top-left offsets of a ``want`` window inside ``have`` (both int32 [2])."""
    room = tf.maximum(have - want, 0) + 1
    u = tf.random.stateless_uniform([2], seed, dtype=tf.float32)
    return tf.minimum(tf.cast(u * tf.cast(room, tf.float32), tf.int32), room - 1)


def pad_to(image, mask, size, fill: float = 0.0):
    """Pad image (``fill``) and mask (0) evenly on both sides to at least ``size`` [h, w]."""
    shape = tf.shape(image)
    pad_h, pad_w = tf.maximum(size[0] - shape[0], 0), tf.maximum(size[1] - shape[1], 0)
    pads = [[pad_h // 2, pad_h - pad_h // 2], [pad_w // 2, pad_w - pad_w // 2], [0, 0]]
    return tf.pad(image, pads, constant_values=tf.cast(fill, image.dtype)), tf.pad(mask, pads)


def crop(image, mask, offset, size):
    """Crop the [size] window at ``offset`` (int [2], top-left) from both; static size kept."""
    h, w = size
    image = tf.slice(image, [offset[0], offset[1], 0], [h, w, -1])
    mask = tf.slice(mask, [offset[0], offset[1], 0], [h, w, -1])
    image.set_shape([h, w, image.shape[-1]])
    mask.set_shape([h, w, mask.shape[-1]])
    return image, mask


def _fold(coord, size, mode):
    """Map coordinates outside [0, size-1] back inside (reflect) or keep them (constant)."""
    if mode == "reflect":
        period = 2.0 * size
        coord = tf.math.floormod(coord + 0.5, period)
        coord = tf.where(coord >= size, period - coord, coord) - 0.5
        return tf.clip_by_value(coord, 0.0, size - 1.0)
    return coord


def remap(image, mask, map_x, map_y, border: str = "reflect"):
    """Sample image (bilinear) and mask (nearest) at float32 [H, W] input coordinates.

    Args:
        image: float32 [H, W, C]. mask: integer [H, W, 1].
        map_x, map_y: float32 [H, W], the input point each output pixel reads.
        border: ``constant`` (outside reads 0, mask 0) or ``reflect`` (mirrored input).

    Returns:
        (image float32 [H, W, C], mask [H, W, 1] of the mask's dtype).
    """
    shape = tf.shape(image)
    h, w = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
    map_x, map_y = _fold(map_x, w, border), _fold(map_y, h, border)
    flat_image = tf.reshape(image, [shape[0] * shape[1], -1])
    flat_mask = tf.reshape(mask, [shape[0] * shape[1], -1])

    def gather(flat, yi, xi):  # one flat gather per corner: much cheaper than gather_nd
        rows = tf.cast(tf.clip_by_value(yi, 0.0, h - 1.0), tf.int32)
        cols = tf.cast(tf.clip_by_value(xi, 0.0, w - 1.0), tf.int32)
        vals = tf.gather(flat, rows * shape[1] + cols)
        if border == "reflect":  # _fold already brought every point inside
            return vals
        inside = (xi >= 0) & (yi >= 0) & (xi <= w - 1) & (yi <= h - 1)
        return tf.where(inside[..., None], vals, tf.zeros_like(vals))

    x0, y0 = tf.floor(map_x), tf.floor(map_y)
    fx, fy = (map_x - x0)[..., None], (map_y - y0)[..., None]
    top = gather(flat_image, y0, x0) * (1 - fx) + gather(flat_image, y0, x0 + 1) * fx
    bottom = gather(flat_image, y0 + 1, x0) * (1 - fx) + gather(flat_image, y0 + 1, x0 + 1) * fx
    out_image = top * (1 - fy) + bottom * fy
    out_mask = gather(flat_mask, tf.round(map_y), tf.round(map_x))
    out_image.set_shape(image.shape)
    out_mask.set_shape(mask.shape)
    return out_image, out_mask
