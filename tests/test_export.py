"""Export: each format that works is reloaded and compared with the Keras model's predictions.

Tolerances: SavedModel 1e-5 (same kernels), TFLite and ONNX 1e-4 (other kernels, float32).
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tests.conftest import shared_path
from tfseg.errors import ModelError, RunError
from tfseg.export import export_model, load_serving


def small_model(size=None, classes=1, logits=False):
    import keras

    inp = keras.Input((size, size, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1.0)(inp)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(x)
    x = keras.layers.BatchNormalization()(x)
    skip = x
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(x)
    x = keras.layers.UpSampling2D()(x)
    x = keras.layers.Concatenate()([x, skip])
    x = keras.layers.Conv2D(classes, 1)(x)
    act = "linear" if logits else ("sigmoid" if classes == 1 else "softmax")
    out = keras.layers.Activation(act, dtype="float32", name="output")(x)
    model = keras.Model(inp, out)
    rng = np.random.default_rng(0)
    model.set_weights([rng.normal(0, 0.5, w.shape).astype(np.float32) if w.ndim > 1 else w
                       for w in model.get_weights()])
    return model


def kvasir_batch(size=64):
    path = shared_path("kvasir_seg", "images", "cju0qkwl35piu0993l0dewei2.jpg")
    img = np.asarray(Image.open(path).convert("RGB").resize((size, size)))
    return np.stack([img, img[::-1]]).astype(np.uint8)


def keras_probs(model, x, logits=False, classes=1):
    y = model.predict_on_batch(x.astype(np.float32))
    if logits:
        y = 1 / (1 + np.exp(-y)) if classes == 1 else np.exp(y) / np.exp(y).sum(-1, keepdims=True)
    return y


@pytest.mark.parametrize(("fmt", "tol"), [("savedmodel", 1e-5), ("tflite", 1e-4), ("onnx", 1e-4)])
def test_export_reload_matches_keras(tmp_path, fmt, tol):
    if fmt == "onnx":
        _need_onnx()
    model = small_model(size=None, classes=1, logits=True)
    x = kvasir_batch(64)
    out = export_model(model, fmt, tmp_path / f"m.{fmt}", input_shape=(64, 64, 3))
    y = load_serving(fmt, out)(x)
    assert y.shape == (2, 64, 64, 1) and y.dtype == np.float32
    assert 0.0 <= y.min() and y.max() <= 1.0  # logits were turned into probabilities inside
    np.testing.assert_allclose(y, keras_probs(model, x, logits=True), atol=tol)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def _need_onnx():
    for name in ("tf2onnx", "onnxruntime"):
        pytest.importorskip(name, reason=f"{name} is not installed (pip install tfseg[export])")


def normalization_model(size=32):
    """Keras' ``Normalization`` layer with constant mean and variance, as EfficientNet encoders begin."""
    import keras

    inp = keras.Input((size, size, 3))
    x = keras.layers.Rescaling(1 / 255)(inp)
    x = keras.layers.Normalization(mean=[0.485, 0.456, 0.406], variance=[0.052, 0.050, 0.050])(x)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(x)
    x = keras.layers.BatchNormalization()(x)
    out = keras.layers.Conv2D(1, 1, activation="sigmoid", name="output")(x)
    model = keras.Model(inp, out)
    rng = np.random.default_rng(1)
    model.set_weights([rng.normal(0, 0.5, w.shape).astype(np.float32) if w.ndim > 1 else w
                       for w in model.get_weights()])
    return model


def _onnx_feeds(path) -> list[str]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [i.name for i in session.get_inputs()]


def test_onnx_export_of_a_normalization_layer_takes_only_the_image(tmp_path):
    """The audit: the kvasir recipe's ONNX (EfficientNet: keras' Normalization layer) asked for
    `.../normalization_1/Sub/y:0` and `.../Sqrt/x:0` besides `image`; now they are constants."""
    _need_onnx()
    model = normalization_model(32)
    x = kvasir_batch(32)
    out = export_model(model, "onnx", tmp_path / "norm.onnx")
    assert _onnx_feeds(out) == ["image"]
    np.testing.assert_allclose(load_serving("onnx", out)(x), keras_probs(model, x), atol=1e-4)
    assert [p.name for p in tmp_path.iterdir()] == ["norm.onnx"]


@pytest.mark.slow
def test_onnx_export_of_an_efficientnet_unet_matches_keras(tmp_path):
    """The kvasir recipe's architecture (unet, efficientnetb0; no download: random weights)."""
    _need_onnx()
    from tfseg.config import ModelConfig
    from tfseg.models import build_model

    model = build_model(ModelConfig(arch="unet", backbone="efficientnetb0", input_shape=(64, 64, 3), classes=1,
                                    encoder_weights=None))
    x = kvasir_batch(64)
    out = export_model(model, "onnx", tmp_path / "effb0.onnx")
    assert _onnx_feeds(out) == ["image"]
    np.testing.assert_allclose(load_serving("onnx", out)(x), keras_probs(model, x), atol=1e-4)


def test_savedmodel_multiclass_fixed_size_and_refuses_overwrite(tmp_path):
    model = small_model(size=32, classes=3)
    x = kvasir_batch(32)
    out = export_model(model, "savedmodel", tmp_path / "sm")
    y = load_serving("savedmodel", out)(x)
    np.testing.assert_allclose(y, keras_probs(model, x), atol=1e-5)
    np.testing.assert_allclose(y.sum(-1), 1.0, atol=1e-5)
    with pytest.raises(RunError, match="already exists"):
        export_model(model, "savedmodel", tmp_path / "sm")


def test_static_export_of_free_size_model_needs_a_size(tmp_path):
    with pytest.raises(ModelError, match="model.input_shape"):
        export_model(small_model(size=None), "tflite", tmp_path / "m.tflite", input_shape=None)
    with pytest.raises(ModelError, match="Expected one of"):
        export_model(small_model(size=32), "torchscript", tmp_path / "m.pt")
    assert not list(tmp_path.iterdir())


def test_onnx_missing_tf2onnx_is_one_line(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tf2onnx(name, *args, **kwargs):
        if name == "tf2onnx":
            raise ImportError("No module named 'tf2onnx'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tf2onnx)
    with pytest.raises(ModelError, match="pip install") as info:
        export_model(small_model(size=32), "onnx", tmp_path / "m.onnx")
    assert "\n" not in str(info.value)


def test_cli_export_from_run(tmp_path, capsys):
    from tfseg.cli import main
    from tfseg.config import dump_config, load_config

    run = tmp_path / "run"
    dump_config(load_config(None, ["data.classes=1", "data.channels=3", "data.image_size=[32, 32]"]),
                run / "config.yaml")
    model = small_model(size=None)
    (run / "fold1").mkdir(parents=True)
    model.save(run / "fold1" / "best.keras")
    out = tmp_path / "m.tflite"
    assert main(["export", "--run", str(run), "--fold", "1", "--format", "tflite", "--output", str(out)]) == 0
    x = kvasir_batch(32)
    np.testing.assert_allclose(load_serving("tflite", out)(x), keras_probs(model, x), atol=1e-4)
    assert main(["export", "--run", str(run), "--fold", "0", "--format", "tflite",
                 "--output", str(tmp_path / "n.tflite")]) == 2
    assert "fold 0 not trained" in capsys.readouterr().err
    for fold in ("x", "all", "0,1"):  # the audit: `--fold x` was reported as `infer.folds: 'x'`
        with pytest.raises(SystemExit) as exit_:
            main(["export", "--run", str(run), "--fold", fold, "--format", "tflite",
                  "--output", str(tmp_path / "x.tflite")])
        assert exit_.value.code == 2
        assert capsys.readouterr().err == (f"tfseg export: error: argument --fold: {fold!r}: expected one fold "
                                           "number such as 0\n")
