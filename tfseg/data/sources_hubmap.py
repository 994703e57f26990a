"""HuBMAP: huge TIFFs + ``train.csv`` (column-major RLE), read by windows and cut into tiles.

Registered in :mod:`tfseg.data.sources` as ``hubmap``. One entry is one source image; reading it
yields its kept tiles. Memory stays at a few tiles: the image is read window by window
(:class:`~tfseg.data.tiling.TiffWindows`) and each tile's mask is painted from the runs that
cross it (:class:`~tfseg.data.tiling.RunLengthMask`), never as a whole-image mask.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from tfseg import rle
from tfseg.config import DataConfig
from tfseg.data.readers import Entry, check_unique, image_files, make_sample, to_channels
from tfseg.data.sample import Sample
from tfseg.data.sources_kaggle import first_dir, read_rle_csv
from tfseg.data.tiling import (
    RunLengthMask,
    TiffWindows,
    reduce_image,
    reduce_mask,
    tile_positions,
    tissue_fraction,
)
from tfseg.errors import DataError

DEFAULT_CSV = "train.csv"


def list_hubmap(cfg: DataConfig) -> list[Entry]:
    """One entry per TIFF in ``root/<images>`` (else ``root/train``), its mask the CSV row of its stem.

    The CSV is ``data.rle_csv`` (default ``train.csv``) relative to ``root``; columns ``id`` and
    ``encoding`` (HuBMAP 2020) or ``rle`` (HuBMAP + HPA 2022). Group = the image id.
    """
    from tfseg.data.sources import data_root

    root = data_root(cfg)
    csv_path = Path(cfg.rle_csv or DEFAULT_CSV).expanduser()
    csv_path = csv_path if csv_path.is_absolute() else root / csv_path
    table = read_rle_csv(csv_path)
    image_dir = first_dir(root, (cfg.images, "train"), "images")
    tiffs = [p for p in image_files(image_dir, "images") if p.suffix.lower() in (".tif", ".tiff")]
    if not tiffs:
        raise DataError(f"{image_dir}: no .tif/.tiff images in the images folder")
    entries = []
    for path in tiffs:
        if path.stem not in table:
            raise DataError(f"{csv_path}: no row for image {path.name} (mask missing)")
        entries.append(Entry(path.stem, path.stem, image=str(path), rle=table[path.stem]))
    check_unique([e.id for e in entries], str(image_dir))
    return entries


def _to_uint8(tile: np.ndarray, where: str) -> np.ndarray:
    if tile.dtype == np.uint8:
        return tile
    if tile.dtype == np.uint16:  # full-range 16-bit: a fixed rule, identical for every tile
        return (tile // 257).astype(np.uint8)
    raise DataError(f"{where}: TIFF samples of dtype {tile.dtype}. Expected uint8 or uint16.")


def read_hubmap(cfg: DataConfig, entry: Entry) -> Iterator[Sample]:
    """Yield the kept tiles of one image, row by row.

    Tiles of ``tile_size`` source pixels start every ``tile_size - tile_overlap`` pixels (the last
    ones end at the image edge), are area-reduced by ``tile_reduce`` and kept when their tissue
    fraction (:func:`~tfseg.data.tiling.tissue_fraction`) is >= ``tile_min_tissue`` (0 keeps all).

    Yields:
        Sample(id=f"{image_id}_{y}_{x}" (source-pixel corner), group=image_id,
        image uint8 [T, T, channels], mask uint8 [T, T] 0/1, label=1 if the tile has foreground)
        with T = tile_size // tile_reduce.
    """
    size, reduce = cfg.tile_size, cfg.tile_reduce
    if size % reduce:
        raise DataError(f"data.tile_size={size} is not divisible by data.tile_reduce={reduce}")
    if cfg.tile_overlap >= size:
        raise DataError(f"data.tile_overlap={cfg.tile_overlap} >= data.tile_size={size}. Expected less.")
    with TiffWindows(entry.image) as tiff:
        where = f"{cfg.rle_csv or DEFAULT_CSV}[{entry.id}]"
        mask = RunLengthMask(rle.parse(entry.rle), (tiff.height, tiff.width), order="column", where=where)
        colour = 3 if tiff.channels >= 3 else 1  # gray scans use the gray tissue rule
        for y, x in tile_positions(tiff.height, tiff.width, size, cfg.tile_overlap):
            tile = to_channels(_to_uint8(tiff.read(y, x, size, size), entry.image), colour, where=entry.image)
            tile = reduce_image(tile, reduce)
            if cfg.tile_min_tissue > 0 and tissue_fraction(tile, cfg.tile_saturation_threshold) \
                    < cfg.tile_min_tissue:
                continue
            tile_mask = reduce_mask(mask.window(y, x, size, size), reduce)
            image = to_channels(tile, cfg.channels, where=entry.image)
            yield make_sample(f"{entry.id}_{y}_{x}", entry.id, image, tile_mask, image_name=entry.image,
                              mask_name=where, label=int(tile_mask.any()))
