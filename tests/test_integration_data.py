"""The data plane end to end on real data: source -> `tfseg tfrecords` -> `tfseg verify` -> a batch.

ISBI 2012 through its recipe (configs/isbi2012.yaml), Carvana arranged in Kaggle's layout, CamVid
as 12 classes; then every bad input of the writer, each a one-line error with no shard left behind.
The CLI runs in-process (`tfseg.cli.main`), the same code path as the console script.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import yaml
from PIL import Image

from tests.conftest import ROOT, shared_path
from tests.kaggle_layouts import carvana_layout
from tfseg import cli
from tfseg.config import load_config
from tfseg.data import sources
from tfseg.data.augment import check_ops
from tfseg.data.folds import fold_split, kfold_files
from tfseg.data.pipeline import dataset_from_config
from tfseg.data.tfrecord import count_records, shard_files, verify_dir
from tfseg.errors import DataError

RECIPES = {"isbi2012": 30, "kvasir": 900, "camvid": 6}  # recipe -> entries it lists


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_batch(cfg, files, groups=None):
    ds = dataset_from_config(cfg, files, training=True, groups=groups)
    image, mask = next(iter(ds))
    return image.numpy(), mask.numpy(), image.dtype, mask.dtype


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_loads_and_its_data_section_is_right(name, monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = load_config(f"configs/{name}.yaml")
    assert cfg.data.tfrecord_dir == f"tfrecords/{name}"
    # a model for any size when validation windows differ from the training crops (data.val_size)
    flexible = cfg.data.val_size not in (None, cfg.data.image_size)
    assert cfg.model.input_shape == ((None, None) if flexible else cfg.data.image_size) + (cfg.data.channels,)
    assert all(s % 32 == 0 for s in cfg.data.image_size)
    check_ops(cfg.augment.ops, cfg.data.channels)
    shared_path()
    assert len(sources.list_entries(cfg.data)) == RECIPES[name]


def test_isbi_recipe_tfrecords_verify_folds_and_an_augmented_batch(tmp_path, capsys, monkeypatch):
    shared_path("isbi2012_em_membrane")
    monkeypatch.chdir(ROOT)  # the recipe's paths are relative to the project root
    out = tmp_path / "isbi2012"
    code, stdout, err = run_cli(capsys, "tfrecords", "--config", "configs/isbi2012.yaml",
                                "--set", f"data.tfrecord_dir={out}", "--set", "data.workers=1")
    assert code == 0, err
    assert re.search(r"wrote 30 records in 6 shards \(\d+\.\d MiB\)", stdout)
    assert [Path(f).name for f in shard_files(out)] == [f"isbi2012-{k:03d}-5.tfrec" for k in range(6)]
    saved = load_config(out / "config.yaml")
    assert saved == load_config("configs/isbi2012.yaml", [f"data.tfrecord_dir={out}", "data.workers=1"])

    code, stdout, err = run_cli(capsys, "verify", out)
    assert code == 0, err
    assert "OK, 30 records in 6 shards" in stdout and "sizes 512x512, mask values [0, 1]" in stdout

    split = fold_split(out, saved.train.folds, 0, saved.train.seed)
    assert (split.n_train, split.n_val, len(split.val_groups)) == (24, 6, 6)
    image, mask, idt, mdt = one_batch(saved.replace(train={"batch_size": 4}), split.train_files,
                                      groups=split.train_groups)
    assert idt == tf.float32 and image.shape == (4, 256, 256, 1)
    assert mdt == tf.float32 and mask.shape == (4, 256, 256, 1)
    assert 0.0 <= image.min() and image.max() <= 255.0 and image.max() > 100.0
    assert set(np.unique(mask)) == {0.0, 1.0}  # membranes and interiors in every crop batch
    assert 0.6 < mask.mean() < 0.95  # ISBI: about 78 % interior

    # a real shard chopped short: verify exits 2 and names it
    victim = Path(shard_files(out)[3])
    victim.write_bytes(victim.read_bytes()[:-1000])
    code, _, err = run_cli(capsys, "verify", out)
    assert code == 2 and victim.name in err and err.count("\n") == 1


def test_carvana_kaggle_layout_to_a_batch(tmp_path, capsys):
    truth = carvana_layout(tmp_path / "carvana", views=4)
    out = tmp_path / "shards" / "carvana"
    recipe = {"data": {"source": "carvana", "root": str(tmp_path / "carvana"), "classes": 1, "channels": 3,
                       "tfrecord_dir": str(out), "shards": 2, "workers": 1, "image_format": "jpeg",
                       "image_size": [160, 224]},
              "augment": {"ops": [{"name": "flip_left_right", "p": 0.5},
                                  {"name": "shift_scale_rotate", "p": 1.0}]},
              "train": {"batch_size": 2, "folds": 2}}
    (tmp_path / "carvana.yaml").write_text(yaml.safe_dump(recipe))
    code, stdout, err = run_cli(capsys, "tfrecords", "--config", tmp_path / "carvana.yaml")
    assert code == 0, err
    assert count_records(shard_files(out)) == 4
    summary = verify_dir(out)
    assert summary["min_size"] == [480, 720] and summary["mask_values"] == [0, 1]
    cfg = load_config(out / "config.yaml")
    image, mask, idt, mdt = one_batch(cfg, shard_files(out))
    assert image.shape == (2, 160, 224, 3) and idt == tf.float32 and 0 <= image.min() <= image.max() <= 255
    assert mask.shape == (2, 160, 224, 1) and set(np.unique(mask)) <= {0.0, 1.0} and mask.max() == 1.0
    assert 0.05 < mask.mean() < 0.4 and 0.05 < np.mean(list(truth.values())[0]) < 0.4  # ~18 % car
    # one car = one group: grouped folds refuse, the notebooks' KFold over shard files works
    with pytest.raises(DataError, match=r"1 group cannot make 2 folds \(train.folds\)\. Expected at least 2"):
        fold_split(out, 2, 0, 42)
    train, val = kfold_files(shard_files(out), 2, 0, 42)
    assert len(train) == len(val) == 1
    # the folder is not written twice unless asked; --output picks another folder (and prefix)
    code, _, err = run_cli(capsys, "tfrecords", "--config", tmp_path / "carvana.yaml")
    assert code == 2 and "already holds 2 shards" in err and "--overwrite" in err
    code, _, err = run_cli(capsys, "tfrecords", "--config", tmp_path / "carvana.yaml", "--overwrite",
                           "--output", tmp_path / "shards" / "cars", "--set", "data.shards=3")
    assert code == 0, err
    assert [Path(f).name for f in shard_files(tmp_path / "shards" / "cars")] == [
        "cars-000-2.tfrec", "cars-001-1.tfrec", "cars-002-1.tfrec"]


def test_camvid_multiclass_to_a_batch(tmp_path, capsys, monkeypatch):
    shared_path("camvid_sample", "train")
    monkeypatch.chdir(ROOT)
    out = tmp_path / "camvid"
    code, stdout, err = run_cli(capsys, "tfrecords", "--config", "configs/camvid.yaml",
                                "--set", f"data.tfrecord_dir={out}", "--set", "data.workers=1",
                                "--set", "data.image_size=[96,128]", "--set", "train.batch_size=3")
    assert code == 0, err
    code, stdout, err = run_cli(capsys, "verify", out)
    assert code == 0, err
    summary = verify_dir(out)
    assert summary["records"] == 6 and summary["min_size"] == [720, 960]
    assert len(summary["mask_values"]) >= 8 and max(summary["mask_values"]) <= 11
    image, mask, idt, mdt = one_batch(load_config(out / "config.yaml"), shard_files(out))
    assert image.shape == (3, 96, 128, 3) and idt == tf.float32 and 0 <= image.min() <= image.max() <= 255
    assert mask.shape == (3, 96, 128, 1) and mdt == tf.int32
    assert 0 <= mask.min() and mask.max() <= 11 and len(np.unique(mask)) >= 5


# ---------------------------------------------------------------------------------------------
# Bad input: a one-line error naming the file, exit 2, and no shard left behind
# ---------------------------------------------------------------------------------------------


def _folder(root: Path, n: int = 4) -> None:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (16, 12, 3), np.uint8)).save(root / "images" / f"im{i}.png")
        Image.fromarray((rng.random((16, 12)) > 0.5).astype(np.uint8)).save(root / "masks" / f"im{i}.png")


def _unreadable(root):
    (root / "images" / "im2.png").write_bytes(b"not a png at all")
    return "im2.png"


def _mask_missing(root):
    (root / "masks" / "im1.png").unlink()
    return "im1.png"


def _size_mismatch(root):
    Image.fromarray(np.zeros((16, 11), np.uint8)).save(root / "masks" / "im3.png")
    return "im3"


def _value_outside(root):
    Image.fromarray(np.full((16, 12), 7, np.uint8)).save(root / "masks" / "im2.png")
    return "im2"


def _empty(root):
    for p in (root / "images").iterdir():
        p.unlink()
    return "images"


@pytest.mark.parametrize("damage", [_unreadable, _mask_missing, _size_mismatch, _value_outside, _empty])
def test_bad_input_is_one_line_and_leaves_no_shard(tmp_path, capsys, damage):
    root = tmp_path / "data"
    _folder(root)
    named = damage(root)
    out = tmp_path / "out" / "set"
    code, stdout, err = run_cli(capsys, "tfrecords", "--config", ROOT / "params.yaml",
                                "--set", "data.source=folder", "--set", f"data.root={root}",
                                "--set", "data.classes=3", "--set", f"data.tfrecord_dir={out}",
                                "--set", "data.shards=2", "--set", "data.workers=1")
    assert code == 2
    shown = err.split("\r")[-1]  # what the terminal shows once the progress bar erased itself
    assert shown.startswith("tfseg tfrecords: error: ") and shown.count("\n") == 1 and named in shown
    assert "Traceback" not in err
    assert not out.exists()
    assert not list(tmp_path.rglob("*.tfrec")) and not list(tmp_path.rglob("*.part"))


def test_carvana_sample_one_car_is_one_group_and_the_documented_overrides_make_folds(monkeypatch):
    """The sample is 16 views of one car: the recipe says `1 group cannot make 5 folds` (it said `1 groups`),
    and the overrides of configs/README.md read it as 16 groups of one image each."""
    from tfseg.train_checks import check_folds

    root = shared_path("carvana_sample")
    monkeypatch.chdir(ROOT)
    recipe = ROOT / "configs" / "carvana_unet.yaml"
    cfg = load_config(recipe, [f"data.root={root}"])
    assert {e.group for e in sources.list_entries(cfg.data)} == {"0cdf5b5d0ce1"}
    with pytest.raises(DataError) as err:
        check_folds(cfg, have_shards=False)
    assert str(err.value) == (f"data.root {root}: 1 group cannot make 5 folds (train.folds). Expected at least 5 "
                              "distinct groups (the records of one group, such as one car or one patient, are never "
                              "split between folds).")
    # the command of configs/README.md, "Trying the Carvana recipes on the sample"
    text = (ROOT / "configs" / "README.md").read_text(encoding="utf-8")
    block = re.search(r"## Trying the Carvana recipes.*?```bash\n(.*?)```", text, re.S)[1].replace("\\\n", " ")
    words = shlex.split(block)
    assert words[:3] == ["tfseg", "train", "--config"] and words[3] == "configs/carvana_unet.yaml"
    overrides = [words[i + 1] for i, w in enumerate(words) if w == "--set"]
    assert "data.source=folder" in overrides and "data.mask_suffix=_mask" in overrides
    overrides = [f"data.root={root}" if o.startswith("data.root=") else o for o in overrides]
    cfg = load_config(recipe, overrides)
    entries = sources.list_entries(cfg.data)
    assert len(entries) == 16 and len({e.group for e in entries}) == 16
    check_folds(cfg, have_shards=False)
    sample = next(iter(sources.read_entry(cfg.data, entries[0])))
    assert sample.image.shape == (480, 720, 3) and set(np.unique(sample.mask)) == {0, 1}
