"""Prediction as the run trained (``infer.fit``): whole images resized to ``data.image_size`` for
``data.fit: resize`` runs, tiles otherwise; rectangular fixed-size models (CamVid's 352 x 480)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tests.conftest import shared_path
from tests.test_inference import isbi, make_run, pointwise, tiny_model
from tfseg import tiling_predict as tp
from tfseg.config import DataConfig, InferConfig
from tfseg.errors import ConfigError, ModelError
from tfseg.inference import Predictor
from tfseg.resize_predict import iter_resized, resize_as_training, resize_bilinear, whole_image_size


def kvasir() -> np.ndarray:
    path = shared_path("kvasir_seg", "images", "cju0qkwl35piu0993l0dewei2.jpg")
    return np.asarray(Image.open(path).convert("RGB"))  # 529 x 622


def camvid(n: int = 2) -> list:
    return sorted(shared_path("camvid_sample", "test", "images").iterdir())[:n]


def tf_resize(x: np.ndarray, size) -> np.ndarray:
    import tensorflow as tf

    return tf.image.resize(x, size, method="bilinear", antialias=False).numpy()


def as_training(image: np.ndarray, size) -> np.ndarray:
    """What the training pipeline (data.fit: resize) fed the model: tfseg.data.pipeline._resize."""
    return np.clip(np.round(tf_resize(image, size)), 0, 255)


@pytest.mark.parametrize("size", [(352, 352), (128, 96), (700, 900), (529, 622), (1, 1), (3, 1000)])
def test_resize_equals_tf_image_resize(size):
    img = kvasir()
    np.testing.assert_array_equal(resize_bilinear(img, size), tf_resize(img, size))
    np.testing.assert_array_equal(resize_as_training(img, size), as_training(img, size))
    # read a few rows at a time (a windowed TIFF): the same values
    bands = list(iter_resized(img, size, max_rows=3))
    assert [y0 for y0, _ in bands] == sorted({y0 for y0, _ in bands}) and bands[0][0] == 0
    np.testing.assert_array_equal(np.concatenate([b for _, b in bands]), tf_resize(img, size))
    probs = np.random.default_rng(0).random((40, 52, 3)).astype(np.float32)  # probabilities going back up
    np.testing.assert_array_equal(resize_bilinear(probs, size), tf_resize(probs, size))


def test_whole_image_size_follows_the_training_fit():
    assert whole_image_size(InferConfig(), DataConfig(fit="resize", image_size=(352, 480))) == (352, 480)
    for fit in ("random_crop", "none"):
        assert whole_image_size(InferConfig(), DataConfig(fit=fit)) is None
    assert whole_image_size(InferConfig(fit="tile"), DataConfig(fit="resize")) is None
    assert whole_image_size(InferConfig(fit="resize"), DataConfig(fit="none", image_size=(64, 64))) == (64, 64)
    with pytest.raises(ConfigError, match=r"infer.downscale: 4 scales tiles.*infer.fit=tile"):
        whole_image_size(InferConfig(downscale=4), DataConfig(fit="resize"))
    assert whole_image_size(InferConfig(downscale=4), DataConfig(fit="none")) is None  # HuBMAP


def fixed_model(hw=(64, 96), channels=3, classes=4, kernel=3):
    """A model built for one input size, as `tfseg train` builds CamVid's (352 x 480)."""
    import keras

    inp = keras.Input((*hw, channels))
    x = keras.layers.Rescaling(1 / 255.0)(inp)
    x = keras.layers.Conv2D(8, kernel, padding="same", activation="relu")(x)
    out = keras.layers.Conv2D(classes, 1, activation="softmax" if classes > 1 else "sigmoid", name="output")(x)
    model = keras.Model(inp, out)
    rng = np.random.default_rng(7)
    model.set_weights([rng.normal(0, 1, w.shape).astype(np.float32) for w in model.get_weights()])
    return model


def test_rectangular_model_predicts_by_rectangular_tiles():
    import keras

    inp = keras.Input((32, 48, 3))  # pointwise: tiles must give the full-image prediction exactly
    out = keras.layers.Conv2D(3, 1, activation="softmax")(keras.layers.Rescaling(1 / 255.0)(inp))
    model = keras.Model(inp, out)
    model.set_weights([np.random.default_rng(1).normal(0, 2, w.shape).astype(np.float32)
                       for w in model.get_weights()])
    rgb = np.asarray(Image.open(camvid(1)[0]).convert("RGB"))[:150, :205]
    pred = Predictor([model], InferConfig(tile_size=64, overlap=0.5, batch_size=3, tta=2, accumulator="float32"))
    assert pred.spec == tp.TileSpec(32, 32, 3, 3, in_width=48, out_width=48)
    assert pred.spec.in_hw == (32, 48) and pred.spec.margins == (0, 0)
    full = keras.Sequential([keras.Input((None, None, 3)), model.layers[-2], model.layers[-1]])  # same weights
    np.testing.assert_allclose(pred.predict(rgb), full.predict_on_batch(rgb[None].astype(np.float32))[0], atol=1e-5)
    # quarter turns would feed it 48 x 32: refused up front
    with pytest.raises(ConfigError, match="infer.tta: 8 includes quarter turns.*32x48"):
        Predictor([model], InferConfig(tta=8))
    # engine: a rectangular valid-region model (margins 4 and 6)
    spec = tp.TileSpec(in_size=40, out_size=32, classes=1, channels=1, in_width=60, out_width=48)

    def valid(x):
        return pointwise(x)[:, 4:36, 6:54]

    img = isbi((150, 130))
    np.testing.assert_allclose(tp.predict_tiled(valid, img, spec, overlap=0.25),
                               pointwise(img[None].astype(np.float32))[0], atol=1e-5)


def test_cli_predicts_a_camvid_like_run_whole_at_its_training_size(tmp_path):
    """A data.fit: resize run whose model is fixed at a rectangle (CamVid: 352 x 480; here 64 x 96):
    `tfseg predict` used to stop with 'Expected square tiles'. Each image is now resized as training
    resized it, predicted once, and the probabilities resized back before the argmax."""
    from tfseg.cli import main

    run, models = make_run(tmp_path, folds=(0,), channels=3, fit="resize", image_size=(64, 96),
                           make_model=fixed_model)
    inputs = camvid(2)
    out = tmp_path / "masks"
    assert main(["predict", "--run", str(run), "--input", *map(str, inputs), "--output", str(out),
                 "--set", "infer.tta=2"]) == 0
    for path in inputs:
        rgb = np.asarray(Image.open(path).convert("RGB"))
        x = as_training(rgb, (64, 96))[None]
        probs = (models[0].predict_on_batch(x) + models[0].predict_on_batch(x[:, :, ::-1])[:, :, ::-1]) / 2
        expect = tf_resize(probs[0], rgb.shape[:2]).argmax(-1)
        mask = np.asarray(Image.open(out / f"{path.stem}.png"))
        assert mask.shape == (720, 960)
        np.testing.assert_array_equal(mask, expect)
    # the same run by rectangular tiles of the model's size, at full resolution
    tiles = tmp_path / "tiles"
    assert main(["predict", "--run", str(run), "--input", str(inputs[0]), "--output", str(tiles),
                 "--set", "infer.fit=tile"]) == 0
    rgb = np.asarray(Image.open(inputs[0]).convert("RGB"))
    expect = Predictor([models[0]], InferConfig(tta=1)).predict_mask(rgb)
    np.testing.assert_array_equal(np.asarray(Image.open(tiles / f"{inputs[0].stem}.png")), expect)


def test_resize_run_predicts_at_the_scale_it_trained_on(tmp_path, capsys):
    """ISBI trained on whole slices resized to 128 used to be tiled at 512 (mean Dice 0.850 instead
    of the 0.918 that evaluate measured on the same slices); now predict resizes as training did."""
    from tfseg.cli import main

    run, models = make_run(tmp_path, folds=(0, 1), fit="resize", image_size=(48, 40))
    src = shared_path("isbi2012_em_membrane", "images", "3.png")
    img = np.asarray(Image.open(src))[..., None]
    x = as_training(img, (48, 40))[None]
    probs = (models[0].predict_on_batch(x) + models[1].predict_on_batch(x)) / 2
    t = float(np.median(probs))  # a threshold that cuts the random model's output in half
    expect = tf_resize(probs[0], (512, 512))[..., 0] > t
    out = tmp_path / "masks"
    assert main(["predict", "--run", str(run), "--input", str(src), "--output", str(out),
                 "--set", "infer.save_probabilities=true", "--set", f"infer.threshold={t}"]) == 0
    assert "whole images resized to 48x40" in capsys.readouterr().out
    np.testing.assert_array_equal(np.asarray(Image.open(out / "3.png")), expect * 255)
    np.testing.assert_allclose(np.load(out / "3_prob.npy")[..., 0], tf_resize(probs[0], (512, 512))[..., 0],
                               atol=1e-3)  # float16 on disk
    # the library way in agrees, and infer.fit=tile keeps the sliding windows
    assert (Predictor.from_run(run, infer=InferConfig(threshold=t)).predict_mask(img) == expect).all()
    tiled = Predictor.from_run(run, infer=InferConfig(fit="tile", tile_size=64, threshold=t))
    assert tiled.resize_to is None and (tiled.predict_mask(img) != expect).any()
    capsys.readouterr()
    assert main(["predict", "--run", str(run), "--input", str(src), "--output", str(tmp_path / "x"),
                 "--set", "infer.downscale=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "infer.downscale: 2 scales tiles" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_whole_image_prediction_refuses_a_model_of_another_size(tmp_path):
    model = fixed_model((64, 96))
    with pytest.raises(ModelError, match="model input 64x96, but whole images are predicted at data.image_size 32x32"):
        Predictor([model], InferConfig(), resize_to=(32, 32))
    pred = Predictor([model], InferConfig(accumulator="float32"), resize_to=(64, 96))
    rgb = np.asarray(Image.open(camvid(1)[0]).convert("RGB"))[:300, :200]
    probs = pred.predict(rgb)
    assert probs.shape == (300, 200, 4) and np.allclose(probs.sum(-1), 1, atol=1e-4)
    bands = list(pred.mask_bands(rgb))
    np.testing.assert_array_equal(np.concatenate([b for _, b in bands]), probs.argmax(-1))
    with pytest.raises(ModelError, match="valid convolutions"):
        Predictor([tiny_model()], InferConfig(), spec=tp.TileSpec(64, 48, 1, 1), resize_to=(64, 64))


def test_huge_tiff_is_resized_by_bands_and_its_mask_streamed(tmp_path, monkeypatch):
    import tifffile

    from tfseg import predict_cli
    from tfseg.cli import main

    run, models = make_run(tmp_path, folds=(0,), channels=3, fit="resize", image_size=(64, 96),
                           make_model=lambda: fixed_model(classes=1))
    rgb = kvasir()[:300, :290]
    tifffile.imwrite(tmp_path / "slide.tif", rgb, tile=(64, 64))
    monkeypatch.setattr(predict_cli, "WINDOWED_PIXELS", 1000)  # read by windows, mask written by bands
    win = predict_cli.open_image(tmp_path / "slide.tif", 3)
    assert not isinstance(win, np.ndarray)
    np.testing.assert_array_equal(np.concatenate([b for _, b in iter_resized(win, (64, 96), max_rows=16)]),
                                  resize_bilinear(rgb, (64, 96)))
    pred = Predictor([models[0]], InferConfig(), resize_to=(64, 96))
    t = float(np.median(pred.predict(rgb)))
    assert main(["predict", "--run", str(run), "--input", str(tmp_path / "slide.tif"), "--output",
                 str(tmp_path / "out"), "--set", f"infer.threshold={t}"]) == 0
    expect = Predictor([models[0]], InferConfig(threshold=t), resize_to=(64, 96)).predict_mask(rgb)
    assert 0.2 < expect.mean() < 0.8
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "out" / "slide.tif"), expect * 255)
