"""Reading and normalising one image or one mask, shared by every source.

Normalisation rules (documented in docs/data_sources.md):

* Images become uint8 [H, W, C] with C = ``channels``. 8-bit data is kept as is; any other
  dtype (16-bit TIFF such as DSB2018, 32-bit, float) is stretched per image from its
  [min, max] to [0, 255] (a constant image becomes 0). Palette images are expanded to RGB,
  alpha is dropped, RGB becomes gray with PIL's ITU-R 601-2 luma (L = .299 R + .587 G + .114 B)
  and gray becomes RGB by repetition.
* Binary masks (``classes == 1``) become 0/1: several channels are first reduced by their
  maximum; a mask already in {0, 1} stays as it is; an 8-bit mask is foreground where its value
  is above ``threshold`` (0/255 and JPEG-noisy masks); a wider integer mask (16/32-bit, e.g.
  DSB2018 instance ids) is foreground where its value is above 0.
* Multiclass masks (``classes > 1``) are class indices: palette PNGs are read as their indices
  (PIL mode "P"), gray values are taken as they are, and every value must be < ``classes``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from tfseg.data.sample import Sample
from tfseg.errors import DataError, first_line

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif")
_TIFF = (".tif", ".tiff")


@dataclass(frozen=True)
class Entry:
    """A picklable reference to one item of a data set (read later by ``read_entry``).

    Attributes:
        id: unique id (file stem, HuBMAP image id, TFDS split name...).
        group: what must stay within one fold (the car, the patient, the source image).
        image: path of the image file ("" for TFDS).
        mask: path of the mask file, or None when the mask comes from ``rle``.
        rle: run-length encoded mask (Carvana/HuBMAP CSV), or None.
        ref: source-specific reference (TFDS: the split slice, e.g. ``"train[0:128]"``).
        start: index of the entry's first example within its split (TFDS).
    """

    id: str
    group: str
    image: str = ""
    mask: str | None = None
    rle: str | None = None
    ref: str = ""
    start: int = 0


def _array_from_pil(img: Image.Image) -> np.ndarray:
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode in ("1", "CMYK", "YCbCr", "LAB", "HSV"):
        img = img.convert("L" if img.mode == "1" else "RGB")
    return np.asarray(img)


def _load(path: Path, what: str) -> np.ndarray:
    """Decode a file into a numpy array (PIL, or tifffile for TIFF); one-line DataError if it fails."""
    if not path.is_file():
        raise DataError(f"{path}: {what} file not found")
    try:
        if path.suffix.lower() in _TIFF:
            import tifffile

            return np.asarray(tifffile.imread(path))
        with Image.open(path) as img:
            img.load()
            return _array_from_pil(img) if what == "image" else _mask_array_from_pil(img)
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - any decoder failure is a bad file
        reason = first_line(err)
        raise DataError(f"{path}: cannot read {what} ({reason})") from None


def _mask_array_from_pil(img: Image.Image) -> np.ndarray:
    if img.mode in ("P", "L", "I", "I;16", "I;16B", "I;16L", "F"):
        return np.asarray(img)  # palette PNG/GIF: the indices, not the colours
    if img.mode == "1":
        return np.asarray(img).astype(np.uint8)
    return np.asarray(img.convert("RGB") if img.mode not in ("RGB", "RGBA", "LA") else img)


def to_uint8(array: np.ndarray) -> np.ndarray:
    """Scale an image to uint8: 8-bit kept; other dtypes stretched per image from [min, max] to [0, 255].

    Args:
        array: any numeric array (uint16 TIFF, float...).

    Returns:
        uint8 array of the same shape (a constant non-8-bit image becomes all 0).
    """
    if array.dtype == np.uint8:
        return array
    if array.dtype == bool:
        return array.astype(np.uint8) * 255
    values = array.astype(np.float64)
    lo, hi = float(np.min(values)), float(np.max(values))
    if hi <= lo:
        return np.zeros(array.shape, dtype=np.uint8)
    return np.round((values - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def to_channels(image: np.ndarray, channels: int, where: str = "image") -> np.ndarray:
    """Bring a uint8 [H, W] / [H, W, C] / [C, H, W] image to uint8 [H, W, channels] (1 or 3)."""
    if image.ndim == 3 and image.shape[0] in (1, 3, 4) and image.shape[-1] not in (1, 3, 4):
        image = np.moveaxis(image, 0, -1)  # channels-first TIFF
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 2, 3, 4):
        raise DataError(f"{where}: image of shape {image.shape}. "
                        "Expected [H, W], [H, W, 1|3|4] or [3, H, W].")
    if image.shape[-1] in (2, 4):  # drop alpha (LA, RGBA)
        image = image[..., :-1]
    if channels == 3 and image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    elif channels == 1 and image.shape[-1] == 3:
        luma = image.astype(np.uint32) @ np.array([299, 587, 114], dtype=np.uint32)
        image = ((luma + 500) // 1000).astype(np.uint8)[..., None]
    elif channels not in (1, 3):
        raise DataError(f"{where}: channels={channels}. Expected 1 or 3.")
    return np.ascontiguousarray(image)


def read_image(path: str | os.PathLike, channels: int) -> np.ndarray:
    """Read an image file as uint8 [H, W, channels].

    Args:
        path: PNG, JPEG, GIF, BMP or TIFF (8 or 16 bit, gray, RGB, RGBA, palette).
        channels: 1 (gray) or 3 (RGB).

    Returns:
        uint8 [H, W, channels], values 0..255 (non-8-bit data stretched per image, see module doc).

    Raises:
        DataError: the file is missing or cannot be decoded (one line naming the file).
    """
    path = Path(path)
    array = _load(path, "image")
    return to_channels(to_uint8(array), channels, where=str(path))


def normalise_mask(mask: np.ndarray, classes: int, threshold: int, where: str) -> np.ndarray:
    """Turn a decoded mask into uint8 [H, W] class indices (binary: 0/1), following the module rules.

    Args:
        mask: [H, W] or [H, W, C] (or [C, H, W]) array of any integer dtype.
        classes: 1 (binary) or the number of classes N (values must be in [0, N)).
        threshold: binary 8-bit masks are foreground where value > threshold.
        where: the file name (or id) used in error messages.

    Returns:
        uint8 [H, W] with values in [0, max(classes, 2)).

    Raises:
        DataError: a multiclass value >= classes, a colour-coded multiclass mask, a bad shape.
    """
    mask = np.asarray(mask)
    if mask.ndim == 3 and mask.shape[0] in (1, 3, 4) and mask.shape[-1] not in (1, 3, 4):
        mask = np.moveaxis(mask, 0, -1)
    if mask.ndim == 3:
        if mask.shape[-1] in (2, 4):
            mask = mask[..., :-1]
        if classes == 1:
            mask = mask.max(axis=-1)
        elif all(np.array_equal(mask[..., 0], mask[..., c]) for c in range(1, mask.shape[-1])):
            mask = mask[..., 0]
        else:
            raise DataError(f"{where}: colour-coded mask with {mask.shape[-1]} different channels. "
                            f"Expected class indices (gray or palette PNG) for classes={classes}.")
    if mask.ndim != 2:
        raise DataError(f"{where}: mask of shape {mask.shape}. Expected [H, W] or [H, W, C].")
    if mask.dtype.kind == "f":
        if not np.all(np.isfinite(mask)) or not np.all(mask == np.round(mask)):
            raise DataError(f"{where}: float mask with non-integer values. Expected class indices.")
    if mask.dtype.kind in "iuf" and mask.size and mask.min() < 0:
        raise DataError(f"{where}: mask value {mask.min()} is negative. Expected values >= 0.")
    if classes == 1:
        if mask.dtype == bool or mask.size == 0 or mask.max() <= 1:
            return mask.astype(np.uint8)
        if mask.dtype == np.uint8:
            return (mask > threshold).astype(np.uint8)
        return (mask > 0).astype(np.uint8)  # 16/32-bit label or instance maps
    if mask.size and mask.max() >= classes:
        bad = sorted(int(v) for v in np.unique(mask[mask >= classes])[:5])
        raise DataError(f"{where}: mask values {bad} outside classes={classes}. "
                        f"Expected class indices 0..{classes - 1}.")
    return mask.astype(np.uint8)


def read_mask(path: str | os.PathLike, classes: int, threshold: int) -> np.ndarray:
    """Read a mask file as uint8 [H, W] class indices (binary: 0/1); see :func:`normalise_mask`."""
    path = Path(path)
    return normalise_mask(_load(path, "mask"), classes, threshold, where=str(path))


def make_sample(entry_id: str, group: str, image: np.ndarray, mask: np.ndarray, *,
                image_name: str, mask_name: str, label: int = -1) -> Sample:
    """Check that image and mask have the same [H, W] and build the :class:`Sample`."""
    if image.shape[:2] != mask.shape[:2]:
        raise DataError(f"{mask_name}: mask size {mask.shape[1]}x{mask.shape[0]} differs from image "
                        f"{image_name} size {image.shape[1]}x{image.shape[0]} (width x height). "
                        "Expected the same size.")
    return Sample(id=entry_id, group=group, image=image, mask=mask, label=int(label))


def image_files(folder: Path, what: str) -> list[Path]:
    """Image files (by extension, hidden files skipped) directly inside ``folder``, sorted by name.

    Raises:
        DataError: the folder is missing or holds no image file.
    """
    if not folder.is_dir():
        raise DataError(f"{folder}: {what} folder not found")
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise DataError(f"{folder}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in the {what} folder")
    return files


def check_unique(ids: Sequence[str], where: str) -> None:
    """Raise DataError when two items share an id (e.g. ``a.png`` and ``a.jpg``)."""
    seen: set[str] = set()
    for i in ids:
        if i in seen:
            raise DataError(f"{where}: two files have the id {i!r}. Expected one image per id.")
        seen.add(i)
