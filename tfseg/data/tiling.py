"""Windows over huge images: tile positions, window reads of TIFFs, and windowed RLE masks.

A 20000 x 20000 x 3 HuBMAP TIFF is 1.2 GB as uint8 and 4.8 GB as float32; nothing here
holds it whole. :class:`TiffWindows` reads one window at a time through tifffile's zarr view
(only the strips/tiles that intersect the window are decoded), and :class:`RunLengthMask`
paints only the runs of an RLE string that cross a window.

    positions = tile_positions(h, w, tile=1024, overlap=128)   # [(y, x), ...]
    with TiffWindows(path) as tiff:
        for y, x in positions:
            image = tiff.read(y, x, 1024, 1024)                # uint8 [1024, 1024, C]
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from tfseg.errors import DataError, first_line

DARK_VALUE = 20
"""A pixel whose brightest channel is at most this (0-255) is never tissue (black padding, dark scans)."""


def axis_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of the tiles along one axis of length ``size``.

    Tiles step by ``tile - overlap`` from 0; the last tile is moved back to end exactly at the edge
    (so no tile needs padding unless ``size < tile``, when the only start is 0).

    Args:
        size: length of the axis in pixels (> 0).
        tile: tile length (> 0).
        overlap: pixels shared by neighbouring tiles, 0 <= overlap < tile.

    Returns:
        Sorted, distinct starts; consecutive starts differ by at most ``tile - overlap``.
    """
    if tile <= 0 or size <= 0:
        raise DataError(f"tile positions: size={size}, tile={tile}. Expected positive sizes.")
    if not 0 <= overlap < tile:
        raise DataError(f"tile positions: overlap={overlap} with tile={tile}. Expected 0 <= overlap < tile.")
    if size <= tile:
        return [0]
    step = tile - overlap
    starts = list(range(0, size - tile, step))
    starts.append(size - tile)
    return starts


def tile_positions(height: int, width: int, tile: int, overlap: int = 0) -> list[tuple[int, int]]:
    """Top-left corners (y, x) of square tiles covering a ``height`` x ``width`` image, row by row.

    Every pixel is covered; tiles overlap by at least ``overlap`` pixels; see :func:`axis_starts`.
    """
    return [(y, x) for y in axis_starts(height, tile, overlap) for x in axis_starts(width, tile, overlap)]


class TiffWindows:
    """Read windows of a (possibly huge, tiled, BigTIFF, pyramidal) TIFF without loading it whole.

    Accepts [H, W], [H, W, C] and channels-first [..., C, H, W] layouts (HuBMAP has both
    (H, W, 3) and (1, 1, 3, H, W) files); pyramids are read at full resolution (level 0).

    Attributes:
        height, width, channels: size of the full-resolution image.
        dtype: numpy dtype of the stored samples.
    """

    def __init__(self, path: str | os.PathLike):
        import tifffile
        import zarr

        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"{self.path}: image file not found")
        try:
            self._store = tifffile.imread(self.path, aszarr=True)
            arr = zarr.open(self._store, mode="r")
        except Exception as err:  # noqa: BLE001 - any decoder failure is a bad file
            reason = first_line(err)
            raise DataError(f"{self.path}: cannot read TIFF ({reason})") from None
        if not hasattr(arr, "shape"):  # multiscale group: level 0 is full resolution
            arr = arr["0"]
        shape = tuple(arr.shape)
        while len(shape) > 3 and shape[0] == 1:
            shape = shape[1:]
        if len(shape) == 2:
            self._layout, (self.height, self.width), self.channels = "hw", shape, 1
        elif len(shape) == 3 and shape[-1] in (1, 3, 4):
            self._layout, (self.height, self.width, self.channels) = "hwc", shape
        elif len(shape) == 3 and shape[0] in (1, 3, 4):
            self._layout, (self.channels, self.height, self.width) = "chw", shape
        else:
            self.close()
            raise DataError(f"{self.path}: TIFF of shape {tuple(arr.shape)}. "
                            "Expected [H, W], [H, W, C] or [C, H, W].")
        self._arr = arr
        self._lead = (0,) * (len(arr.shape) - len(shape))
        self.dtype = np.dtype(arr.dtype)

    def read(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        """The window rows [y, y+h), columns [x, x+w) as [h, w, C], zero-padded past the edges."""
        y1, x1 = min(y + h, self.height), min(x + w, self.width)
        if self._layout == "chw":
            part = np.asarray(self._arr[(*self._lead, slice(None), slice(y, y1), slice(x, x1))])
            part = np.moveaxis(part, 0, -1)
        else:
            part = np.asarray(self._arr[(*self._lead, slice(y, y1), slice(x, x1))])
            if part.ndim == 2:
                part = part[..., None]
        if part.shape[:2] == (h, w):
            return part
        out = np.zeros((h, w, part.shape[-1]), dtype=part.dtype)
        out[: part.shape[0], : part.shape[1]] = part
        return out

    def close(self) -> None:
        self._store.close()

    def __enter__(self) -> TiffWindows:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def reduce_image(tile: np.ndarray, factor: int) -> np.ndarray:
    """Area (mean) downscale of [H, W, C] by an integer ``factor`` dividing H and W; same dtype."""
    if factor == 1:
        return tile
    h, w, c = tile.shape
    if h % factor or w % factor:
        raise DataError(f"tile of {h}x{w} cannot be reduced by {factor}. Expected sizes divisible by it.")
    mean = tile.reshape(h // factor, factor, w // factor, factor, c).mean(axis=(1, 3))
    return np.round(mean).astype(tile.dtype)


def reduce_mask(mask: np.ndarray, factor: int) -> np.ndarray:
    """Downscale a 0/1 uint8 [H, W] mask by ``factor``: a pixel is 1 when at least half its block is."""
    if factor == 1:
        return mask
    h, w = mask.shape
    blocks = mask.reshape(h // factor, factor, w // factor, factor).astype(np.uint16).sum(axis=(1, 3))
    return (2 * blocks >= factor * factor).astype(np.uint8)


def tissue_fraction(tile: np.ndarray, saturation_threshold: int) -> float:
    """Fraction of tissue pixels of an RGB uint8 [H, W, 3] tile.

    A pixel is tissue when its HSV saturation (0-255: ``255 * (max - min) / max`` over R, G, B)
    is above ``saturation_threshold`` and its value (the max channel) is above :data:`DARK_VALUE`.
    Gray [H, W, 1] tiles have no saturation: their tissue is the pixels that are neither
    near-white (> 220) nor dark.
    """
    if tile.size == 0:
        return 0.0
    hi = tile.max(axis=-1).astype(np.int32)
    if tile.shape[-1] == 1:
        return float(np.mean((hi > DARK_VALUE) & (hi <= 220)))
    lo = tile.min(axis=-1).astype(np.int32)
    saturation = np.where(hi > 0, (255 * (hi - lo)) // np.maximum(hi, 1), 0)
    return float(np.mean((saturation > saturation_threshold) & (hi > DARK_VALUE)))


class RunLengthMask:
    """A run-length encoded binary mask that decodes windows without building the whole mask.

    Args:
        pairs: int64 [N, 2] (1-based start, length) as returned by :func:`tfseg.rle.parse`.
        shape: (H, W) of the full mask.
        order: "row" (row-major, Carvana) or "column" (column-major, HuBMAP).

    Raises:
        DataError: a run outside the mask (wrong shape or order), a start < 1 or a length < 1.
    """

    def __init__(self, pairs: np.ndarray, shape: tuple[int, int], order: str = "column", where: str = "RLE"):
        if order not in ("row", "column"):
            raise DataError(f"{where}: order={order!r}. Expected 'row' or 'column'.")
        self.shape = (int(shape[0]), int(shape[1]))
        self.order = order
        pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
        starts, lengths = pairs[:, 0] - 1, pairs[:, 1]
        if len(pairs) and (starts.min() < 0 or lengths.min() <= 0):
            raise DataError(f"{where}: a run starts below pixel 1 or has a length below 1")
        ends = starts + lengths
        total = self.shape[0] * self.shape[1]
        if len(pairs) and ends.max() > total:
            raise DataError(f"{where}: a run ends at pixel {int(ends.max())} past the {self.shape[0]}x"
                            f"{self.shape[1]}={total} pixels. Expected a matching image size and order.")
        keep = np.argsort(starts, kind="stable")
        self._starts, self._ends = starts[keep], ends[keep]
        self._span = np.maximum.accumulate(self._ends) if len(pairs) else self._ends

    def window(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        """uint8 [h, w] 0/1: rows [y, y+h), columns [x, x+w) of the mask, 0 past its edges."""
        height, width = self.shape
        out = np.zeros((h, w), dtype=np.uint8)
        y1, x1 = min(y + h, height), min(x + w, width)
        if y1 <= y or x1 <= x or not len(self._starts):
            return out
        # Lines are rows (row order) or columns (column order); offsets run along a line.
        if self.order == "row":
            line_len, (l0, l1), (o0, o1) = width, (y, y1), (x, x1)
        else:
            line_len, (l0, l1), (o0, o1) = height, (x, x1), (y, y1)
        lo = np.searchsorted(self._span, l0 * line_len, side="right")  # first run that may reach l0
        hi = np.searchsorted(self._starts, l1 * line_len, side="left")  # runs starting before l1 end
        s, e = self._starts[lo:hi], self._ends[lo:hi]
        s, e = s[e > l0 * line_len], e[e > l0 * line_len]
        if not len(s):
            return out
        # Split every run into its pieces on each line it crosses within [l0, l1).
        first = np.maximum(s // line_len, l0)
        last = np.minimum((e - 1) // line_len, l1 - 1)
        count = np.maximum(last - first + 1, 0)
        line = np.repeat(first, count) + (np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count))
        a = np.maximum(np.repeat(s, count), line * line_len) - line * line_len
        b = np.minimum(np.repeat(e, count), (line + 1) * line_len) - line * line_len
        a, b = np.clip(a, o0, o1) - o0, np.clip(b, o0, o1) - o0
        keep = b > a
        line, a, b = line[keep] - l0, a[keep], b[keep]
        delta = np.zeros((l1 - l0, o1 - o0 + 1), dtype=np.int32)
        np.add.at(delta, (line, a), 1)
        np.add.at(delta, (line, b), -1)
        painted = (np.cumsum(delta[:, :-1], axis=1) > 0).astype(np.uint8)
        if self.order == "column":
            painted = painted.T
        out[: y1 - y, : x1 - x] = painted
        return out
