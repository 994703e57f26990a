"""Test-time augmentation over the dihedral group: flips and quarter turns, each exactly inverted.

A transform acts on batches laid out [B, H, W, C] (NumPy arrays). ``transforms(n)`` gives the
first ``n`` elements of the group in a fixed order: 1 = identity, 2 = + horizontal flip,
4 = + vertical flip and both flips (= rotation by 180 degrees), 8 = the whole dihedral group
(the four rotations, each with and without a horizontal flip). Predictions of the transformed
batches are mapped back with the inverse transform and averaged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from tfseg.errors import ConfigError

TTA_SIZES = (1, 2, 4, 8)


@dataclass(frozen=True)
class Transform:
    """One element of the dihedral group: rotate by ``k`` quarter turns after an optional h-flip.

    ``forward(x) = rot90(hflip?(x), k)`` on axes (H, W); ``inverse(forward(x)) == x`` exactly.
    """

    name: str
    k: int = 0
    flip: bool = False

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Apply to a batch [B, H, W, C]."""
        if self.flip:
            x = x[:, :, ::-1]
        if self.k:
            x = np.rot90(x, self.k, axes=(1, 2))
        return x

    def inverse(self, y: np.ndarray) -> np.ndarray:
        """Undo :meth:`forward` on a batch [B, H', W', K] of predictions."""
        if self.k:
            y = np.rot90(y, -self.k, axes=(1, 2))
        if self.flip:
            y = y[:, :, ::-1]
        return y


_ORDER = {
    1: (Transform("identity"),),
    2: (Transform("identity"), Transform("hflip", flip=True)),
    # vflip = rot180 o hflip ; rot180 = both flips
    4: (Transform("identity"), Transform("hflip", flip=True), Transform("vflip", k=2, flip=True),
        Transform("rot180", k=2)),
    8: (Transform("identity"), Transform("hflip", flip=True), Transform("vflip", k=2, flip=True),
        Transform("rot180", k=2), Transform("rot90", k=1), Transform("rot270", k=3),
        Transform("rot90_hflip", k=1, flip=True), Transform("rot270_hflip", k=3, flip=True)),
}


def transforms(n: int) -> tuple[Transform, ...]:
    """The ``n`` TTA transforms (n in 1, 2, 4, 8), identity first."""
    if n not in _ORDER:
        raise ConfigError(f"infer.tta: received {n!r}. Expected one of {list(TTA_SIZES)}.")
    return _ORDER[n]


def with_tta(predict: Callable[[np.ndarray], np.ndarray], n: int) -> Callable[[np.ndarray], np.ndarray]:
    """Wrap a batch predictor so that it averages the predictions of ``n`` transforms.

    Args:
        predict: float32 [B, H, W, C] -> float32 [B, H', W', K] probabilities.
        n: 1, 2, 4 or 8 transforms. Quarter turns (n=8) need square inputs unless the model
            takes any size.

    Returns:
        A predictor with the same signature returning the mean over transforms.
    """
    group = transforms(n)
    if n == 1:
        return predict

    def averaged(x: np.ndarray) -> np.ndarray:
        total = None
        for t in group:
            y = t.inverse(np.asarray(predict(np.ascontiguousarray(t.forward(x)))))
            total = y.astype(np.float32) if total is None else total + y
        return total / len(group)

    return averaged
