"""tfseg evaluate: per-image table, means and threshold sweep on out-of-fold records, shards, folders."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from sklearn.metrics import f1_score, jaccard_score

from tests.test_train import tiny_config
from tfseg import cli
from tfseg.config import load_config
from tfseg.evaluate import Sweep, image_scores


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from tfseg.train import run

    tmp = tmp_path_factory.mktemp("evalrun")
    cfg = load_config(tiny_config(tmp, epochs=2))
    run(cfg, "0")
    return tmp, tmp / "runs" / "tiny"


def _table(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_image_scores_match_sklearn_and_conventions():
    rng = np.random.default_rng(0)
    truth = (rng.random((20, 20)) > 0.6).astype(np.uint8)
    probs = np.clip(truth + rng.normal(0, 0.4, truth.shape), 0, 1)[..., None]
    scores = image_scores(truth, probs, 0.5)
    pred = (probs[..., 0] > 0.5).astype(int)
    assert scores["dice"] == pytest.approx(f1_score(truth.ravel(), pred.ravel()))
    assert scores["iou"] == pytest.approx(jaccard_score(truth.ravel(), pred.ravel()))
    assert scores["dice_background"] == pytest.approx(f1_score(1 - truth.ravel(), 1 - pred.ravel()))
    empty = image_scores(np.zeros((4, 4)), np.zeros((4, 4, 1)))
    assert empty["dice"] == 1.0 and empty["iou"] == 1.0
    multi = np.eye(3)[[[0, 1], [2, 2]]]  # prediction: classes 0,1,2,2
    ms = image_scores(np.array([[0, 1], [2, 1]]), multi)
    assert ms["pixel_accuracy"] == pytest.approx(0.75)
    assert ms["dice"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)


def test_sweep_picks_the_best_threshold():
    truth = np.zeros((10, 10), np.uint8)
    truth[:5] = 1
    prob = np.where(truth > 0, 0.35, 0.2)  # only thresholds below 0.35 (and >= 0.2) find it
    sweep = Sweep()
    sweep.add(truth, prob)
    rows = {r["threshold"]: r for r in sweep.rows()}
    assert rows[0.2]["mean_dice"] == pytest.approx(1.0) and rows[0.5]["mean_dice"] == pytest.approx(0.0)
    assert sweep.best()["threshold"] in (0.2, 0.3)


def test_out_of_fold_evaluation(trained, capsys):
    tmp, run_dir = trained
    assert cli.main(["evaluate", "--run", str(run_dir)]) == 0
    printed = capsys.readouterr().out
    assert "mean Dice" in printed and "threshold sweep: best" in printed
    out = run_dir / "evaluate" / "oof"
    rows = _table(out / "per_image.csv")
    held = json.loads((run_dir / "fold0" / "val_groups.json").read_text())
    assert sorted(r["id"] for r in rows) == sorted(held["val_groups"])  # exactly the held-out images
    assert {r["fold"] for r in rows} == {"0"}
    result = json.loads((out / "evaluation.json").read_text())
    assert result["images"] == held["n_val"]
    assert result["mean"]["dice"] == pytest.approx(np.mean([float(r["dice"]) for r in rows]), abs=1e-5)
    sweep = _table(out / "sweep.csv")
    assert [float(r["threshold"]) for r in sweep] == pytest.approx([0.1 * i for i in range(1, 10)])


def test_folder_and_shard_evaluation(trained, tmp_path):
    tmp, run_dir = trained
    assert cli.main(["evaluate", "--run", str(run_dir), "--fold", "0", "--data", str(tmp / "data"),
                     "--output", str(tmp_path / "folder")]) == 0
    rows = _table(tmp_path / "folder" / "per_image.csv")
    assert len(rows) == 12 and all(0.0 <= float(r["dice"]) <= 1.0 for r in rows)
    assert cli.main(["evaluate", "--run", str(run_dir), "--data", str(tmp / "tfrec"),
                     "--output", str(tmp_path / "shards")]) == 0
    shard_rows = _table(tmp_path / "shards" / "per_image.csv")
    assert sorted(r["id"] for r in shard_rows) == sorted(r["id"] for r in rows)
    # same images at the same size (32 px records, 32 px model): the same scores
    by_id = {r["id"]: float(r["dice"]) for r in rows}
    assert all(float(r["dice"]) == pytest.approx(by_id[r["id"]], abs=0.05) for r in shard_rows)


def test_evaluate_errors_are_one_line(trained, tmp_path, capsys):
    tmp, run_dir = trained
    assert cli.main(["evaluate", "--run", str(tmp_path / "nope")]) == 2
    assert "run directory not found" in capsys.readouterr().err
    assert cli.main(["evaluate", "--run", str(run_dir), "--fold", "2"]) == 2
    assert "fold 2 not trained" in capsys.readouterr().err
    assert cli.main(["evaluate", "--run", str(run_dir), "--data", str(tmp_path / "missing")]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_out_of_fold_means_per_fold(tmp_path):
    from tfseg.evaluate import _write

    rows = [{"fold": k, "id": f"i{k}{j}", "dice": d, "iou": d / 2, "pixel_accuracy": 1.0}
            for k, ds in ((0, (0.5, 0.7)), (1, (0.9, 0.9))) for j, d in enumerate(ds)]
    result = _write(tmp_path, rows, None, 0.5, "oof")
    assert result["folds"]["0"]["dice"] == pytest.approx(0.6) and result["folds"]["1"]["dice"] == 0.9
    assert result["mean"]["dice"] == pytest.approx(0.75) and "best_threshold" not in result
    assert json.loads((tmp_path / "evaluation.json").read_text())["folds"]["1"]["iou"] == 0.45


def test_threshold_from_the_out_of_fold_sweep(trained, tmp_path, capsys):
    import shutil

    from PIL import Image

    from tfseg.config import InferConfig
    from tfseg.errors import RunError
    from tfseg.inference import Predictor

    tmp, run_dir = trained
    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("evaluate"))
    oof = ["--set", "infer.threshold_from=oof"]
    # no sweep yet: one line that says which file is missing and which command writes it
    assert cli.main(["evaluate", "--run", str(run), "--data", str(tmp / "data"), *oof]) == 2
    err = capsys.readouterr().err.strip()
    assert "evaluate/oof/evaluation.json: not found" in err and "tfseg evaluate --run" in err
    assert len(err.splitlines()) == 1
    # the sweep on out-of-fold predictions, then the held-out folder scored at its best threshold
    assert cli.main(["evaluate", "--run", str(run)]) == 0
    best = json.loads((run / "evaluate" / "oof" / "evaluation.json").read_text())["best_threshold"]["threshold"]
    assert cli.main(["evaluate", "--run", str(run), "--data", str(tmp / "data"), *oof]) == 0
    assert json.loads((run / "evaluate" / "data" / "evaluation.json").read_text())["threshold"] == best
    # predict: a sweep that picked 0.3 gives masks thresholded at 0.3, not at infer.threshold
    sweep = run / "evaluate" / "oof" / "evaluation.json"
    sweep.write_text(json.dumps({**json.loads(sweep.read_text()), "best_threshold": {"threshold": 0.3}}))
    predictor = Predictor.from_run(run, "0", InferConfig(tile_size=32, threshold_from="oof"))
    assert predictor.infer.threshold == 0.3
    image = np.asarray(Image.open(tmp / "data" / "images" / "s00.png"))[..., None]
    probs = predictor.predict(image)[..., 0].astype(np.float32)
    assert ((probs > 0.3) != (probs > 0.5)).any()  # the two thresholds disagree somewhere
    np.testing.assert_array_equal(predictor.predict_mask(image), (probs > 0.3).astype(np.uint8))
    assert cli.main(["predict", "--run", str(run), "--folds", "0", "--input", str(tmp / "data" / "images" / "s00.png"),
                     "--output", str(tmp_path / "pred"), *oof, "--set", "infer.tile_size=32"]) == 0
    assert "threshold 0.3 (out-of-fold sweep)" in capsys.readouterr().out
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "pred" / "s00.png")), (probs > 0.3) * 255)
    sweep.write_text(json.dumps({"data": "oof"}))  # a multiclass run's evaluation has no sweep
    with pytest.raises(RunError, match="no best_threshold.threshold"):
        Predictor.from_run(run, "0", InferConfig(tile_size=32, threshold_from="oof"))


def test_evaluation_applies_the_runs_test_time_augmentation(trained, tmp_path):
    """Scores are those of what `tfseg predict` would output: the infer.tta mean."""
    import keras
    from PIL import Image

    from tfseg.tta import with_tta

    tmp, run_dir = trained
    scores = {}
    for n in (1, 8):
        out = tmp_path / f"tta{n}"
        assert cli.main(["evaluate", "--run", str(run_dir), "--fold", "0", "--data", str(tmp / "data"),
                         "--output", str(out), "--set", f"infer.tta={n}"]) == 0
        assert json.loads((out / "evaluation.json").read_text())["tta"] == n
        scores[n] = {r["id"]: r for r in _table(out / "per_image.csv")}
    # recompute one image's Dice from the 8-transform mean and compare
    model = keras.models.load_model(run_dir / "fold0" / "best.keras")
    ident = sorted(scores[8])[0]
    image = np.asarray(Image.open(tmp / "data" / "images" / f"{ident}.png"), np.float32)[None, ..., None]
    truth = np.asarray(Image.open(tmp / "data" / "masks" / f"{ident}.png")) > 127
    probs = with_tta(lambda x: model.predict_on_batch(x), 8)(image)[0, ..., 0]
    pred = probs > 0.5
    dice = 1.0 if not (pred.any() or truth.any()) else 2 * (pred & truth).sum() / (pred.sum() + truth.sum())
    assert float(scores[8][ident]["dice"]) == pytest.approx(dice, abs=1e-4)
    assert any(scores[1][i]["dice"] != scores[8][i]["dice"] for i in scores[1])


@pytest.mark.parametrize("fit", ["random_crop", "resize"])
def test_folder_evaluation_scores_the_masks_predict_writes(tmp_path, fit):
    """evaluate --data <images + masks> predicts as `tfseg predict` does (the run's infer.fit): it used
    to resize every image to data.image_size even for runs trained on crops, which predict tiles at
    full resolution (ISBI slice 16: 0.912 in evaluate, 0.942 in the masks predict wrote)."""
    from PIL import Image

    from tests.conftest import shared_path
    from tests.test_inference import make_run
    from tfseg.config import InferConfig
    from tfseg.inference import Predictor

    run, _ = make_run(tmp_path, folds=(0, 1), fit=fit, image_size=(64, 64))
    src = shared_path("isbi2012_em_membrane")
    data = tmp_path / "held_out"
    for sub in ("images", "masks"):
        (data / sub).mkdir(parents=True)
        for n in (16, 7):
            (data / sub / f"{n}.png").symlink_to(src / sub / f"{n}.png")
    image = np.asarray(Image.open(data / "images" / "16.png"))[..., None]
    t = float(np.median(Predictor.from_run(run, infer=InferConfig(tile_size=64)).predict(image)))
    sets = ["--set", f"infer.threshold={t}"]
    assert cli.main(["evaluate", "--run", str(run), "--data", str(data), "--output", str(tmp_path / "ev"), *sets]) == 0
    assert cli.main(["predict", "--run", str(run), "--input", str(data / "images"), "--output",
                     str(tmp_path / "pred"), *sets]) == 0
    rows = {r["id"]: r for r in _table(tmp_path / "ev" / "per_image.csv")}
    assert sorted(rows) == ["16", "7"]
    for ident, row in rows.items():
        pred = np.asarray(Image.open(tmp_path / "pred" / f"{ident}.png")) > 0
        truth = np.asarray(Image.open(data / "masks" / f"{ident}.png")) > 127
        dice = 2 * (pred & truth).sum() / (pred.sum() + truth.sum())
        assert 0.2 < dice < 0.95 and float(row["dice"]) == pytest.approx(dice, abs=1e-6)


def _swapped(run_dir, tmp_path, model):
    """A copy of the trained run whose fold0/best.keras is ``model`` (a checkpoint from elsewhere)."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("evaluate"))
    model.save(run / "fold0" / "best.keras")
    return run, run / "fold0" / "best.keras"


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_a_checkpoint_that_does_not_match_the_config_is_one_line(trained, tmp_path, capsys):
    """CamVid's best.keras (3 channels, 96x128, 12 classes) copied into an ISBI run and a Kvasir run: evaluate
    crashed with a Keras traceback ('expected shape=(None, 96, 128, 3), found shape=(6, 256, 256)'); it now
    refuses as predict does, naming the checkpoint, the key and where the key was set."""
    from tests.test_predict_checks import small_unet
    from tests.test_whole_image import fixed_model

    tmp, run_dir = trained  # binary, 1 channel, 32x32 resized records
    run, model = _swapped(run_dir, tmp_path, fixed_model((32, 32), channels=3, classes=1))
    assert cli.main(["evaluate", "--run", str(run), "--output", str(tmp_path / "e")]) == 2
    assert (f"data.channels is 1 ({run / 'config.yaml'}), but the run's model {model} takes 3-channel images. "
            "Expected data.channels: 3") in _one_line(capsys)
    fixed_model((32, 32), channels=1, classes=12).save(model)
    for data in ([], ["--data", str(tmp / "tfrec")], ["--data", str(tmp / "data")]):  # out-of-fold, shards, images
        assert cli.main(["evaluate", "--run", str(run), *data, "--output", str(tmp_path / "e"),
                         "--set", "infer.tta=1"]) == 2
        assert (f"data.classes is 1 ({run / 'config.yaml'}), but the run's model {model} outputs 12 channels "
                "(12 classes). Expected data.classes: 12") in _one_line(capsys)
    fixed_model((48, 48), channels=1, classes=1).save(model)
    assert cli.main(["evaluate", "--run", str(run), "--output", str(tmp_path / "e")]) == 2
    assert (f"data.image_size is 32x32 ({run / 'config.yaml'}), but the run's model {model} takes only 48x48 "
            "inputs. Expected data.image_size: [48, 48]") in _one_line(capsys)
    fixed_model((32, 48), channels=1, classes=1).save(model)  # quarter turns would feed it 48 x 32
    assert cli.main(["evaluate", "--run", str(run), "--output", str(tmp_path / "e"), "--set", "data.image_size=[32,48]",
                     "--set", "infer.tta=8"]) == 2
    assert f"the model {model} takes only its own size" in _one_line(capsys)
    # a model of any size that cannot take the records' size: the sizes that work, not a Concatenate traceback
    small_unet().save(model)
    assert cli.main(["evaluate", "--run", str(run), "--data", str(tmp / "tfrec"), "--output", str(tmp_path / "e"),
                     "--set", "data.image_size=[30,30]"]) == 2
    err = _one_line(capsys)
    assert "data.image_size: 30 does not fit the model" in err and "nearest sizes that work are 28 and 32" in err
    assert not (tmp_path / "e").exists()


def test_evaluation_says_how_the_images_met_the_model(trained, tmp_path, capsys):
    """The same image scores differently as a record (the validation pipeline's size) and as an image
    file (predicted as `tfseg predict` does: tiles or whole and resized back, at full resolution):
    DSB2018's one image gave Dice 0.334 from its folder and 0.298 from its shard. evaluation.json and
    the printed line say which ran."""
    tmp, run_dir = trained  # trained on records resized to 32x32 (data.fit: resize)
    runs = {"shards": (["--data", str(tmp / "tfrec")], "pipeline", "records resized to 32x32 (data.image_size), "
                                                                    "scored at that size"),
            "resize": (["--data", str(tmp / "data")], "resize", "whole images resized to 32x32, scored at full "
                                                                 "resolution"),
            "tiles": (["--data", str(tmp / "data"), "--set", "infer.fit=tile"], "tiles",
                      "tiles of 32x32, scored at full resolution")}  # the model's own size
    for name, (args, mode, how) in runs.items():
        out = tmp_path / name
        assert cli.main(["evaluate", "--run", str(run_dir), *args, "--output", str(out), "--set", "infer.tta=1"]) == 0
        result = json.loads((out / "evaluation.json").read_text())
        assert (result["mode"], result["how"]) == (mode, how)
        assert result["input_size"] == [32, 32]
        label = "tfrec" if name == "shards" else "data"
        assert f"12 images ({label}; {how}), threshold 0.5: " in capsys.readouterr().out


def test_multiclass_evaluation_says_argmax_not_threshold(trained, tmp_path, capsys):
    """A multiclass (softmax, argmax) run printed 'threshold 0.5: mean Dice ...' (CamVid), a threshold it
    never used; it now prints the argmax over its classes, and evaluation.json has no threshold."""
    from tests.test_whole_image import fixed_model

    tmp, run_dir = trained
    run, _ = _swapped(run_dir, tmp_path, fixed_model((32, 32), channels=1, classes=3))
    out = tmp_path / "e"
    assert cli.main(["evaluate", "--run", str(run), "--data", str(tmp / "tfrec"), "--output", str(out),
                     "--set", "model.classes=null", "--set", "data.classes=3", "--set", "infer.tta=1"]) == 0
    printed = capsys.readouterr().out
    assert "12 images (tfrec; records resized to 32x32 (data.image_size), scored at that size), argmax over 3 " \
           "classes: mean Dice" in printed
    assert "threshold" not in printed
    result = json.loads((out / "evaluation.json").read_text())
    assert result["threshold"] is None and result["classes"] == 3 and "best_threshold" not in result
    assert not (out / "sweep.csv").exists()
