"""Every recipe in configs/ loads, builds its model and pipeline on tiny data of its kind and trains.

For each ``configs/*.yaml`` the test writes a tiny data set of the recipe's layout in tmp_path
(a folder of images and masks, Kaggle's Carvana and LGG trees, HuBMAP TIFFs + column-major RLE
CSV, or TFDS mock data for Oxford Pet), points the recipe at it, shrinks sizes (image size, batch,
filter widths of the from-scratch U-Nets) and keeps what makes the recipe: architecture, backbone,
loss, optimizer, schedule, augment ops, classes, folds, metrics and monitor. Then:

* fast, every recipe: real TFRecords -> ``fold_split`` (grouped) -> ``dataset_from_config``; one
  batch has the recipe's channels, size and mask format.
* one training step: ``build_compiled_model`` (tfseg.train: the recipe's model, loss, optimizer and
  metrics) -> one ``train_on_batch`` on a pipeline batch; the loss is finite and the head's weights
  move. Fast for the recipes whose model has no keras.applications encoder (plus one pix2pix
  recipe); slow for the others (building and tracing ResNet50 / EfficientNet / the second
  MobileNetV2 recipe costs tens of CPU seconds each). The HuBMAP EfficientNet-B5 is replaced by B0
  in this test; the entry-point test below builds the B5.
* slow: the real entry point ``tfseg.train.run(cfg, "0")`` (1 epoch of 1 step) on every recipe.

The generators are also used by tests/test_notebooks.py.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tfseg import rle
from tfseg.config import load_config

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))


# ------------------------------------------------------------------------------------------------
# tiny data of each layout
# ------------------------------------------------------------------------------------------------


def _blob(rng, h: int, w: int) -> np.ndarray:
    """uint8 [h, w] 0/1: one ellipse somewhere in the middle."""
    yy, xx = np.mgrid[:h, :w]
    cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w
    ry, rx = rng.uniform(0.15, 0.3) * h, rng.uniform(0.15, 0.3) * w
    return (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1).astype(np.uint8)


def _picture(rng, mask: np.ndarray, channels: int) -> np.ndarray:
    """uint8 [h, w, channels]: saturated colour noise, brighter where the mask is set."""
    h, w = mask.shape
    base = rng.integers(30, 120, (h, w, channels))
    base[..., 0] += 100 * (mask > 0)
    return np.clip(base, 0, 255).astype(np.uint8)


def make_folder(root: Path, n: int = 6, shape=(40, 48), channels: int = 3, classes: int = 1,
                images: str = "images", masks: str = "masks", ext: str = ".png", seed: int = 0) -> Path:
    """``root/<images>/sNN<ext>`` + ``root/<masks>/sNN<ext>`` (binary 0/255, or class indices)."""
    rng = np.random.default_rng(seed)
    (root / images).mkdir(parents=True, exist_ok=True)
    (root / masks).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        mask = _blob(rng, *shape)
        if classes > 1:
            mask = (mask * (1 + i % (classes - 1))).astype(np.uint8)
            stored = mask
        else:
            stored = mask * 255
        image = _picture(rng, mask, channels)
        Image.fromarray(image[..., 0] if channels == 1 else image).save(root / images / f"s{i:02d}{ext}")
        Image.fromarray(stored).save(root / masks / f"s{i:02d}{ext}")
    return root


def make_carvana(root: Path, cars: int = 6, views: int = 2, shape=(40, 60), seed: int = 0) -> Path:
    """Kaggle's Carvana tree: ``train/<car>_NN.jpg`` + ``train_masks/<car>_NN_mask.gif`` (0/1 GIF)."""
    rng = np.random.default_rng(seed)
    (root / "train").mkdir(parents=True, exist_ok=True)
    (root / "train_masks").mkdir(parents=True, exist_ok=True)
    for c in range(cars):
        for v in range(1, views + 1):
            stem = f"{c:04x}beefcafe_{v:02d}"
            mask = _blob(rng, *shape)
            Image.fromarray(_picture(rng, mask, 3)).save(root / "train" / f"{stem}.jpg", quality=95)
            gif = Image.fromarray(mask, mode="L").convert("P")
            gif.putpalette([0, 0, 0, 255, 255, 255])
            gif.save(root / "train_masks" / f"{stem}_mask.gif")
    return root


def make_lgg(root: Path, patients: int = 6, slices: int = 2, size: int = 32, seed: int = 0) -> Path:
    """kaggle_3m: ``<root>/<patient>/<patient>_<n>.tif`` + ``_mask.tif`` (0/255); half the slices empty."""
    import tifffile

    rng = np.random.default_rng(seed)
    for p in range(patients):
        name = f"TCGA_CS_{4941 + p}_19960909"
        (root / name).mkdir(parents=True, exist_ok=True)
        for n in range(1, slices + 1):
            mask = _blob(rng, size, size) if (p + n) % 2 else np.zeros((size, size), np.uint8)
            tifffile.imwrite(root / name / f"{name}_{n}.tif", _picture(rng, mask, 3))
            tifffile.imwrite(root / name / f"{name}_{n}_mask.tif", mask * 255)
    return root


def make_hubmap(root: Path, images: int = 4, shape=(96, 128), seed: int = 0) -> Path:
    """HuBMAP: ``train/<id>.tiff`` RGB + ``train.csv`` (id,encoding) with column-major RLE."""
    import tifffile

    rng = np.random.default_rng(seed)
    (root / "train").mkdir(parents=True, exist_ok=True)
    rows = ["id,encoding"]
    for i in range(images):
        ident = f"{i:04x}e5f1c"
        mask = _blob(rng, *shape)
        tifffile.imwrite(root / "train" / f"{ident}.tiff", _picture(rng, mask, 3))
        rows.append(f"{ident},{rle.encode(mask, 'column')}")
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    return root


def pet_examples(n: int = 10, shape=(40, 48), seed: int = 0) -> list[dict]:
    """Oxford-IIIT Pet examples as TFDS yields them: trimap values 1 (pet), 2 (background), 3 (border)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        pet = _blob(rng, *shape)
        trimap = np.where(pet > 0, 1, 2).astype(np.uint8)
        trimap[1:-1, 1:-1][np.diff(pet, axis=0)[:-1, 1:-1] != 0] = 3
        out.append({"image": _picture(rng, pet, 3), "segmentation_mask": trimap[..., None],
                    "file_name": f"Abyssinian_{i}.jpg", "label": i % 2, "species": 0,
                    "head_bbox": np.zeros(4, np.float32)})
    return out


def prepare_pet_tfds(data_dir: Path, n: int) -> None:
    """Write oxford_iiit_pet's real metadata (a ``train`` split of ``n`` examples) into ``data_dir``."""
    tfds = pytest.importorskip("tensorflow_datasets")
    builder = tfds.builder("oxford_iiit_pet", data_dir=str(data_dir))
    builder.data_path.mkdir(parents=True, exist_ok=True)
    template = tfds.core.naming.ShardedFileTemplate(
        data_dir=builder.data_path, dataset_name="oxford_iiit_pet", split="train", filetype_suffix="tfrecord")
    builder.info.set_splits(tfds.core.SplitDict([tfds.core.SplitInfo(
        name="train", shard_lengths=[n], num_bytes=0, filename_template=template)]))
    builder.info.write_to_directory(builder.data_path)


@contextlib.contextmanager
def mock_pets(data_dir: Path, n: int = 10):
    """TFDS mock data: ``tfds.load('oxford_iiit_pet', split='train[a:b]')`` yields :func:`pet_examples`."""
    import tensorflow as tf
    import tensorflow_datasets as tfds

    prepare_pet_tfds(data_dir, n)
    examples = pet_examples(n)

    def as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False):
        match = re.fullmatch(r"train\[(\d+):(\d+)\]", str(split))
        a, b = (int(match[1]), int(match[2])) if match else (0, n)
        spec = self.info.features.get_tensor_spec()
        return tf.data.Dataset.from_generator(lambda: iter(examples[a:b]), output_signature=spec)

    with tfds.testing.mock_data(data_dir=str(data_dir), as_dataset_fn=as_dataset):
        yield


# ------------------------------------------------------------------------------------------------
# each recipe: its tiny data and the overrides that shrink it
# ------------------------------------------------------------------------------------------------

SMALL_UNET_ORIGINAL = [4, 4, 8, 8, 16]


def tiny_setup(recipe: str, tmp_path: Path, fast: bool = True) -> tuple[list[str], object]:
    """Write the tiny data of ``recipe`` and return (overrides, context to train in)."""
    cfg = load_config(ROOT / "configs" / recipe)
    data = tmp_path / "data"
    context: contextlib.AbstractContextManager = contextlib.nullcontext()
    size = 32
    over = [f"data.tfrecord_dir={tmp_path / 'tfrec'}", "data.workers=1", "data.shards=2",
            "data.shuffle_buffer=8", "data.cache=false", "model.encoder_weights=null",
            "train.batch_size=2", f"train.output_dir={tmp_path / 'runs'}", "train.epochs=1",
            "train.steps_per_epoch=1", "train.validation_steps=1", "train.tensorboard=false",
            "train.strategy=default", "train.steps_per_execution=1", "infer.tile_size=32"]
    groups = cfg.train.folds + 1
    source = cfg.data.source
    if source == "folder":
        make_folder(data, n=groups, channels=cfg.data.channels, classes=cfg.data.classes,
                    images=cfg.data.images, masks=cfg.data.masks)
        over += [f"data.root={data}", "data.split_file=null", "data.split=null"]
    elif source == "carvana":
        make_carvana(data, cars=groups)
        over += [f"data.root={data}"]
    elif source == "lgg":
        make_lgg(data, patients=groups, size=size)
        over += [f"data.root={data}"]
    elif source == "hubmap":
        make_hubmap(data, images=groups)
        over += [f"data.root={data}", "data.tile_size=64", "data.tile_reduce=2", "data.tile_min_tissue=0"]
    elif source == "tfds":
        over += [f"data.tfds_data_dir={data}"]
        context = mock_pets(data, n=2 * groups)
    else:  # a new source needs its tiny layout here
        raise AssertionError(f"{recipe}: no tiny data for source {source!r}")

    options = dict(cfg.model.options)
    if cfg.model.arch == "unet_original":
        size = 188  # the smallest valid input (output 4x4)
        options["filters"] = SMALL_UNET_ORIGINAL
    elif cfg.model.arch == "unet1024":
        options.update(filters=[4, 4, 8, 8], center=16)
    elif cfg.model.arch == "unet_small":
        options["filters"] = [4, 8, 8, 16]
    elif cfg.model.arch == "pix2pix_unet":
        options["filters"] = [16, 16, 16, 16]
    if options != dict(cfg.model.options):
        over.append(f"model.options={json.dumps(options)}")
    if fast and cfg.model.backbone == "efficientnetb5":
        over.append("model.backbone=efficientnetb0")  # B5 builds slowly: the slow test covers it
    over.append(f"data.image_size=[{size},{size}]")
    if cfg.data.val_size is not None:  # validation windows larger than the training crops, as the recipe's
        over.append(f"data.val_size=[{2 * size},{2 * size}]")
    return over, context


KEPT = [("model", "arch"), ("model", "activation"), ("model", "classes"), ("train", "loss"),
        ("train", "optimizer"), ("train", "lr"), ("train", "schedule"), ("train", "folds"),
        ("train", "class_weights"), ("train", "metrics"), ("train", "monitor"), ("augment", "ops"),
        ("data", "source"), ("data", "classes"), ("data", "channels"), ("data", "fit")]


def _tiny_records(recipe: str, tmp_path: Path):
    """Load ``recipe`` shrunk to tiny data, write its TFRecords; return (cfg, fold-0 split)."""
    from tfseg.data.folds import fold_split
    from tfseg.data.tfrecord import shard_files, write_tfrecords
    from tfseg.train import check_invariants

    original = load_config(ROOT / "configs" / recipe)
    overrides, context = tiny_setup(recipe, tmp_path)
    cfg = load_config(ROOT / "configs" / recipe, overrides)
    for section, key in KEPT:  # the tiny run keeps what makes the recipe
        assert getattr(getattr(cfg, section), key) == getattr(getattr(original, section), key), key
    check_invariants(cfg)
    with context:
        summary = write_tfrecords(cfg.data, progress=False)
    assert summary["records"] >= cfg.train.folds
    assert shard_files(cfg.data.tfrecord_dir)
    split = fold_split(cfg.data.tfrecord_dir, cfg.train.folds, 0, cfg.train.seed)
    assert not set(split.train_groups) & set(split.val_groups)
    assert split.n_train > 0 and split.n_val > 0
    return cfg, split


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_tiny_data_goes_through_its_pipeline(recipe, tmp_path):
    from tfseg.data.pipeline import dataset_from_config

    cfg, split = _tiny_records(recipe, tmp_path)
    for training, groups, files in ((True, split.train_groups, split.train_files),
                                    (False, split.val_groups, split.val_files)):
        ds = dataset_from_config(cfg, files, training=training, groups=groups)
        images, masks = next(iter(ds))
        h, w = cfg.data.image_size if training or cfg.data.val_size is None else cfg.data.val_size
        assert images.shape[1:] == (h, w, cfg.data.channels) and images.dtype == "float32"
        assert masks.shape[1:] == (h, w, 1)
        values = np.unique(masks.numpy())
        if cfg.data.classes == 1:
            assert masks.dtype == "float32" and set(values) <= {0.0, 1.0}
        else:
            assert masks.dtype == "int32" and values.min() >= 0 and values.max() < cfg.data.classes


def _step_marks(recipe: str):
    cfg = load_config(ROOT / "configs" / recipe)
    heavy = cfg.model.arch in ("unet", "fpn", "linknet", "pspnet") or recipe == "oxford_pet_mobilenetv2.yaml"
    return pytest.param(recipe, marks=pytest.mark.slow) if heavy else recipe


@pytest.mark.parametrize("recipe", [_step_marks(r) for r in RECIPES])
def test_recipe_builds_and_takes_a_training_step(recipe, tmp_path):
    import keras

    from tfseg.data.pipeline import dataset_from_config
    from tfseg.train import build_compiled_model, mask_crop_for

    cfg, split = _tiny_records(recipe, tmp_path)
    keras.backend.clear_session()
    model, _ = build_compiled_model(cfg, steps_per_epoch=1)
    crop = mask_crop_for(model)
    ds = dataset_from_config(cfg, split.train_files, training=True, groups=split.train_groups, mask_crop=crop)
    images, masks = next(iter(ds))
    h, w = cfg.data.image_size
    assert images.shape == (2, h, w, cfg.data.channels) and images.dtype == "float32"
    assert tuple(masks.shape[1:3]) == tuple(model.compute_output_shape(images.shape)[1:3])
    assert model.output_shape[-1] == cfg.model.classes
    head = model.trainable_weights[-1]
    before = np.array(head.numpy())
    logs = model.train_on_batch(images, masks, return_dict=True)
    assert math.isfinite(logs["loss"]), logs
    assert not np.array_equal(before, head.numpy()), "one step did not change the head's weights"
    keras.backend.clear_session()


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_trains_through_the_entry_point(recipe, tmp_path):
    """The real ``tfseg.train.run`` on tiny data, 1 epoch of 1 step (the HuBMAP B5 encoder as is)."""
    from tfseg.train import run

    overrides, context = tiny_setup(recipe, tmp_path, fast=False)
    cfg = load_config(ROOT / "configs" / recipe, overrides)
    with context:
        summary = run(cfg, "0")
    fold_dir = tmp_path / "runs" / cfg.train.name / "fold0"
    for name in ("config.yaml", "best.keras", "last.keras", "history.csv", "val_groups.json"):
        assert (fold_dir / name).is_file(), name
    assert summary["monitor"] == cfg.train.monitor and "0" in summary["folds"]


def test_every_recipe_is_documented():
    readme = (ROOT / "configs" / "README.md").read_text()
    missing = [r for r in RECIPES if f"`{r}`" not in readme]
    assert not missing, f"configs/README.md does not list {missing}"
