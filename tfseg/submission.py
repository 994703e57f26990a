"""Streaming submission files: one ``id,rle`` row per image, written as each prediction is made.

Memory does not grow with the test set: each mask is run-length encoded (:mod:`tfseg.rle`) and
its row written and flushed at once (the Carvana winners' ``PredictionsSaverCallback`` wrote a
``submit.csv.gz`` for 100k images this way). The file appears under its final name only when
the writer is closed without error (:func:`tfseg.files.atomic_path`); ``*.csv.gz`` is gzipped.

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
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from tfseg import rle
from tfseg.config import SubmitConfig
from tfseg.errors import DataError, RunError
from tfseg.files import atomic_path

SUFFIXES = (".csv", ".csv.gz")


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
    """Context manager writing ``id_column,rle_column`` rows one mask at a time.

    Args:
        path: ``*.csv`` or ``*.csv.gz`` (gzip).
        id_column, rle_column: header names (Carvana ``img,rle_mask``; HuBMAP ``id,predicted``).
        pixel_order: ``row`` (Carvana) or ``column`` (HuBMAP), see :mod:`tfseg.rle`.
    """

    def __init__(self, path: str | os.PathLike, id_column: str = "img", rle_column: str = "rle_mask",
                 pixel_order: str = "row"):
        if not is_submission_path(path):
            raise DataError(f"{path}: submission file name. Expected it to end with .csv or .csv.gz.")
        rle.encode(np.zeros((1, 1), np.uint8), pixel_order)  # check the order before opening anything
        self.path = Path(path)
        self.columns = (id_column, rle_column)
        self.pixel_order = pixel_order
        self.count = 0
        self._ids: set[str] = set()
        self._stack: contextlib.ExitStack | None = None
        self._writer = None
        self._fh: io.TextIOBase | None = None

    @classmethod
    def from_config(cls, path: str | os.PathLike, cfg: SubmitConfig) -> SubmissionWriter:
        """A writer with the columns and pixel order of the ``submit`` section."""
        return cls(path, cfg.id_column, cfg.rle_column, cfg.pixel_order)

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

    def write(self, image_id: str, mask: np.ndarray) -> str:
        """Encode ``mask`` (uint8/bool [H, W], non-zero = foreground) and write its row.

        Returns:
            The RLE string written ("" for an empty mask).

        Raises:
            DataError: the id was already written (two inputs with the same name).
        """
        return self._write_row(image_id, lambda: rle.runs(mask, self.pixel_order))

    def write_bands(self, image_id: str, bands: Iterable[tuple[int, np.ndarray]], height: int,
                    width: int) -> str:
        """As :meth:`write`, for a mask that arrives as row bands (``Predictor.mask_bands``): the
        whole mask is never held, in either pixel order (:func:`tfseg.rle.runs_from_bands`)."""
        return self._write_row(image_id, lambda: rle.runs_from_bands(bands, height, width, self.pixel_order))

    def _write_row(self, image_id: str, make_runs) -> str:
        if self._writer is None:
            raise RunError(f"{self.path}: SubmissionWriter.write called outside its `with` block.")
        if image_id in self._ids:
            raise DataError(f"{self.path}: id {image_id!r} written twice. Expected unique image names.")
        self._ids.add(image_id)
        text = rle.format_runs(make_runs())
        self._writer.writerow((image_id, text))
        self._fh.flush()
        self.count += 1
        return text

    def __exit__(self, *exc) -> None:
        stack, self._stack, self._writer, self._fh = self._stack, None, None, None
        if stack is not None:
            stack.__exit__(*exc)


def write_submission(path: str | os.PathLike, items: Iterable[tuple[str, np.ndarray]],
                     cfg: SubmitConfig | None = None) -> int:
    """Write every ``(id, mask)`` of ``items`` (consumed lazily) to a submission file.

    Returns:
        The number of rows written.
    """
    with SubmissionWriter.from_config(path, cfg or SubmitConfig()) as sub:
        for name, mask in items:
            sub.write(name, mask)
    return sub.count


def read_submission(path: str | os.PathLike) -> tuple[tuple[str, str], list[tuple[str, str]]]:
    """Read a submission back: ``(header, [(id, rle), ...])`` (gzip when the name ends in .gz)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: submission file not found.")
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", newline="") as fh:
        rows = list(csv.reader(fh))
    if not rows or len(rows[0]) != 2:
        raise DataError(f"{path}: expected a header of two columns, got {rows[0] if rows else 'nothing'}.")
    return (rows[0][0], rows[0][1]), [(r[0], r[1] if len(r) > 1 else "") for r in rows[1:]]
