"""Kaggle's folder layouts rebuilt in tmp_path from the real samples in ../shared/data.

The project never copies the shared files into its tree; tests that need a competition's layout
convert the shared sample into it under pytest's tmp_path.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from tests.conftest import shared_path


def carvana_layout(root: Path, views: int = 4) -> dict[str, np.ndarray]:
    """``root/train/<car>_NN.jpg`` + ``root/train_masks/<car>_NN_mask.gif`` (Kaggle's Carvana).

    Images are the shared PNGs saved as JPEG q95, masks as 2-colour palette GIFs (index 1 = car).

    Returns:
        ``{id: mask uint8 [H, W] 0/1}`` of the views written, sorted by id.
    """
    src = shared_path("carvana_sample")
    (root / "train").mkdir(parents=True, exist_ok=True)
    (root / "train_masks").mkdir(parents=True, exist_ok=True)
    truth = {}
    for path in sorted((src / "images").glob("*.png"))[:views]:
        Image.open(path).convert("RGB").save(root / "train" / f"{path.stem}.jpg", quality=95)
        mask = (np.asarray(Image.open(src / "masks" / f"{path.stem}_mask.png")) > 127).astype(np.uint8)
        gif = Image.fromarray(mask, mode="L").convert("P")
        gif.putpalette([0, 0, 0, 255, 255, 255])
        gif.save(root / "train_masks" / f"{path.stem}_mask.gif")
        truth[path.stem] = mask
    return truth
