"""Sliding-window prediction of images of any size, with blending of overlapping tiles.

The engine streams: tiles are predicted row of tiles by row of tiles, their weighted
probabilities are added into a *band* accumulator only one tile high, and every image row that
no later tile can touch is normalised and handed out at once. Peak memory is therefore about
``tile x width x classes`` float32 (40 MB for a 20000-pixel-wide image and 512-pixel tiles),
whatever the image height, and the image itself is read window by window from any array-like
that slices (a NumPy array, a memory map, or the zarr view of a tiled TIFF:
:func:`open_tiff`).

Geometry. Tiles of ``tile`` output pixels are laid on a grid with step
``tile x (1 - overlap)``, spread evenly so the last tile ends on the image border (nnU-Net's
rule); a model built for a fixed rectangle (352 x 480) gets rectangular tiles, each axis on its
own grid. A model whose output is smaller than its input (the original U-Net: 572 -> 388) reads
``margin = (in - out) / 2`` extra pixels on each side. Outside the image, windows are padded
with zeros (what "same" convolutions see at the border of a full image). With ``downscale`` d
the whole grid lives on the image reduced d times (block mean), and the probabilities are
repeated d x d on the way out (the HuBMAP winners' reduced-scale prediction).

Blending weights (separable profiles, max 1, strictly positive): ``constant``; ``linear``
(a tent, highest in the tile centre); ``gaussian`` with sigma = tile x ``sigma_scale``
(nnU-Net: 1/8), clipped below at 1e-3 so that border pixels covered by one tile keep their
prediction.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from tfseg.errors import ConfigError, DataError

BLENDS = ("gaussian", "linear", "constant")
MIN_WEIGHT = 1e-3


def positions(length: int, tile: int, overlap: float) -> list[int]:
    """Start offsets of tiles covering ``[0, length)``: evenly spread, first at 0, last at length - tile.

    A length shorter than the tile gives one tile at 0 (padded when read).
    """
    if not 0.0 <= overlap < 1.0:
        raise ConfigError(f"infer.overlap: received {overlap}. Expected 0 <= overlap < 1.")
    if length <= tile:
        return [0]
    step = max(1, int(round(tile * (1.0 - overlap))))
    n = math.ceil((length - tile) / step) + 1
    return [int(round(i * (length - tile) / (n - 1))) for i in range(n)]


def weight_profile(tile: int, blend: str, sigma_scale: float = 0.125) -> np.ndarray:
    """1-D blending profile, float32 [tile] in (0, 1]; the 2-D weight is its outer product."""
    if blend not in BLENDS:
        raise ConfigError(f"infer.blend: received {blend!r}. Expected one of {list(BLENDS)}.")
    x = np.arange(tile, dtype=np.float64)
    centre = (tile - 1) / 2.0
    if blend == "constant":
        prof = np.ones(tile)
    elif blend == "linear":
        prof = 1.0 - np.abs(x - centre) / (tile / 2.0)
    else:
        sigma = tile * sigma_scale
        if sigma <= 0:
            raise ConfigError(f"infer.sigma_scale: received {sigma_scale}. "
                              "Expected > 0 with gaussian blending.")
        prof = np.exp(-((x - centre) ** 2) / (2.0 * sigma * sigma))
    prof = prof / prof.max()
    return np.maximum(prof, MIN_WEIGHT).astype(np.float32)


def weight_map(tile: int, blend: str, sigma_scale: float = 0.125) -> np.ndarray:
    """2-D blending weights, float32 [tile, tile] in (0, 1], maximum 1 at the centre."""
    p = weight_profile(tile, blend, sigma_scale)
    return np.outer(p, p)


def read_window(image, y0: int, x0: int, h: int, w: int, downscale: int = 1,
                out: np.ndarray | None = None) -> np.ndarray:
    """Read ``[y0, y0+h) x [x0, x0+w)`` of the (downscaled) image, zero-padded outside it.

    Args:
        image: array-like [H, W, C] that supports 2-D slicing (NumPy, memmap, zarr).
        y0, x0: top-left corner in downscaled coordinates (may be negative).
        h, w: window size in downscaled pixels.
        downscale: d; the window covers d*h x d*w source pixels, reduced by block mean.
        out: optional float32 [h, w, C] array to write into (e.g. a slot of a batch buffer).

    Returns:
        float32 [h, w, C], values as in the image (0..255 for uint8).
    """
    H, W, C = image.shape
    d = downscale
    sy0, sx0, sy1, sx1 = y0 * d, x0 * d, (y0 + h) * d, (x0 + w) * d
    cy0, cx0, cy1, cx1 = max(sy0, 0), max(sx0, 0), min(sy1, H), min(sx1, W)
    if out is None:
        out = np.empty((h, w, C), dtype=np.float32)
    inside = (cy0, cx0, cy1, cx1) == (sy0, sx0, sy1, sx1)
    if d == 1:
        if not inside:
            out[...] = 0.0
        if cy1 > cy0 and cx1 > cx0:
            out[cy0 - sy0:cy1 - sy0, cx0 - sx0:cx1 - sx0] = np.asarray(image[cy0:cy1, cx0:cx1])
        return out
    full = np.zeros((h * d, w * d, C), dtype=np.float32)
    if cy1 > cy0 and cx1 > cx0:
        full[cy0 - sy0:cy1 - sy0, cx0 - sx0:cx1 - sx0] = np.asarray(image[cy0:cy1, cx0:cx1])
    out[...] = full.reshape(h, d, w, d, C).mean(axis=(1, 3))
    return out


def is_background(tile: np.ndarray, saturation: float = 40.0, min_fraction: float = 0.005) -> bool:
    """Cheap background rule for a tile [h, w, C] with values in 0..255 (every other pixel of
    every other row is looked at).

    RGB: background when fewer than ``min_fraction`` of the pixels have an HSV-style saturation
    (max - min over channels) above ``saturation`` (the HuBMAP notebooks' rule for glass and
    blank slide). Other channel counts: background when the tile is flat (range below 8).
    """
    sub = tile[::2, ::2]
    if tile.shape[-1] == 3:
        r, g, b = sub[..., 0], sub[..., 1], sub[..., 2]
        # elementwise max/min of three planes: numpy's reduce over a last axis of 3 is ~20x slower
        sat = np.maximum(np.maximum(r, g), b) - np.minimum(np.minimum(r, g), b)
        return float(np.count_nonzero(sat > saturation)) < min_fraction * sat.size
    return float(sub.max() - sub.min()) < 8.0


def prefetch(items: Iterator, depth: int = 2) -> Iterator:
    """Run the iterator ``items`` in a background thread, ``depth`` items ahead of the consumer.

    Errors raised by ``items`` are raised again in the consumer; when the consumer stops early
    the thread stops too. TensorFlow and NumPy release the GIL in their kernels, so reading
    tiles overlaps the model's work.
    """
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def worker() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put((None, item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put((None, done))
        except BaseException as err:  # noqa: BLE001 - handed to the consumer
            q.put((err, None))

    thread = threading.Thread(target=worker, name="tfseg-tile-reader", daemon=True)
    thread.start()
    try:
        while True:
            err, item = q.get()
            if err is not None:
                raise err
            if item is done:
                return
            yield item
    finally:
        stop.set()
        while thread.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.05)


@dataclass(frozen=True)
class TileSpec:
    """Sizes the model imposes: ``in_size`` read per tile, ``out_size`` predicted per tile.

    Tiles are square unless ``in_width`` / ``out_width`` are given (a model built for a fixed
    rectangular input, e.g. CamVid's 352 x 480): ``in_size`` and ``out_size`` are then the heights
    and each width defaults to its height.
    """

    in_size: int
    out_size: int
    classes: int
    channels: int
    in_width: int | None = None
    out_width: int | None = None

    def __post_init__(self):  # widths equal to the heights are stored as None: one spelling per spec
        if (self.in_width or self.in_size) == self.in_size and (self.out_width or self.out_size) == self.out_size:
            object.__setattr__(self, "in_width", None)
            object.__setattr__(self, "out_width", None)

    @property
    def in_hw(self) -> tuple[int, int]:
        """(height, width) read per tile."""
        return self.in_size, self.in_width or self.in_size

    @property
    def out_hw(self) -> tuple[int, int]:
        """(height, width) predicted per tile."""
        return self.out_size, self.out_width or self.out_size

    @property
    def margins(self) -> tuple[int, int]:
        """(top, left) margin: input pixels read around the predicted part of a tile."""
        (ih, iw), (oh, ow) = self.in_hw, self.out_hw
        return (ih - oh) // 2, (iw - ow) // 2


def iter_bands(predict: Callable[[np.ndarray], np.ndarray], image, spec: TileSpec, *, overlap: float = 0.5,
               blend: str = "gaussian", sigma_scale: float = 0.125, batch_size: int = 8, downscale: int = 1,
               skip_background: bool = False, progress: bool = False, prefetch_tiles: bool = True
               ) -> Iterator[tuple[int, np.ndarray]]:
    """Predict ``image`` tile by tile and yield finished bands of rows, top to bottom.

    Args:
        predict: float32 [batch_size, in_h, in_w, C] -> [batch_size, out_h, out_w, K] probabilities
            (``spec.in_hw``, ``spec.out_hw``; square unless the model imposes a rectangle).
            It is always called with exactly ``batch_size`` tiles (the last batch is padded)
            so a compiled model traces once.
        image: array-like uint8/float [H, W, C] with C = spec.channels (NumPy, memmap, zarr).
        spec: the model's tile sizes.
        overlap, blend, sigma_scale: see the module docstring.
        batch_size: tiles per model call.
        downscale: predict on the image reduced this many times; bands come back at full size.
        skip_background: tiles that :func:`is_background` calls background are not predicted;
            they count as probability 0 with their full weight.
        progress: show a tqdm bar counting tiles.
        prefetch_tiles: read the next batch of tiles in a background thread while the model
            predicts this one (:func:`prefetch`).

    Yields:
        (y0, probs): probs float32 [h, W, K] are the final probabilities of image rows
        ``[y0, y0 + h)``; the bands tile the image exactly once, in order.
    """
    H, W, C = image.shape
    if C != spec.channels:
        raise DataError(f"image has {C} channels. Expected {spec.channels}, the model's input channels.")
    if batch_size < 1 or downscale < 1:
        raise ConfigError(f"infer.batch_size={batch_size}, infer.downscale={downscale}. Expected both >= 1.")
    d, K = downscale, spec.classes
    (Th, Tw), (my, mx), (ih, iw) = spec.out_hw, spec.margins, spec.in_hw
    h, w = -(-H // d), -(-W // d)  # ceil: the downscaled image
    ys, xs = positions(h, Th, overlap), positions(w, Tw, overlap)
    wmap = np.outer(weight_profile(Th, blend, sigma_scale), weight_profile(Tw, blend, sigma_scale))[..., None]
    acc_h, acc_w = Th, max(w, Tw)
    acc = np.zeros((acc_h, acc_w, K), np.float32)
    wsum = np.zeros((acc_h, acc_w, 1), np.float32)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(ys) * len(xs), unit="tile", desc="predict")
    top, out_row = 0, 0  # acc row 0 <-> downscaled row `top`; next full-size row to emit

    def emit(rows: int) -> Iterator[tuple[int, np.ndarray]]:
        nonlocal out_row
        rows = min(rows, h - top)
        if rows <= 0:
            return
        band = acc[:rows, :w] / np.maximum(wsum[:rows, :w], 1e-12)
        band[wsum[:rows, :w, 0] == 0] = 0.0
        if d > 1:
            band = np.repeat(np.repeat(band, d, axis=0), d, axis=1)[:, :W]
        band = band[:max(0, min(band.shape[0], H - out_row))]
        yield out_row, band
        out_row += band.shape[0]

    def shift_to(y: int) -> Iterator[tuple[int, np.ndarray]]:
        # Every tile above row y is accumulated: rows [top, y) are final.
        nonlocal top
        shift = y - top
        yield from emit(shift)
        acc[:-shift], wsum[:-shift] = acc[shift:], wsum[shift:]
        acc[-shift:], wsum[-shift:] = 0.0, 0.0
        top = y

    def batches() -> Iterator[tuple[np.ndarray, int, list]]:
        # Fixed-size batches of tiles read straight into their buffer, with the grid positions
        # of the batch's tiles (and of the skipped tiles between them) in grid order.
        buf = np.zeros((batch_size, ih, iw, C), np.float32)
        pending: list = []
        n_real = 0
        for y in ys:
            for x in xs:
                t = read_window(image, y - my, x - mx, ih, iw, d, out=buf[n_real])
                slot = None if skip_background and is_background(t) else n_real
                pending.append((y, x, slot))
                n_real += slot is not None
                if n_real == batch_size:
                    yield buf, n_real, pending
                    buf = np.zeros_like(buf)
                    pending, n_real = [], 0
        if pending:
            buf[n_real:] = 0.0  # the padding of a last, partial batch
            yield buf, n_real, pending

    def drain(buf: np.ndarray, n_real: int, pending: list) -> Iterator[tuple[int, np.ndarray]]:
        # Predict one batch, then add every tile in grid order (a batch may span two rows of
        # tiles; the rows above a new row of tiles are flushed before it is added).
        pred = None
        if n_real:
            pred = np.asarray(predict(buf), dtype=np.float32)
            if pred.shape[1:] != (Th, Tw, K):
                raise DataError(f"model returned tiles of shape {pred.shape[1:]}. Expected {(Th, Tw, K)}.")
        for y, x, slot in pending:
            if y > top:
                yield from shift_to(y)
            ww = min(Tw, acc_w - x)
            if slot is not None:
                acc[:, x:x + ww] += pred[slot, :, :ww] * wmap[:, :ww]
            wsum[:, x:x + ww] += wmap[:, :ww]  # skipped tiles count as probability 0
        if bar is not None:
            bar.update(len(pending))

    # Reading the next batch (I/O, decoding, casts) overlaps the model's call on this one.
    for batch in (prefetch(batches(), depth=2) if prefetch_tiles else batches()):
        yield from drain(*batch)
    yield from emit(h - top)
    if bar is not None:
        bar.close()


def predict_tiled(predict: Callable[[np.ndarray], np.ndarray], image, spec: TileSpec, *,
                  dtype: str = "float32", out: np.ndarray | None = None, **kwargs) -> np.ndarray:
    """Probabilities of a whole image by sliding windows (see :func:`iter_bands` for arguments).

    Args:
        predict, image, spec, kwargs: as :func:`iter_bands`.
        dtype: ``float32`` or ``float16`` for the returned array (ignored when ``out`` is given).
        out: optional preallocated [H, W, K] array (e.g. an ``np.memmap`` on disk) to fill.

    Returns:
        [H, W, K] probabilities in 0..1 (``out`` when given).
    """
    H, W, _ = image.shape
    if out is None:
        out = np.zeros((H, W, spec.classes), dtype=np.dtype(dtype))
    return collect_bands(iter_bands(predict, image, spec, **kwargs), out)


def collect_bands(bands: Iterable[tuple[int, np.ndarray]], out: np.ndarray) -> np.ndarray:
    """Write ``(y0, band)`` row bands (:func:`iter_bands`' form) into ``out`` [H, ...]; returns ``out``."""
    for y0, band in bands:
        out[y0:y0 + band.shape[0]] = band
    return out


def band_to_mask(band: np.ndarray, threshold: float) -> np.ndarray:
    """Hard labels of probabilities [h, W, K]: binary (K=1) ``p > threshold`` as 0/1, else argmax.

    Returns:
        uint8 [h, W].
    """
    if band.shape[-1] == 1:
        return (band[..., 0] > threshold).astype(np.uint8)
    return np.argmax(band, axis=-1).astype(np.uint8)
