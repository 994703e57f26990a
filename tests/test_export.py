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


def eager_probs(model, x):
    """The Keras model's probabilities from an eager call: ``predict_on_batch`` retraces for any size (None)
    at the second size it sees, where Keras' bilinear UpSampling2D fails as the export did."""
    import keras

    return keras.ops.convert_to_numpy(model(x.astype(np.float32), training=False))


def isbi_batch(height, width):
    """Two uint8 [height, width, 1] crops (top-left, bottom-right) of a real ISBI 2012 EM slice."""
    img = np.asarray(Image.open(shared_path("isbi2012_em_membrane", "images", "0.png")).convert("L"))
    return np.stack([img[:height, :width], img[-height:, -width:]])[..., None].astype(np.uint8)


def test_cli_savedmodel_of_a_free_size_bilinear_unet_small_run(tmp_path):
    """The dogfood ISBI run: unet_small (bilinear UpSampling2D) with input_shape [null, null, 1] crashed in
    `tfseg export --format savedmodel` with OperatorNotAllowedInGraphError (Keras' resize checks a tensor size
    in Python). Now the SavedModel takes any size and predicts what the Keras model predicts."""
    import keras
    import tensorflow as tf

    from tfseg.cli import main
    from tfseg.config import dump_config, load_config
    from tfseg.models import build_model

    run = tmp_path / "run"
    cfg = load_config(None, ["data.classes=1", "data.channels=1", "data.image_size=[32, 32]", "data.fit=random_crop",
                             "data.val_size=[64, 64]", "model.arch=unet_small", "model.input_shape=[null, null, 1]",
                             "model.encoder_weights=null", "model.options={filters: [4, 8, 8, 16], batchnorm: true}"])
    dump_config(cfg, run / "config.yaml")
    keras.utils.set_random_seed(0)
    model = build_model(cfg.model)
    (run / "fold0").mkdir(parents=True)
    model.save(run / "fold0" / "best.keras")
    out = tmp_path / "exp" / "sm"
    assert main(["export", "--run", str(run), "--format", "savedmodel", "--output", str(out)]) == 0
    signature = tf.saved_model.load(str(out)).signatures["serve"]
    assert signature.structured_input_signature[1]["image"].shape.as_list() == [None, None, None, 1]
    serve = load_serving("savedmodel", out)
    for height, width in ((64, 64), (48, 80)):  # the model's free size, square or not
        x = isbi_batch(height, width)
        y = serve(x)
        assert y.shape == (2, height, width, 1) and y.dtype == np.float32
        np.testing.assert_allclose(y, eager_probs(model, x), atol=1e-5)
    assert [p.name for p in (tmp_path / "exp").iterdir()] == ["sm"]


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_savedmodel_free_size_upsampling_interpolations_match_keras(tmp_path, interpolation):
    """Each UpSampling2D that resizes (not nearest) is swapped for the export only: same values at any size."""
    import keras

    inp = keras.Input((None, None, 1))
    x = keras.layers.Conv2D(4, 3, padding="same")(inp)
    x = keras.layers.MaxPooling2D(4)(x)
    x = keras.layers.UpSampling2D((4, 2), interpolation=interpolation)(x)
    x = keras.layers.UpSampling2D((1, 2), interpolation="nearest")(x)
    model = keras.Model(inp, keras.layers.Conv2D(1, 1, activation="sigmoid", name="output")(x))
    out = export_model(model, "savedmodel", tmp_path / "sm")
    for height, width in ((32, 32), (16, 40)):
        x = isbi_batch(height, width)
        np.testing.assert_allclose(load_serving("savedmodel", out)(x), eager_probs(model, x), atol=1e-5)
    assert [type(layer).__name__ for layer in model.layers].count("UpSampling2D") == 2  # the model is untouched


def test_savedmodel_export_that_cannot_be_traced_is_one_line(tmp_path):
    """A layer that branches in Python on its input's height cannot be traced for any size: a one-line
    ModelError naming the layer (was: TensorFlow's OperatorNotAllowedInGraphError and its traceback)."""
    import keras

    class HeightBranch(keras.layers.Layer):
        def compute_output_shape(self, shape):
            return shape

        def call(self, x):
            return x * 2.0 if keras.ops.shape(x)[1] > 8 else x

    inp = keras.Input((None, None, 1))
    model = keras.Model(inp, keras.layers.Conv2D(1, 1, activation="sigmoid", name="output")(HeightBranch()(inp)))
    with pytest.raises(ModelError, match=r"cannot be traced for any image size .*HeightBranch\.call\(\)") as info:
        export_model(model, "savedmodel", tmp_path / "sm")
    assert "\n" not in str(info.value) and "tflite" in str(info.value)
    assert not list(tmp_path.iterdir())


def test_any_size_copy_of_a_fixed_size_model_shares_its_weights():
    """The copy of a 188x188 unet_original takes any size and computes what the model computes at 188 on a
    real ISBI crop."""
    from tfseg.config import ModelConfig
    from tfseg.export import any_size_copy
    from tfseg.models import build_model
    from tfseg.models import unet_original as uo

    model = build_model(ModelConfig(arch="unet_original", input_shape=[188, 188, 1], classes=1,
                                    encoder_weights=None, options=uo.TEST_OPTIONS))
    copy = any_size_copy(model)
    assert model.input_shape == (None, 188, 188, 1) and copy.input_shape == (None, None, None, 1)
    img = np.asarray(Image.open(shared_path("isbi2012_em_membrane", "images", "0.png")), np.float32)
    x = img[None, :188, :188, None]
    np.testing.assert_allclose(copy(x, training=False), model(x, training=False), atol=1e-6)
    assert tuple(copy(img[None, :204, :204, None], training=False).shape) == (1, 20, 20, 1)
