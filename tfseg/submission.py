"""Streaming submission files: RLE rows written as each prediction is made.

A binary run (1 class) writes one ``id,rle`` row per image (Carvana ``img,rle_mask``, HuBMAP
``id,predicted``). A multiclass run writes one row per image and class, in a long format: by
default ``id,ClassId,rle`` for the classes 1 .. K-1 (Severstal ``ImageId,ClassId,EncodedPixels``),
or, with ``submit.class_column: null``, ``<id>_<class>,rle`` (Understanding Clouds
``Image_Label,EncodedPixels``); the background 0 is not written unless ``submit.class_ids`` asks.

Memory does not grow with the test set: each mask is run-length encoded (:mod:`tfseg.rle`) and
its rows written and flushed at once (the Carvana winners' ``PredictionsSaverCallback`` wrote a
``submit.csv.gz`` for 100k images this way); a multiclass mask is encoded for every class in one
pass over its bands. The file appears under its final name only when the writer is closed
without error (:func:`tfseg.files.atomic_path`); ``*.csv.gz`` is gzipped.

    with SubmissionWriter("submit.csv.gz", "img", "rle_mask", "row") as sub:
        for name, mask in predictions:
            sub.write(name, mask)
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import io
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from tfseg import rle
from tfseg.config import SubmitConfig
from tfseg.errors import ConfigError, DataError, RunError
from tfseg.files import atomic_path

SUFFIXES = (".csv", ".csv.gz")
BAND_PIXELS = 1 << 24  # pixels of a band of rows encoded at once (multiclass masks in memory)


def is_submission_path(path: str | os.PathLike) -> bool:
    """True when ``path`` names a submission file (``*.csv`` or ``*.csv.gz``)."""
    return str(path).lower().endswith(SUFFIXES)


def image_id(file_name: str, id_format: str = "{name}") -> str:
    """The submission id of an image: ``{name}`` (``a_01.jpg``) or ``{stem}`` (``a_01``)."""
    name = Path(file_name).name
    stem = name.split(".")[0] if name.lower().endswith(".ome.tif") else Path(name).stem
    try:
        return id_format.format(name=name, stem=stem)
    except (KeyError, IndexError, ValueError):
        raise DataError(f"submit.id_format: {id_format!r}. Expected '{{name}}' or '{{stem}}'.") from None


class SubmissionWriter:
    """Context manager writing RLE rows one mask at a time.

    Binary (``classes=1``): one ``id_column,rle_column`` row per image, the RLE of ``mask != 0``.
    Multiclass (``classes > 1``, masks of class indices): one row per image and class of
    ``class_ids``, the RLE of ``mask == class``: ``id_column,class_column,rle_column``, or
    ``id_column,rle_column`` with ids ``<id>_<class>`` when ``class_column`` is None.

    Args:
        path: ``*.csv`` or ``*.csv.gz`` (gzip).
        id_column, rle_column: header names (Carvana ``img,rle_mask``; HuBMAP ``id,predicted``).
        pixel_order: ``row`` (Carvana) or ``column`` (HuBMAP), see :mod:`tfseg.rle`.
        classes: the run's classes: 1 = binary, K > 1 = masks of class indices 0..K-1.
        class_column: multiclass: header of the class column; None = the class joins the id.
        class_ids: multiclass: the class indices written, in this order; None = 1..K-1.
        class_names: multiclass: one label per class index (K names); None = the index.
        skip_empty: leave out the rows whose mask is empty.

    Raises:
        DataError: a path that is not ``*.csv`` / ``*.csv.gz``, an unknown pixel order.
        ConfigError: class settings that do not fit ``classes`` (named by their ``submit.`` key).
    """

    def __init__(self, path: str | os.PathLike, id_column: str = "img", rle_column: str = "rle_mask",
                 pixel_order: str = "row", *, classes: int = 1, class_column: str | None = "ClassId",
                 class_ids: Sequence[int] | None = None, class_names: Sequence[str] | None = None,
                 skip_empty: bool = False):
        if not is_submission_path(path):
            raise DataError(f"{path}: submission file name. Expected it to end with .csv or .csv.gz.")
        rle.encode(np.zeros((1, 1), np.uint8), pixel_order)  # check the order before opening anything
        self.path = Path(path)
        self.pixel_order = pixel_order
        self.classes = int(classes)
        self.skip_empty = skip_empty
        self.class_ids, self.labels = _check_classes(self.classes, class_ids, class_names)
        self.joined = self.classes > 1 and class_column is None
        self.columns = (id_column, rle_column) if self.classes == 1 or self.joined else \
            (id_column, class_column, rle_column)
        if len(set(self.columns)) < len(self.columns):
            raise ConfigError(f"submit: columns {list(self.columns)}. Expected distinct column names.")
        self.count = 0
        self._ids: set[str] = set()
        self._stack: contextlib.ExitStack | None = None
        self._writer = None
        self._fh: io.TextIOBase | None = None

    @classmethod
    def from_config(cls, path: str | os.PathLike, cfg: SubmitConfig, classes: int = 1) -> SubmissionWriter:
        """A writer laid out by the ``submit`` section for a run of ``classes`` classes."""
        return cls(path, cfg.id_column, cfg.rle_column, cfg.pixel_order, classes=classes,
                   class_column=cfg.class_column, class_ids=cfg.class_ids, class_names=cfg.class_names,
                   skip_empty=cfg.skip_empty)

    def __enter__(self) -> SubmissionWriter:
        stack = contextlib.ExitStack()
        tmp = stack.enter_context(atomic_path(self.path))
        if self.path.name.lower().endswith(".gz"):
            fh = stack.enter_context(gzip.open(tmp, "wt", encoding="utf-8", newline=""))
        else:
            fh = stack.enter_context(open(tmp, "w", encoding="utf-8", newline=""))
        self._stack, self._fh = stack, fh
        self._writer = csv.writer(fh, lineterminator="\n")
        self._writer.writerow(self.columns)
        return self

    def write(self, image_id: str, mask: np.ndarray) -> str | dict[int, str]:
        """Encode ``mask`` and write its row(s).

        Args:
            image_id: the image's id (:func:`image_id`).
            mask: [H, W]; binary: uint8/bool, non-zero = foreground; multiclass: integer class
                indices in [0, classes).

        Returns:
            Binary: the RLE string written ("" for an empty mask). Multiclass: class index -> RLE
            string, for every index of ``class_ids`` (skipped empty rows included, as "").

        Raises:
            DataError: the id was already written (two inputs with the same name); a multiclass
                mask that is not integer class indices below ``classes``.
        """
        mask = np.asarray(mask)
        if self.classes == 1:
            return self._write_rows(image_id, lambda: {None: rle.runs(mask, self.pixel_order)})
        if mask.ndim != 2:
            raise DataError(f"{image_id}: mask of shape {mask.shape}. Expected a 2-D [H, W] mask of class indices.")
        h, w = mask.shape
        step = max(1, BAND_PIXELS // max(w, 1))
        return self.write_bands(image_id, ((y, mask[y:y + step]) for y in range(0, h, step)), h, w)

    def write_bands(self, image_id: str, bands: Iterable[tuple[int, np.ndarray]], height: int,
                    width: int) -> str | dict[int, str]:
        """As :meth:`write`, for a mask that arrives as row bands (``Predictor.mask_bands``): the
        whole mask is never held, in either pixel order (:class:`tfseg.rle.BandEncoder`); a
        multiclass mask is encoded for every class in the same pass."""
        if self.classes == 1:
            return self._write_rows(image_id, lambda: {
                None: rle.runs_from_bands(bands, height, width, self.pixel_order)})
        return self._write_rows(image_id, lambda: self._class_runs(image_id, bands, height, width))

    def _class_runs(self, image_id: str, bands: Iterable[tuple[int, np.ndarray]], height: int,
                    width: int) -> dict[int, np.ndarray]:
        encoders = {c: rle.BandEncoder(height, width, self.pixel_order) for c in self.class_ids}
        for y0, band in bands:
            band = np.asarray(band)
            if band.dtype.kind not in "biu" or (band.size and (band.min() < 0 or band.max() >= self.classes)):
                found = f"dtype {band.dtype}" if band.dtype.kind not in "biu" else \
                    f"value {band.max() if band.max() >= self.classes else band.min()}"
                raise DataError(f"{image_id}: mask {found} at rows {y0}..{y0 + len(band)}. Expected class "
                                f"indices 0..{self.classes - 1} (a {self.classes}-class run).")
            for c, encoder in encoders.items():
                encoder.add(y0, band == c)
        return {c: encoder.runs() for c, encoder in encoders.items()}

    def _write_rows(self, image_id: str, make_runs) -> str | dict[int, str]:
        if self._writer is None:
            raise RunError(f"{self.path}: SubmissionWriter.write called outside its `with` block.")
        if image_id in self._ids:
            raise DataError(f"{self.path}: id {image_id!r} written twice. Expected unique image names.")
        self._ids.add(image_id)
        texts = {c: rle.format_runs(runs) for c, runs in make_runs().items()}  # every class before any row
        for text, label in zip(texts.values(), self.labels):
            if self.skip_empty and not text:
                continue
            if self.classes == 1:
                row = (image_id, text)
            elif self.joined:
                row = (f"{image_id}_{label}", text)
            else:
                row = (image_id, label, text)
            self._writer.writerow(row)
            self.count += 1
        self._fh.flush()
        return texts[None] if self.classes == 1 else texts

    def __exit__(self, *exc) -> None:
        stack, self._stack, self._writer, self._fh = self._stack, None, None, None
        if stack is not None:
            stack.__exit__(*exc)


def _check_classes(classes: int, class_ids: Sequence[int] | None,
                   class_names: Sequence[str] | None) -> tuple[tuple, tuple[str, ...]]:
    """The class indices written and their labels; ``((None,), ("",))`` for a binary run."""
    if classes < 1:
        raise ValueError(f"SubmissionWriter: classes={classes}. Expected 1 (binary) or more.")
    if classes == 1:
        for key, value in (("class_ids", class_ids), ("class_names", class_names)):
            if value is not None:
                raise ConfigError(f"submit.{key}: {list(value)} is for multiclass runs; this run has 1 class "
                                  f"(binary: one row per image). Expected null.")
        return (None,), ("",)
    if class_names is not None:
        class_names = tuple(str(n) for n in class_names)
        if len(class_names) != classes or len(set(class_names)) != classes:
            raise ConfigError(f"submit.class_names: {list(class_names)}. Expected {classes} distinct names, "
                              f"one per class index 0..{classes - 1} (background included).")
    if class_ids is None:
        ids = tuple(range(1, classes))
    else:
        ids = tuple(int(c) for c in class_ids)
        bad = [c for c in ids if not 0 <= c < classes]
        if not ids or bad or len(set(ids)) != len(ids):
            why = f"{bad[0]} is not a class index" if bad else "empty" if not ids else "an index twice"
            raise ConfigError(f"submit.class_ids: {list(ids)}: {why}. Expected distinct class indices "
                              f"0..{classes - 1} of this {classes}-class run, or null (1..{classes - 1}).")
    return ids, tuple(class_names[c] if class_names else str(c) for c in ids)


def write_submission(path: str | os.PathLike, items: Iterable[tuple[str, np.ndarray]],
                     cfg: SubmitConfig | None = None, classes: int = 1) -> int:
    """Write every ``(id, mask)`` of ``items`` (consumed lazily) to a submission file.

    Args:
        classes: 1 (binary masks) or the run's K > 1 (masks of class indices, one row per class).

    Returns:
        The number of rows written.
    """
    with SubmissionWriter.from_config(path, cfg or SubmitConfig(), classes) as sub:
        for name, mask in items:
            sub.write(name, mask)
    return sub.count


def read_submission(path: str | os.PathLike) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
    """Read a submission back: ``(header, rows)``, each row a tuple as wide as the header (two
    columns: ``(id, rle)``; three: ``(id, class, rle)``); gzip when the name ends in .gz."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: submission file not found.")
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", newline="") as fh:
        rows = list(csv.reader(fh))
    if not rows or len(rows[0]) not in (2, 3):
        raise DataError(f"{path}: expected a header of two or three columns, got {rows[0] if rows else 'nothing'}.")
    width = len(rows[0])
    return tuple(rows[0]), [tuple(r[:width]) + ("",) * (width - len(r)) for r in rows[1:]]
