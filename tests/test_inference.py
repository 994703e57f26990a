"""Sliding-window inference: stitching, blending weights, downscale, skipping, TTA, ensembles,
the run loader and ``tfseg predict`` end to end on a real ISBI image."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tests.conftest import shared_path
from tfseg import tiling_predict as tp
from tfseg import tta
from tfseg.config import InferConfig
from tfseg.errors import ConfigError, DataError, RunError
from tfseg.inference import Predictor


def isbi(crop=None) -> np.ndarray:
    img = np.asarray(Image.open(shared_path("isbi2012_em_membrane", "images", "0.png")))[..., None]
    return img if crop is None else img[:crop[0], :crop[1]]


def pointwise(x: np.ndarray) -> np.ndarray:
    """A model with a 1-pixel receptive field: any stitching error changes its output."""
    return 1.0 / (1.0 + np.exp(-(x[..., :1] - 128.0) / 20.0))


def box3(x: np.ndarray) -> np.ndarray:
    """3x3 mean with zero padding ("same" convolution): receptive field radius 1."""
    p = np.pad(x[..., :1], ((0, 0), (1, 1), (1, 1), (0, 0)))
    h, w = x.shape[1:3]
    return sum(p[:, i:i + h, j:j + w] for i in range(3) for j in range(3)) / 9.0 / 255.0


SPEC1 = tp.TileSpec(in_size=64, out_size=64, classes=1, channels=1)


def test_positions_cover_and_end_on_border():
    for length in (1, 63, 64, 65, 200, 513):
        for overlap in (0.0, 0.25, 0.5):
            ys = tp.positions(length, 64, overlap)
            assert ys[0] == 0 and (ys[-1] == length - 64 or length <= 64)
            assert all(b - a <= round(64 * (1 - overlap)) and b > a for a, b in zip(ys, ys[1:]))
    assert tp.positions(128, 64, 0.0) == [0, 64]
    with pytest.raises(ConfigError, match="overlap"):
        tp.positions(100, 64, 1.0)


def test_blending_weights():
    g = tp.weight_profile(64, "gaussian", 0.125)
    assert g.max() == pytest.approx(1.0) and g.min() >= tp.MIN_WEIGHT
    np.testing.assert_allclose(g, g[::-1])
    sigma = 64 * 0.125
    def gauss(d):
        return np.exp(-(d ** 2) / (2 * sigma ** 2))
    # pixel 40 is 8.5 = sigma + 0.5 from the centre 31.5; the peak pixels are 0.5 from it
    assert g[40] == pytest.approx(gauss(8.5) / gauss(0.5), rel=1e-5)
    lin = tp.weight_profile(64, "linear")
    assert lin[31] == lin[32] and lin[0] < lin[16] < lin[31]
    assert (tp.weight_profile(64, "constant") == 1).all()
    w2 = tp.weight_map(64, "gaussian")
    assert w2.shape == (64, 64) and w2[31, 31] == w2.max()
    with pytest.raises(ConfigError, match="Expected one of"):
        tp.weight_profile(64, "cosine")


@pytest.mark.parametrize("blend", tp.BLENDS)
@pytest.mark.parametrize("shape", [(512, 512), (300, 417), (40, 50)])
def test_tiled_equals_full_for_pointwise_model(blend, shape):
    img = isbi(shape)
    probs = tp.predict_tiled(pointwise, img, SPEC1, overlap=0.5, blend=blend, batch_size=3)
    np.testing.assert_allclose(probs, pointwise(img[None].astype(np.float32))[0], atol=1e-5)


def test_tiled_equals_full_inside_tiles_for_local_model():
    img = isbi((256, 256))
    full = box3(img[None].astype(np.float32))[0]
    tiled = tp.predict_tiled(box3, img, SPEC1, overlap=0.0, blend="gaussian", batch_size=4)
    inner = np.ones((256, 256), bool)
    for b in range(0, 257, 64):  # one pixel each side of every tile border sees the padding
        inner[max(b - 1, 0):b + 1] = False
        inner[:, max(b - 1, 0):b + 1] = False
    np.testing.assert_allclose(tiled[inner], full[inner], atol=1e-6)
    assert np.abs(tiled[~inner] - full[~inner]).max() > 1e-3  # the test sees seams where they are


def test_position_dependent_model_breaks_stitching():
    def row_index(x):
        return np.broadcast_to(np.arange(x.shape[1], dtype=np.float32)[None, :, None, None] / 64,
                               (*x.shape[:3], 1))
    tiled = tp.predict_tiled(row_index, isbi((128, 128)), SPEC1, overlap=0.0)
    assert not np.allclose(tiled[64:], np.arange(64, 128)[:, None, None] / 64)


def test_margin_model_valid_region():
    spec = tp.TileSpec(in_size=64, out_size=48, classes=1, channels=1)

    def valid(x):  # predicts only the centre 48x48 of its input, like the original U-Net
        return pointwise(x)[:, 8:56, 8:56]

    img = isbi((150, 130))
    probs = tp.predict_tiled(valid, img, spec, overlap=0.25, blend="linear")
    np.testing.assert_allclose(probs, pointwise(img[None].astype(np.float32))[0], atol=1e-5)


def test_downscale_predicts_on_reduced_image():
    small = isbi((60, 70))
    big = np.repeat(np.repeat(small, 2, axis=0), 2, axis=1)[:119, :139]  # odd sizes: last block partial
    probs = tp.predict_tiled(pointwise, big, SPEC1, overlap=0.5, downscale=2)
    assert probs.shape == (119, 139, 1)
    expect = np.repeat(np.repeat(pointwise(small[None].astype(np.float32))[0], 2, 0), 2, 1)[:119, :139]
    np.testing.assert_allclose(probs[:118, :138], expect[:118, :138], atol=1e-5)


def test_skip_background_tiles_are_not_predicted():
    img = np.zeros((128, 192, 3), np.uint8)
    img[:64, :64] = (200, 40, 90)  # saturated tissue in the top-left tile only
    calls = []

    def ones(x):
        calls.append(int((np.ptp(x, axis=(1, 2, 3)) > 0).sum()))
        return np.ones((*x.shape[:3], 1), np.float32)

    spec = tp.TileSpec(64, 64, 1, 3)
    probs = tp.predict_tiled(ones, img, spec, overlap=0.0, batch_size=2, skip_background=True)
    assert sum(calls) == 1 and len(calls) == 1  # one real tile, padded to a batch of 2
    assert probs[:64, :64].min() == 1.0 and probs[64:].max() == 0.0 and probs[:, 64:].max() == 0.0
    assert tp.is_background(np.full((8, 8, 3), 250.0)) and not tp.is_background(img[:8, :8].astype(float))


def test_float16_and_memmap_outputs(tmp_path):
    img = isbi((100, 90))
    half = tp.predict_tiled(pointwise, img, SPEC1, dtype="float16")
    assert half.dtype == np.float16
    mm = np.lib.format.open_memmap(tmp_path / "p.npy", mode="w+", dtype=np.float32, shape=(100, 90, 1))
    tp.predict_tiled(pointwise, img, SPEC1, out=mm)
    mm.flush()
    np.testing.assert_allclose(np.load(tmp_path / "p.npy"), half, atol=2e-3)


@pytest.mark.parametrize("n", tta.TTA_SIZES)
def test_tta_transforms_invert_exactly(n):
    x = np.random.default_rng(n).random((2, 6, 6, 3)).astype(np.float32)
    group = tta.transforms(n)
    assert len(group) == n and len({t.forward(x).tobytes() for t in group}) == n  # all distinct
    for t in group:
        np.testing.assert_array_equal(t.inverse(t.forward(x)), x)
    np.testing.assert_allclose(tta.with_tta(pointwise, n)(x * 255), pointwise(x * 255), atol=1e-6)


def test_tta_averages_a_non_equivariant_model():
    def left_ramp(x):  # output depends on the column: h-flip TTA averages it to a constant
        w = x.shape[2]
        ramp = np.arange(w, dtype=np.float32)[None, None, :, None] / (w - 1)
        return np.broadcast_to(ramp, (*x.shape[:3], 1))
    out = tta.with_tta(left_ramp, 2)(np.zeros((1, 4, 5, 1), np.float32))
    np.testing.assert_allclose(out, 0.5)
    with pytest.raises(ConfigError, match="Expected one of"):
        tta.transforms(3)


def test_ensemble_mean_threshold_and_argmax():
    spec = tp.TileSpec(32, 32, 1, 1)
    consts = [lambda x, v=v: np.full((*x.shape[:3], 1), v, np.float32) for v in (0.2, 0.5, 0.9)]
    pred = Predictor(consts, InferConfig(tile_size=32, threshold=0.5, accumulator="float32"), spec=spec)
    img = np.zeros((40, 33, 1), np.uint8)
    np.testing.assert_allclose(pred.predict(img), np.float32(1.6 / 3), atol=1e-6)
    assert Predictor(consts, InferConfig(tile_size=32), spec=spec).predict(img).dtype == np.float16
    assert pred.predict_mask(img).min() == 1
    high = Predictor(consts, InferConfig(tile_size=32, threshold=0.6), spec=spec)
    assert high.predict_mask(img).max() == 0
    band = np.array([[[0.1, 0.7, 0.2], [0.5, 0.2, 0.3]]], np.float32)
    np.testing.assert_array_equal(tp.band_to_mask(band, 0.5), [[1, 0]])
    with pytest.raises(DataError, match="3 channels. Expected 1"):
        pred.predict(np.zeros((8, 8, 3), np.uint8))


def test_select_folds_errors(tmp_path):
    from tfseg.inference import select_folds

    with pytest.raises(RunError, match="run directory not found"):
        select_folds(tmp_path / "missing")
    (tmp_path / "fold0").mkdir()
    with pytest.raises(RunError, match="no trained fold"):
        select_folds(tmp_path)
    for k in (0, 1):
        (tmp_path / f"fold{k}").mkdir(exist_ok=True)
        (tmp_path / f"fold{k}" / "best.keras").write_bytes(b"x")
    assert list(select_folds(tmp_path, "all")) == [0, 1]
    assert list(select_folds(tmp_path, "1")) == [1]
    with pytest.raises(RunError, match=r"fold 3 not trained .*folds found: \[0, 1\]"):
        select_folds(tmp_path, "0,3")


# --- Keras models, run directories and the command line ---------------------------------------
def tiny_model(kernel: int = 1, channels: int = 1, logits: bool = False):
    import keras

    inp = keras.Input((None, None, channels))
    x = keras.layers.Rescaling(1 / 255.0)(inp)
    x = keras.layers.Conv2D(4, kernel, padding="same", activation="relu", name="c1")(x)
    x = keras.layers.Conv2D(1, 1, name="c2")(x)
    out = keras.layers.Activation("linear" if logits else "sigmoid", dtype="float32", name="output")(x)
    model = keras.Model(inp, out)
    rng = np.random.default_rng(kernel)
    model.set_weights([rng.normal(0, 1, w.shape).astype(np.float32) for w in model.get_weights()])
    return model


def test_keras_tiled_equals_full_image_prediction():
    model = tiny_model(kernel=1, logits=True)  # logits: the predictor applies the sigmoid
    img = isbi((256, 192))
    pred = Predictor([model], InferConfig(tile_size=64, overlap=0.5, batch_size=4, accumulator="float32"))
    assert pred.spec == tp.TileSpec(64, 64, 1, 1)
    full = model.predict_on_batch(img[None].astype(np.float32))[0]
    np.testing.assert_allclose(pred.predict(img), 1 / (1 + np.exp(-full)), atol=1e-5)


def make_run(root, folds=(0, 1), channels=1, threshold=0.5, fit="random_crop", image_size=(64, 64),
             make_model=None):
    """A run of ``tiny_model`` folds whose config says it trained with ``data.fit: fit`` (random_crop:
    on full-resolution crops, so predicted by tiles; resize: on whole images resized to image_size).
    ``data.classes`` is the models' output channels, as in a run that `tfseg train` wrote."""
    from tfseg.config import dump_config, load_config

    run = root / "runs" / "tiny"
    models = {}
    for k in folds:
        (run / f"fold{k}").mkdir(parents=True)
        models[k] = tiny_model(kernel=3, channels=channels) if make_model is None else make_model()
        models[k].save(run / f"fold{k}" / "best.keras")
    classes = int(next(iter(models.values())).output_shape[-1]) if models else 1
    cfg = load_config(None, [f"data.channels={channels}", f"data.classes={classes}", "infer.tile_size=64",
                             f"data.fit={fit}", f"data.image_size={list(image_size)}",
                             "infer.batch_size=2", f"infer.threshold={threshold}",
                             "submit.pixel_order=column", "submit.id_column=id",
                             "submit.rle_column=predicted"])
    dump_config(cfg, run / "config.yaml")
    return run, models


def test_predictor_from_run_is_the_fold_mean(tmp_path):
    run, models = make_run(tmp_path)
    img = isbi((64, 128))
    infer = InferConfig(tile_size=64, overlap=0.0, accumulator="float32")
    both = Predictor.from_run(run, "all", infer)
    assert both.folds == [0, 1]
    x = img[None].astype(np.float32)
    expect = (models[0].predict_on_batch(x[:, :, :64]) + models[1].predict_on_batch(x[:, :, :64])) / 2
    np.testing.assert_allclose(both.predict(img)[:, :64], expect[0], atol=1e-5)
    with pytest.raises(RunError, match="folds found: \\[0, 1\\]"):
        Predictor.from_run(run, "2", infer)


def test_cli_predict_folder_csv_overlays_and_errors(tmp_path, capsys):
    from tfseg import rle
    from tfseg.cli import main
    from tfseg.submission import read_submission

    run, _ = make_run(tmp_path, folds=(0,))
    src = shared_path("isbi2012_em_membrane", "images")
    inputs = [str(src / "0.png"), str(src / "1.png")]
    out = tmp_path / "masks"
    assert main(["predict", "--run", str(run), "--input", *inputs, "--output", str(out),
                 "--overlays", str(tmp_path / "ov"), "--set", "infer.save_probabilities=true"]) == 0
    mask = np.asarray(Image.open(out / "0.png"))
    assert mask.shape == (512, 512) and set(np.unique(mask)) <= {0, 255}
    probs = np.load(out / "0_prob.npy")
    np.testing.assert_array_equal(mask == 255, probs[..., 0] > 0.5)
    assert (tmp_path / "ov" / "1.png").is_file()

    sub = tmp_path / "sub.csv.gz"
    assert main(["predict", "--run", str(run), "--input", *inputs, "--output", str(sub)]) == 0
    header, rows = read_submission(sub)
    assert header == ("id", "predicted") and [r[0] for r in rows] == ["0.png", "1.png"]
    np.testing.assert_array_equal(rle.decode(rows[0][1], (512, 512), "column") * 255, mask)

    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"not a tiff at all")
    capsys.readouterr()
    assert main(["predict", "--run", str(run), "--input", str(bad), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "bad.tif" in err and "\n" not in err
    assert main(["predict", "--run", str(tmp_path / "nope"), "--input", *inputs, "--output", "x"]) == 2
    assert "run directory not found" in capsys.readouterr().err
    assert main(["predict", "--run", str(run), "--folds", "3", "--input", *inputs, "--output", "x"]) == 2
    assert "fold 3 not trained" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_huge_tiff_is_read_by_windows(tmp_path, monkeypatch):
    import tifffile

    from tfseg import predict_cli

    run, models = make_run(tmp_path, folds=(0,), channels=3)
    rgb = np.asarray(Image.open(shared_path("kvasir_seg", "images", "cju0qkwl35piu0993l0dewei2.jpg")
                                ).convert("RGB"))[:200, :300]
    tifffile.imwrite(tmp_path / "big.tif", rgb, tile=(64, 64))
    monkeypatch.setattr(predict_cli, "WINDOWED_PIXELS", 1000)
    win = predict_cli.open_image(tmp_path / "big.tif", 3)
    assert not isinstance(win, np.ndarray) and win.shape == (200, 300, 3)
    pred = Predictor([models[0]], InferConfig(tile_size=64, overlap=0.5, accumulator="float32"))
    np.testing.assert_allclose(pred.predict(win), pred.predict(rgb), atol=1e-6)
    for step in (1, 3, 7):  # overlay thumbnails of a windowed image = plain subsampling
        thumb = predict_cli._overlay_image(predict_cli.Item("big.tif", win), step)
        np.testing.assert_array_equal(thumb, rgb[::step, ::step])
    tifffile.imwrite(tmp_path / "two.tif", rgb[..., :2].copy(), tile=(64, 64), planarconfig="contig")
    with pytest.raises(DataError, match="two.tif"):
        predict_cli.open_image(tmp_path / "two.tif", 3)


def test_cli_predict_tfrecord_shard_uses_ids_and_truth(tmp_path):
    import tensorflow as tf

    from tfseg.cli import main
    from tfseg.data.sample import Sample
    from tfseg.data.tfrecord import encode_example

    run, _ = make_run(tmp_path, folds=(0,))
    img = isbi((96, 80))
    mask = (np.asarray(Image.open(shared_path("isbi2012_em_membrane", "masks", "0.png")))[:96, :80] > 127)
    shard = tmp_path / "isbi-000-2.tfrec"
    with tf.io.TFRecordWriter(str(shard)) as w:
        for i in (3, 7):
            w.write(encode_example(Sample(f"slice{i}", "g", img, mask.astype(np.uint8)), image_format="png"))
    out = tmp_path / "preds"
    assert main(["predict", "--run", str(run), "--input", str(shard), "--output", str(out),
                 "--overlays", str(tmp_path / "ov")]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["slice3.png", "slice7.png"]
    assert np.asarray(Image.open(out / "slice3.png")).shape == (96, 80)
    assert sorted(p.name for p in (tmp_path / "ov").iterdir()) == ["slice3.png", "slice7.png"]


def test_prefetch_keeps_order_raises_and_stops_early():
    assert list(tp.prefetch(iter(range(50)), depth=2)) == list(range(50))

    def broken():
        yield 1
        raise DataError("tile 2 unreadable")

    got = []
    with pytest.raises(DataError, match="tile 2 unreadable"):
        for item in tp.prefetch(broken()):
            got.append(item)
    assert got == [1]
    produced = []

    def endless():
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1

    gen = tp.prefetch(endless(), depth=2)
    assert next(gen) == 0
    gen.close()  # the reader thread stops instead of running on
    n = len(produced)
    import time
    time.sleep(0.3)
    assert len(produced) == n <= 5


@pytest.mark.parametrize("skip", [False, True])
def test_prefetch_and_plain_reading_agree(skip):
    img = np.asarray(Image.open(shared_path("kvasir_seg", "images", "cju0qkwl35piu0993l0dewei2.jpg")
                                ).convert("RGB"))[:300, :260]
    spec = tp.TileSpec(64, 64, 1, 3)

    def f(x):
        return pointwise(x)

    kw = dict(overlap=0.5, batch_size=3, skip_background=skip)
    a = tp.predict_tiled(f, img, spec, prefetch_tiles=True, **kw)
    b = tp.predict_tiled(f, img, spec, prefetch_tiles=False, **kw)
    np.testing.assert_array_equal(a, b)


def test_cli_streams_huge_tiff_mask_to_tiled_tiff(tmp_path, monkeypatch):
    import tifffile

    from tfseg import predict_cli
    from tfseg.cli import main

    run, models = make_run(tmp_path, folds=(0,), channels=3)
    rgb = np.asarray(Image.open(shared_path("kvasir_seg", "images", "cju0qkwl35piu0993l0dewei2.jpg")
                                ).convert("RGB"))[:300, :290]
    tifffile.imwrite(tmp_path / "slide.tif", rgb, tile=(64, 64))
    monkeypatch.setattr(predict_cli, "WINDOWED_PIXELS", 1000)
    monkeypatch.setattr(predict_cli, "MASK_TILE", 128)  # partial last strip and tile column
    monkeypatch.setattr(predict_cli, "OVERLAY_MAX_SIDE", 100)
    out = tmp_path / "out"
    assert main(["predict", "--run", str(run), "--input", str(tmp_path / "slide.tif"), "--output", str(out),
                 "--overlays", str(tmp_path / "ov"), "--set", "infer.save_probabilities=true"]) == 0
    mask = tifffile.imread(out / "slide.tif")
    pred = Predictor([models[0]], InferConfig(tile_size=64, batch_size=2))
    expect = pred.predict_mask(rgb)
    np.testing.assert_array_equal(mask, expect * 255)
    np.testing.assert_array_equal(np.load(out / "slide_prob.npy")[..., 0] > 0.5, expect == 1)
    assert (tmp_path / "ov" / "slide.png").is_file()
    thumbs = []
    bands = predict_cli.thumbnail_rows(((y, expect[y:y + 37]) for y in range(0, 300, 37)), 3, thumbs)
    predict_cli.write_mask_tiff(tmp_path / "m.tif", bands, 300, 290, 1, tile=128)
    np.testing.assert_array_equal(np.concatenate(thumbs), expect[::3, ::3])
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "m.tif"), expect)
    # the run's column-major (HuBMAP) submission of the huge image is encoded band by band, equal
    # to encoding the whole mask
    from tfseg import rle
    from tfseg.submission import read_submission

    sub = tmp_path / "sub.csv.gz"
    t = float(np.median(pred.predict(rgb)))  # a threshold that makes many runs
    expect = Predictor([models[0]], InferConfig(tile_size=64, batch_size=2, threshold=t)).predict_mask(rgb)
    assert main(["predict", "--run", str(run), "--input", str(tmp_path / "slide.tif"), "--output", str(sub),
                 "--overlays", str(tmp_path / "ov2"), "--set", "submit.id_format='{stem}'",
                 "--set", f"infer.threshold={t}"]) == 0
    header, rows = read_submission(sub)
    assert header == ("id", "predicted") and rows == [("slide", rle.encode(expect, "column"))]
    assert len(rows[0][1].split()) > 100 and (tmp_path / "ov2" / "slide.png").is_file()


def test_multiclass_mask_is_the_argmax_of_the_full_prediction():
    import keras

    inp = keras.Input((None, None, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inp)
    out = keras.layers.Conv2D(4, 1, activation="softmax", name="output")(x)
    model = keras.Model(inp, out)
    model.set_weights([np.random.default_rng(3).normal(0, 3, w.shape).astype(np.float32)
                       for w in model.get_weights()])
    rgb = np.asarray(Image.open(shared_path("camvid_sample", "train", "images").glob("*").__next__()
                                ).convert("RGB"))[:200, :230]
    pred = Predictor([model], InferConfig(tile_size=64, overlap=0.25, tta=8, accumulator="float32"))
    assert pred.spec.classes == 4
    full = model.predict_on_batch(rgb[None].astype(np.float32))[0]
    probs = pred.predict(rgb)
    np.testing.assert_allclose(probs, full, atol=1e-5)  # pointwise model: tiles and TTA change nothing
    mask = pred.predict_mask(rgb)
    assert mask.dtype == np.uint8 and mask.max() <= 3
    assert (mask == full.argmax(-1)).mean() > 0.999  # ties between near-equal classes aside


def test_a_free_size_bilinear_model_predicts_rotated_rectangular_tiles():
    # infer.tta: 8 on rectangular tiles feeds one model two shapes (16x24, then 24x16). Keras then traces
    # predict_on_batch again with unknown H and W, which Keras 3.15's bilinear UpSampling2D cannot take
    # (OperatorNotAllowedInGraphError); keras_predict_fn predicts through a traceable copy instead.
    import keras

    from tfseg.inference import keras_predict_fn

    inp = keras.Input((None, None, 1))
    x = keras.layers.Conv2D(3, 3, strides=2, padding="same")(inp)
    x = keras.layers.UpSampling2D(2, interpolation="bilinear")(x)
    model = keras.Model(inp, keras.layers.Conv2D(1, 1, activation="sigmoid")(x))
    image = isbi((16, 24))[None].astype(np.float32)
    predict = keras_predict_fn(model)
    for batch in (image, np.ascontiguousarray(np.rot90(image, axes=(1, 2)))):
        want = keras.ops.convert_to_numpy(model(batch, training=False))
        np.testing.assert_allclose(predict(batch), want, rtol=1e-5, atol=1e-6)
    averaged = tta.with_tta(predict, 8)(image)
    assert averaged.shape == (1, 16, 24, 1) and np.isfinite(averaged).all()


def test_a_small_tile_of_a_valid_convolution_model_is_said_once_to_be_slow(capsys):
    """The original U-Net at infer.tile_size 188 predicts 4x4 pixels of each 188x188 window: one line says so."""
    from tfseg.config import ModelConfig
    from tfseg.inference import warn_small_output
    from tfseg.models import build_model
    from tfseg.models import unet_original as uo

    model = build_model(ModelConfig(arch="unet_original", input_shape=[None, None, 1], classes=1,
                                    encoder_weights=None, options=uo.TEST_OPTIONS))
    capsys.readouterr()
    small = Predictor([model], InferConfig(tile_size=188))
    line = ("tfseg: warning: infer.tile_size 188: the model predicts the central 4x4 of each 188x188 window it "
            "reads (0.045% of it; its valid convolutions use 92 pixels on each side), so prediction is slow; a larger "
            "infer.tile_size wastes less")
    assert small.spec.out_hw == (4, 4) and capsys.readouterr().err == line + "\n"
    Predictor([model], InferConfig(tile_size=188))
    assert capsys.readouterr().err == ""  # once per process
    # the paper's 572 -> 388 reads 2.2 pixels per pixel predicted: no warning
    assert Predictor([model], InferConfig(tile_size=572)).spec.out_hw == (388, 388)
    assert capsys.readouterr().err == "" and warn_small_output(tp.TileSpec(572, 388, 1, 1)) is None
    # it still predicts: a 24x40 ISBI crop, 4x4 pixels at a time
    probs = small.predict(isbi((24, 40)).astype(np.float32))
    assert probs.shape == (24, 40, 1) and np.isfinite(probs).all()


def unet_original(h: int, w: int | None = None):
    """A fixed-size unet_original with tiny filters (TEST_OPTIONS), as `tfseg train` builds it for
    data.image_size [h, w] without data.val_size."""
    from tfseg.config import ModelConfig
    from tfseg.models import build_model
    from tfseg.models import unet_original as uo

    return build_model(ModelConfig(arch="unet_original", input_shape=[h, w or h, 1], classes=1,
                                   encoder_weights=None, options=uo.TEST_OPTIONS))


def test_a_fixed_size_valid_convolution_model_predicts_large_windows_with_the_fixed_models_result(capsys):
    """A unet_original trained at 188 (188 -> 4) read 188x188 windows for 4x4 pixels each; it now predicts
    252x252 windows (68x68 pixels) through a copy for any size, with the result of its own windows placed
    side by side: each large window is predicted at 4x4 shifts of 4 pixels, each pixel taken where it sits
    at an offset the 188 model trained (4 of every 16; unet_original's four poolings make it equivariant
    to shifts of 16 only)."""
    from tfseg.inference import keras_predict_fn
    from tfseg.large_windows import large_windows

    model = unet_original(188)
    img = isbi((136, 136))  # 2 x 2 tiles of 68: every tile starts at a multiple of 4, as the 188 windows do
    capsys.readouterr()
    wide = Predictor([model], InferConfig(tile_size=256, overlap=0.0, blend="constant", accumulator="float32"))
    assert wide.spec.in_hw == (252, 252) and wide.spec.out_hw == (68, 68)
    assert wide.how == "tiles of 252x252 (the 188x188 model's copy for any size)"
    assert "infer.tile_size 256: the model predicts the central 68x68 of each 252x252 window" in capsys.readouterr().err
    own = Predictor([model], InferConfig(tile_size=188, overlap=0.0, blend="constant", accumulator="float32",
                                         batch_size=64))
    assert own.spec.in_hw == (188, 188) and own.spec.out_hw == (4, 4)
    np.testing.assert_allclose(wide.predict(img), own.predict(img), atol=1e-5)
    # the copy alone (one call per window) predicts 12 of every 16 rows and columns at offsets never trained
    copy = large_windows(model)
    assert (copy.size, copy.out, copy.period) == ((188, 188), (4, 4), 16)
    x = np.zeros((1, 252, 252, 1), np.float32)
    x[0, :136, :136] = img
    plain, shifted = keras_predict_fn(copy.model)(x)[0], copy.predict_fn(keras_predict_fn(copy.model))(x)[0]
    np.testing.assert_allclose(plain[:4, :4], shifted[:4, :4], atol=1e-5)
    assert np.abs(plain[4:16, 4:16] - shifted[4:16, 4:16]).max() > 1e-3


def test_which_fixed_size_models_get_large_windows():
    """Valid convolutions whose copy is exact only: a 'same' padding model keeps the size it trained at
    (its zero padding at the window's border is part of what it learnt), and so does a model with a layer
    fixed to its size; a unet_original whose output covers a whole period (204 -> 20) needs no shifts."""
    import keras

    from tfseg.large_windows import large_windows

    inp = keras.Input((64, 64, 1))
    same = keras.Model(inp, keras.layers.Conv2D(1, 3, padding="same", activation="sigmoid")(inp))
    assert large_windows(same) is None
    assert Predictor([same], InferConfig(tile_size=256)).spec.in_hw == (64, 64)
    inp = keras.Input((40, 40, 1))
    x = keras.layers.Reshape((100,))(keras.layers.Conv2D(1, 31, activation="sigmoid")(inp))  # 40 -> 10, flattened
    sized = keras.Model(inp, keras.layers.Reshape((10, 10, 1))(x))
    assert large_windows(sized) is None
    model = unet_original(204)
    wide = large_windows(model)
    assert (wide.out, wide.period, wide.tile(512), wide.tile(219)) == ((20, 20), 16, 508, None)
    img = isbi((100, 100))
    big = Predictor([model], InferConfig(tile_size=252, overlap=0.2, blend="constant", accumulator="float32"))
    own = Predictor([model], InferConfig(tile_size=204, overlap=0.2, blend="constant", accumulator="float32"))
    assert big.spec.out_hw == (68, 68) and own.spec.out_hw == (20, 20)
    # tiles at multiples of 16 in both (0 and 32 of 68; 0, 16, ... 80 of 20): the same pixels
    np.testing.assert_allclose(big.predict(img), own.predict(img), atol=1e-5)


def test_quarter_turns_of_a_rectangular_valid_convolution_model_read_square_windows(tmp_path):
    """infer.tta: 8 turns a 188x204 model's windows into 204x188 ones, which it cannot take: refused, unless
    the tiles are read through square windows of its copy for any size (infer.tile_size 220 and up);
    tfseg predict's checkpoint check and the Predictor agree."""
    from tfseg.checkpoint_checks import check_checkpoint
    from tfseg.config import load_config

    model = unet_original(188, 204)
    cfg = load_config(None, ["data.channels=1", "data.classes=1", "infer.tta=8", "infer.tile_size=256"])
    check_checkpoint(model, "m.keras", cfg)
    pred = Predictor([model], cfg.infer)
    assert pred.spec.in_hw == (252, 252) and pred.spec.out_hw == (68, 68)
    probs = pred.predict(isbi((80, 90)).astype(np.float32))
    assert probs.shape == (80, 90, 1) and np.isfinite(probs).all()
    small = load_config(None, ["data.channels=1", "data.classes=1", "infer.tta=8", "infer.tile_size=210"])
    with pytest.raises(ConfigError, match="infer.tta: 8 includes quarter turns, which make the model's 188x204"):
        check_checkpoint(model, "m.keras", small)
    with pytest.raises(ConfigError, match="infer.tta: 8 includes quarter turns"):
        Predictor([model], small.infer)


def test_a_fixed_size_model_that_keeps_a_small_output_is_said_to_be_slow(capsys):
    """The warning of a small output covers fixed-size models, naming the key that would help."""
    import keras

    model = unet_original(188)
    capsys.readouterr()
    Predictor([model], InferConfig(tile_size=200))
    assert capsys.readouterr().err == (
        "tfseg: warning: infer.tile_size 200: the model predicts the central 4x4 of each 188x188 window it reads "
        "(0.045% of it; its valid convolutions use 92 pixels on each side), so prediction is slow; an "
        "infer.tile_size of 204 or more predicts through a copy of the model for any size, each pixel as one of its "
        "188x188 windows would\n")
    inp = keras.Input((40, 40, 1))
    x = keras.layers.Reshape((100,))(keras.layers.Conv2D(1, 31, activation="sigmoid")(inp))
    sized = keras.Model(inp, keras.layers.Reshape((10, 10, 1))(x))
    Predictor([sized], InferConfig(tile_size=512))
    assert capsys.readouterr().err == (
        "tfseg: warning: data.image_size 40: the model predicts the central 10x10 of each 40x40 window it reads "
        "(6.2% of it; its valid convolutions use 15 pixels on each side), so prediction is slow; the model was "
        "built for that size and cannot take a larger one: training at a larger data.image_size (or with "
        "data.val_size: any size) wastes less\n")


@pytest.mark.slow  # 30 s; the large windows' equality with the fixed model's is checked in make test
def test_cli_predicts_a_run_of_a_fixed_size_unet_original_by_large_windows(tmp_path, capsys):
    """The tester's case, small: a run whose unet_original was trained at a fixed 188 predicts a real ISBI
    slice through `tfseg predict` by 252x252 windows, as the summary line says."""
    from tfseg.cli import main

    run, models = make_run(tmp_path, folds=(0,), image_size=(188, 188), make_model=lambda: unet_original(188))
    src = shared_path("isbi2012_em_membrane", "images", "0.png")
    out = tmp_path / "masks"
    assert main(["predict", "--run", str(run), "--input", str(src), "--output", str(out), "--set",
                 "infer.tile_size=256", "--set", "infer.tta=2", "--set", "infer.batch_size=4"]) == 0
    captured = capsys.readouterr()
    assert "tiles of 252x252 (the 188x188 model's copy for any size)" in captured.out + captured.err
    mask = np.asarray(Image.open(out / "0.png"))
    assert mask.shape == (512, 512) and set(np.unique(mask)) <= {0, 255}
