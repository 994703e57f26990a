"""The record every source yields and every writer consumes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Sample:
    """One image and its mask, as read from a source.

    Attributes:
        id: unique id of the example within the data set (file stem, tile name...).
        group: what must stay within one fold (the car, the patient, the source image).
        image: uint8 [H, W, C], C = 1 or 3.
        mask: uint8 [H, W], class indices in [0, classes) (binary: 0/1).
        label: optional integer label used for stratified folds (e.g. LGG: mask has tumour);
            -1 when absent.
    """

    id: str
    group: str
    image: np.ndarray
    mask: np.ndarray
    label: int = -1
