"""Run-length encoding of binary masks, the one tested pair used everywhere in tfseg.

Kaggle's segmentation competitions write a mask as ``"start length start length ..."`` with
1-based starts over the flattened image. They disagree on the flattening order:

* ``order="row"``: row-major (C order, ``mask.flatten()``) -- Carvana.
* ``order="column"``: column-major (Fortran order, ``mask.T.flatten()``) -- HuBMAP.

An empty mask encodes as the empty string. ``decode(encode(m, order), m.shape, order) == m``
for every binary mask and both orders (tests/test_rle.py checks it against the competitions'
own reference functions).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import numpy as np

from tfseg.errors import DataError

ORDERS = ("row", "column")
_NUMPY_ORDER = {"row": "C", "column": "F"}


def _check_order(order: str) -> str:
    if order not in _NUMPY_ORDER:
        raise DataError(f"RLE pixel order: received order={order!r}. Expected one of {list(ORDERS)}.")
    return _NUMPY_ORDER[order]


def runs(mask: np.ndarray, order: str = "row", chunk_pixels: int = 1 << 24) -> np.ndarray:
    """Foreground runs of a mask as an int64 array of shape [N, 2]: (1-based start, length).

    The mask is scanned in bands of about ``chunk_pixels`` rows x width (:func:`runs_from_bands`),
    so a 20000 x 20000 HuBMAP mask needs no full-size temporary copy.

    Args:
        mask: [H, W] array; any non-zero value is foreground (bool, uint8 0/1 or 0/255...).
        order: "row" (row-major, Carvana) or "column" (column-major, HuBMAP).
        chunk_pixels: pixels per band scanned at once.

    Returns:
        int64 [N, 2]; starts are 1-based positions in the flattened mask, lengths >= 1.
    """
    _check_order(order)
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise DataError(f"RLE encode: mask of shape {mask.shape}. Expected a 2-D [H, W] mask.")
    h, w = mask.shape
    step = max(1, chunk_pixels // max(w, 1))
    return runs_from_bands(((y, mask[y:y + step]) for y in range(0, h, step)), h, w, order)


def runs_from_bands(bands: Iterable[tuple[int, np.ndarray]], height: int, width: int,
                    order: str = "row") -> np.ndarray:
    """Foreground runs, as :func:`runs`, of a mask that arrives as bands of rows, top to bottom.

    Only one band is held at a time, in either pixel order: a column-major (HuBMAP) submission of
    a 20000 x 20000 prediction never needs the whole mask (see :class:`BandEncoder`).

    Args:
        bands: ``(y0, [h, width] array)`` pairs covering rows ``0..height`` in order, each band
            starting where the last ended (``Predictor.mask_bands`` yields these).
        height, width: the mask's size.
        order: "row" or "column".

    Returns:
        int64 [N, 2] (1-based start, length) in the order's flattening.

    Raises:
        DataError: a band out of order, of the wrong width, or rows missing at the end.
    """
    encoder = BandEncoder(height, width, order)
    for y0, band in bands:
        encoder.add(y0, band)
    return encoder.runs()


class BandEncoder:
    """The runs of one mask fed band by band (:meth:`add`), then read once (:meth:`runs`).

    Several encoders can be fed from one stream of bands, e.g. one per class of a multiclass
    prediction (``encoder_c.add(y0, band == c)``), so that one pass encodes every class.

    Column order keeps, per column, whether the last row seen was foreground; each band adds the
    positions where a column changes, and the sorted positions are the runs (a run that ends at
    the bottom of one column and goes on at the top of the next is one run of the flattened mask,
    as in the competitions' reference encoders). Memory: one row plus the change positions.

    Args:
        height, width: the mask's size.
        order: "row" or "column".
    """

    def __init__(self, height: int, width: int, order: str = "row"):
        _check_order(order)
        self.height, self.width, self.order = height, width, order
        self._edges: list[np.ndarray] = []  # 0-based flat positions where the value differs from the pixel before
        self._last_row = np.zeros(width, bool)  # column order: each column's last pixel seen
        self._prev = False  # row order: the last pixel seen
        self._y = 0  # the next row expected

    def add(self, y0: int, band: np.ndarray) -> None:
        """Add rows ``y0 .. y0 + h`` (``band``: [h, width]; any non-zero value is foreground).

        Raises:
            DataError: the band does not start at the next row, or is not [h, width].
        """
        band = np.asarray(band)
        y, width, height = self._y, self.width, self.height
        if y0 != y or band.ndim != 2 or band.shape[1] != width:
            raise DataError(f"RLE encode: band of shape {band.shape} at row {y0}. Expected [h, {width}] "
                            f"starting at row {y}.")
        fg = band != 0
        if self.order == "row":
            flat = fg.ravel()
            change = np.flatnonzero(np.concatenate([[self._prev], flat[:-1]]) != flat)
            self._edges.append(change + y * width)
            self._prev = bool(flat[-1]) if flat.size else self._prev
        else:
            rows, cols = np.nonzero(np.concatenate([self._last_row[None], fg[:-1]]) != fg)
            self._edges.append(cols.astype(np.int64) * height + (rows + y))
            self._last_row = fg[-1] if len(fg) else self._last_row
        self._y = y + band.shape[0]

    def runs(self) -> np.ndarray:
        """int64 [N, 2] (1-based start, length) of everything added.

        Raises:
            DataError: the bands added do not cover ``height`` rows.
        """
        height, width, edges = self.height, self.width, list(self._edges)
        if self._y != height:
            raise DataError(f"RLE encode: bands cover {self._y} rows. Expected {height}.")
        if self.order == "row":
            if self._prev:
                edges.append(np.array([height * width]))
            flat = np.concatenate(edges).astype(np.int64) if edges else np.zeros(0, np.int64)
        else:
            # each column also ends at (c + 1) * H; where column c ends and column c + 1 starts in
            # foreground, the two changes at that position cancel (the run goes on)
            edges.append((np.flatnonzero(self._last_row).astype(np.int64) + 1) * height)
            positions, counts = np.unique(np.concatenate(edges).astype(np.int64), return_counts=True)
            flat = positions[counts == 1]
        starts, ends = flat[0::2], flat[1::2]
        return np.stack([starts + 1, ends - starts], axis=1)


def format_runs(pairs: np.ndarray) -> str:
    """``"start length start length ..."`` of :func:`runs`' pairs; ``""`` when there are none."""
    if pairs.size == 0:
        return ""
    return " ".join(map(str, pairs.ravel().tolist()))


def encode(mask: np.ndarray, order: str = "row") -> str:
    """Run-length encode a binary mask.

    Args:
        mask: [H, W] array; any non-zero value is foreground.
        order: "row" (Carvana) or "column" (HuBMAP).

    Returns:
        ``"start length start length ..."`` with 1-based starts; ``""`` for an empty mask.
    """
    return format_runs(runs(mask, order))


_NOT_RLE = re.compile(r"[^0-9 \t\r\n]")


def parse(rle: str | float | None) -> np.ndarray:
    """Parse an RLE string into int64 [N, 2] (start, length) pairs.

    Empty strings, None and NaN (pandas reads an empty CSV cell as NaN) mean no runs.
    Raises DataError for an odd count of numbers or a non-integer token.
    """
    if rle is None or (isinstance(rle, float) and np.isnan(rle)):
        return np.zeros((0, 2), dtype=np.int64)
    text = str(rle).strip()
    if not text:
        return np.zeros((0, 2), dtype=np.int64)
    # Parse in C without a Python list of tokens (a HuBMAP mask has millions of numbers).
    if _NOT_RLE.search(text):
        raise DataError(f"RLE {_short(text)!r}: non-integer token. Expected 'start length ...'.")
    values = np.fromstring(text, dtype=np.int64, sep=" ")
    if values.size % 2:
        raise DataError(f"RLE {_short(text)!r}: {values.size} numbers. Expected start/length pairs.")
    return values.reshape(-1, 2)


def decode(rle: str | float | None, shape: Sequence[int], order: str = "row",
           value: int = 1) -> np.ndarray:
    """Decode an RLE string into a mask.

    Args:
        rle: ``"start length ..."`` with 1-based starts; ``""``/None/NaN for an empty mask.
        shape: (H, W) of the mask.
        order: "row" (Carvana) or "column" (HuBMAP): the order the string was encoded in.
        value: value written into foreground pixels (1, or 255 for viewable PNGs).

    Returns:
        uint8 [H, W], ``value`` on foreground, 0 elsewhere.

    Raises:
        DataError: a run starts before pixel 1, has a non-positive length, or ends past the
            last pixel (the usual sign of a wrong shape or order).
    """
    np_order = _check_order(order)
    if len(shape) != 2 or min(int(s) for s in shape) <= 0:
        raise DataError(f"RLE decode: shape {tuple(shape)}. Expected a positive (height, width).")
    h, w = int(shape[0]), int(shape[1])
    pairs = parse(rle)
    flat = np.zeros(h * w, dtype=np.uint8)
    if pairs.size:
        starts = pairs[:, 0] - 1
        lengths = pairs[:, 1]
        if starts.min() < 0 or lengths.min() <= 0:
            raise DataError(f"RLE {_short(str(rle))!r}: a start below 1 or a length below 1.")
        ends = starts + lengths
        if ends.max() > flat.size:
            raise DataError(f"RLE {_short(str(rle))!r}: run ends at pixel {int(ends.max())} past the "
                            f"{h}x{w}={flat.size} pixels of the mask. Expected a matching shape/order.")
        # A +1/-1 edge array and a cumulative sum paint every run in one vectorised pass.
        delta = np.zeros(flat.size + 1, dtype=np.int32)
        np.add.at(delta, starts, 1)
        np.add.at(delta, ends, -1)
        flat[np.cumsum(delta[:-1]) > 0] = value
    return flat.reshape((h, w), order=np_order)


def _short(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[:limit] + "..."
