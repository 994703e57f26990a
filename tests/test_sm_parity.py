"""Parity with segmentation_models 1.0.1: same trainable parameters and output shape.

Parameter counts do not depend on the spatial size, so models are built small. The sm side runs
in a subprocess with ``SM_FRAMEWORK=tf.keras`` so that importing segmentation_models cannot
change this process. The issue's reference figures (sm.Unet at 512x512, ``encoder_weights=None``)
are checked directly against tfseg's ``unet``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tests.conftest import shared_path, sm_env
from tfseg.config import ModelConfig
from tfseg.models import build_model

# sm.Unet(name, input_shape=(512, 512, 3), classes=1, encoder_weights=None): trainable, total.
SM_UNET_REFERENCE = {
    "efficientnetb0": (10_071_501, 10_115_501),
    "mobilenetv2": (8_011_345, 8_047_441),
    "vgg16": (23_748_241, 23_752_273),
    "efficientnetb5": (37_293_953, 37_468_673),
}
# keras.applications' EfficientNet has a Normalization layer (mean 3 + variance 3 + count 1).
KERAS_EFFICIENTNET_EXTRA = 7

SM_TWINS = {"Unet": "unet", "FPN": "fpn", "Linknet": "linknet", "PSPNet": "pspnet"}
SHARED_BACKBONES = ("efficientnetb0", "efficientnetb5", "mobilenetv2", "vgg16", "resnet50")


def _trainable(model) -> int:
    return int(sum(np.prod(w.shape) for w in model.trainable_weights))


def _tfseg(arch: str, backbone: str, size: int):
    cfg = ModelConfig(arch=arch, backbone=backbone, input_shape=(size, size, 3), classes=1,
                      activation="sigmoid", encoder_weights=None)
    return build_model(cfg)


def _size(sm_arch: str) -> int:
    return 96 if sm_arch == "PSPNet" else 64  # PSPNet: a multiple of 6 * downsample_factor (8)


@pytest.mark.parametrize("backbone", ["efficientnetb0", "mobilenetv2", "vgg16"])
def test_unet_matches_sm_reference_counts(backbone):
    model = _tfseg("unet", backbone, 64)
    trainable, total = SM_UNET_REFERENCE[backbone]
    extra = KERAS_EFFICIENTNET_EXTRA if backbone.startswith("efficientnet") else 0
    assert _trainable(model) == trainable
    assert model.count_params() == total + extra


@pytest.mark.slow
def test_unet_efficientnetb5_matches_sm_reference_counts():
    model = _tfseg("unet", "efficientnetb5", 64)
    trainable, total = SM_UNET_REFERENCE["efficientnetb5"]
    assert _trainable(model) == trainable
    assert model.count_params() == total + KERAS_EFFICIENTNET_EXTRA


SM_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import segmentation_models as sm
    out = {}
    for arch, backbone, size in json.loads(sys.argv[1]):
        m = getattr(sm, arch)(backbone, input_shape=(size, size, 3), classes=1, encoder_weights=None)
        out[f"{arch}/{backbone}"] = {
            "trainable": int(sum(np.prod(w.shape) for w in m.trainable_weights)),
            "shape": list(m.output_shape[1:]),
        }
    print("RESULT" + json.dumps(out))
""")


def _sm_counts(cases, legacy_keras: bool = False) -> dict:
    proc = subprocess.run([sys.executable, "-c", SM_SCRIPT, json.dumps(cases)], env=sm_env(legacy_keras),
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))
    return json.loads(line[len("RESULT"):])


def _compare(sm_arch: str, backbones, legacy_keras: bool = False) -> None:
    cases = [(sm_arch, b, _size(sm_arch)) for b in backbones]
    sm_counts = _sm_counts(cases, legacy_keras)
    for _, backbone, size in cases:
        model = _tfseg(SM_TWINS[sm_arch], backbone, size)
        ref = sm_counts[f"{sm_arch}/{backbone}"]
        assert (_trainable(model), list(model.output_shape[1:])) == (ref["trainable"], ref["shape"]), \
            f"{sm_arch} {backbone}"


@pytest.mark.slow
def test_sm_unet_mobilenetv2_same_trainable_params_and_shape():
    _compare("Unet", ["mobilenetv2"])


@pytest.mark.slow
@pytest.mark.parametrize("sm_arch", sorted(SM_TWINS))
def test_sm_twins_same_trainable_params_and_shape(sm_arch):
    _compare(sm_arch, SHARED_BACKBONES)


@pytest.mark.slow
def test_sm_unet_classification_models_backbones_same_trainable_params_and_shape():
    """segmentation_models' most used Kaggle backbones (classification_models' ResNets, ResNeXts and SE
    networks, not in keras.applications): tfseg builds the same networks (tfseg.models.sm_resnet,
    tfseg.models.sm_senet)."""
    _compare("Unet", ["resnet18", "resnet34", "seresnet18", "resnext50", "seresnet50", "seresnext50"])


@pytest.mark.slow
@pytest.mark.parametrize("sm_arch", ["FPN", "Linknet", "PSPNet"])
def test_sm_twins_on_classification_models_backbones(sm_arch):
    """FPN, Linknet and PSPNet on sm's own networks (pre-activation ResNet, SE-ResNet, ResNeXt, SE-ResNeXt)."""
    _compare(sm_arch, ["resnet34", "seresnet18", "resnext50", "seresnext50"])


# sm 1.0.1 on tf_keras, at 64x64 (PSPNet 96x96), 1 class: trainable parameters. sm skips from the DenseNet
# transitions' convolutions (pool2_conv, pool3_conv, pool4_conv), before their pooling, half the channels
# of the block outputs.
SM_DENSENET121 = {"unet": 12_059_345, "fpn": 9_825_793, "linknet": 8_267_121, "pspnet": 3_143_297}


@pytest.mark.parametrize("arch", sorted(SM_DENSENET121))
def test_densenet_twins_match_sm_counts(arch):
    model = _tfseg(arch, "densenet121", _size("PSPNet" if arch == "pspnet" else "Unet"))
    assert _trainable(model) == SM_DENSENET121[arch]


@pytest.mark.slow
@pytest.mark.parametrize("sm_arch", sorted(SM_TWINS))
def test_sm_twins_on_densenet(sm_arch):
    """sm's DenseNets fail to build under Keras 3, so sm runs on tf_keras here."""
    _compare(sm_arch, ["densenet121", "densenet169", "densenet201"], legacy_keras=True)


def test_sm_bridge_rejects_unknown_sm_arch_without_importing_sm():
    from tfseg.errors import ModelError

    with pytest.raises(ModelError, match=r"arch='sm.Unett' \(did you mean 'sm.Unet'\?\). Expected one of "
                                         r"\['sm.FPN', 'sm.Linknet', "):
        build_model(ModelConfig(arch="sm.Unett", input_shape=(64, 64, 3), classes=1, encoder_weights=None))


BRIDGE_SCRIPT = textwrap.dedent("""
    import numpy as np
    from tfseg.config import ModelConfig
    from tfseg.models import build_model
    m = build_model(ModelConfig(arch="sm.Unet", backbone="mobilenetv2", input_shape=(64, 64, 1), classes=2,
                                activation="softmax", encoder_weights=None, bn_momentum=0.9))
    y = np.asarray(m(np.full((1, 64, 64, 1), 128.0, "float32")))
    from tfseg.models.common import all_layers
    bn = [layer.momentum for layer in all_layers(m) if "BatchNormalization" in type(layer).__name__]
    print("RESULT", m.layers[-1].name, y.dtype, y.shape, round(float(y.sum(-1).mean()), 4), len(bn) > 10,
          set(bn))
    # classification_models' networks normalize their own input: no tfseg preprocess layer in front
    r = build_model(ModelConfig(arch="sm.Unet", backbone="resnet18", input_shape=(64, 64, 3), classes=1,
                                encoder_weights=None))
    print("RESNET", [layer.name for layer in r.layers if layer.name == "preprocess"], tuple(r.output.shape))
""")


@pytest.mark.slow
def test_sm_bridge_builds_sm_unet_in_tfseg_contract():
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("TF_USE_LEGACY_KERAS", None)
    env.pop("SM_FRAMEWORK", None)
    proc = subprocess.run([sys.executable, "-c", BRIDGE_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))
    assert line.split()[1:] == ["output", "float32", "(1,", "64,", "64,", "2)", "1.0", "True", "{0.9}"]
    assert "RESNET [] (None, 64, 64, 1)" in proc.stdout.splitlines()


def test_sm_bridge_offline_imagenet_says_to_pass_a_file(tmp_path):
    """sm downloads its backbones' weights with keras' get_file; offline (here: every URL through a proxy
    that refuses) the bridge says what to do instead of keras' bare ``Exception``."""
    from tests.conftest import require_sm

    require_sm()
    script = textwrap.dedent("""
        from tfseg.config import ModelConfig
        from tfseg.errors import ModelError
        from tfseg.models import build_model
        try:
            build_model(ModelConfig(arch="sm.Unet", backbone="mobilenetv2", input_shape=(64, 64, 3), classes=1,
                                    encoder_weights="imagenet"))
        except ModelError as err:
            print("ERROR", err)
    """)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "HOME": str(tmp_path), "KERAS_HOME": str(tmp_path / "keras"),
           "https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"}
    env.pop("TF_USE_LEGACY_KERAS", None)
    env.pop("SM_FRAMEWORK", None)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ERROR sm.Unet('mobilenetv2'): could not download ImageNet weights (offline?); pass encoder_weights=<path" \
        in proc.stdout, proc.stdout[-2000:]


def test_every_sm_backbone_has_a_tfseg_twin_of_the_same_name():
    """A notebook's sm.Unet(name) ports by its import for every backbone segmentation_models has."""
    from tests.conftest import require_sm
    from tfseg.models.encoders import encoder_names

    require_sm()
    script = "import segmentation_models as sm; print(sorted(sm.Backbones._default_feature_layers))"
    proc = subprocess.run([sys.executable, "-c", script], env=sm_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    sm_names = set(json.loads(proc.stdout.strip().splitlines()[-1].replace("'", '"')))
    assert len(sm_names) > 25 and sm_names <= set(encoder_names()), sorted(sm_names - set(encoder_names()))


# ------------------------------------------------------------------------------------------------
# segmentation_models' loss and metric names (tfseg.losses.SM_LOSSES, tfseg.metrics.METRICS)
# ------------------------------------------------------------------------------------------------

SM_LOSS_NAMES = ["jaccard_loss", "dice_loss", "binary_focal_loss", "categorical_focal_loss", "binary_crossentropy",
                 "categorical_crossentropy", "bce_dice_loss", "bce_jaccard_loss", "cce_dice_loss", "cce_jaccard_loss",
                 "binary_focal_dice_loss", "binary_focal_jaccard_loss", "categorical_focal_dice_loss",
                 "categorical_focal_jaccard_loss"]
SM_METRIC_NAMES = ["iou_score", "f1_score", "f2_score", "precision", "recall"]
# sm's loss and metric classes with their arguments (L: sm.losses / tfseg.losses, M: sm.metrics / tfseg.metrics);
# the second multiclass one is sm's CamVid example's loss
SM_OBJECTS = [
    ("binary", "L.DiceLoss()"), ("binary", "L.DiceLoss(beta=2, per_image=True, smooth=1.0)"),
    ("binary", "L.JaccardLoss(per_image=True)"), ("binary", "L.BinaryCELoss()"),
    ("binary", "L.BinaryFocalLoss(alpha=0.4, gamma=3.0)"), ("binary", "L.BinaryFocalLoss() + 2 * L.DiceLoss()"),
    ("binary", "L.binary_focal_loss + L.JaccardLoss(smooth=1.0)"),
    ("binary", "M.IOUScore(threshold=0.5)"), ("binary", "M.FScore(beta=2, threshold=0.3, per_image=True)"),
    ("saturated", "L.binary_crossentropy"), ("saturated", "L.bce_jaccard_loss"), ("saturated", "L.binary_focal_loss"),
    ("multiclass", "L.DiceLoss(class_weights=np.array([1, 2, 0.5, 1]))"),
    ("multiclass", "L.DiceLoss(class_weights=np.array([1, 2, 0.5, 1])) + (1 * L.CategoricalFocalLoss())"),
    ("multiclass", "L.JaccardLoss(class_indexes=[1, 2], class_weights=[0.5, 2.0], per_image=True)"),
    ("multiclass", "L.CategoricalCELoss(class_weights=np.array([1, 2, 0.5, 1]))"),
    ("multiclass", "L.CategoricalCELoss(class_indexes=[0, 3])"),
    ("multiclass", "L.CategoricalFocalLoss(alpha=0.5, gamma=1.5, class_indexes=[1, 2, 3])"),
    ("multiclass", "L.BinaryFocalLoss()"), ("multiclass", "L.BinaryCELoss()"),
    ("multiclass", "M.IOUScore(threshold=0.5)"), ("multiclass", "M.FScore(threshold=0.5)"),
    ("multiclass", "M.IOUScore(class_indexes=1, per_image=True)"),
    ("multiclass", "M.FScore(beta=2, class_weights=np.array([0.5, 1, 1, 2]))"),
]
SM_VALUES_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import segmentation_models as sm
    data = np.load(sys.argv[1])
    out = {}
    for case in ("binary", "multiclass"):
        gt, pr = data[case + "_gt"], data[case + "_pr"]
        for name in json.loads(sys.argv[2]):
            out[f"{case}/{name}"] = float(getattr(sm.losses, name)(gt, pr))
        for name in json.loads(sys.argv[3]):
            out[f"{case}/{name}"] = float(getattr(sm.metrics, name)(gt, pr))
    for case, expr in json.loads(sys.argv[4]):
        out[f"{case}/{expr}"] = float(eval(expr, {"L": sm.losses, "M": sm.metrics, "np": np})(
            data[case + "_gt"], data[case + "_pr"]))
    print("RESULT" + json.dumps(out))
""")


def _sm_cases(seed: int = 0) -> dict[str, np.ndarray]:
    """A one-channel batch (0/1 masks, sigmoid probabilities) and a 4-class one (one-hot masks, softmax)."""
    rng = np.random.default_rng(seed)
    binary_gt = (rng.uniform(size=(3, 16, 16, 1)) > 0.6).astype("float32")
    binary_pr = np.clip(0.6 * binary_gt + 0.4 * rng.uniform(size=binary_gt.shape), 0.01, 0.99).astype("float32")
    labels = rng.integers(0, 4, (3, 16, 16))
    logits = rng.normal(size=(3, 16, 16, 4)) + 2.0 * np.eye(4)[labels]
    softmax = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    # sigmoid outputs at exactly 0 and 1 (float32 saturates there), right and wrong: Keras 2's cross-entropy
    saturated_pr = binary_pr.copy()
    saturated_pr[:, :4] = binary_gt[:, :4]
    saturated_pr[:, 4:8] = 1.0 - binary_gt[:, 4:8]
    return {"binary_gt": binary_gt, "binary_pr": binary_pr, "saturated_gt": binary_gt, "saturated_pr": saturated_pr,
            "multiclass_gt": np.eye(4, dtype="float32")[labels],
            "multiclass_pr": softmax.astype("float32"), "multiclass_labels": labels[..., None].astype("int32")}


@pytest.fixture(scope="module")
def sm_values(tmp_path_factory) -> tuple[dict, dict]:
    arrays = _sm_cases()
    path = tmp_path_factory.mktemp("sm_values") / "cases.npz"
    np.savez(path, **arrays)
    proc = subprocess.run([sys.executable, "-c", SM_VALUES_SCRIPT, str(path), json.dumps(SM_LOSS_NAMES),
                           json.dumps(SM_METRIC_NAMES), json.dumps(SM_OBJECTS)],
                          env=sm_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))
    return json.loads(line[len("RESULT"):]), arrays


@pytest.mark.parametrize("name", SM_LOSS_NAMES)
def test_sm_loss_names_compute_sms_value(sm_values, name):
    """train.loss {<sm name>: 1} and tfseg.losses.<sm name> give sm.losses.<sm name>'s value, on sm's one-hot masks
    and on tfseg's class indices; sm's categorical losses are refused on one channel."""
    import tfseg.losses
    from tfseg.errors import ConfigError
    from tfseg.losses import build_loss

    values, arrays = sm_values
    for case, classes in (("binary", 1), ("multiclass", 4)):
        gt, pr = arrays[f"{case}_gt"], arrays[f"{case}_pr"]
        want = values[f"{case}/{name}"]
        if classes == 1 and name.startswith(("categorical", "cce")):
            with pytest.raises(ConfigError, match=f"train.loss: segmentation_models' {name} is a categorical loss and "
                                                  "needs classes > 1"):
                build_loss({name: 1}, classes=1)
            continue
        assert float(getattr(tfseg.losses, name)(gt, pr)) == pytest.approx(want, rel=2e-5, abs=1e-6), case
        assert float(build_loss({name: 1}, classes=classes)(gt, pr)) == pytest.approx(want, rel=2e-5, abs=1e-6)
        if classes > 1:
            labels = arrays["multiclass_labels"]
            assert float(build_loss({name: 1}, classes=classes)(labels, pr)) == pytest.approx(want, rel=2e-5, abs=1e-6)


@pytest.mark.parametrize("name", SM_METRIC_NAMES)
def test_sm_metric_names_compute_sms_value(sm_values, name):
    """train.metrics [<sm name>] over one batch, and tfseg.metrics.<sm name>, give sm.metrics.<sm name>'s value."""
    import tfseg.metrics
    from tfseg.metrics import build_metric

    values, arrays = sm_values
    for case, classes in (("binary", 1), ("multiclass", 4)):
        gt, pr = arrays[f"{case}_gt"], arrays[f"{case}_pr"]
        want = values[f"{case}/{name}"]
        assert float(getattr(tfseg.metrics, name)(gt, pr)) == pytest.approx(want, rel=2e-5), case
        metric = build_metric(name, classes=classes)
        metric.update_state(arrays["multiclass_labels"] if classes > 1 else gt, pr)
        assert float(metric.result()) == pytest.approx(want, rel=2e-5), case


@pytest.mark.parametrize("case,expr", SM_OBJECTS, ids=[f"{c}-{e}" for c, e in SM_OBJECTS])
def test_sm_loss_and_metric_classes_compute_sms_value(sm_values, case, expr):
    """sm.losses.DiceLoss(class_weights=...), sm.metrics.IOUScore(threshold=0.5) ... with tfseg.losses / tfseg.metrics
    in their place give sm's value, on sm's one-hot masks and on class indices."""
    import tfseg.losses
    import tfseg.metrics

    values, arrays = sm_values
    want = values[f"{case}/{expr}"]
    targets = [arrays[f"{case}_gt"]] + ([arrays["multiclass_labels"]] if case == "multiclass" else [])
    for gt in targets:
        obj = eval(expr, {"L": tfseg.losses, "M": tfseg.metrics, "np": np})
        assert float(obj(gt, arrays[f"{case}_pr"])) == pytest.approx(want, rel=2e-5, abs=1e-6), gt.shape


def test_sms_camvid_example_ports_by_its_import_and_trains_on_camvid(tmp_path):
    """segmentation_models' multiclass example (CamVid: a Unet, DiceLoss(class_weights) + 1 * CategoricalFocalLoss,
    IOUScore(threshold=0.5) and FScore(threshold=0.5)) with tfseg in sm's place, on 4 CamVid sample images cut to
    64x64 with one-hot masks of 4 classes and the rest: the loss falls, Keras logs sm's metric names, and the
    compiled model reloads from .keras (after import tfseg, no custom_objects) to the same loss."""
    import keras
    from PIL import Image

    import tfseg.losses
    import tfseg.metrics
    from tfseg.models.unet import Unet

    root = shared_path("camvid_sample", "train")
    names = sorted(p.name for p in (root / "images").iterdir())[:4]
    images = np.stack([np.asarray(Image.open(root / "images" / n).convert("RGB").resize((64, 64), Image.BILINEAR))
                       for n in names]).astype("float32")
    labels = np.stack([np.asarray(Image.open(root / "masks" / n).resize((64, 64), Image.NEAREST)) for n in names])
    classes = [0, 1, 3, 8]  # sky, building, road, car; the background channel last, as sm's example does
    masks = np.stack([labels == c for c in classes], axis=-1).astype("float32")
    masks = np.concatenate([masks, 1.0 - masks.sum(-1, keepdims=True)], axis=-1)
    assert masks.sum(axis=(0, 1, 2)).min() > 0  # every class is present

    keras.utils.set_random_seed(0)
    model = Unet("mobilenetv2", input_shape=(64, 64, 3), classes=5, activation="softmax", encoder_weights=None)
    dice_loss = tfseg.losses.DiceLoss(class_weights=np.array([1, 2, 0.5, 2, 0.5]))
    total_loss = dice_loss + (1 * tfseg.losses.CategoricalFocalLoss())
    metrics = [tfseg.metrics.IOUScore(threshold=0.5), tfseg.metrics.FScore(threshold=0.5)]
    # Keras 3 takes loss_weights third: metrics by keyword. Eager steps: tracing costs more than a few of them.
    model.compile(keras.optimizers.Adam(1e-3), total_loss, metrics=metrics, run_eagerly=True)
    logs = [model.train_on_batch(images, masks, return_dict=True) for _ in range(4)]
    assert set(logs[0]) == {"loss", "iou_score", "f1-score"}
    losses = [log["loss"] for log in logs]  # before each update
    assert losses[-1] < losses[0], losses
    path = tmp_path / "camvid_unet.keras"
    model.save(path)
    again = keras.models.load_model(path)
    assert type(again.loss).__name__ == "SmLossSum"
    assert [type(loss).__name__ for _, loss in again.loss.parts] == ["DiceLoss", "CategoricalFocalLoss"]
    assert again.loss.parts[0][1].class_weights == [1.0, 2.0, 0.5, 2.0, 0.5]
    probs = model(images, training=False)
    assert float(again.loss(masks, probs)) == pytest.approx(float(total_loss(masks, probs)), rel=1e-6)
