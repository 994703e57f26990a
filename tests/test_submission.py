"""Streaming submission writer: columns, gzip, pixel order, atomicity, ids."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
from PIL import Image

from tests.conftest import shared_path
from tfseg import rle
from tfseg.config import SubmitConfig
from tfseg.errors import DataError
from tfseg.submission import SubmissionWriter, image_id, read_submission, write_submission


def carvana_masks():
    folder = shared_path("carvana_sample", "masks")
    for path in sorted(folder.glob("*_mask.png"))[:4]:
        name = path.name.replace("_mask.png", ".jpg")
        yield name, (np.asarray(Image.open(path).convert("L")) > 127).astype(np.uint8)


@pytest.mark.parametrize("suffix", [".csv", ".csv.gz"])
def test_carvana_submission_round_trip(tmp_path, suffix):
    path = tmp_path / f"submit{suffix}"
    masks = dict(carvana_masks())
    n = write_submission(path, masks.items(), SubmitConfig())
    assert n == 4
    if suffix == ".csv.gz":
        assert gzip.open(path, "rt").readline().strip() == "img,rle_mask"
    header, rows = read_submission(path)
    assert header == ("img", "rle_mask")
    for name, text in rows:
        np.testing.assert_array_equal(rle.decode(text, masks[name].shape, "row"), masks[name])


def test_hubmap_columns_and_column_order(tmp_path):
    mask = np.zeros((5, 7), np.uint8)
    mask[1:3, 2] = 1
    cfg = SubmitConfig(id_column="id", rle_column="predicted", id_format="{stem}", pixel_order="column")
    with SubmissionWriter.from_config(tmp_path / "s.csv", cfg) as sub:
        assert sub.write(image_id("aaa.tiff", cfg.id_format), mask) == "12 2"
        sub.write("empty", np.zeros((5, 7), np.uint8))
    assert (tmp_path / "s.csv").read_text() == "id,predicted\naaa,12 2\nempty,\n"


def test_rows_are_streamed_and_file_appears_only_on_success(tmp_path):
    path = tmp_path / "s.csv"
    mask = np.ones((4, 4), np.uint8)
    with pytest.raises(RuntimeError), SubmissionWriter(path) as sub:
        sub.write("a.jpg", mask)
        tmp = next(tmp_path.glob(".s.csv.*"))
        assert tmp.read_text() == "img,rle_mask\na.jpg,1 16\n"  # flushed before the next image
        raise RuntimeError("crash mid-way")
    assert not path.exists() and not list(tmp_path.iterdir())


def test_bad_inputs(tmp_path):
    with pytest.raises(DataError, match=r"\.csv or \.csv\.gz"):
        SubmissionWriter(tmp_path / "s.txt")
    with pytest.raises(DataError, match="Expected one of"):
        SubmissionWriter(tmp_path / "s.csv", pixel_order="diagonal")
    with pytest.raises(DataError, match="'a' written twice"), SubmissionWriter(tmp_path / "s.csv") as sub:
        sub.write("a", np.zeros((2, 2)))
        sub.write("a", np.zeros((2, 2)))
    assert not (tmp_path / "s.csv").exists()
    with pytest.raises(DataError, match="not found"):
        read_submission(tmp_path / "none.csv")


def test_image_id_formats():
    assert image_id("dir/a_01.jpg") == "a_01.jpg"
    assert image_id("dir/a_01.jpg", "{stem}") == "a_01"
    assert image_id("x/2f6ecfcdf.ome.tif", "{stem}") == "2f6ecfcdf"
