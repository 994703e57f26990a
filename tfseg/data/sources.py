"""Sources: readers of the layouts users have, each giving :class:`~tfseg.data.sample.Sample` records.

    entries = list_entries(cfg.data)            # cheap, picklable references, sorted by id
    for sample in read_entry(cfg.data, entries[0]):
        sample.image  # uint8 [H, W, C], C = cfg.data.channels
        sample.mask   # uint8 [H, W], class indices in [0, classes) (binary: 0/1)

Sources (``data.source``), documented with their layouts in docs/data_sources.md:

* ``folder``  -- ``root/images/<stem>.<ext>`` + ``root/masks/<stem><mask_suffix><mask_ext>``.
* ``carvana`` -- ``train/<car>_NN.jpg`` + ``train_masks/<car>_NN_mask.gif`` or ``train_masks.csv``.
* ``lgg``     -- kaggle_3m: ``<patient>/<slice>.tif`` + ``<slice>_mask.tif``.
* ``hubmap``  -- huge TIFFs + ``train.csv`` (column-major RLE), read by windows and cut into tiles.
* ``tfds``    -- a TFDS dataset (oxford_iiit_pet: trimap 1, 2, 3 -> classes 0, 1, 2).

Every reader checks what it reads and raises :class:`~tfseg.errors.DataError` in one line
naming the file: unreadable image, mask missing, size mismatch, mask value outside ``classes``,
empty folder, unknown split.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tfseg.config import DataConfig
from tfseg.data import sources_hubmap, sources_kaggle, sources_tfds
from tfseg.data.readers import Entry, check_unique, image_files, make_sample, read_image, read_mask
from tfseg.data.sample import Sample
from tfseg.errors import DataError
from tfseg.registry import Registry

__all__ = ["Entry", "SOURCES", "data_root", "iter_samples", "list_entries", "read_entry", "read_image",
           "read_mask"]


@dataclass(frozen=True)
class Source:
    """A source: ``list(cfg) -> entries`` and ``read(cfg, entry) -> samples``."""

    list: Callable[[DataConfig], list[Entry]]
    read: Callable[[DataConfig, Entry], Iterator[Sample]]
    uses_split_file: bool = True


SOURCES: Registry[Source] = Registry("data.source", DataError)


def data_root(cfg: DataConfig) -> Path:
    """The data root folder of ``cfg`` (must exist), relative paths from the working directory."""
    if not cfg.root:
        raise DataError(f"data.root is not set. Expected the folder of the data set "
                        f"for source={cfg.source!r}.")
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise DataError(f"data.root: {root} is not a folder")
    return root


# ---------------------------------------------------------------------------------------------
# folder: images/ + masks/ paired by name
# ---------------------------------------------------------------------------------------------


def mask_path_for(image: Path, mask_dir: Path, suffix: str, ext: str | None) -> Path:
    """The mask file of ``image``: ``mask_dir / (image stem + suffix + (ext or the image's extension))``."""
    if ext and not ext.startswith("."):
        ext = "." + ext
    return mask_dir / f"{image.stem}{suffix}{ext or image.suffix}"


def _list_folder(cfg: DataConfig) -> list[Entry]:
    root = data_root(cfg)
    image_dir, mask_dir = root / cfg.images, root / cfg.masks
    images = image_files(image_dir, "images")
    if not mask_dir.is_dir():
        raise DataError(f"{mask_dir}: masks folder not found (data.masks={cfg.masks!r})")
    entries = []
    for image in images:
        mask = mask_path_for(image, mask_dir, cfg.mask_suffix, cfg.mask_ext)
        if not mask.is_file():
            raise DataError(f"{mask}: mask missing for image {image.name} (mask name = image stem + "
                            f"data.mask_suffix={cfg.mask_suffix!r} + data.mask_ext={cfg.mask_ext!r})")
        entries.append(Entry(id=image.stem, group=image.stem, image=str(image), mask=str(mask)))
    check_unique([e.id for e in entries], str(image_dir))
    return entries


def _read_folder(cfg: DataConfig, entry: Entry) -> Iterator[Sample]:
    image = read_image(entry.image, cfg.channels)
    mask = read_mask(entry.mask, cfg.classes, cfg.mask_threshold)
    yield make_sample(entry.id, entry.group, image, mask, image_name=entry.image, mask_name=entry.mask)


SOURCES.register("folder", Source(_list_folder, _read_folder))
SOURCES.register("carvana", Source(sources_kaggle.list_carvana, sources_kaggle.read_carvana))
SOURCES.register("lgg", Source(sources_kaggle.list_lgg, sources_kaggle.read_lgg))
SOURCES.register("hubmap", Source(sources_hubmap.list_hubmap, sources_hubmap.read_hubmap))
SOURCES.register("tfds", Source(sources_tfds.list_tfds, sources_tfds.read_tfds, uses_split_file=False))


# ---------------------------------------------------------------------------------------------
# split_file: keep only the ids of one split
# ---------------------------------------------------------------------------------------------


def split_ids(cfg: DataConfig) -> list[str] | None:
    """The ids of ``cfg.split`` in ``cfg.split_file`` (JSON ``{split: [ids]}``), or None when unset.

    A relative ``split_file`` is looked up in ``root`` first, then in the working directory.
    """
    if cfg.split_file is None:
        if cfg.split is not None:
            raise DataError(f"data.split={cfg.split!r} is set but data.split_file is null. "
                            "Expected a JSON file mapping split names to ids.")
        return None
    path = _find_split_file(cfg)
    try:
        splits = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: cannot read the split file ({err.__class__.__name__}). "
                        "Expected JSON {split: [ids]}.") from None
    lists = {k: v for k, v in splits.items() if isinstance(v, list)} if isinstance(splits, dict) else {}
    if cfg.split is None:
        raise DataError(f"data.split is null. Expected one of the splits of {path}: {sorted(lists)}.")
    if cfg.split not in lists:
        raise DataError(f"{path}: no split {cfg.split!r}. Expected one of {sorted(lists)}.")
    return [str(i) for i in lists[cfg.split]]


def _find_split_file(cfg: DataConfig) -> Path:
    """``cfg.split_file`` as a path that exists: an absolute one as given; a relative one under ``root``,
    else in the working directory. Raises a DataError naming every place looked in."""
    path = Path(cfg.split_file).expanduser()
    if path.is_absolute():
        if path.is_file():
            return path
        raise DataError(f"data.split_file: {path} not found. Expected a JSON file {{split: [ids]}}.")
    places = [("data.root", Path(cfg.root).expanduser() / path)] if cfg.root else []
    places.append(("the working directory", path))
    for _, place in places:
        if place.is_file():
            return place
    looked = " and in ".join(f"{name} ({os.path.abspath(place)})" for name, place in places)
    raise DataError(f"data.split_file: {str(path)!r} not found; looked in {looked}. Expected a JSON file "
                    "{split: [ids]} (a relative path is read from data.root, then from the working directory).")


def _apply_split(cfg: DataConfig, entries: list[Entry]) -> list[Entry]:
    ids = split_ids(cfg)
    if ids is None:
        return entries
    by_id = {e.id: e for e in entries}
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise DataError(f"{cfg.split_file}: id {missing[0]!r} of split {cfg.split!r} is not in the data "
                        f"({len(missing)} missing). Expected every listed id on disk.")
    wanted = set(ids)
    return [e for e in entries if e.id in wanted]


# ---------------------------------------------------------------------------------------------
# The agreed interface
# ---------------------------------------------------------------------------------------------


def list_entries(cfg: DataConfig) -> list[Entry]:
    """List the entries of the data set described by ``cfg``, sorted by id.

    Args:
        cfg: the data section of the config (``source``, ``root``, naming keys, ``split_file``...).

    Returns:
        Picklable :class:`Entry` references (id, group, paths), sorted by id, never empty.

    Raises:
        DataError: empty or missing folder, unreadable split file, id of the split missing...
    """
    source = SOURCES.get(cfg.source)
    entries = source.list(cfg)
    if source.uses_split_file:
        entries = _apply_split(cfg, entries)
    if not entries:
        raise DataError(f"data.source={cfg.source!r}, root={cfg.root!r}: no entries found")
    return sorted(entries, key=lambda e: e.id)


def read_entry(cfg: DataConfig, entry: Entry) -> Iterator[Sample]:
    """Read and check one entry: one :class:`Sample` for most sources, many tiles for ``hubmap``.

    Yields:
        Sample with image uint8 [H, W, cfg.channels], mask uint8 [H, W] in [0, classes) (binary 0/1).

    Raises:
        DataError naming the file: unreadable image, mask missing, size mismatch, value outside classes.
    """
    return SOURCES.get(cfg.source).read(cfg, entry)


def iter_samples(cfg: DataConfig) -> Iterator[Sample]:
    """Every sample of the data set, entry after entry in :func:`list_entries` order."""
    for entry in list_entries(cfg):
        yield from read_entry(cfg, entry)
