"""Sources on the real data (ISBI, Kvasir, CamVid, DSB2018, Carvana) and on layouts built in tmp_path
(Kaggle's Carvana and kaggle_3m LGG trees), the normalisation rules, and every bad-input error."""

from __future__ import annotations

import json
import pickle
from dataclasses import replace

import numpy as np
import pytest
import tifffile
from PIL import Image

from tests.conftest import shared_path
from tests.kaggle_layouts import carvana_layout
from tfseg import rle
from tfseg.config import DataConfig
from tfseg.data.readers import normalise_mask, read_image, read_mask
from tfseg.data.sources import iter_samples, list_entries, read_entry
from tfseg.errors import DataError


def first(cfg: DataConfig, entry):
    samples = list(read_entry(cfg, entry))
    assert len(samples) == 1
    return samples[0]


def check_sample(sample, channels: int, classes: int):
    assert sample.image.dtype == np.uint8 and sample.image.ndim == 3 and sample.image.shape[2] == channels
    assert sample.mask.dtype == np.uint8 and sample.mask.shape == sample.image.shape[:2]
    assert int(sample.mask.max()) < max(classes, 2)


# --- real data -------------------------------------------------------------------------------


def test_isbi_gray_binary_masks_from_0_255():
    root = shared_path("isbi2012_em_membrane")
    cfg = DataConfig(source="folder", root=str(root), classes=1, channels=1)
    entries = list_entries(cfg)
    assert len(entries) == 30
    assert [e.id for e in entries] == sorted(e.id for e in entries)
    assert all(e.group == e.id for e in entries)
    pickle.loads(pickle.dumps(entries))  # entries travel to worker processes
    sample = first(cfg, entries[0])
    check_sample(sample, channels=1, classes=1)
    raw_mask = np.asarray(Image.open(root / "masks" / f"{entries[0].id}.png"))
    raw_image = np.asarray(Image.open(root / "images" / f"{entries[0].id}.png"))
    np.testing.assert_array_equal(sample.mask, (raw_mask == 255).astype(np.uint8))
    np.testing.assert_array_equal(sample.image[..., 0], raw_image)
    assert 0.6 < sample.mask.mean() < 0.9  # 255 = cell interior, about 78 %


def test_kvasir_split_and_noisy_jpeg_masks():
    root = shared_path("kvasir_seg")
    split = json.loads((root / "split.json").read_text())
    cfg = DataConfig(source="folder", root=str(root), classes=1, channels=3, split_file="split.json",
                     split="test")
    entries = list_entries(cfg)
    assert [e.id for e in entries] == sorted(split["test"])
    for entry in entries[:2]:
        sample = first(cfg, entry)
        check_sample(sample, channels=3, classes=1)
        raw = np.asarray(Image.open(entry.mask))
        assert len(np.unique(raw)) > 2  # JPEG noise is really there
        assert set(np.unique(sample.mask).tolist()) == {0, 1}
        np.testing.assert_array_equal(sample.mask, (raw.max(axis=-1) > 127).astype(np.uint8))


def test_camvid_multiclass_indices_and_out_of_range():
    root = shared_path("camvid_sample", "train")
    cfg = DataConfig(source="folder", root=str(root), classes=12, channels=3)
    entries = list_entries(cfg)
    assert len(entries) == 6
    sample = first(cfg, entries[0])
    check_sample(sample, channels=3, classes=12)
    np.testing.assert_array_equal(sample.mask, np.asarray(Image.open(entries[0].mask)))
    assert len(np.unique(sample.mask)) > 3
    with pytest.raises(DataError, match=r"masks/.*\.png: mask values \[.*\] outside classes=3"):
        first(DataConfig(source="folder", root=str(root), classes=3), entries[0])


def test_dsb2018_uint16_image_and_instance_mask(tmp_path):
    src = shared_path("stardist_dsb2018_single")
    for sub, name in (("images", "img2d.tif"), ("masks", "mask2d.tif")):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "nuclei.tif").symlink_to(src / sub / name)
    cfg = DataConfig(source="folder", root=str(tmp_path), classes=1, channels=1)
    sample = first(cfg, list_entries(cfg)[0])
    check_sample(sample, channels=1, classes=1)
    raw = tifffile.imread(src / "images" / "img2d.tif")
    instances = tifffile.imread(src / "masks" / "mask2d.tif")
    assert raw.dtype == np.uint16 and instances.max() > 100
    # per-image min-max stretch: min -> 0, max -> 255, order of values kept
    assert sample.image.min() == 0 and sample.image.max() == 255
    expected = np.round((raw - raw.min()) * 255.0 / (raw.max() - raw.min())).astype(np.uint8)
    np.testing.assert_array_equal(sample.image[..., 0], expected)
    np.testing.assert_array_equal(sample.mask, (instances > 0).astype(np.uint8))


def _carvana_tree(tmp_path, views: int = 4):
    """Kaggle's Carvana layout (tests.kaggle_layouts) plus its ``train_masks.csv`` of row-major RLE."""
    truth = carvana_layout(tmp_path, views)
    rows = ["img,rle_mask", *(f"{stem}.jpg,{rle.encode(mask, order='row')}" for stem, mask in truth.items())]
    (tmp_path / "train_masks.csv").write_text("\n".join(rows) + "\n")
    return truth


def test_carvana_gif_masks_and_rle_csv_agree(tmp_path):
    truth = _carvana_tree(tmp_path)
    gif_cfg = DataConfig(source="carvana", root=str(tmp_path), classes=1)
    csv_cfg = DataConfig(source="carvana", root=str(tmp_path), classes=1, rle_csv="train_masks.csv")
    gif_entries, csv_entries = list_entries(gif_cfg), list_entries(csv_cfg)
    assert [e.id for e in gif_entries] == sorted(truth) == [e.id for e in csv_entries]
    assert {e.group for e in gif_entries} == {"0cdf5b5d0ce1"}  # the car: all views in one fold
    assert all(e.mask.endswith("_mask.gif") for e in gif_entries)
    for g, c in zip(gif_entries[:2], csv_entries[:2]):
        a, b = first(gif_cfg, g), first(csv_cfg, c)
        check_sample(a, channels=3, classes=1)
        assert a.image.shape == (480, 720, 3)
        np.testing.assert_array_equal(a.mask, truth[g.id])
        np.testing.assert_array_equal(b.mask, truth[g.id])
        np.testing.assert_array_equal(a.image, b.image)


def test_carvana_rle_missing_row_and_wrong_size(tmp_path):
    _carvana_tree(tmp_path, views=2)
    csv = tmp_path / "train_masks.csv"
    lines = csv.read_text().splitlines()
    csv.write_text("\n".join(lines[:2]) + "\n")
    cfg = DataConfig(source="carvana", root=str(tmp_path), classes=1, rle_csv="train_masks.csv")
    with pytest.raises(DataError, match=r"train_masks.csv: no row for image 0cdf5b5d0ce1_02.jpg"):
        list_entries(cfg)
    csv.write_text(f"{lines[0]}\n{lines[1]}\n0cdf5b5d0ce1_02.jpg,1 {720 * 480 + 5}\n")
    entry = list_entries(cfg)[1]
    with pytest.raises(DataError, match=r"0cdf5b5d0ce1_02.jpg: .*past the 480x720"):
        first(cfg, entry)


def test_lgg_kaggle_3m_patients_groups_labels(tmp_path):
    rng = np.random.default_rng(0)
    for p in range(3):
        patient = tmp_path / f"TCGA_CS_{4941 + p}_19960909"
        patient.mkdir()
        for s in (1, 2):
            image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            mask = np.zeros((32, 32), np.uint8)
            if s == 2 and p != 1:
                mask[8:16, 10:20] = 255
            tifffile.imwrite(patient / f"{patient.name}_{s}.tif", image)
            tifffile.imwrite(patient / f"{patient.name}_{s}_mask.tif", mask)
    (tmp_path / "data.csv").write_text("Patient,death01\n")  # kaggle_3m keeps files beside the folders
    cfg = DataConfig(source="lgg", root=str(tmp_path), classes=1, channels=3)
    entries = list_entries(cfg)
    assert len(entries) == 6
    assert {e.group for e in entries} == {f"TCGA_CS_{4941 + p}_19960909" for p in range(3)}
    samples = list(iter_samples(cfg))
    labels = {s.id: s.label for s in samples}
    expected = {f"TCGA_CS_{4941 + p}_19960909_{s}": int(s == 2 and p != 1) for p in range(3) for s in (1, 2)}
    assert labels == expected
    tumour = next(s for s in samples if s.label == 1)
    assert tumour.mask.sum() == 80 and set(np.unique(tumour.mask).tolist()) == {0, 1}
    tumour_entry = next(e for e in entries if e.id == tumour.id)
    np.testing.assert_array_equal(tumour.image, tifffile.imread(tumour_entry.image))
    (tmp_path / "TCGA_CS_4941_19960909" / "TCGA_CS_4941_19960909_2_mask.tif").unlink()
    with pytest.raises(DataError, match=r"TCGA_CS_4941_19960909_2_mask.tif: mask missing"):
        list_entries(cfg)


# --- normalisation rules -----------------------------------------------------------------------


def test_binary_mask_rules():
    assert normalise_mask(np.array([[0, 1], [1, 0]], np.uint8), 1, 127, "m").tolist() == [[0, 1], [1, 0]]
    noisy = np.array([[0, 128], [127, 255]], np.uint8)
    assert normalise_mask(noisy, 1, 127, "m").tolist() == [[0, 1], [0, 1]]
    rgb = np.zeros((2, 2, 3), np.uint8)
    rgb[0, 1, 2] = 250
    assert normalise_mask(rgb, 1, 127, "m").tolist() == [[0, 1], [0, 0]]
    instances = np.array([[0, 3], [70, 0]], np.uint16)  # 16-bit label map: foreground = value > 0
    assert normalise_mask(instances, 1, 127, "m").tolist() == [[0, 1], [1, 0]]
    with pytest.raises(DataError, match="colour-coded mask"):
        normalise_mask(rgb, 3, 127, "m")


def test_palette_png_mask_read_as_indices_and_images_normalised(tmp_path):
    indices = np.array([[0, 1, 2], [3, 2, 1]], np.uint8)
    palette = Image.fromarray(indices, mode="L").convert("P")
    palette.putpalette([0, 0, 0, 200, 10, 10, 10, 200, 10, 10, 10, 200])
    palette.save(tmp_path / "p.png")
    assert read_mask(tmp_path / "p.png", classes=4, threshold=127).tolist() == indices.tolist()
    with pytest.raises(DataError, match=r"p.png: mask values \[3\] outside classes=3"):
        read_mask(tmp_path / "p.png", classes=3, threshold=127)
    # palette image -> RGB colours; RGBA drops alpha; RGB -> gray by luma; 16-bit PNG stretched
    rgb = read_image(tmp_path / "p.png", 3)
    assert rgb[0, 1].tolist() == [200, 10, 10]
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 7, np.uint8)]), "RGBA").save(tmp_path / "a.png")
    np.testing.assert_array_equal(read_image(tmp_path / "a.png", 3), rgb)
    assert read_image(tmp_path / "a.png", 1)[0, 1, 0] == round(0.299 * 200 + 0.587 * 10 + 0.114 * 10)
    wide = np.array([[1000, 2000], [3000, 1000]], np.uint16)
    Image.fromarray(wide).save(tmp_path / "w.png")
    assert read_image(tmp_path / "w.png", 1)[..., 0].tolist() == [[0, 128], [255, 0]]
    assert read_image(tmp_path / "w.png", 3).shape == (2, 2, 3)


# --- bad input -------------------------------------------------------------------------------


def _folder(tmp_path, n=2, size=(8, 6), mask_size=None):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for i in range(n):
        Image.fromarray(np.full((*size, 3), 40 * i, np.uint8)).save(tmp_path / "images" / f"im{i}.png")
        mask = np.zeros(mask_size or size, np.uint8)
        mask[:2] = 255
        Image.fromarray(mask).save(tmp_path / "masks" / f"im{i}_mask.png")
    return DataConfig(source="folder", root=str(tmp_path), classes=1, mask_suffix="_mask")


def test_folder_mask_suffix_and_extension(tmp_path):
    cfg = _folder(tmp_path)
    assert [e.id for e in list_entries(cfg)] == ["im0", "im1"]
    sample = first(cfg, list_entries(cfg)[1])
    assert sample.image[0, 0].tolist() == [40, 40, 40] and sample.mask[:2].all() and not sample.mask[2:].any()
    for p in (tmp_path / "masks").iterdir():
        Image.open(p).save(p.with_suffix(".gif"))
        p.unlink()
    gif = DataConfig(source="folder", root=str(tmp_path), classes=1, mask_suffix="_mask", mask_ext=".gif")
    np.testing.assert_array_equal(first(gif, list_entries(gif)[1]).mask, sample.mask)


def test_empty_folder(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    (tmp_path / "images" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=r"images: no image files"):
        list_entries(DataConfig(source="folder", root=str(tmp_path), classes=1))
    with pytest.raises(DataError, match=r"data.root: .*missing is not a folder"):
        list_entries(DataConfig(source="folder", root=str(tmp_path / "missing"), classes=1))


def test_mask_missing(tmp_path):
    cfg = _folder(tmp_path)
    (tmp_path / "masks" / "im1_mask.png").unlink()
    with pytest.raises(DataError, match=r"masks/im1_mask.png: mask missing for image im1.png"):
        list_entries(cfg)


def test_unreadable_image(tmp_path):
    cfg = _folder(tmp_path)
    (tmp_path / "images" / "im0.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    entry = list_entries(cfg)[0]
    with pytest.raises(DataError, match=r"images/im0.png: cannot read image") as err:
        first(cfg, entry)
    assert "\n" not in str(err.value)


def test_size_mismatch(tmp_path):
    cfg = _folder(tmp_path, size=(8, 6), mask_size=(8, 7))
    with pytest.raises(DataError, match=r"im0_mask.png: mask size 7x8 differs from image .*im0.png size 6x8"):
        first(cfg, list_entries(cfg)[0])


def test_mask_value_outside_classes(tmp_path):
    cfg = _folder(tmp_path)
    multi = DataConfig(source="folder", root=str(tmp_path), classes=4, mask_suffix="_mask")
    with pytest.raises(DataError, match=r"im0_mask.png: mask values \[255\] outside classes=4"):
        first(multi, list_entries(cfg)[0])


def test_split_file_errors(tmp_path):
    cfg = _folder(tmp_path)
    (tmp_path / "split.json").write_text(json.dumps({"train": ["im1"], "test": ["im0", "gone"]}))
    base = dict(source="folder", root=str(tmp_path), classes=1, mask_suffix="_mask", split_file="split.json")
    assert [e.id for e in list_entries(DataConfig(**base, split="train"))] == ["im1"]
    with pytest.raises(DataError, match=r"split.json: id 'gone' of split 'test' is not in the data"):
        list_entries(DataConfig(**base, split="test"))
    with pytest.raises(DataError, match=r"no split 'val'. Expected one of \['test', 'train'\]"):
        list_entries(DataConfig(**base, split="val"))
    (tmp_path / "split.json").write_text("{not json")
    with pytest.raises(DataError, match=r"split.json: cannot read the split file"):
        list_entries(DataConfig(**base, split="train"))
    assert list_entries(cfg)  # without split_file every pair is listed


# --- tfds ------------------------------------------------------------------------------------


def _pet_metadata(data_dir, train_examples=None):
    """Write oxford_iiit_pet's metadata (no data) so that TFDS and mock_data see it as prepared."""
    tfds = pytest.importorskip("tensorflow_datasets")
    builder = tfds.builder("oxford_iiit_pet", data_dir=str(data_dir))
    builder.data_path.mkdir(parents=True)
    if train_examples:
        template = tfds.core.naming.ShardedFileTemplate(
            data_dir=builder.data_path, dataset_name="oxford_iiit_pet", split="train",
            filetype_suffix="tfrecord")
        builder.info.set_splits(tfds.core.SplitDict([tfds.core.SplitInfo(
            name="train", shard_lengths=[train_examples], num_bytes=0, filename_template=template)]))
    builder.info.write_to_directory(builder.data_path)
    return tfds


def test_tfds_oxford_pet_trimap_to_classes_in_chunks(tmp_path, monkeypatch):
    import re

    from tfseg.data import sources_tfds

    tfds = _pet_metadata(tmp_path, train_examples=5)
    import tensorflow as tf

    rng = np.random.default_rng(0)
    examples = [{"image": rng.integers(0, 256, (10 + i, 12, 3), dtype=np.uint8),
                 "segmentation_mask": rng.integers(1, 4, (10 + i, 12, 1), dtype=np.uint8),
                 "file_name": f"Abyssinian_{i}.jpg", "label": i, "species": 0,
                 "head_bbox": np.zeros(4, np.float32)} for i in range(5)]
    asked = []

    def as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False):
        asked.append(split)
        a, b = map(int, re.fullmatch(r"train\[(\d+):(\d+)\]", split).groups())
        spec = self.info.features.get_tensor_spec()
        return tf.data.Dataset.from_generator(lambda: iter(examples[a:b]), output_signature=spec)

    monkeypatch.setattr(sources_tfds, "TFDS_CHUNK", 2)
    cfg = DataConfig(source="tfds", tfds_name="oxford_iiit_pet", tfds_split="train",
                     tfds_data_dir=str(tmp_path), classes=3, channels=3)
    with tfds.testing.mock_data(data_dir=str(tmp_path), as_dataset_fn=as_dataset):
        entries = list_entries(cfg)
        pickle.loads(pickle.dumps(entries))
        samples = list(iter_samples(cfg))
    assert [e.ref for e in entries] == ["train[0:2]", "train[2:4]", "train[4:5]"] == asked
    assert [(s.id, s.group, s.label) for s in samples] == [(f"Abyssinian_{i}", f"Abyssinian_{i}", i)
                                                           for i in range(5)]
    for sample, example in zip(samples, examples):
        check_sample(sample, channels=3, classes=3)
        np.testing.assert_array_equal(sample.image, example["image"])
        np.testing.assert_array_equal(sample.mask, example["segmentation_mask"][..., 0] - 1)


def test_tfds_mock_random_examples_are_checked(tmp_path):
    tfds = _pet_metadata(tmp_path)
    cfg = DataConfig(source="tfds", tfds_data_dir=str(tmp_path), classes=3)
    # mock_data's random examples have masks 0..254 and sizes unrelated to the image: rejected
    with tfds.testing.mock_data(num_examples=2, data_dir=str(tmp_path)):
        with pytest.raises(DataError, match=r"tfds oxford_iiit_pet/train example .*(below 1|differs)"):
            list(iter_samples(cfg))


def test_tfds_offline_fails_fast_without_tmp_files(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    import time

    from tfseg.data import sources_tfds

    if sources_tfds.is_online(sources_tfds.layout_for("oxford_iiit_pet").download_host):
        pytest.skip("the download host answers: this machine is online, the offline path cannot run")
    data_dir = tmp_path / "tfds"
    data_dir.mkdir()
    start = time.monotonic()
    with pytest.raises(DataError) as err:
        list_entries(DataConfig(source="tfds", tfds_name="oxford_iiit_pet", tfds_data_dir=str(data_dir)))
    assert time.monotonic() - start < 10
    message = str(err.value)
    assert "\n" not in message
    assert f"'oxford_iiit_pet' is not in {data_dir}" in message and "offline" in message
    assert "configs/isbi2012.yaml" in message
    assert list(data_dir.rglob("*")) == []  # nothing written, no .tmp folders


def test_tfds_unknown_name(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(DataError, match=r"data.tfds_name='oxford_iit_pet': .*not found"):
        list_entries(DataConfig(source="tfds", tfds_name="oxford_iit_pet", tfds_data_dir=str(tmp_path)))


def test_tfds_not_installed_is_one_line(monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # makes the import fail
    with pytest.raises(DataError, match=r"needs tensorflow-datasets .*pip install tensorflow-datasets"):
        list_entries(DataConfig(source="tfds", tfds_data_dir=str(tmp_path)))


def test_a_missing_split_file_names_every_place_looked_in(tmp_path, monkeypatch):
    """kvasir.yaml's split_file (../shared/data/kvasir_seg/split.json) is relative to the project; run from
    another folder with data.root set, the message said only `... not found`, not where it had looked."""
    root = shared_path("kvasir_seg")
    cfg = DataConfig(source="folder", root=str(root), classes=1, channels=3,
                     split_file="../shared/data/kvasir_seg/split.json", split="test")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as err:
        list_entries(cfg)
    assert str(err.value) == (
        "data.split_file: '../shared/data/kvasir_seg/split.json' not found; looked in data.root "
        f"({root.resolve().parent}/shared/data/kvasir_seg/split.json) and in the working directory "
        f"({tmp_path.resolve().parent}/shared/data/kvasir_seg/split.json). Expected a JSON file {{split: [ids]}} "
        "(a relative path is read from data.root, then from the working directory).")
    # both places work: data.root first, then the working directory
    assert len(list_entries(replace(cfg, split_file="split.json"))) == 100
    monkeypatch.chdir(root.parent)
    assert len(list_entries(replace(cfg, split_file="kvasir_seg/split.json"))) == 100
    with pytest.raises(DataError, match=r"^data.split_file: /nowhere/split.json not found. Expected a JSON file"):
        list_entries(replace(cfg, split_file="/nowhere/split.json"))
