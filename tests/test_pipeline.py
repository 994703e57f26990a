"""The tf.data pipeline over real shards written in tmp_path (ISBI 2012 and Carvana crops)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tests.conftest import ROOT, shared_path
from tfseg.config import load_config
from tfseg.data.pipeline import check_global_batch, dataset_from_config, make_dataset
from tfseg.data.sample import Sample
from tfseg.data.tfrecord import encode_example, shard_name
from tfseg.errors import ConfigError, DataError


def write_shards(folder, samples, per_shard=4, image_format="png"):
    """Shards in the agreed layout, written with the real schema (tfrecord.encode_example)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for shard, start in enumerate(range(0, len(samples), per_shard)):
        chunk = samples[start:start + per_shard]
        path = folder / shard_name("test", shard, len(chunk))
        with tf.io.TFRecordWriter(str(path)) as writer:
            for s in chunk:
                writer.write(encode_example(s, image_format=image_format))
        files.append(str(path))
    return files


def isbi_samples(n=10, size=48):
    """Crops of the ISBI slices; the mask is 1 where the image is bright (a function of the image)."""
    folder = shared_path("isbi2012_em_membrane", "images")
    samples = []
    for i in range(n):
        image = np.asarray(Image.open(folder / f"{i % 30}.png").convert("L"))
        y, x = (i * 37) % 400, (i * 53) % 400
        image = image[y:y + size, x:x + size, None]
        samples.append(Sample(f"isbi{i:02d}", f"g{i % 3}", image, (image[..., 0] > 128).astype(np.uint8)))
    return samples


@pytest.fixture(scope="module")
def isbi_files(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("isbi"), isbi_samples())


@pytest.fixture(scope="module")
def carvana_files(tmp_path_factory):
    root = shared_path("carvana_sample")
    samples = []
    for i, path in enumerate(sorted((root / "images").glob("*.png"))[:6]):
        image = np.asarray(Image.open(path).convert("RGB").resize((60, 40)))
        mask = np.asarray(Image.open(root / "masks" / f"{path.stem}_mask.png").convert("L").resize((60, 40)))
        mask = (mask > 127).astype(np.uint8) + (image.mean(-1) > 200).astype(np.uint8)  # 3 classes
        samples.append(Sample(path.stem, f"car{i % 2}", image, mask))
    return write_shards(tmp_path_factory.mktemp("carvana"), samples, per_shard=3, image_format="jpeg")


def batches(ds, n=None):
    return [tuple(np.asarray(t) for t in b) for b in (ds.take(n) if n else ds)]


def test_binary_validation_batches(isbi_files):
    ds = make_dataset(isbi_files, batch_size=4, training=False, image_size=(32, 32), channels=1, classes=1)
    assert ds.element_spec[0].shape.as_list() == [None, 32, 32, 1]
    out = batches(ds)
    assert [len(b[0]) for b in out] == [4, 4, 2]  # no drop_remainder, no repeat
    image, mask = out[0]
    assert image.dtype == np.float32 and 0 <= image.min() and image.max() <= 255 and image.max() > 100
    assert mask.dtype == np.float32 and mask.shape == (4, 32, 32, 1) and set(np.unique(mask)) == {0.0, 1.0}
    # resize: image bilinear, mask nearest; the mask still follows the image on clear pixels
    clear = (image > 170) | (image < 90)
    assert ((image > 128) == (mask > 0.5))[clear].mean() > 0.97


def test_multiclass_training_batches_random_crop_and_augment(carvana_files):
    ops = [{"name": "flip_left_right", "p": 0.5}, {"name": "rot90", "p": 0.5},
           {"name": "shift_scale_rotate", "p": 0.5}, {"name": "hue", "p": 0.5}]
    ds = make_dataset(carvana_files, batch_size=4, training=True, image_size=(48, 48), fit="random_crop",
                      augment_ops=ops, channels=3, classes=3, seed=1)
    assert ds.element_spec[1].shape.as_list() == [4, 48, 48, 1]
    for image, mask in batches(ds, 4):  # 6 records, repeated: drop_remainder keeps batches full
        assert image.shape == (4, 48, 48, 3) and image.dtype == np.float32
        assert mask.dtype == np.int32 and set(np.unique(mask)) <= {0, 1, 2}
        assert 0 <= image.min() and image.max() <= 255


def test_validation_random_crop_is_central_and_padded(isbi_files):
    # deterministic: the test reads the shard's first record (a parallel map may reorder otherwise)
    ds = make_dataset(isbi_files[:1], batch_size=1, training=False, image_size=(64, 40), fit="random_crop",
                      channels=1, with_ids=True, deterministic=True)
    image, mask, ident = batches(ds, 1)[0]
    assert image.shape == (1, 64, 40, 1) and ident[0] == b"isbi00"
    assert np.all(image[0, :8] == 0) and np.all(image[0, -8:] == 0) and np.all(mask[0, :8] == 0)
    assert image[0, 8:-8].max() > 0  # 48 rows of data, centered; 4 columns cut on each side
    first = isbi_samples(1)[0].image[:, 4:44, 0]
    np.testing.assert_array_equal(image[0, 8:-8, :, 0], first)


def test_drop_remainder_and_repeat(isbi_files):
    ds = make_dataset(isbi_files, batch_size=4, training=True, image_size=(32, 32), channels=1, repeat=False)
    assert [len(b[0]) for b in batches(ds)] == [4, 4]
    ds = make_dataset(isbi_files, batch_size=4, training=False, image_size=(32, 32), channels=1, repeat=2,
                      drop_remainder=True)
    assert [len(b[0]) for b in batches(ds)] == [4] * 5


def test_deterministic_runs_give_identical_batches(carvana_files):
    ops = [{"name": "flip_left_right", "p": 0.5}, {"name": "shift_scale_rotate", "p": 0.7},
           {"name": "brightness", "p": 0.5}, {"name": "gaussian_noise", "p": 0.5}]

    def run(seed):
        return batches(make_dataset(carvana_files, batch_size=2, training=True, image_size=(32, 32),
                                    augment_ops=ops, classes=3, seed=seed, deterministic=True,
                                    shuffle_buffer=8), 6)

    a, b, c = run(3), run(3), run(4)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x[0], y[0])
        np.testing.assert_array_equal(x[1], y[1])
    assert any(not np.array_equal(x[0], z[0]) for x, z in zip(a, c))
    # a new draw every epoch: 6 records, batch 2 -> the second epoch (batches 3..5) differs
    assert any(not np.array_equal(a[i][0], a[i + 3][0]) for i in range(3))


def test_group_filtering(isbi_files):
    ds = make_dataset(isbi_files, batch_size=3, training=False, image_size=(16, 16), channels=1,
                      groups={"g0", "g2"}, with_ids=True)
    ids = sorted(i.decode() for b in batches(ds) for i in b[2])
    assert ids == [f"isbi{i:02d}" for i in range(10) if i % 3 != 1]
    with pytest.raises(DataError, match="groups"):
        make_dataset(isbi_files, batch_size=3, training=False, image_size=(16, 16), groups=[])


def test_fit_none_mask_crop_and_cache(isbi_files):
    ds = make_dataset(isbi_files, batch_size=5, training=False, fit="none", image_size=(48, 48), channels=1,
                      mask_crop=(20, 20), cache=True)
    for _ in range(2):  # second pass reads the cache
        image, mask = batches(ds, 1)[0]
        assert image.shape == (5, 48, 48, 1) and mask.shape == (5, 20, 20, 1)
        np.testing.assert_array_equal(mask[..., 0], (image[:, 14:34, 14:34, 0] > 128).astype(np.float32))
    same, plain = (make_dataset(isbi_files, batch_size=5, training=False, fit=fit, image_size=(48, 48),
                                channels=1, deterministic=True) for fit in ("resize", "none"))
    np.testing.assert_array_equal(batches(same, 1)[0][0], batches(plain, 1)[0][0])  # already the size
    wrong = make_dataset(isbi_files, batch_size=5, training=False, fit="none", image_size=(32, 32),
                         channels=1)
    with pytest.raises(tf.errors.InvalidArgumentError, match="data.fit=none"):
        batches(wrong, 1)


def test_geometric_augmentation_keeps_alignment_through_the_pipeline(isbi_files):
    ops = [{"name": "rot90", "p": 0.5}, {"name": "shift_scale_rotate", "p": 1.0, "rotate": 30},
           {"name": "elastic", "p": 0.5, "sigma": 4.0}]
    ds = make_dataset(isbi_files, batch_size=5, training=True, fit="none", image_size=(48, 48), channels=1,
                      augment_ops=ops, seed=5)
    for image, mask in batches(ds, 2):
        clear = (image > 170) | ((image < 90) & (image > 0))
        assert ((image > 128) == (mask > 0.5))[clear].mean() > 0.98


def test_errors_come_before_any_data(isbi_files, tmp_path):
    with pytest.raises(ConfigError, match=r"augment\.ops\[0\]: Received: name='flip'"):
        make_dataset(isbi_files, batch_size=2, training=True, image_size=(8, 8),
                     augment_ops=[{"name": "flip"}])
    with pytest.raises(ConfigError, match=r"augment\.ops\[0\]\.p=2"):  # checked for validation too
        make_dataset(isbi_files, batch_size=2, training=False, image_size=(8, 8),
                     augment_ops=[{"name": "rot90", "p": 2}])
    with pytest.raises(ConfigError, match="saturation needs RGB"):
        make_dataset(isbi_files, batch_size=2, training=True, image_size=(8, 8), channels=1,
                     augment_ops=[{"name": "saturation"}])
    with pytest.raises(DataError, match="missing-000-3.tfrec: TFRecord shard not found"):
        make_dataset([str(tmp_path / "missing-000-3.tfrec")], batch_size=2, training=False, image_size=(8, 8))
    with pytest.raises(DataError, match="no TFRecord files"):
        make_dataset([], batch_size=2, training=False, image_size=(8, 8))
    with pytest.raises(ConfigError, match="fit='crop'"):
        make_dataset(isbi_files, batch_size=2, training=False, image_size=(8, 8), fit="crop")
    with pytest.raises(ConfigError, match="mask_crop"):
        make_dataset(isbi_files, batch_size=2, training=False, image_size=(8, 8), mask_crop=(9, 9))


def test_check_global_batch():
    assert check_global_batch(16, 8) == 128
    with pytest.raises(ConfigError, match=r"train.batch_size=0: expected a positive integer"):
        check_global_batch(0, 2)
    with pytest.raises(ConfigError, match=r"replicas=-1"):
        check_global_batch(4, -1)


def test_dataset_from_config(carvana_files):
    cfg = load_config(None).replace(
        data={"image_size": [24, 32], "classes": 3, "deterministic": True},
        augment={"ops": [{"name": "flip_up_down", "p": 0.5}, {"name": "gamma", "p": 0.5}]},
        train={"batch_size": 2, "seed": 7})
    ds = dataset_from_config(cfg, carvana_files, training=True, global_batch=check_global_batch(2, 2))
    image, mask = batches(ds, 1)[0]
    assert image.shape == (4, 24, 32, 3) and mask.shape == (4, 24, 32, 1) and mask.dtype == np.int32
    val = dataset_from_config(cfg, carvana_files, training=False, groups=["car0"])
    assert sum(len(b[0]) for b in batches(val)) == 3


DISTRIBUTED = textwrap.dedent("""
    import json, sys
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from tfseg.data.pipeline import check_global_batch, make_dataset
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    batch = check_global_batch(2, strategy.num_replicas_in_sync)
    ds = make_dataset(sys.argv[2:], batch_size=batch, training=True, image_size=(16, 16), channels=1,
                      augment_ops=[{"name": "flip_left_right", "p": 0.5}])
    dist = strategy.experimental_distribute_dataset(ds)
    images, masks = next(iter(dist))
    shapes = [list(t.shape) for t in strategy.experimental_local_results(images)]
    shapes += [list(t.shape) for t in strategy.experimental_local_results(masks)]
    result = {"replicas": strategy.num_replicas_in_sync, "shapes": shapes}
    if sys.argv[1] == "fit":
        import keras
        with strategy.scope():
            inputs = keras.Input((16, 16, 1))
            outputs = keras.layers.Conv2D(1, 3, padding="same", activation="sigmoid")(inputs)
            model = keras.Model(inputs, outputs)
            model.compile("adam", "binary_crossentropy")
        result["loss"] = model.fit(ds, steps_per_epoch=2, epochs=1, verbose=0).history["loss"][-1]
    print(json.dumps(result))
""")


def distributed(mode, files):
    out = subprocess.run([sys.executable, "-c", DISTRIBUTED, mode, *files], capture_output=True, text=True,
                         timeout=300, cwd=ROOT, env={"TF_CPP_MIN_LOG_LEVEL": "3", "PATH": "/usr/bin:/bin",
                                                     "KERAS_BACKEND": "tensorflow", "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["replicas"] == 2
    assert result["shapes"] == [[2, 16, 16, 1]] * 4  # global batch 4 -> 2 per replica
    return result


def test_distributes_over_two_devices_of_a_mirrored_strategy(isbi_files):
    distributed("shapes", isbi_files)


@pytest.mark.slow
def test_keras_fit_under_a_mirrored_strategy(isbi_files):
    assert np.isfinite(distributed("fit", isbi_files)["loss"])
