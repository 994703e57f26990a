"""TFDS source: a TensorFlow Datasets data set, with ``oxford_iiit_pet`` as the worked case.

Registered in :mod:`tfseg.data.sources` as ``tfds``. One entry is a slice of ``TFDS_CHUNK``
examples of the split (``train[0:128]``, ``train[128:256]``...; the whole split when its size is
unknown or ``tfds_split`` is already a slice); reading it yields the examples in TFDS order.

For oxford_iiit_pet the trimap values 1, 2, 3 become the classes 0, 1, 2 (``mask - 1``, as in the
TensorFlow segmentation tutorial); by the data set's README 1 is the pet, 2 the background and 3
the unclassified border, so the classes are 0 pet, 1 background, 2 border. The group is the image
file name and the label the breed (0..36).

Offline, ``tfds.load`` retries downloads for minutes and leaves ``.tmp`` folders behind. Here a
data set that is not prepared in ``data_dir`` is downloaded only when the download host answers
within a few seconds; otherwise :class:`~tfseg.errors.DataError` says so at once, before any
file is written.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tfseg.config import DataConfig
from tfseg.data.readers import Entry, make_sample, normalise_mask, to_channels, to_uint8
from tfseg.data.sample import Sample
from tfseg.errors import DataError, first_line

ONLINE_TIMEOUT_S = 3.0
LOCAL_RECIPE = "configs/isbi2012.yaml"
TFDS_CHUNK = 128
"""Examples per entry, so that TFRecord writers can spread a split over shards and processes."""


@dataclass(frozen=True)
class TfdsLayout:
    """Where a TFDS data set keeps its image, mask, name and label, and how its mask maps to classes."""

    image: str = "image"
    mask: str = "segmentation_mask"
    mask_offset: int = 0  # subtracted from the stored mask values
    name: str = "file_name"
    label: str = "label"
    download_host: str = "storage.googleapis.com"


TFDS_LAYOUTS = {
    "oxford_iiit_pet": TfdsLayout(mask_offset=1, download_host="www.robots.ox.ac.uk"),
}


def layout_for(name: str) -> TfdsLayout:
    """The layout of TFDS data set ``name`` (the defaults for data sets not in TFDS_LAYOUTS)."""
    return TFDS_LAYOUTS.get(name.split("/")[0].split(":")[0], TfdsLayout())


def is_online(host: str, timeout: float = ONLINE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to ``host``:443 opens within ``timeout`` seconds (DNS included)."""
    result: list[bool] = []

    def attempt() -> None:
        try:
            with socket.create_connection((host, 443), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    return bool(result and result[0])


def import_tfds():
    """``tensorflow_datasets``, or a one-line DataError saying what to install."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as err:
        raise DataError(f"data.source='tfds' needs tensorflow-datasets ({err.msg}); "
                        "pip install tensorflow-datasets importlib_resources") from None
    return tfds


def prepared_builder(cfg: DataConfig):
    """The TFDS builder of ``cfg.tfds_name``, prepared in ``cfg.tfds_data_dir`` (downloading if online).

    Raises:
        DataError: unknown data set, or not prepared while the download host is unreachable.
    """
    tfds = import_tfds()
    data_dir = os.path.expanduser(cfg.tfds_data_dir) if cfg.tfds_data_dir else None
    absl = logging.getLogger("absl")  # TFDS warns about each missing version folder while it looks
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        builder = tfds.builder(cfg.tfds_name, data_dir=data_dir)
        prepared = builder.is_prepared()
    except Exception as err:  # noqa: BLE001 - DatasetNotFoundError, bad config name...
        reason = first_line(err)
        raise DataError(f"data.tfds_name={cfg.tfds_name!r}: {reason}") from None
    finally:
        absl.setLevel(level)
    if prepared:
        return builder
    where = Path(str(builder.data_path)).parent.parent
    host = layout_for(cfg.tfds_name).download_host
    if not is_online(host):
        raise DataError(f"TFDS data set {cfg.tfds_name!r} is not in {where} and this machine is offline "
                        f"({host} unreachable); prepare it there, or use a recipe in configs/ that reads "
                        f"local data, e.g. tfseg train --config {LOCAL_RECIPE} --fold 0")
    builder.download_and_prepare()
    return builder


def split_slices(split: str, num_examples: int, chunk: int | None = None) -> list[tuple[int, str]]:
    """``(start, "split[start:end]")`` slices of ``chunk`` (default TFDS_CHUNK) examples covering a split."""
    chunk = chunk or TFDS_CHUNK
    return [(a, f"{split}[{a}:{min(a + chunk, num_examples)}]") for a in range(0, num_examples, chunk)]


def list_tfds(cfg: DataConfig) -> list[Entry]:
    """Entries of ``TFDS_CHUNK`` examples of ``data.tfds_split`` (checked to be available), in split order."""
    builder = prepared_builder(cfg)
    splits = builder.info.splits
    base = cfg.tfds_split.split("[")[0]
    if splits and base not in splits:
        raise DataError(f"data.tfds_split={cfg.tfds_split!r}: {cfg.tfds_name} has the splits "
                        f"{sorted(splits)}")
    total = splits[base].num_examples if splits and "[" not in cfg.tfds_split else 0
    if not total:  # size unknown (or a slice already): one entry for the whole split
        ref = f"{cfg.tfds_name}:{cfg.tfds_split}"
        return [Entry(id=ref, group=ref, ref=cfg.tfds_split)]
    entries = []
    for start, ref in split_slices(cfg.tfds_split, total):
        entry_id = f"{cfg.tfds_name}:{cfg.tfds_split}[{start:09d}]"  # zero-padded: sorts in split order
        entries.append(Entry(id=entry_id, group=entry_id, ref=ref, start=start))
    return entries


def _stem(name: bytes | str) -> str:
    text = name.decode("utf-8") if isinstance(name, bytes) else str(name)
    return Path(text).stem if Path(text).suffix else text


def read_tfds(cfg: DataConfig, entry: Entry) -> Iterator[Sample]:
    """Yield every example of the split, in TFDS order.

    Yields:
        Sample(id=file stem (or ``<split>_<n>``), group=id, image uint8 [H, W, channels],
        mask uint8 [H, W] = stored mask - mask_offset (checked against ``classes``), label=breed or -1).
    """
    tfds = import_tfds()
    layout = layout_for(cfg.tfds_name)
    builder = prepared_builder(cfg)
    features = builder.info.features
    for key in (layout.image, layout.mask):
        if key not in features:
            raise DataError(f"data.tfds_name={cfg.tfds_name!r}: no feature {key!r}. "
                            f"Expected image and mask features; it has {sorted(features.keys())}.")
    dataset = builder.as_dataset(split=entry.ref or cfg.tfds_split, shuffle_files=False)
    for i, example in enumerate(tfds.as_numpy(dataset), start=entry.start):
        sample_id = _stem(example[layout.name]) if layout.name in example else f"{cfg.tfds_split}_{i:06d}"
        where = f"tfds {cfg.tfds_name}/{cfg.tfds_split} example {sample_id}"
        image = to_channels(to_uint8(np.asarray(example[layout.image])), cfg.channels, where=where)
        mask = np.asarray(example[layout.mask])
        if mask.ndim == 3 and mask.shape[-1] == 1:
            mask = mask[..., 0]
        if layout.mask_offset:
            if mask.size and mask.min() < layout.mask_offset:
                raise DataError(f"{where}: mask value {int(mask.min())} below {layout.mask_offset}. "
                                f"Expected the trimap values {layout.mask_offset}..{layout.mask_offset + 2}.")
            mask = mask.astype(np.int32) - layout.mask_offset
        mask = normalise_mask(mask, cfg.classes, cfg.mask_threshold, where=where)
        has_label = layout.label in example and np.ndim(example[layout.label]) == 0
        label = int(example[layout.label]) if has_label else -1
        yield make_sample(sample_id, sample_id, image, mask, image_name=where, mask_name=where, label=label)
