"""Kaggle layouts with one mask per image: Carvana (files or RLE CSV) and LGG MRI (kaggle_3m).

Registered in :mod:`tfseg.data.sources` as ``carvana`` and ``lgg``; docs/data_sources.md has
the layouts and example configs.
"""

from __future__ import annotations

import csv
import sys
from collections.abc import Iterator
from pathlib import Path

from tfseg import rle
from tfseg.config import DataConfig
from tfseg.data.readers import (
    IMAGE_EXTENSIONS,
    Entry,
    check_unique,
    image_files,
    make_sample,
    read_image,
    read_mask,
)
from tfseg.data.sample import Sample
from tfseg.errors import DataError

ID_COLUMNS = ("img", "id", "image", "ImageId")
RLE_COLUMNS = ("rle_mask", "encoding", "rle", "EncodedPixels", "predicted")
CARVANA_MASK_EXTENSIONS = (".gif", ".png", ".jpg")


def _root(cfg: DataConfig) -> Path:
    from tfseg.data.sources import data_root

    return data_root(cfg)


def first_dir(root: Path, names: tuple[str, ...], what: str) -> Path:
    """The first existing ``root / name`` folder, or a DataError listing what was tried."""
    for name in names:
        if (root / name).is_dir():
            return root / name
    raise DataError(f"{root}: no {what} folder. Expected one of {list(dict.fromkeys(names))}.")


def read_rle_csv(path: Path) -> dict[str, str]:
    """Read a Kaggle RLE CSV into ``{id: rle}``; ids are keyed both as written and without extension.

    The id column is the first of ``img, id, image, ImageId`` present, the RLE column the first
    of ``rle_mask, encoding, rle, EncodedPixels, predicted``.
    """
    if not path.is_file():
        raise DataError(f"data.rle_csv: {path} not found")
    csv.field_size_limit(sys.maxsize)  # HuBMAP encodings are megabytes long
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            id_col = next((c for c in ID_COLUMNS if c in columns), None)
            rle_col = next((c for c in RLE_COLUMNS if c in columns), None)
            if id_col is None or rle_col is None:
                raise DataError(f"{path}: columns {columns}. Expected an id column {list(ID_COLUMNS)} "
                                f"and an RLE column {list(RLE_COLUMNS)}.")
            table: dict[str, str] = {}
            for row in reader:
                key, value = row[id_col], row[rle_col] or ""
                table[key] = value
                table.setdefault(Path(key).stem if Path(key).suffix.lower() in IMAGE_EXTENSIONS else key,
                                 value)
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"{path}: cannot read the RLE CSV ({err.__class__.__name__}: {err})") from None
    if not table:
        raise DataError(f"{path}: the RLE CSV has no rows")
    return table


def rle_csv_path(cfg: DataConfig, root: Path) -> Path:
    """``data.rle_csv`` relative to ``root`` (or absolute)."""
    path = Path(cfg.rle_csv).expanduser()
    return path if path.is_absolute() else root / path


# ---------------------------------------------------------------------------------------------
# carvana
# ---------------------------------------------------------------------------------------------


def _carvana_mask(image: Path, mask_dir: Path, cfg: DataConfig) -> Path:
    stem = image.stem + (cfg.mask_suffix or "_mask")
    if cfg.mask_ext:
        ext = cfg.mask_ext if cfg.mask_ext.startswith(".") else "." + cfg.mask_ext
        return mask_dir / (stem + ext)
    for ext in CARVANA_MASK_EXTENSIONS:
        if (mask_dir / (stem + ext)).is_file():
            return mask_dir / (stem + ext)
    return mask_dir / (stem + CARVANA_MASK_EXTENSIONS[0])


def carvana_group(stem: str) -> str:
    """The car id of a Carvana view: ``"0cdf5b5d0ce1_01"`` -> ``"0cdf5b5d0ce1"``."""
    car, sep, view = stem.rpartition("_")
    return car if sep and view.isdigit() else stem


def list_carvana(cfg: DataConfig) -> list[Entry]:
    """``root/train/<car>_NN.jpg`` with ``root/train_masks/<car>_NN_mask.gif`` or ``data.rle_csv`` rows.

    ``data.images``/``data.masks`` name the folders when they exist (else ``train``/``train_masks``);
    the mask stem is the image stem + ``data.mask_suffix`` (default ``_mask``). Group = car id.
    """
    root = _root(cfg)
    image_dir = first_dir(root, (cfg.images, "train"), "images")
    images = image_files(image_dir, "images")
    entries = []
    if cfg.rle_csv:
        csv_path = rle_csv_path(cfg, root)
        table = read_rle_csv(csv_path)
        for image in images:
            if image.name not in table and image.stem not in table:
                raise DataError(f"{csv_path}: no row for image {image.name} (mask missing)")
            code = table.get(image.name, table.get(image.stem))
            entries.append(Entry(image.stem, carvana_group(image.stem), image=str(image), rle=code))
    else:
        mask_dir = first_dir(root, (cfg.masks, "train_masks"), "masks")
        for image in images:
            mask = _carvana_mask(image, mask_dir, cfg)
            if not mask.is_file():
                raise DataError(f"{mask}: mask missing for image {image.name}")
            entries.append(Entry(image.stem, carvana_group(image.stem), image=str(image), mask=str(mask)))
    check_unique([e.id for e in entries], str(image_dir))
    return entries


def read_carvana(cfg: DataConfig, entry: Entry) -> Iterator[Sample]:
    """One Carvana view; an RLE mask is decoded row-major at the image's size."""
    image = read_image(entry.image, cfg.channels)
    if entry.mask is None:
        try:
            mask = rle.decode(entry.rle, image.shape[:2], order="row")
        except DataError as err:
            raise DataError(f"{entry.image}: {cfg.rle_csv} row: {err}") from None
        mask_name = f"{cfg.rle_csv}[{entry.id}]"
    else:
        mask = read_mask(entry.mask, cfg.classes, cfg.mask_threshold)
        mask_name = entry.mask
    yield make_sample(entry.id, entry.group, image, mask, image_name=entry.image, mask_name=mask_name)


# ---------------------------------------------------------------------------------------------
# lgg (kaggle_3m)
# ---------------------------------------------------------------------------------------------


def list_lgg(cfg: DataConfig) -> list[Entry]:
    """kaggle_3m: ``root/<patient>/<patient>_<n>.tif`` + ``<patient>_<n>_mask.tif``; group = patient.

    The mask stem is the slice stem + ``data.mask_suffix`` (default ``_mask``), its extension
    ``data.mask_ext`` (default the slice's). Files whose stem ends with that suffix are masks.
    """
    root = _root(cfg)
    suffix = cfg.mask_suffix or "_mask"
    patients = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not patients:
        raise DataError(f"{root}: no patient folders. Expected the kaggle_3m layout <patient>/<slice>.tif.")
    entries = []
    for patient in patients:
        slices = [p for p in image_files(patient, "patient") if not p.stem.endswith(suffix)]
        if not slices:
            raise DataError(f"{patient}: only masks, no image slices")
        for image in slices:
            ext = cfg.mask_ext or image.suffix
            mask = patient / f"{image.stem}{suffix}{ext if ext.startswith('.') else '.' + ext}"
            if not mask.is_file():
                raise DataError(f"{mask}: mask missing for image {image.name}")
            entries.append(Entry(image.stem, patient.name, image=str(image), mask=str(mask)))
    check_unique([e.id for e in entries], str(root))
    return entries


def read_lgg(cfg: DataConfig, entry: Entry) -> Iterator[Sample]:
    """One MRI slice; label = 1 when the mask has tumour (the notebooks' "diagnosis"), else 0."""
    image = read_image(entry.image, cfg.channels)
    mask = read_mask(entry.mask, cfg.classes, cfg.mask_threshold)
    yield make_sample(entry.id, entry.group, image, mask, image_name=entry.image, mask_name=entry.mask,
                      label=int(mask.any()))
