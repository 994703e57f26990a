"""Losses: hand-computed cases, a NumPy reference on real Kvasir masks, stability, serialization."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
from PIL import Image

from tests.conftest import shared_path
from tfseg.errors import ConfigError
from tfseg.losses import LOSSES, SegLoss, build_loss, loss_names

ALL_BINARY = ["bce", "dice", "bce_dice", "jaccard", "bce_log_jaccard", "focal", "tversky", "focal_tversky",
              "lovasz_hinge"]


def _value(spec, y_true, y_pred, **kw):
    return float(build_loss(spec, **kw)(y_true, y_pred))


def _square(p_in=0.8, p_out=0.1):
    y = np.zeros((1, 4, 4, 1), "float32")
    y[0, :2, :2] = 1  # 4 foreground pixels of 16
    p = np.where(y > 0, p_in, p_out).astype("float32")
    return y, p


def test_hand_computed_binary_cases():
    y, p = _square()
    bce = -(4 * np.log(0.8) + 12 * np.log(0.9)) / 16
    assert _value({"bce": 1}, y, p) == pytest.approx(bce, rel=1e-5)
    inter, psum, tsum = 4 * 0.8, 4 * 0.8 + 12 * 0.1, 4.0
    dice = 1 - (2 * inter + 1) / (psum + tsum + 1)
    assert _value({"dice": 1}, y, p) == pytest.approx(dice, rel=1e-5)
    assert _value({"bce_dice": 1}, y, p) == pytest.approx(bce + dice, rel=1e-5)
    jac = (inter + 1) / (psum + tsum - inter + 1)
    assert _value({"jaccard": 1}, y, p) == pytest.approx(1 - jac, rel=1e-5)
    assert _value({"bce_log_jaccard": 1}, y, p) == pytest.approx(bce - np.log(jac), rel=1e-5)
    tp, fn, fp = inter, 4 * 0.2, 12 * 0.1
    ti = (tp + 1) / (tp + 0.7 * fn + 0.3 * fp + 1)
    assert _value({"tversky": 1}, y, p) == pytest.approx(1 - ti, rel=1e-5)
    assert _value({"focal_tversky": 1}, y, p) == pytest.approx((1 - ti) ** 0.75, rel=1e-4)
    focal = -(4 * 0.25 * 0.2 ** 2 * np.log(0.8) + 12 * 0.75 * 0.1 ** 2 * np.log(0.9)) / 16
    assert _value({"focal": 1}, y, p) == pytest.approx(focal, rel=1e-5)
    # weights combine linearly
    assert _value({"bce": 0.5, "dice": 2.0}, y, p) == pytest.approx(0.5 * bce + 2 * dice, rel=1e-5)


def test_lovasz_hinge_hand_computed():
    # one image, pixels with log-odds x and labels t; errors 1 - x * sign.
    x = np.array([2.0, -0.5, 0.5, -2.0], "float32").reshape(1, 2, 2, 1)
    t = np.array([1, 1, 0, 0], "float32").reshape(1, 2, 2, 1)
    # errors [-1, 1.5, 1.5, -1]; sorted decreasing: 1.5 (t=1), 1.5 (t=0), -1 (t=1), -1 (t=0)
    gt = np.array([1, 0, 1, 0], "float32")
    inter = 2 - np.cumsum(gt)
    union = 2 + np.cumsum(1 - gt)
    jac = 1 - inter / union
    grad = np.concatenate([jac[:1], np.diff(jac)])
    expected = float(np.dot(np.maximum([1.5, 1.5, -1, -1], 0), grad))
    assert _value({"lovasz_hinge": 1}, t, x, from_logits=True) == pytest.approx(expected, rel=1e-5)
    # a perfect, confident prediction costs nothing
    assert _value({"lovasz_hinge": 1}, t, (t * 2 - 1) * 5, from_logits=True) == pytest.approx(0.0)


def test_per_batch_dice_differs_from_per_image():
    y = np.zeros((2, 4, 4, 1), "float32")
    y[0, :2, :2] = 1
    p = np.full_like(y, 0.3)
    per_image = _value({"dice": 1}, y, p)
    per_batch = _value({"dice": {"weight": 1, "per_image": False}}, y, p)
    s = 1.0
    d0 = 1 - (2 * 4 * 0.3 + s) / (16 * 0.3 + 4 + s)
    d1 = 1 - s / (16 * 0.3 + s)
    assert per_image == pytest.approx((d0 + d1) / 2, rel=1e-5)
    assert per_batch == pytest.approx(1 - (2 * 4 * 0.3 + s) / (32 * 0.3 + 4 + s), rel=1e-5)


def test_sparse_cce_class_weights_match_the_tutorial_sample_weight_recipe():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, (2, 5, 5, 1))
    logits = rng.normal(size=(2, 5, 5, 3)).astype("float32")
    weights = [0.5, 2.0, 1.0]
    ours = _value({"scce": 1}, y, logits, classes=3, from_logits=True, class_weights=weights)
    sample_weight = np.take(weights, y[..., 0])
    ref = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y, logits, sample_weight=sample_weight)
    assert ours == pytest.approx(float(ref), rel=1e-5)
    probs = keras.ops.softmax(logits)
    assert _value({"scce": 1}, y, probs, classes=3, class_weights=weights) == pytest.approx(ours, rel=1e-4)


def _kvasir_pair(name: str, size=(64, 64)):
    root = shared_path("kvasir_seg")
    mask = Image.open(root / "masks" / f"{name}.jpg").convert("L").resize(size, Image.NEAREST)
    return (np.asarray(mask) > 127).astype("float32")


def test_binary_losses_match_numpy_reference_on_real_masks():
    root = shared_path("kvasir_seg")
    ids = sorted(json.loads((root / "split.json").read_text())["test"])[:3]
    y = np.stack([_kvasir_pair(i) for i in ids])[..., None]
    rng = np.random.default_rng(1)
    shifted = np.roll(y, 5, axis=2)
    p = np.clip(0.15 + 0.7 * shifted + rng.normal(0, 0.05, y.shape), 0.01, 0.99).astype("float32")
    ref_bce = np.mean(-(y * np.log(p) + (1 - y) * np.log(1 - p)), axis=(1, 2, 3)).mean()
    inter = (y * p).sum(axis=(1, 2, 3))
    psum, tsum = p.sum(axis=(1, 2, 3)), y.sum(axis=(1, 2, 3))
    ref_dice = np.mean(1 - (2 * inter + 1) / (psum + tsum + 1))
    ref_jac = (inter.sum() + 1) / (psum.sum() + tsum.sum() - inter.sum() + 1)
    assert _value({"bce": 1}, y, p) == pytest.approx(ref_bce, rel=1e-4)
    assert _value({"dice": 1}, y, p) == pytest.approx(ref_dice, rel=1e-4)
    assert _value({"bce_log_jaccard": 1}, y, p) == pytest.approx(ref_bce - np.log(ref_jac), rel=1e-4)


def test_multiclass_dice_on_one_hot_is_class_mean():
    y = np.array([0, 1, 2, 2], "int32").reshape(1, 2, 2, 1)
    p = np.eye(3, dtype="float32")[[0, 1, 2, 1]].reshape(1, 2, 2, 3)
    # class dice with smooth 1: c0 (2+1)/(1+1+1)=1, c1 (2+1)/(2+1+1)=.75, c2 (2+1)/(1+2+1)=.75
    expected = 1 - (1 + .75 + .75) / 3
    assert _value({"categorical_dice": 1}, y, p, classes=3) == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("name", ALL_BINARY)
def test_float16_logits_are_stable_and_differentiable(name):
    y, _ = _square()
    logits = np.array(np.where(y > 0, 30.0, -30.0), dtype="float16")  # saturated sigmoid in float16
    value = _value({name: 1}, y, logits, from_logits=True)
    assert np.isfinite(value)
    x = keras.Variable(np.where(y > 0, 3.0, -3.0).astype("float32"))
    import tensorflow as tf

    with tf.GradientTape() as tape:
        out = build_loss({name: 1}, from_logits=True)(y, keras.ops.cast(x, "float16"))
    grad = tape.gradient(out, x.value)
    assert grad is not None and np.all(np.isfinite(grad.numpy()))


def test_serialization_roundtrip_and_model_reload(tmp_path):
    loss = build_loss({"bce_dice": 1.0, "focal": {"weight": 0.5, "gamma": 1.0}}, classes=1)
    clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
    assert isinstance(clone, SegLoss) and clone.terms == loss.terms
    inp = keras.Input((8, 8, 1))
    model = keras.Model(inp, keras.layers.Conv2D(1, 1, activation="sigmoid")(inp))
    model.compile("adam", loss=loss)
    model.save(tmp_path / "m.keras")
    again = keras.models.load_model(tmp_path / "m.keras")
    y, p = _square()
    assert float(again.loss(y, p)) == pytest.approx(float(loss(y, p)), rel=1e-6)


def test_errors_are_one_line_and_name_the_problem():
    with pytest.raises(ConfigError, match="did you mean 'dice'"):
        build_loss({"dcie": 1})
    with pytest.raises(ConfigError, match="needs classes > 1"):
        build_loss({"scce": 1}, classes=1)
    with pytest.raises(ConfigError, match="unknown parameter 'gama'"):
        build_loss({"focal": {"gama": 2}})
    with pytest.raises(ConfigError, match="expected 3 weights"):
        build_loss({"scce": 1}, classes=3, class_weights=[1, 2])
    with pytest.raises(ConfigError, match="weight must be a number"):
        build_loss({"bce": "a lot"})
    assert set(ALL_BINARY) <= set(loss_names()) and "lovasz_hinge" in LOSSES


def test_an_unknown_loss_names_train_loss_and_lists_presets_and_aliases():
    """It said only `Received: loss='dise'`, without the key, and left out bce_dice, scce... which it accepts."""
    with pytest.raises(ConfigError) as err:
        build_loss({"bce": 1, "dise": 1})
    message = str(err.value)
    assert message.startswith("train.loss: Received: loss='dise' (did you mean 'dice'?). Expected one of [")
    for name in ("bce", "dice", "bce_dice", "bce_log_jaccard", "scce", "categorical_dice"):
        assert f"'{name}'" in message
    with pytest.raises(ConfigError, match=r"^train\.loss: Received: loss='bce_dise' \(did you mean 'bce_dice'\?\)"):
        build_loss({"bce_dise": 1})


def test_cli_train_names_the_loss_key_of_a_typo(tmp_path, capsys):
    """The tester's command: `tfseg train --config configs/isbi2012.yaml --set "train.loss={bce: 1, dise: 1}"`."""
    from tests.conftest import ROOT
    from tfseg import cli

    root = shared_path("isbi2012_em_membrane")
    code = cli.main(["train", "--config", str(ROOT / "configs" / "isbi2012.yaml"), "--fold", "0",
                     "--set", "train.loss={bce: 1, dise: 1}", "--set", f"data.root={root}",
                     "--set", f"data.tfrecord_dir={tmp_path / 'tfr'}",
                     "--set", f"train.output_dir={tmp_path / 'runs'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "train.loss" in err and "Received: loss='dise' (did you mean 'dice'?)" in err and "'bce_dice'" in err
    assert list(tmp_path.iterdir()) == []  # refused before anything was written


@pytest.mark.parametrize("spec, message", [
    ({"dice": -1}, "train.loss.dice: weight=-1: expected a number >= 0 (a negative weight would reward"),
    ({"bce": 1, "focal": {"weight": -0.5}}, "train.loss.focal: weight=-0.5: expected a number >= 0"),
    ({"bce": float("nan")}, "train.loss.bce: weight=nan: expected a number >= 0"),
    ({"bce": 0, "dice": 0.0}, "train.loss: every weight is 0 in {'bce': 0, 'dice': 0.0}; expected at least one"),
    ({"dice": 1, "dice_loss": 1}, "train.loss: the dice term is asked for twice with other parameters ("),
    ({"bce_jaccard_loss": {"weight": 1, "smooth": 1}},
     "train.loss.bce_jaccard_loss: segmentation_models' bce_jaccard_loss takes a weight only, got ['smooth']; for "
     "other parameters name tfseg's terms, e.g. {bce: 1, jaccard: {smooth: 1e-05, per_image: false}}"),
])
def test_weights_are_non_negative_and_terms_agree(spec, message):
    with pytest.raises(ConfigError) as err:
        build_loss(spec)
    assert str(err.value).startswith(message), str(err.value)


def test_sm_loss_names_are_taken_not_mistaken_for_other_losses():
    """train.loss {bce_jaccard_loss: 1} suggested bce_log_jaccard (BCE - log J), binary_crossentropy suggested
    sparse_categorical_crossentropy: they are segmentation_models' BCE + 1 - J and BCE, per batch, smooth 1e-5."""
    y, p = _square()
    bce = -(4 * np.log(0.8) + 12 * np.log(0.9)) / 16
    inter, union = 4 * 0.8, 4 * 0.8 + 12 * 0.1 + 4 - 4 * 0.8
    assert _value({"bce_jaccard_loss": 1}, y, p) == pytest.approx(bce + 1 - (inter + 1e-5) / (union + 1e-5), rel=1e-5)
    assert _value({"binary_crossentropy": 2}, y, p) == pytest.approx(2 * bce, rel=1e-5)
    assert {"bce_jaccard_loss", "binary_crossentropy", "dice_loss", "cce_dice_loss"} <= set(loss_names())
    assert build_loss({"bce_dice_loss": 1, "bce_jaccard_loss": 1}).terms["bce"]["weight"] == 2.0  # one bce, twice


def test_keras_focal_loss_names_compute_keras_values():
    """train.loss {binary_focal_crossentropy: 1} suggested binary_crossentropy (a loss without the focal term):
    Keras' two focal losses are taken by name and give keras.losses' values with Keras' defaults, on masks and
    probabilities made here (binary; 4 classes, as indices and one-hot)."""
    rng = np.random.default_rng(3)
    gt = (rng.uniform(size=(2, 8, 8, 1)) > 0.6).astype("float32")
    pr = np.clip(0.5 * gt + 0.5 * rng.uniform(size=gt.shape), 0.01, 0.99).astype("float32")
    want = float(keras.losses.BinaryFocalCrossentropy()(gt, pr))
    assert _value({"binary_focal_crossentropy": 1}, gt, pr) == pytest.approx(want, rel=1e-5)
    assert _value({"binary_focal_crossentropy": 1}, gt, pr) != pytest.approx(_value({"focal": 1}, gt, pr), rel=1e-2)
    labels = rng.integers(0, 4, (2, 8, 8))
    logits = rng.normal(size=(2, 8, 8, 4)) + 2.0 * np.eye(4)[labels]
    softmax = (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).astype("float32")
    one_hot = np.eye(4, dtype="float32")[labels]
    want_ovr = float(keras.losses.BinaryFocalCrossentropy()(one_hot, softmax))  # one-vs-rest over the channels
    loss = build_loss({"binary_focal_crossentropy": 1}, classes=4)
    assert float(loss(labels[..., None], softmax)) == pytest.approx(want_ovr, rel=1e-5)
    want4 = float(keras.losses.CategoricalFocalCrossentropy()(one_hot, softmax))
    loss = build_loss({"categorical_focal_crossentropy": 2}, classes=4)
    assert float(loss(labels[..., None], softmax)) == pytest.approx(2 * want4, rel=1e-5)
    assert float(loss(one_hot, softmax)) == pytest.approx(2 * want4, rel=1e-5)
    with pytest.raises(ConfigError, match="^train.loss: Keras' categorical_focal_crossentropy is a categorical loss "
                                          "and needs classes > 1; on a one-class"):
        build_loss({"categorical_focal_crossentropy": 1}, classes=1)
    with pytest.raises(ConfigError, match=r"^train.loss.binary_focal_crossentropy: Keras' binary_focal_crossentropy "
                                          r"takes a weight only, got \['gamma'\]; .* \{focal: \{alpha: null"):
        build_loss({"binary_focal_crossentropy": {"gamma": 3}})


def test_sm_loss_and_metric_classes_say_what_is_wrong_and_take_mixed_precision():
    """sm's classes with arguments (values against sm itself: tests/test_sm_parity.py): a wrong class_weights or
    class_indexes is one line naming the class and what was expected; float16 / bfloat16 predictions give the
    float32 value."""
    import tfseg.metrics

    rng = np.random.default_rng(4)
    labels = rng.integers(0, 4, (2, 8, 8, 1))
    probs = rng.uniform(0.05, 1.0, (2, 8, 8, 4)).astype("float32")
    probs /= probs.sum(-1, keepdims=True)
    with pytest.raises(ConfigError, match=r"^DiceLoss: class_weights has 2 values for 4 channels \(after "):
        tfseg.losses.DiceLoss(class_weights=[1, 2])(labels, probs)
    with pytest.raises(ConfigError, match=r"^JaccardLoss: class_indexes \[1, 5\] name a channel outside the "
                                          r"prediction's 4$"):
        tfseg.losses.JaccardLoss(class_indexes=[1, 5])(labels, probs)
    with pytest.raises(ConfigError, match="^CategoricalCELoss: class_weights must be a list of numbers, got 'abc'"):
        tfseg.losses.CategoricalCELoss(class_weights="abc")
    with pytest.raises(ConfigError, match=r"^IOUScore: class_indexes must be channel indexes >= 0 .*got \[-1\]"):
        tfseg.metrics.IOUScore(class_indexes=[-1])
    for make in (lambda: tfseg.losses.DiceLoss(class_weights=[1, 2, 0.5, 1]) + tfseg.losses.CategoricalFocalLoss(),
                 lambda: tfseg.metrics.FScore(beta=2, threshold=0.5), lambda: tfseg.metrics.IOUScore(per_image=True)):
        want = float(make()(labels, probs))
        for dtype in ("float16", "bfloat16"):
            got = float(make()(labels, keras.ops.cast(probs, dtype)))
            assert got == pytest.approx(want, rel=2e-2, abs=1e-3), dtype


def test_masks_without_a_channel_axis_give_the_same_values():
    """Masks [B, H, W], as Keras' own losses take them: fit with loss=tfseg.losses.bce_dice_loss failed inside
    bce with TensorFlow's "Dimensions must be equal"; class indices [B, 4, 4] of 4 classes looked one-hot."""
    import tfseg.metrics

    rng = np.random.default_rng(6)
    binary = (rng.uniform(size=(2, 8, 8, 1)) > 0.5).astype("float32")
    probs = rng.uniform(0.05, 0.95, (2, 8, 8, 1)).astype("float32")
    labels = rng.integers(0, 4, (2, 4, 4, 1))
    softmax = rng.uniform(0.05, 1.0, (2, 4, 4, 4)).astype("float32")
    softmax /= softmax.sum(-1, keepdims=True)
    for y, p, classes in ((binary, probs, 1), (labels, softmax, 4)):
        for make in (lambda c=classes: build_loss({"bce": 1, "dice": 1}, classes=c),
                     lambda: tfseg.losses.bce_dice_loss, lambda: tfseg.losses.DiceLoss(),
                     lambda: tfseg.metrics.IOUScore(), lambda c=classes: tfseg.metrics.build_metric("dice", classes=c)):
            assert float(make()(y[..., 0], p)) == pytest.approx(float(make()(y, p)), rel=1e-6), classes


def test_sm_loss_objects_add_scale_serialize_and_take_mixed_precision(tmp_path):
    """loss=tfseg.losses.bce_jaccard_loss as a notebook had loss=sm.losses.bce_jaccard_loss: sm's arithmetic,
    a .keras file that reloads without custom_objects, float16 predictions."""
    from tfseg import losses

    y, p = _square()
    total = losses.binary_focal_loss + 2 * losses.dice_loss
    assert [(w, loss.name) for w, loss in total.parts] == [(1.0, "binary_focal_loss"), (2.0, "dice_loss")]
    parts = float(losses.binary_focal_loss(y, p)) + 2 * float(losses.dice_loss(y, p))
    assert float(total(y, p)) == pytest.approx(parts, rel=1e-6)
    half = float(losses.bce_jaccard_loss(y, p.astype("float16")))
    assert half == pytest.approx(float(losses.bce_jaccard_loss(y, p)), rel=1e-3)
    inp = keras.Input((4, 4, 1))
    model = keras.Model(inp, keras.layers.Conv2D(1, 1, activation="sigmoid")(inp))
    from tfseg import metrics

    model.compile("adam", loss=losses.bce_jaccard_loss, metrics=[metrics.iou_score, metrics.f1_score])
    before = model.evaluate(y, y, verbose=0, return_dict=True)
    model.save(tmp_path / "m.keras")
    again = keras.models.load_model(tmp_path / "m.keras")
    after = again.evaluate(y, y, verbose=0, return_dict=True)
    assert set(after) == {"loss", "iou_score", "f1_score"}
    for key in before:
        assert after[key] == pytest.approx(before[key], rel=1e-6)
