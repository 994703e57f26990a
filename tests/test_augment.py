"""Augmentation ops: eager and inside Dataset.map, image-mask alignment, mask values, config errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tensorflow as tf

from tfseg.data import augment
from tfseg.data.augment import AUGMENTS, check_ops, compose
from tfseg.data.geometry import affine_matrix, transform
from tfseg.errors import ConfigError

GEOMETRIC = [n for n, op in AUGMENTS.items() if op.kind == "geometric"]
COLOR = [n for n, op in AUGMENTS.items() if op.kind == "color"]
# Parameters that make each op do something large enough to test (ranges wide, p = 1).
STRONG = {
    "shift_scale_rotate": {"shift": 0.2, "scale": 0.3, "rotate": 60, "shear": 10},
    "shift_scale_rotate_reflect": {"shift": 0.2, "scale": 0.3, "rotate": 60, "border": "reflect"},
    "random_crop": {"size": [40, 64]},
    "random_resized_crop": {"scale": [0.2, 0.6]},
    "elastic": {"sigma": 6.0, "grid": 4},
    "elastic_constant": {"sigma": 6.0, "border": "constant"},
}


def checker(x, y):
    """The mask as a function of source coordinates: classes 0, 1, 2 in 4-pixel cells."""
    return ((x // 4 + y // 4) % 3).astype(np.uint8)


def coordinate_pair(h=48, w=48):
    """Image whose channels are (x + 1, y + 1, 255): it carries its own coordinates."""
    ys, xs = np.mgrid[0:h, 0:w]
    image = np.stack([xs + 1, ys + 1, np.full_like(xs, 255)], -1).astype(np.float32)
    return image, checker(xs, ys)[..., None]


def run(name_or_ops, image, mask, seed, in_map: bool):
    """Apply the ops with one seed [2] (or several [n, 2]: then lists of results come back)."""
    ops = name_or_ops if isinstance(name_or_ops, list) else [op_entry(name_or_ops)]
    fn = compose(ops)
    seeds = np.asarray(seed, np.int64)
    many = seeds.ndim == 2
    seeds = seeds if many else seeds[None]
    if in_map:  # one traced graph for every seed
        ds = tf.data.Dataset.from_tensor_slices(seeds).map(lambda s: fn(image, mask, s))
        outs = [(a.numpy(), b.numpy()) for a, b in ds]
    else:
        outs = [tuple(t.numpy() for t in fn(tf.constant(image), tf.constant(mask), tf.constant(s)))
                for s in seeds]
    return outs if many else outs[0]


def op_entry(key: str) -> dict:
    name = key.replace("_reflect", "").replace("_constant", "") if key not in AUGMENTS else key
    return {"name": name, "p": 1.0, **STRONG.get(key, {})}


def assert_aligned(image, mask, min_fraction=0.2):
    """Where a pixel is fully inside the source (channel 2 == 255) and its source coordinates are
    not at a rounding tie, the mask must be the checker of the rounded source coordinates."""
    fx, fy = image[..., 0] - 1.0, image[..., 1] - 1.0
    inside = np.abs(image[..., 2] - 255.0) < 1e-3
    untied = (np.abs(fx - np.floor(fx) - 0.5) > 0.02) & (np.abs(fy - np.floor(fy) - 0.5) > 0.02)
    check = inside & untied & (fx > -0.5) & (fy > -0.5)
    assert check.mean() >= min_fraction, f"only {check.mean():.2f} of the pixels could be checked"
    expected = checker(np.round(fx).astype(int), np.round(fy).astype(int))
    bad = check & (mask[..., 0] != expected)
    assert bad.sum() == 0, f"{bad.sum()} of {check.sum()} checked pixels misaligned"


@pytest.mark.parametrize("in_map", [False, True], ids=["eager", "dataset_map"])
@pytest.mark.parametrize("key", GEOMETRIC + ["shift_scale_rotate_reflect", "elastic_constant"])
def test_geometric_ops_keep_image_and_mask_aligned(key, in_map):
    for size in [(48, 48), (40, 56)]:
        image, mask = coordinate_pair(*size)
        for out_image, out_mask in run(key, image, mask, [[1, 2], [123, 9], [7, 3]], in_map):
            assert out_image.dtype == np.float32 and out_mask.dtype == np.uint8
            assert set(np.unique(out_mask)) <= set(np.unique(mask))
            if key == "random_crop":
                assert out_image.shape[:2] == (40, 64) and out_mask.shape == (40, 64, 1)
            else:
                assert out_image.shape == image.shape and out_mask.shape == mask.shape
            assert_aligned(out_image, out_mask, min_fraction=0.15 if key.startswith("random_crop") else 0.3)


@pytest.mark.parametrize("key", [k for k in GEOMETRIC if k not in ("flip_left_right", "flip_up_down")])
def test_geometric_ops_move_the_content(key):
    image, mask = coordinate_pair()
    ops = [{"name": key, "size": [24, 24]}] if key == "random_crop" else key
    out_image, _ = run(ops, image, mask, [5, 5], in_map=False)
    assert not np.allclose(out_image[..., :2], image[:out_image.shape[0], :out_image.shape[1], :2])


def test_flips_and_rot90_are_exact():
    image, mask = coordinate_pair(6, 6)
    out, out_mask = run("flip_left_right", image, mask, [0, 1], in_map=True)
    np.testing.assert_array_equal(out, image[:, ::-1])
    np.testing.assert_array_equal(out_mask, mask[:, ::-1])
    out, out_mask = run("flip_up_down", image, mask, [0, 1], in_map=False)
    np.testing.assert_array_equal(out_mask, mask[::-1])
    rotations = {np.rot90(image, k).tobytes(): k for k in (1, 2, 3)}
    seen = set()
    for out, out_mask in run("rot90", image, mask, [[s, 0] for s in range(12)], in_map=True):
        k = rotations[out.tobytes()]
        np.testing.assert_array_equal(out_mask, np.rot90(mask, k))
        seen.add(k)
    assert seen == {1, 2, 3}
    rect, rect_mask = coordinate_pair(4, 6)  # non-square: only 180 degrees keeps the shape
    out, _ = run("rot90", rect, rect_mask, [3, 1], in_map=True)
    np.testing.assert_array_equal(out, np.rot90(rect, 2))


@pytest.mark.parametrize("h, w", [(8, 8), (7, 7)])
def test_affine_matrix_rotates_about_the_center(h, w):
    image, mask = coordinate_pair(h, w)
    matrix = affine_matrix(h, w, math.pi / 2, 1.0, 0.0, 0.0)
    out, out_mask = transform(tf.constant(image), tf.constant(mask), matrix)
    # +90 degrees in image coordinates (y down) is a clockwise turn: np.rot90 with k=-1.
    np.testing.assert_allclose(out.numpy(), np.rot90(image, -1), atol=1e-3)
    np.testing.assert_array_equal(out_mask.numpy(), np.rot90(mask, -1))
    shifted, _ = transform(tf.constant(image), tf.constant(mask), affine_matrix(h, w, 0.0, 1.0, 2.0, 1.0))
    np.testing.assert_allclose(shifted.numpy()[1:, 2:], image[:-1, :-2], atol=1e-3)
    assert np.all(shifted.numpy()[0] == 0) and np.all(shifted.numpy()[:, :2] == 0)


@pytest.mark.parametrize("in_map", [False, True], ids=["eager", "dataset_map"])
@pytest.mark.parametrize("name", COLOR)
def test_color_ops_change_only_the_image(name, in_map):
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 255, (24, 32, 3)).astype(np.float32)
    mask = (rng.uniform(size=(24, 32, 1)) > 0.5).astype(np.uint8)
    out_image, out_mask = run(name, image, mask, [4, 2], in_map)
    assert out_image.dtype == np.float32 and out_image.shape == image.shape
    assert out_image.min() >= 0.0 and out_image.max() <= 255.0
    np.testing.assert_array_equal(out_mask, mask)
    assert np.abs(out_image - image).mean() > 0.1, f"{name} left the image unchanged"


def test_gray_images_work_with_gray_ops():
    image = np.random.default_rng(1).uniform(0, 255, (16, 16, 1)).astype(np.float32)
    mask = np.zeros((16, 16, 1), np.uint8)
    ops = [{"name": n} for n in COLOR if not AUGMENTS.get(n).needs_rgb]
    out, _ = run(ops, image, mask, [1, 1], in_map=True)
    assert out.shape == (16, 16, 1) and 0 <= out.min() and out.max() <= 255


def test_same_seed_same_result_eager_and_in_map():
    ops = [{"name": n, "p": 0.5} for n in AUGMENTS.names() if n != "random_crop"]
    image, mask = coordinate_pair(32, 32)
    a = run(ops, image, mask, [11, 4], in_map=False)
    b = run(ops, image, mask, [11, 4], in_map=True)
    c = run(ops, image, mask, [12, 4], in_map=False)
    np.testing.assert_allclose(a[0], b[0], atol=1e-3)
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.allclose(a[0], c[0])


def test_probability_is_respected():
    image, mask = coordinate_pair(4, 4)
    outs = run([{"name": "flip_left_right", "p": 0.3}], image, mask, [[s, 0] for s in range(200)], True)
    flips = sum(int(out[0][0, 0, 0] != 1.0) for out in outs)
    assert 40 <= flips <= 80
    never = compose([{"name": "flip_left_right", "p": 0.0}])
    assert never(image, mask, tf.constant([1, 1]))[0].numpy()[0, 0, 0] == 1.0


def test_reflect_border_adds_no_class():
    image, mask = coordinate_pair(32, 32)
    mask = mask + 1  # classes 1..3, no background
    out_image, out_mask = run("shift_scale_rotate_reflect", image, mask, [3, 3], in_map=True)
    assert set(np.unique(out_mask)) <= {1, 2, 3}


def test_real_image_alignment_with_threshold_mask(shared_data):
    """ISBI membrane slice: mask = image > 128 before the op must still match after it."""
    from PIL import Image

    image = np.asarray(Image.open(shared_data / "isbi2012_em_membrane/images/0.png").convert("L"))[:96, :96]
    image = image[..., None].astype(np.float32)
    mask = (image > 128).astype(np.uint8)
    for key in GEOMETRIC:
        out_image, out_mask = run(key, image, mask, [2, 9], in_map=key != "random_crop")
        sure = (out_image[..., 0] > 160) | ((out_image[..., 0] < 96) & (out_image[..., 0] > 0))
        agree = (out_mask[..., 0] == (out_image[..., 0] > 128))[sure].mean()
        assert agree > 0.99, f"{key}: mask and image disagree on {1 - agree:.3f} of the clear pixels"


def test_config_errors_name_the_entry():
    with pytest.raises(ConfigError, match=r"augment\.ops\[1\]: Received: name='flip_lr'.*Expected one of"):
        check_ops([{"name": "hue"}, {"name": "flip_lr"}])
    with pytest.raises(ConfigError, match=r"ops\[0\]\.delt: unknown parameter of brightness.*'delta'"):
        check_ops([{"name": "brightness", "delt": 0.1}])
    with pytest.raises(ConfigError, match=r"augment\.ops\[0\]\.range=\[1.2, 0.8\]"):
        check_ops([{"name": "gamma", "range": [1.2, 0.8]}])
    with pytest.raises(ConfigError, match=r"augment\.ops\[0\]\.p=1.5"):
        check_ops([{"name": "rot90", "p": 1.5}])
    with pytest.raises(ConfigError, match=r"random_crop changes the image size"):
        check_ops([{"name": "random_crop", "p": 0.5, "size": [8, 8]}])
    with pytest.raises(ConfigError, match=r"hue needs RGB images, but data.channels=1"):
        check_ops([{"name": "hue"}], channels=1)
    with pytest.raises(ConfigError, match=r"augment\.ops\[0\]=.*expected a mapping"):
        check_ops(["flip_left_right"])
    steps = check_ops([{"name": "shift_scale_rotate", "rotate": 10}])
    assert steps[0].p == 1.0 and steps[0].params["rotate"] == 10.0 and steps[0].params["shift"] == 0.0625


def test_every_op_is_documented(project_root):
    doc = (project_root / "docs" / "augment.md").read_text()
    for name, op in AUGMENTS.items():
        assert f"`{name}`" in doc, f"docs/augment.md does not describe {name}"
        for param in op.defaults():
            assert f"`{param}`" in doc
    assert augment.__doc__


def test_hue_and_saturation_keep_gray_pixels_gray_and_luma():
    rng = np.random.default_rng(3)
    gray = np.repeat(rng.uniform(0, 255, (8, 8, 1)), 3, -1).astype(np.float32)
    mask = np.zeros((8, 8, 1), np.uint8)
    for op in ({"name": "hue", "delta": 0.5}, {"name": "saturation", "range": [0.0, 3.0]}):
        out, _ = run([op], gray, mask, [1, 2], in_map=False)
        np.testing.assert_allclose(out, gray, atol=0.05)
    color = rng.uniform(40, 215, (8, 8, 3)).astype(np.float32)
    luma = color @ np.array([0.299, 0.587, 0.114], np.float32)
    out, _ = run([{"name": "hue", "delta": 0.1}], color, mask, [5, 1], in_map=True)
    inside = (out > 0.5).all(-1) & (out < 254.5).all(-1)  # not clipped
    out_luma = out @ np.array([0.299, 0.587, 0.114], np.float32)
    np.testing.assert_allclose(out_luma[inside], luma[inside], atol=0.1)
    out, _ = run([{"name": "saturation", "range": [0.0, 0.0]}], color, mask, [5, 1], in_map=False)
    np.testing.assert_allclose(out, np.repeat(luma[..., None], 3, -1), atol=0.05)


def test_uint8_input_gives_the_float_result():
    ops = [{"name": "flip_left_right", "p": 0.5}, {"name": "rot90"}, {"name": "brightness"},
           {"name": "shift_scale_rotate"}]
    rng = np.random.default_rng(4)
    image = rng.integers(0, 256, (16, 16, 3)).astype(np.uint8)
    mask = (rng.uniform(size=(16, 16, 1)) > 0.5).astype(np.uint8)
    a = run(ops, image, mask, [8, 8], in_map=True)
    b = run(ops, image.astype(np.float32), mask, [8, 8], in_map=True)
    assert a[0].dtype == np.float32
    np.testing.assert_allclose(a[0], b[0], atol=1e-3)
    np.testing.assert_array_equal(a[1], b[1])


def test_gamma_matches_the_power_law():
    image = np.linspace(0, 255, 64 * 3, dtype=np.float32).reshape(8, 8, 3)
    mask = np.zeros((8, 8, 1), np.uint8)
    out, _ = run([{"name": "gamma", "range": [1.5, 1.5]}], image, mask, [1, 1], in_map=True)
    np.testing.assert_allclose(out, 255.0 * (image / 255.0) ** 1.5, atol=0.02)


def test_fused_colour_ops_equal_the_ops_one_by_one():
    """compose() folds consecutive brightness/contrast/saturation/hue into one colour map; away
    from clipping that is the same as applying them one after the other."""
    ops = [{"name": "brightness", "delta": 0.05}, {"name": "contrast", "range": [0.8, 1.2]},
           {"name": "saturation", "range": [0.7, 1.3]}, {"name": "hue", "delta": 0.05},
           {"name": "contrast", "range": [0.9, 1.1]}]
    image = np.random.default_rng(6).uniform(90, 160, (12, 10, 3)).astype(np.float32)
    mask = np.zeros((12, 10, 1), np.uint8)
    seed = tf.constant([21, 4], tf.int64)
    fused, _ = compose(ops)(image, mask, seed)
    seeds = augment._seeds(seed, len(ops) + 1)  # op k draws from seeds[k]
    one_by_one = tf.constant(image)
    for k, step in enumerate(check_ops(ops)):
        one_by_one, _ = step.op.fn(one_by_one, mask, seeds[k], **step.params)
    np.testing.assert_allclose(fused.numpy(), one_by_one.numpy(), atol=0.01)
    assert np.abs(fused.numpy() - image).mean() > 1.0


@pytest.mark.parametrize("size", [(6, 6), (4, 6)], ids=["square", "non_square"])
def test_fused_flips_and_rot90_equal_the_ops_one_by_one(size):
    """compose() chains a run of flips/rot90 into one symmetry (one transpose + one reverse at
    most); with the same seeds and coins that is bit for bit the ops one after the other."""
    ops = [{"name": "flip_left_right", "p": 0.5}, {"name": "rot90", "p": 0.5},
           {"name": "flip_up_down", "p": 0.5}, {"name": "rot90", "p": 0.7},
           {"name": "flip_left_right", "p": 0.5}]
    steps = check_ops(ops)
    image, mask = coordinate_pair(*size)
    fused = compose(ops)
    seen = set()
    for s in range(40):
        seed = tf.constant([s, 11], tf.int64)
        out, out_mask = fused(image.astype(np.uint8), mask, seed)
        seeds = augment._seeds(seed, len(ops) + 1)  # op k draws from seeds[k], coins from seeds[-1]
        coins = tf.random.stateless_uniform([len(ops)], seeds[-1]).numpy() < [o["p"] for o in ops]
        ref, ref_mask = tf.constant(image), tf.constant(mask)
        for k, step in enumerate(steps):
            if coins[k]:
                ref, ref_mask = step.op.fn(ref, ref_mask, seeds[k])
        np.testing.assert_array_equal(out.numpy(), ref.numpy())
        np.testing.assert_array_equal(out_mask.numpy(), ref_mask.numpy())
        assert out.dtype == tf.float32 and out_mask.dtype == tf.uint8
        seen.add(out.numpy().tobytes())
    assert len(seen) == (8 if size[0] == size[1] else 4)  # every symmetry that keeps the shape


def test_fused_colour_ops_with_coins_equal_the_ops_that_ran():
    """With p < 1 each colour step runs where its coin says so (contrast's channel mean is only
    computed when a contrast step runs); away from clipping, fused = the steps that ran, in order."""
    ops = [{"name": "brightness", "p": 0.5, "delta": 0.05}, {"name": "contrast", "p": 0.5},
           {"name": "saturation", "p": 0.5}, {"name": "contrast", "p": 0.5, "range": [0.9, 1.1]}]
    steps = check_ops(ops)
    image = np.random.default_rng(7).uniform(90, 160, (10, 12, 3)).astype(np.float32)
    mask = np.zeros((10, 12, 1), np.uint8)
    fused = tf.function(compose(ops))
    patterns = set()
    for s in range(16):
        seed = tf.constant([s, 2], tf.int64)
        out, _ = fused(image, mask, seed)
        seeds = augment._seeds(seed, len(ops) + 1)
        coins = tf.random.stateless_uniform([len(ops)], seeds[-1]).numpy() < 0.5
        ref = tf.constant(image)
        for k, step in enumerate(steps):
            if coins[k]:
                ref, _ = step.op.fn(ref, mask, seeds[k], **step.params)
        np.testing.assert_allclose(out.numpy(), ref.numpy(), atol=0.01)
        patterns.add((bool(coins[1]), bool(coins[3])))
    assert len(patterns) == 4  # contrast steps both off, either one, both on
