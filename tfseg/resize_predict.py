"""Whole-image prediction at the training size, for runs trained on resized whole images.

A run trained with ``data.fit: resize`` (Kvasir, CamVid, Oxford pets) saw every image shrunk to
``data.image_size``; tiling the original resolution shows it objects at a scale it never saw. So,
with ``infer.fit: resize`` (the default ``auto`` picks it for such runs), the image is resized to
``data.image_size`` exactly as the training pipeline did (``tf.image.resize`` bilinear without
antialiasing, rounded to 0..255), predicted once, and the probabilities are resized back to the
image's size (bilinear) before they are thresholded.

Both resizes are NumPy twins of ``tf.image.resize(method="bilinear", antialias=False)`` (half-pixel
centres), computed a band of rows at a time: the input may be a windowed reader of a huge TIFF
(read a band at a time, never whole), and the probabilities come back as row bands, like the
sliding-window engine's (:func:`tfseg.tiling_predict.iter_bands`), so a huge mask is never held.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from tfseg.config import DataConfig, InferConfig
from tfseg.errors import ConfigError


def whole_image_size(infer: InferConfig, data: DataConfig) -> tuple[int, int] | None:
    """[height, width] that images are resized to for prediction, or None to predict by tiles.

    ``infer.fit``: ``resize`` -> ``data.image_size``; ``tile`` -> None; ``auto`` -> as the run
    trained (``data.fit: resize`` -> resize; random_crop and none train on full-resolution windows
    -> tile).

    Raises:
        ConfigError: ``infer.downscale`` set while whole images are predicted (it scales the tiles).
    """
    fit = infer.fit
    if fit == "auto":
        fit = "resize" if data.fit == "resize" else "tile"
    if fit != "resize":
        return None
    h, w = (int(v) for v in data.image_size)
    if infer.downscale != 1:
        why = "infer.fit: resize" if infer.fit == "resize" else "infer.fit: auto, as the run trained: data.fit: resize"
        raise ConfigError(f"infer.downscale: {infer.downscale} scales tiles, but whole images are resized to "
                          f"{h}x{w} ({why}). Expected infer.downscale=1, or infer.fit=tile to tile at 1/"
                          f"{infer.downscale} scale")
    return h, w


def bilinear_axis(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices (lower, upper) and weights of the upper one, float32 [n_out] each, of
    ``tf.image.resize``'s bilinear interpolation (half-pixel centres) along one axis."""
    scale = np.float32(n_in) / np.float32(n_out)  # float32 arithmetic, as TF's kernel: same weights
    x = (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    f = np.floor(x)
    lower = np.clip(f, 0, n_in - 1).astype(np.int64)
    upper = np.clip(np.ceil(x), 0, n_in - 1).astype(np.int64)
    return lower, upper, (x - f).astype(np.float32)


def iter_resized(image, size: Sequence[int], max_rows: int = 512) -> Iterator[tuple[int, np.ndarray]]:
    """Resize ``image`` to ``size`` bilinearly, yielding ``(y0, float32 [h, width, C])`` row bands.

    Args:
        image: array-like [H, W, C] with 2-D slicing (NumPy, memmap, windowed TIFF reader).
        size: [height, width] of the result.
        max_rows: rows of ``image`` read at once (about; at least the two rows one output row needs).

    Yields:
        Bands of the resized image, top to bottom, covering ``size[0]`` rows once.
    """
    H, W, _ = image.shape
    h, w = int(size[0]), int(size[1])
    ylo, yhi, yw = bilinear_axis(H, h)
    xlo, xhi, xw = bilinear_axis(W, w)
    xw = xw[None, :, None]
    i = 0
    while i < h:
        j = i + 1  # output rows i..j-1 need input rows ylo[i]..yhi[j-1]
        while j < h and yhi[j] + 1 - ylo[i] <= max_rows and j - i < max_rows:
            j += 1
        a, b = int(ylo[i]), int(yhi[j - 1]) + 1
        rows = np.asarray(image[a:b, 0:W])

        def across(r, rows=rows, a=a):  # interpolate along x, as TF does first
            r = rows[r - a].astype(np.float32)
            left = r[:, xlo]
            return left + (r[:, xhi] - left) * xw

        top, bottom = across(ylo[i:j]), across(yhi[i:j])
        yield i, top + (bottom - top) * yw[i:j, None, None]
        i = j


def resize_bilinear(image, size: Sequence[int]) -> np.ndarray:
    """float32 [h, w, C]: ``image`` [H, W, C] resized as ``tf.image.resize(..., "bilinear")`` does."""
    return np.concatenate([band for _, band in iter_resized(image, size)])


def resize_as_training(image, size: Sequence[int]) -> np.ndarray:
    """The image as the training pipeline fed it to the model (``data.fit: resize``): resized
    bilinearly to ``size`` and rounded to integers in 0..255; float32 [h, w, C]."""
    return np.clip(np.round(resize_bilinear(image, size)), 0.0, 255.0)
