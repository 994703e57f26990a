"""A fixed-size valid-convolution model predicted through large windows, when that is exact.

tfseg builds a model for ``data.image_size`` unless ``data.val_size`` asks for any size, so the original
U-Net trained on 188 x 188 crops is a 188 -> 4 model. Predicted with windows of its own size, each
188 x 188 window gives 4 x 4 pixels: a 512 x 512 ISBI slice at ``infer.overlap: 0.5`` and ``infer.tta: 8``
is about 65,000 windows x 8. Its layers do not depend on the size, so a copy built for any size
(:func:`tfseg.export.any_size_copy`, the same weights) predicts a large window in one call. That is
done only where every pixel it predicts is a pixel the fixed model predicts for some window of its own
size (docs/inference.md, "How the sliding window works"):

* **Valid convolutions only** (an output smaller than the input). A model with "same" padding sees zeros
  past its window's border, and its training size is part of what it learnt there: it keeps its size,
  as nnU-Net predicts with the patch size it trained on.
* **Period**: a valid-convolution model with poolings is equivariant to shifts of its total stride ``p``
  only (16 for ``unet_original``'s four poolings), not to every shift. ``p`` is the smallest step by which
  the copy's input and output grow together; at load the copy is run on a random ``s + p`` window and each
  of its four corner outputs must equal the fixed model's output for that corner's ``s`` window, else the
  model keeps its size (a layer that depends on the size: a fixed pooling window or resize target).
* **Phases**: a window of ``s`` trains the outputs whose offset from the window modulo ``p`` is below its
  output ``o``. When ``o >= p`` (``unet_original`` at 204 and up) every offset was trained, and a large
  window's output is, pixel for pixel, the fixed model's. When ``o < p`` (188 -> 4: offsets 0..3 of 16
  per axis) a large window would predict 12 of every 16 rows and columns at offsets the model never
  produced in training; so each large window is predicted ``ceil(p / o)`` times per axis, shifted by
  ``o``, each pixel taken from the shift that puts it at a trained offset: the result equals the fixed
  model's windows placed side by side (step ``o``), at a fraction of the work.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from tfseg.checkpoint_checks import fixed_input_size
from tfseg.errors import ModelError
from tfseg.tiling_predict import TileSpec

PERIODS = (1, 2, 4, 8, 16, 32, 64)  # the steps tried: the total stride of a valid-convolution model


@dataclass(frozen=True)
class LargeWindows:
    """A fixed-size model's checked copy for any size.

    Attributes:
        model: the copy (Keras model taking [B, H, W, C] for H, W = ``size`` + k x ``period``).
        size: [h, w] the fixed model takes; ``out``: [h, w] it returns.
        period: the shift (pixels) the models are equivariant to.
    """

    model: object
    size: tuple[int, int]
    out: tuple[int, int]
    period: int

    def tile(self, tile_size: int) -> int | None:
        """Side of the square windows to read for ``infer.tile_size``: the largest ``s + k p <= tile_size``
        with k >= 1 (``s`` the larger fixed side), or None when there is none (or the sides differ by other
        than a multiple of the period, so no square window fits both)."""
        (sh, sw), p = self.size, self.period
        if (sh - sw) % p:
            return None
        side = max(sh, sw)
        k = (int(tile_size) - side) // p
        return side + k * p if k >= 1 else None

    def spec(self, tile: int, classes: int, channels: int) -> TileSpec:
        """The :class:`TileSpec` of square windows of ``tile`` pixels."""
        (sh, sw), (oh, ow) = self.size, self.out
        return TileSpec(in_size=tile, out_size=tile - (sh - oh), classes=classes, channels=channels,
                        in_width=tile, out_width=tile - (sw - ow))

    def predict_fn(self, base: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
        """Batch predictor of large windows from ``base`` (the copy's batch predictor, e.g.
        :func:`tfseg.inference.keras_predict_fn`): [B, H, W, C] -> [B, H - (s - o), W - (s - o), K], each
        pixel at an offset the fixed model trained (module docstring, "Phases")."""
        (sh, sw), (oh, ow), p = self.size, self.out, self.period

        def plan(n_in: int, s: int, o: int) -> tuple[list[int], np.ndarray]:
            if (n_in - s) % p or (o < p and n_in < s + p):
                raise ModelError(f"a window side of {n_in} pixels does not fit the model's copy for any size "
                                 f"(expected {s} + a multiple of {p}, at least {s + p})")
            n_out = n_in - (s - o)
            if o >= p:
                return [0], np.zeros(n_out, int)
            shifts = sorted({min(k * o, p - o) for k in range(-(-p // o))})
            phase = np.arange(n_out) % p
            owner = np.array([next(d for d in shifts if d <= f < d + o) for f in phase[:p]])[phase]
            return shifts, owner

        def predict(x: np.ndarray) -> np.ndarray:
            h, w = x.shape[1:3]
            (ys, yown), (xs, xown) = plan(h, sh, oh), plan(w, sw, ow)
            if ys == [0] and xs == [0]:
                return base(x)
            out = None
            for dy in ys:
                rows = np.flatnonzero(yown == dy)
                for dx in xs:
                    cols = np.flatnonzero(xown == dx)
                    window = x[:, dy:h if dy == 0 else dy + h - p, dx:w if dx == 0 else dx + w - p]
                    y = base(np.ascontiguousarray(window))
                    if out is None:
                        out = np.empty((x.shape[0], len(yown), len(xown), y.shape[-1]), np.float32)
                    out[:, rows[:, None], cols[None, :]] = y[:, (rows - dy)[:, None], (cols - dx)[None, :]]
            return out

        return predict


_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def large_windows(model) -> LargeWindows | None:
    """The checked copy for any size of a fixed-size valid-convolution ``model`` (module docstring), or None:
    the model takes any size already, its output has its input's size ("same" padding), or no copy
    computes what it computes. Checked once per model object."""
    if model in _CHECKED:
        return _CHECKED[model]
    _CHECKED[model] = found = _find(model)
    return found


def _find(model) -> LargeWindows | None:
    from tfseg.export import any_size_copy

    size = fixed_input_size(model)
    if size is None or not hasattr(model, "output_shape"):
        return None
    out = tuple(int(v) for v in model.output_shape[1:3])
    if out == size or out[0] > size[0] or out[1] > size[1]:
        return None
    copy = any_size_copy(model)
    if copy is None:
        return None
    channels = int(model.input_shape[-1])
    period = next((p for p in PERIODS if _output_hw(copy, (size[0] + p, size[1] + p), channels)
                   == (out[0] + p, out[1] + p)), None)
    if period is None or not _exact(model, copy, size, out, period, channels):
        return None
    return LargeWindows(copy, size, out, period)


def _output_hw(model, hw: tuple[int, int], channels: int) -> tuple[int, int] | None:
    try:
        y = model(np.zeros((1, *hw, channels), np.float32), training=False)
    except Exception:  # noqa: BLE001 - a size the model cannot take fails deep inside it (Concatenate...)
        return None
    return int(y.shape[1]), int(y.shape[2])


def _exact(model, copy, size: tuple[int, int], out: tuple[int, int], p: int, channels: int) -> bool:
    """The copy's output for a random ``s + p`` window equals, in each corner, the fixed model's for that
    corner's ``s`` window."""
    import keras

    (sh, sw), (oh, ow) = size, out
    x = np.random.default_rng(0).uniform(0, 255, (1, sh + p, sw + p, channels)).astype(np.float32)
    corners = [(a, b) for a in (0, p) for b in (0, p)]
    want = keras.ops.convert_to_numpy(model(np.concatenate([x[:, a:a + sh, b:b + sw] for a, b in corners]),
                                            training=False))
    got = keras.ops.convert_to_numpy(copy(x, training=False))
    got = np.concatenate([got[:, a:a + oh, b:b + ow] for a, b in corners])
    scale = max(1.0, float(np.abs(want).max()))
    return got.shape == want.shape and bool(np.allclose(got, want, rtol=1e-3, atol=1e-4 * scale))
