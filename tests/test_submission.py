"""Streaming submission writer: columns, gzip, pixel order, atomicity, ids."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
from PIL import Image

from tests.conftest import shared_path
from tfseg import rle
from tfseg.config import SubmitConfig, load_config
from tfseg.errors import ConfigError, DataError
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


# --- multiclass runs: one row per image and class -------------------------------------------


def camvid_masks(n: int = 3):
    """Real CamVid test masks: class indices 0..11 (0 sky, 11 void; class 7, fence, absent from the first)."""
    folder = shared_path("camvid_sample", "test", "masks")
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))[:n]}


@pytest.mark.parametrize("suffix, order", [(".csv", "row"), (".csv.gz", "column")])
def test_multiclass_rows_decode_to_each_class_mask(tmp_path, suffix, order):
    """A 12-class run used to write one row per image, the RLE of `mask != 0` ("not sky"). Now each
    image gets a row per foreground class 1..11 (Severstal's long format), each row exactly the
    pixels of its class; the background 0 has no row, an absent class an empty one."""
    masks = camvid_masks()
    path = tmp_path / f"sub{suffix}"
    n = write_submission(path, masks.items(), SubmitConfig(pixel_order=order, id_column="ImageId",
                                                           rle_column="EncodedPixels"), classes=12)
    header, rows = read_submission(path)
    assert header == ("ImageId", "ClassId", "EncodedPixels")
    assert n == len(rows) == 3 * 11
    assert [(r[0], r[1]) for r in rows] == [(name, str(c)) for name in masks for c in range(1, 12)]
    for name, cls, text in rows:
        np.testing.assert_array_equal(rle.decode(text, (720, 960), order), masks[name] == int(cls))
    first = next(iter(masks))
    assert not (masks[first] == 7).any() and (first, "7", "") in rows


def test_multiclass_bands_joined_ids_names_and_skipped_empty_rows(tmp_path):
    """Bands (a huge image's stream) give the rows of the whole mask; `class_column: null` joins the
    class to the id (Understanding Clouds' `Image_Label`), `class_names` labels it, `class_ids` picks
    and orders the classes (0 included: CamVid's 0 is sky), `skip_empty` leaves out absent classes."""
    name, mask = next(iter(camvid_masks(1).items()))
    cfg = SubmitConfig(id_column="Image_Label", rle_column="EncodedPixels", class_column=None,
                       class_ids=(8, 0, 7), skip_empty=True,
                       class_names=("Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence",
                                    "Car", "Pedestrian", "Bicyclist", "Void"))
    whole, banded = tmp_path / "whole.csv", tmp_path / "banded.csv"
    with SubmissionWriter.from_config(whole, cfg, classes=12) as sub:
        texts = sub.write(name, mask)
    cuts = [0, 5, 5, 300, 719, 720]  # uneven bands, an empty one too
    with SubmissionWriter.from_config(banded, cfg, classes=12) as sub:
        assert sub.write_bands(name, ((a, mask[a:b]) for a, b in zip(cuts[:-1], cuts[1:])), 720, 960) == texts
    assert whole.read_text() == banded.read_text()
    header, rows = read_submission(whole)
    assert header == ("Image_Label", "EncodedPixels")
    assert [r[0] for r in rows] == [f"{name}_Car", f"{name}_Sky"]  # Fence (7) is absent: no row
    assert texts[7] == "" and sub.count == 2
    for (_, text), cls in zip(rows, (8, 0)):
        np.testing.assert_array_equal(rle.decode(text, mask.shape), mask == cls)


def test_binary_format_unchanged_by_the_class_keys(tmp_path):
    """A 1-class run keeps `id,rle`, one row per image, whatever `class_column` says."""
    mask = np.zeros((3, 4), np.uint8)
    mask[1, 1:3] = 255
    cfg = SubmitConfig(class_column="ClassId")
    write_submission(tmp_path / "s.csv", [("a.png", mask), ("b.png", np.zeros((3, 4), np.uint8))], cfg)
    assert (tmp_path / "s.csv").read_text() == "img,rle_mask\na.png,6 2\nb.png,\n"
    write_submission(tmp_path / "t.csv", [("a.png", mask), ("b.png", np.zeros((3, 4), np.uint8))],
                     SubmitConfig(skip_empty=True))
    assert (tmp_path / "t.csv").read_text() == "img,rle_mask\na.png,6 2\n"


@pytest.mark.parametrize("classes, keys, message", [
    (12, {"class_ids": (1, 12)}, r"submit.class_ids: \[1, 12\]: 12 is not a class index. Expected distinct "
                                 r"class indices 0..11"),
    (12, {"class_ids": (3, 3)}, "class_ids: .*an index twice"),
    (12, {"class_ids": ()}, r"class_ids: \[\]: empty"),
    (4, {"class_names": ("bg", "a", "b")}, r"submit.class_names: .*Expected 4 distinct names"),
    (4, {"class_names": ("bg", "a", "a", "b")}, "Expected 4 distinct names"),
    (1, {"class_ids": (1,)}, r"submit.class_ids: \[1\] is for multiclass runs; this run has 1 class"),
    (1, {"class_names": ("bg", "fg")}, "submit.class_names: .* is for multiclass runs"),
    (4, {"class_column": "img"}, r"columns \['img', 'img', 'rle_mask'\]. Expected distinct"),
])
def test_class_settings_that_do_not_fit_the_run_fail_before_any_file(tmp_path, classes, keys, message):
    with pytest.raises(ConfigError, match=message) as info:
        SubmissionWriter.from_config(tmp_path / "s.csv", SubmitConfig(**keys), classes=classes)
    assert "\n" not in str(info.value) and not list(tmp_path.iterdir())


@pytest.mark.parametrize("override, message", [
    ("submit.class_ids=[-1]", "submit.class_ids=.*expected at least 0"),
    ("submit.class_ids=abc", "submit.class_ids=abc: expected a list"),
    ("submit.skip_empty=maybe", "expected true or false"),
    ("submit.class_colum=x", "did you mean 'submit.class_column'"),
])
def test_class_keys_are_validated_by_the_config(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])
    cfg = load_config(None, ["submit.class_ids=[0, 2]", "submit.class_column=null"]).submit
    assert cfg.class_ids == (0, 2) and cfg.class_column is None


@pytest.mark.parametrize("mask, message", [
    (np.full((4, 4), 12, np.uint8), r"a.png: mask value 12 at rows 0..4. Expected class indices 0..11"),
    (np.full((4, 4), 0.7, np.float32), r"a.png: mask dtype float32 .*Expected class indices"),
    (np.zeros((4, 4, 1), np.uint8), r"Expected a 2-D \[H, W\] mask"),
])
def test_a_multiclass_mask_that_is_not_class_indices_writes_nothing(tmp_path, mask, message):
    with pytest.raises(DataError, match=message), SubmissionWriter(tmp_path / "s.csv", classes=12) as sub:
        sub.write("a.png", mask)
    assert not list(tmp_path.iterdir())


def test_cli_writes_one_row_per_image_and_class_for_a_multiclass_run(tmp_path, monkeypatch, capsys):
    """`tfseg predict --output sub.csv` of a 12-class CamVid run wrote one row per image, the RLE of
    `mask != 0` ("not sky"). A (4-class) run now writes a row per image and class 1..3, each the
    pixels of its class in the mask the run predicts, whether that mask is held (small images) or
    streamed by bands (huge ones)."""
    from tests.test_whole_image import fixed_model
    from tfseg import predict_cli
    from tfseg.cli import main
    from tfseg.config import dump_config
    from tfseg.inference import Predictor

    run = tmp_path / "run"
    dump_config(load_config(None, ["data.classes=4", "data.fit=resize", "data.image_size=[64, 96]"]),
                run / "config.yaml")
    (run / "fold0").mkdir()
    fixed_model(classes=4).save(run / "fold0" / "best.keras")
    inputs = sorted(shared_path("camvid_sample", "test", "images").iterdir())[:2]
    args = ["predict", "--run", str(run), "--input", *map(str, inputs), "--output"]
    assert main([*args, str(tmp_path / "held.csv")]) == 0
    assert "(6 rows)" in capsys.readouterr().out
    monkeypatch.setattr(predict_cli, "WINDOWED_PIXELS", 1000)  # every image streamed by bands
    assert main([*args, str(tmp_path / "bands.csv")]) == 0
    assert (tmp_path / "held.csv").read_text() == (tmp_path / "bands.csv").read_text()
    header, rows = read_submission(tmp_path / "held.csv")
    assert header == ("img", "ClassId", "rle_mask")
    assert [(r[0], r[1]) for r in rows] == [(p.name, str(c)) for p in inputs for c in (1, 2, 3)]
    cfg = load_config(run / "config.yaml")
    predictor = Predictor.from_run(run, "all", cfg.infer, cfg.data)
    masks = {p.name: predictor.predict_mask(np.asarray(Image.open(p).convert("RGB"))) for p in inputs}
    assert any(set(np.unique(m)) - {0} for m in masks.values())  # the rows are not all empty
    for name, cls, text in rows:
        np.testing.assert_array_equal(rle.decode(text, (720, 960)), masks[name] == int(cls))
