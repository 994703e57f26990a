"""Metrics: hand cases, scikit-learn on real Kvasir masks, both aggregations, merging, precision."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import f1_score, jaccard_score

from tests.conftest import shared_path
from tfseg.errors import ConfigError
from tfseg.metrics import Dice, IoU, PixelAccuracy, build_metric, build_metrics


def _real_pairs(n=4):
    """Real Kvasir masks (full size, varying) and a perturbed probability map for each."""
    root = shared_path("kvasir_seg")
    ids = sorted(json.loads((root / "split.json").read_text())["test"])[:n]
    rng = np.random.default_rng(0)
    pairs = []
    for i in ids:
        mask = (np.asarray(Image.open(root / "masks" / f"{i}.jpg").convert("L")) > 127).astype("float32")
        pred = np.roll(mask, 7, axis=1)
        flip = rng.random(mask.shape) < 0.02
        pred = np.where(flip, 1 - pred, pred)
        probs = np.clip(0.5 + (pred - 0.5) * rng.uniform(0.2, 1.0, mask.shape), 0, 1)
        pairs.append((mask[None, ..., None], probs[None, ..., None].astype("float32")))
    return pairs


def _update(metric, pairs):
    metric.reset_state()
    for y, p in pairs:
        metric.update_state(y, p)
    return float(metric.result())


def test_global_and_per_image_scores_match_sklearn_on_real_masks():
    pairs = _real_pairs()
    flat_true = np.concatenate([y.ravel() for y, _ in pairs]).astype(int)
    flat_pred = np.concatenate([(p > 0.5).ravel() for _, p in pairs]).astype(int)
    assert _update(Dice(), pairs) == pytest.approx(f1_score(flat_true, flat_pred), rel=1e-5)
    assert _update(IoU(), pairs) == pytest.approx(jaccard_score(flat_true, flat_pred), rel=1e-5)
    per_dice = np.mean([f1_score(y.ravel().astype(int), (p > 0.5).ravel().astype(int)) for y, p in pairs])
    per_iou = np.mean([jaccard_score(y.ravel().astype(int), (p > 0.5).ravel().astype(int)) for y, p in pairs])
    assert _update(build_metric("dice"), pairs) == pytest.approx(per_dice, rel=1e-5)
    assert _update(build_metric("iou_per_image"), pairs) == pytest.approx(per_iou, rel=1e-5)
    acc = np.mean(flat_true == flat_pred)
    assert _update(PixelAccuracy(), pairs) == pytest.approx(acc, rel=1e-6)
    # the per-image mean is not the global score on these images
    assert abs(_update(build_metric("dice"), pairs) - _update(Dice(), pairs)) > 1e-4


def test_empty_prediction_of_empty_mask_scores_one():
    empty = np.zeros((2, 8, 8, 1), "float32")
    full = np.zeros_like(empty)
    full[1, :4] = 1
    for name in ("dice", "iou_per_image", "dice_coe", "iou"):
        assert _update(build_metric(name), [(empty, empty)]) == pytest.approx(1.0)
    # image 0 empty/empty -> 1, image 1 missed entirely -> 0: the per-image mean is 0.5
    assert _update(build_metric("dice"), [(full, empty)]) == pytest.approx(0.5)
    assert _update(build_metric("dice_coe"), [(full, empty)]) == pytest.approx(0.0, abs=1e-6)


def test_hubmap_dice_coe_semantics_threshold_and_smooth():
    y = np.zeros((1, 4, 4, 1), "float32")
    y[0, :2] = 1
    p = np.where(y > 0, 0.6, 0.4).astype("float32")
    p[0, 0, 0, 0] = 0.5  # exactly 0.5 is not foreground (strictly greater)
    inter, l_sum, r_sum = 7, 7, 8
    assert _update(Dice(), [(y, p)]) == pytest.approx((2 * inter + 1e-10) / (l_sum + r_sum + 1e-10))
    soft = build_metric("soft_dice")
    expected = (2 * (7 * 0.6 + 0.5) + 1) / (7 * 0.6 + 0.5 + 8 * 0.4 + 8 + 1)
    assert _update(soft, [(y, p)]) == pytest.approx(expected, rel=1e-5)


def test_multiclass_per_class_and_mean_iou_match_sklearn():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, (3, 16, 16, 1))
    noisy = np.where(rng.random(y.shape) < 0.3, rng.integers(0, 3, y.shape), y)
    probs = np.eye(3, dtype="float32")[noisy[..., 0]] * 0.8 + 0.2 / 3
    pairs = [(y, probs)]
    per_class = jaccard_score(y.ravel(), noisy.ravel(), average=None)
    for k in range(3):
        metric = build_metric(f"iou_class{k}", classes=3)
        assert _update(metric, pairs) == pytest.approx(per_class[k], rel=1e-5)
    assert _update(build_metric("mean_iou", classes=3), pairs) == pytest.approx(per_class.mean(), rel=1e-5)
    macro_f1 = f1_score(y.ravel(), noisy.ravel(), average="macro")
    assert _update(build_metric("dice_coe", classes=3), pairs) == pytest.approx(macro_f1, rel=1e-5)
    assert _update(build_metric("pixel_accuracy", classes=3), pairs) == pytest.approx(
        np.mean(y == noisy), rel=1e-6)


def test_state_sums_merge_like_replicas():
    """Summing the variables of two metrics fed halves equals one metric fed everything."""
    pairs = _real_pairs(4)
    for name in ("dice_coe", "dice", "iou", "pixel_accuracy"):
        whole = build_metric(name)
        _update(whole, pairs)
        a, b = build_metric(name), build_metric(name)
        _update(a, pairs[:1])
        _update(b, pairs[1:])
        merged = build_metric(name)
        for vm, va, vb in zip(merged.variables, a.variables, b.variables):
            vm.assign(va.numpy() + vb.numpy())
        assert float(merged.result()) == pytest.approx(float(whole.result()), rel=1e-6)


def test_mixed_precision_and_logits():
    y = np.zeros((1, 4, 4, 1), "float32")
    y[0, :2] = 1
    logits = np.where(y > 0, 2.0, -2.0).astype("float16")
    assert _update(build_metric("dice_coe", from_logits=True), [(y, logits)]) == pytest.approx(1.0)
    bf16 = keras.ops.cast(np.where(y > 0, 0.9, 0.1), "bfloat16")
    assert _update(build_metric("iou"), [(y, bf16)]) == pytest.approx(1.0)


def test_serializable_inside_a_saved_model(tmp_path):
    inp = keras.Input((8, 8, 1))
    model = keras.Model(inp, keras.layers.Conv2D(1, 1, activation="sigmoid")(inp))
    metrics = build_metrics(["dice_coe", "dice", "iou_class0"])
    model.compile("adam", loss="binary_crossentropy", metrics=metrics)
    x = np.random.default_rng(0).random((4, 8, 8, 1)).astype("float32")
    model.fit(x, (x > 0.5).astype("float32"), epochs=1, verbose=0)
    model.save(tmp_path / "m.keras")
    keras.models.load_model(tmp_path / "m.keras")
    clone = Dice.from_config(build_metric("dice").get_config())
    assert clone.aggregation == "per_image" and clone.name == "dice"


def test_unknown_metric_lists_valid_names():
    with pytest.raises(ConfigError, match="did you mean 'dice_coe'"):
        build_metric("dice_co")
    with pytest.raises(ConfigError, match="class_id 3 is outside"):
        build_metric("iou_class3", classes=3)


def test_accuracy_and_sm_metric_names_are_taken():
    """train.metrics [iou_score, f1_score] suggested dice_coe, [accuracy] was refused."""
    y = np.zeros((2, 4, 4, 1), "float32")
    y[0, :2, :2] = 1
    p = np.where(y > 0, 0.8, 0.3).astype("float32")
    acc = build_metric("accuracy")
    acc.update_state(y, p)
    assert acc.name == "accuracy" and float(acc.result()) == pytest.approx(1.0)
    assert build_metric("iou_score").name == "iou_score"
    # sm's scores are soft (the probabilities), per batch, smooth 1e-5, and Keras averages the batches
    inter, psum = 4 * 0.8, 4 * 0.8 + 12 * 0.3  # the first image; the second has no mask, 16 pixels at 0.3
    first = (inter + 1e-5) / (psum + 4 - inter + 1e-5)
    second = 1e-5 / (16 * 0.3 + 1e-5)
    metric = build_metric("iou_score")
    metric.update_state(y[:1], p[:1])
    metric.update_state(y[1:], p[1:])
    assert float(metric.result()) == pytest.approx((first + second) / 2, rel=1e-5)
    from tfseg.metrics import check_metric_names

    assert check_metric_names(["accuracy", "iou_score", "f1_score", "f2_score", "precision", "recall"]) == [
        "accuracy", "iou_score", "f1_score", "f2_score", "precision", "recall"]
