"""The training run on tiny generated data: outputs, summary, errors, NaN stop, schedules."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import keras
import numpy as np
import pytest
import yaml
from PIL import Image

from tfseg import cli
from tfseg.config import load_config
from tfseg.errors import ConfigError, RunError

ROOT = Path(__file__).resolve().parents[1]


def make_blobs(root: Path, n: int = 12, size: int = 32, seed: int = 0) -> Path:
    """``n`` gray images with one bright disc each, and the disc masks (0/255) in images/ + masks/."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        cy, cx = rng.integers(size // 4, 3 * size // 4, 2)
        r = rng.integers(size // 8, size // 4)
        mask = ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r).astype(np.uint8)
        image = np.clip(60 + 120 * mask + rng.normal(0, 20, mask.shape), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(root / "images" / f"s{i:02d}.png")
        Image.fromarray(mask * 255).save(root / "masks" / f"s{i:02d}.png")
    return root


def tiny_config(tmp_path: Path, n: int = 12, size: int = 32, **train) -> Path:
    """A params file training unet_small (8/16 filters) on ``n`` generated ``size`` px images."""
    data_root = make_blobs(tmp_path / "data", n, size)
    params = {
        "data": {"source": "folder", "root": str(data_root), "classes": 1, "channels": 1,
                 "tfrecord_dir": str(tmp_path / "tfrec"), "shards": 3, "workers": 1, "image_format": "png",
                 "image_size": [size, size], "fit": "resize", "shuffle_buffer": 16},
        "augment": {"ops": [{"name": "flip_left_right", "p": 0.5}]},
        "model": {"arch": "unet_small", "encoder_weights": None, "options": {"filters": [8, 16]}},
        "train": {"name": "tiny", "output_dir": str(tmp_path / "runs"), "folds": 3, "epochs": 2,
                  "batch_size": 4, "loss": {"bce_dice": 1.0}, "strategy": "default", "tensorboard": False,
                  **train},
    }
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_train_fold_writes_the_run_layout(tmp_path):
    from tfseg.train import run

    class Seen(keras.callbacks.Callback):  # a user's callback (the pet notebook's DisplayCallback)
        epochs: list = []

        def on_epoch_end(self, epoch, logs=None):
            Seen.epochs.append((epoch, "val_dice_coe" in logs, self.model.output_shape))

    cfg = load_config(tiny_config(tmp_path), ["train.schedule=cosine", "train.warmup_epochs=0.5"])
    with pytest.raises(ConfigError, match="callbacks: expected keras.callbacks.Callback objects, got function"):
        run(cfg, "0", callbacks=[lambda: None])
    assert not (tmp_path / "runs").exists()
    summary = run(cfg, "0", callbacks=[Seen()])
    assert Seen.epochs == [(0, True, (None, 32, 32, 1)), (1, True, (None, 32, 32, 1))]
    fold_dir = tmp_path / "runs" / "tiny" / "fold0"
    for name in ("config.yaml", "best.keras", "last.keras", "history.csv", "curves.png", "val_groups.json"):
        assert (fold_dir / name).is_file(), name
    assert (tmp_path / "runs" / "tiny" / "config.yaml").is_file()
    assert not (fold_dir / "backup").exists()  # removed when the fold finished
    rows = (fold_dir / "history.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,") and "val_dice_coe" in rows[0] and len(rows) == 3
    fold = summary["folds"]["0"]
    assert summary["monitor"] == "val_dice_coe" and summary["mode"] == "max"
    assert fold["epochs"] == 2 and 1 <= fold["best_epoch"] <= 2 and 0.0 <= fold["best"] <= 1.0
    assert fold["n_train"] + fold["n_val"] == 12
    assert summary["cv_mean"] == pytest.approx(fold["best"]) and summary["cv_std"] == 0.0
    held_out = json.loads((fold_dir / "val_groups.json").read_text())
    assert len(held_out["val_groups"]) == fold["n_val"]
    # the best model reloads without custom_objects and predicts probabilities of the input size
    model = keras.models.load_model(fold_dir / "best.keras")
    out = model.predict(np.zeros((1, 32, 32, 1), "float32"), verbose=0)
    assert out.shape == (1, 32, 32, 1) and 0.0 <= out.min() and out.max() <= 1.0
    assert load_config(fold_dir / "config.yaml") == cfg


# What a user writes to load a checkpoint in a fresh Python (each claim of docs/training.md in its own
# process: a module imported earlier would register the classes and hide a missing registration).
LOAD_AFTER_IMPORT_TFSEG = """
import sys
import tfseg
assert "keras" not in sys.modules and "tensorflow" not in sys.modules, "import tfseg must stay light"
import keras
for path in sys.argv[1:]:
    model = keras.models.load_model(path)
    assert type(model.loss).__name__ == "SegLoss", model.loss
    assert type(model.optimizer._learning_rate).__name__ == "WarmupDecay"
    print("LOADED", model.output_shape)
"""
LOAD_WITH_KERAS_ONLY = """
import sys
import keras
for path in sys.argv[1:]:
    model = keras.models.load_model(path, compile=False)  # the model alone: keras suffices
    print("LOADED", model.output_shape)
assert not [m for m in sys.modules if m.startswith("tfseg")]
import tfseg  # after keras: registers at once
for path in sys.argv[1:]:
    model = keras.models.load_model(path)
    print("LOADED", model.output_shape, type(model.loss).__name__)
"""


def test_checkpoints_load_with_keras_after_import_tfseg_in_a_fresh_process(tmp_path):
    """The audit: best.keras did not load with `keras.models.load_model(p)` even after `import tfseg`
    (`Could not locate class 'WarmupDecay'`, then 'SegLoss')."""
    from tfseg.train import run

    cfg = load_config(tiny_config(tmp_path, n=9, epochs=1), ["train.schedule=cosine", "train.folds=3"])
    run(cfg, "0")
    paths = [str(tmp_path / "runs" / "tiny" / "fold0" / name) for name in ("best.keras", "last.keras")]
    for script, loads in ((LOAD_AFTER_IMPORT_TFSEG, 2), (LOAD_WITH_KERAS_ONLY, 4)):
        proc = subprocess.run([sys.executable, "-c", script, *paths], capture_output=True, text=True,
                              cwd=tmp_path, timeout=300)
        assert proc.returncode == 0 and proc.stdout.count("LOADED (None, 32, 32, 1)") == loads, proc.stderr[-2000:]


def test_import_tfseg_registers_every_class_it_saves():
    """Every module that registers a Keras-serializable class is in tfseg.SERIALIZABLE_MODULES, and
    each registered class is known to Keras under its ``tfseg>`` name."""
    import re

    import tfseg

    registering = sorted(
        "tfseg." + ".".join(path.relative_to(ROOT / "tfseg").with_suffix("").parts)
        for path in (ROOT / "tfseg").rglob("*.py")
        if re.search(r"^@[\w.]*register_keras_serializable", path.read_text(), re.MULTILINE))
    assert registering == sorted(tfseg.SERIALIZABLE_MODULES)
    for module in registering:
        source = (ROOT / Path(*module.split("."))).with_suffix(".py").read_text()
        names = re.findall(r"register_keras_serializable\(package=\"tfseg\"\)\s*\nclass (\w+)", source)
        assert names, module
        for name in names:
            assert keras.saving.get_registered_object(f"tfseg>{name}") is not None, name


def test_each_serializable_module_imports_first_in_a_fresh_process(tmp_path):
    """``import tfseg.losses`` as a process's first import: its ``import keras`` runs tfseg's import hook,
    which imports the other serializable modules while tfseg.losses is half-run (tfseg.metrics once
    took a name from it there and failed with a circular ImportError). The numpy backend keeps each
    process free of TensorFlow."""
    import tfseg

    env = {**os.environ, "KERAS_BACKEND": "numpy", "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(ROOT)}
    procs = {name: subprocess.Popen([sys.executable, "-c", f"import {name}, keras; "
                                     "print(keras.saving.get_registered_object('tfseg>Dice') is not None)"],
                                    cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name in tfseg.SERIALIZABLE_MODULES}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0 and out.strip() == "True", f"import {name}: {err[-1500:]}"


def test_cli_errors_are_one_line(tmp_path, capsys):
    params = tiny_config(tmp_path)
    assert cli.main(["train", "--config", str(params), "--set", "train.monitor=val_dice"]) == 2
    err = capsys.readouterr().err.strip()
    assert "train.monitor" in err and "val_dice_coe" in err and len(err.splitlines()) == 1
    assert cli.main(["train", "--config", str(params), "--set", "train.loss={dcie: 1}"]) == 2
    assert "did you mean 'dice'" in capsys.readouterr().err
    assert cli.main(["train", "--config", str(params), "--fold", "3"]) == 2
    assert "0..2" in capsys.readouterr().err
    assert cli.main(["train", "--config", str(params), "--set", "train.batch_size=0"]) == 2
    assert "batch_size" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # nothing started


@pytest.mark.parametrize(("override", "message"), [
    # the audit's cases: each was a traceback, a wrong key, or left runs/<name> (and the shards) behind
    ("augment.ops=[{name: flipp, p: 0.5}]",
     "--set augment.ops=[{name: flipp, p: 0.5}]: augment.ops[0]: Received: name='flipp' (did you mean"),
    ("model.arch=unett", "--set model.arch=unett: Received: arch='unett' (did you mean 'unet'?). Expected one of"),
    ("model.options={foo: 1}", "--set model.options={foo: 1}: unet_small: unknown option 'foo'. Expected one of"),
    ("data.image_size=[33,33]", "--set data.image_size=[33,33]: unet_small: input height 33 is not divisible by 2; "
                                "the nearest sizes that work are 32 and 34"),
    ("model.input_shape=[32,32,3]", "--set model.input_shape=[32,32,3]: [32, 32, 3] takes 3 channel(s), but "
                                    "data.channels is 1 ({params})"),
    ("model.input_shape=[64,64,1]", "--set model.input_shape=[64,64,1]: [64, 64, 1] is fixed, but data.image_size "
                                    "is [32, 32] ({params})"),
    ("train.folds=13", "data.root {data}: 12 groups cannot make 13 folds (train.folds)"),
    ("train.lr=abc", "--set train.lr=abc: expected a number, got 'abc'"),
    # these three named the key without the --set that set it (the last trained all weights, silently)
    ("train.metrics=[iou_scor]", "--set train.metrics=[iou_scor]: Received: metric='iou_scor' (did you mean "
                                 "'iou_score'?). Expected one of ["),
    ("train.monitor=val_iou_score", "--set train.monitor=val_iou_score: Received: monitor='val_iou_score' (did you "
                                    "mean 'val_dice_coe'?)"),
    ("model.encoder_freeze=true", "--set model.encoder_freeze=true: unet_small: model.encoder_freeze=true, but "
                                  "unet_small is trained from scratch and has no pretrained encoder to freeze"),
    ("model.encoder_weights=missing.h5", "--set model.encoder_weights=missing.h5: model.encoder_weights="
                                         "'missing.h5': no such file"),
    # sm.Unet takes fewer decoder stages than the encoder has downsamplings; its map is then downscaled
    ("model.decoder_filters=[16,8,8,8]", "--set model.decoder_filters=[16,8,8,8]: unet gives a 16x16 output for a "
                                         "32x32 input; training needs an output of the input's size (only "
                                         "unet_original's valid convolutions give a smaller, centre-cropped one); "
                                         "the decoder is 1 upsampling stage(s) short"),
])
def test_a_run_that_cannot_start_says_why_in_one_line_and_writes_nothing(tmp_path, capsys, override, message):
    """Checked before the shards are written and before runs/<name> exists; the key is named as the
    user set it (the --set, or the params file)."""
    params = tiny_config(tmp_path)
    argv = ["train", "--config", str(params), "--set", override]
    if "encoder_weights" in override or "decoder_filters" in override:
        argv += ["--set", "model.arch=unet", "--set", "model.backbone=mobilenetv2", "--set", "model.options={}"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0]
    expected = message.replace("{params}", str(params)).replace("{data}", str(tmp_path / "data"))
    assert err[0].startswith(f"tfseg train: error: {expected}"), err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "params.yaml"]  # no runs/, no tfrec/


def test_a_key_set_in_the_params_file_is_blamed_on_the_file(tmp_path, capsys):
    params = tiny_config(tmp_path)
    values = yaml.safe_load(params.read_text())
    values["model"]["arch"] = "unett"
    params.write_text(yaml.safe_dump(values))
    assert cli.main(["train", "--config", str(params)]) == 2
    assert capsys.readouterr().err.startswith(f"tfseg train: error: {params}: model.arch: Received: arch='unett'")


def test_offline_imagenet_weights_name_the_config_key(tmp_path, capsys, monkeypatch):
    """The kvasir recipe offline: keras.applications' download fails; the error names
    model.encoder_weights (not the builder's encoder_weights=), before any shard is written."""
    import keras.src.utils.file_utils as file_utils

    def offline(fname, origin=None, **kwargs):
        raise Exception(f"URL fetch failure on {origin}: None -- [Errno -2] Name or service not known")

    monkeypatch.setattr(file_utils, "get_file", offline)
    params = tiny_config(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cli.main(["train", "--config", str(params), "--set", "model.arch=unet", "--set", "model.options={}",
                         "--set", "model.backbone=mobilenetv2", "--set", "model.encoder_weights=imagenet"]) == 2
    # nor Keras' warning that weights for (224, 224) load when input_shape is unset: a topless model's do anyway
    assert not [w for w in caught if "non-square" in str(w.message)], [str(w.message) for w in caught]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("tfseg train: error: --set model.encoder_weights=imagenet: could not download ImageNet "
                             "weights for mobilenetv2 (offline?); pass model.encoder_weights=<path")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "params.yaml"]


def test_a_damaged_shard_stops_training_in_one_line_and_leaves_no_run(tmp_path, capsys):
    """A truncated shard raised a 27-line DataLossError from inside fit, and left runs/<name>/config.yaml
    and fold0/ behind."""
    from tfseg.data.tfrecord import shard_files, write_tfrecords

    params = tiny_config(tmp_path)
    write_tfrecords(load_config(params).data, progress=False)
    damaged = shard_files(tmp_path / "tfrec")[1]
    with open(damaged, "r+b") as fh:
        fh.truncate(20)  # the first record's header, then nothing
    assert cli.main(["train", "--config", str(params)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"tfseg train: error: {damaged}: unreadable (truncated record at 0"), err
    assert "Traceback" not in "".join(err) and len(err) <= 2  # the fold's start line, the error
    assert not (tmp_path / "runs").exists()


def test_only_folders_this_start_created_and_without_results_are_removed(tmp_path):
    from tfseg.train import removed_if_no_results

    def fail_in(*folders, write=None):
        with pytest.raises(RuntimeError), removed_if_no_results(*folders):
            for folder in folders:
                folder.mkdir(parents=True, exist_ok=True)
            if write:
                write()
            raise RuntimeError("the first epoch failed")

    run = tmp_path / "runs" / "r"
    fail_in(run / "fold0", run, run.parent)  # nothing of value: all three go
    assert not (tmp_path / "runs").exists()
    (run / "fold0" / "backup").mkdir(parents=True)  # a preempted run: its backup must survive
    (run / "fold0" / "backup" / "chief").write_text("x")
    fail_in(run / "fold0", run, run.parent)
    assert (run / "fold0" / "backup" / "chief").is_file()
    fail_in(run / "fold1", run, run.parent)  # a new fold of a run with results: only the fold goes
    assert not (run / "fold1").exists() and (run / "fold0").is_dir()
    fail_in(run / "fold2", write=lambda: (run / "fold2" / "history.csv").write_text("epoch,loss\n0,0.5\n"))
    assert (run / "fold2" / "history.csv").is_file()  # an epoch finished: kept


def test_global_batch_must_be_per_replica_times_replicas():
    from tfseg.data.pipeline import check_global_batch

    assert check_global_batch(4, 2) == 8
    with pytest.raises(ConfigError, match="train.batch_size"):
        check_global_batch(0, 2)


def test_nan_loss_stops_the_run_with_a_message(tmp_path, capsys):
    params = tiny_config(tmp_path, n=9)
    # logits (linear activation) blown up by a huge SGD step: inf - inf in the cross-entropy
    code = cli.main(["train", "--config", str(params), "--set", "train.optimizer=sgd",
                     "--set", "train.lr=1.0e+30", "--set", "train.epochs=3",
                     "--set", "model.activation=linear", "--set", "train.loss={bce: 1.0}"])
    err = capsys.readouterr().err
    assert code == 2
    assert "training loss became nan" in err.lower() and "train.lr" in err
    assert not (tmp_path / "runs" / "tiny" / "fold0" / "last.keras").exists()


def test_python_m_entry_point_parses_fold_and_set():
    proc = subprocess.run([sys.executable, "-m", "tfseg.train", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and "--fold" in proc.stdout and "--set" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "tfseg.train", "--config", "missing.yaml"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "missing.yaml: config file not found" in proc.stderr


def test_schedules_and_optimizers():
    from tfseg.schedules import WarmupDecay, build_optimizer, uses_plateau

    sched = WarmupDecay(1e-3, 1e-5, warmup_steps=10, total_steps=110, kind="cosine")
    lr = [float(sched(s)) for s in (0, 4, 9, 10, 60, 109, 500)]
    assert lr[0] == pytest.approx(1e-4) and lr[1] == pytest.approx(5e-4) and lr[2] == pytest.approx(1e-3)
    assert lr[3] == pytest.approx(1e-3) and lr[4] == pytest.approx((1e-3 + 1e-5) / 2, rel=1e-3)
    assert lr[6] == pytest.approx(1e-5)
    poly = WarmupDecay(1e-3, 0.0, warmup_steps=0, total_steps=100, kind="polynomial")
    assert float(poly(50)) == pytest.approx(5e-4)
    clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(sched))
    assert float(clone(60)) == pytest.approx(lr[4])
    t = load_config(None, ["train.optimizer=sgd", "train.momentum=0.99", "train.lr=0.01"]).train
    opt = build_optimizer(t, 10)
    assert isinstance(opt, keras.optimizers.SGD) and opt.momentum == pytest.approx(0.99)
    t = load_config(None, ["train.optimizer=rmsprop", "train.lr=2e-4"]).train
    assert isinstance(build_optimizer(t, 10), keras.optimizers.RMSprop) and uses_plateau(t)
    t = load_config(None, ["train.optimizer=adamw", "train.schedule=cosine", "train.weight_decay=1e-4"]).train
    opt = build_optimizer(t, 10)
    assert isinstance(opt, keras.optimizers.AdamW) and not uses_plateau(t)


def test_warmup_callback_ramps_a_constant_rate():
    from tfseg.callbacks import Warmup

    inp = keras.Input((4,))
    model = keras.Model(inp, keras.layers.Dense(1)(inp))
    model.compile(keras.optimizers.SGD(0.1), "mse")
    seen = []
    record = keras.callbacks.LambdaCallback(
        on_train_batch_begin=lambda b, logs: seen.append(float(model.optimizer.learning_rate)))
    x = np.ones((8, 4), "float32")
    model.fit(x, x[:, :1], batch_size=1, epochs=1, verbose=0, callbacks=[Warmup(0.1, 4), record])
    assert seen[:5] == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1])


def test_mask_crop_for_models_with_smaller_outputs():
    from tfseg.train import mask_crop_for

    inp = keras.Input((36, 36, 1))
    valid = keras.Model(inp, keras.layers.Conv2D(1, 5, padding="valid")(inp))
    same = keras.Model(inp, keras.layers.Conv2D(1, 5, padding="same")(inp))
    assert mask_crop_for(valid) == (32, 32) and mask_crop_for(same) is None
    # a model of any size: the crop follows the size fed
    free = keras.Input((None, None, 1))
    free = keras.Model(free, keras.layers.Conv2D(1, 5, padding="valid")(free))
    assert mask_crop_for(free, (36, 40)) == (32, 36) and mask_crop_for(free, [12, 12]) == (8, 8)
    assert mask_crop_for(valid, (36, 36)) == (32, 32)


def test_a_valid_convolution_model_of_any_size_trains_and_evaluates(tmp_path):
    """unet_original built for any size (data.val_size) trains on 188 crops (output 4x4) and validates on
    204 windows (output 20x20): each dataset's masks are cropped to the output of the size it feeds. The
    masks were never cropped (the crop was asked of the model's [null, null] input): bce failed on
    [4, 4, 4, 1] against [4, 188, 188, 1] at the first step."""
    from tfseg.evaluate import evaluate_run
    from tfseg.models import unet_original as uo

    path = tiny_config(tmp_path, n=6, size=204, steps_per_epoch=2, epochs=1)
    sets = ["model.arch=unet_original", "data.fit=random_crop", "data.image_size=[188,188]",
            "data.val_size=[204,204]", f"model.options={{filters: {list(uo.TEST_OPTIONS['filters'])}}}"]
    assert cli.main(["train", "--config", str(path), "--fold", "0", *[a for s in sets for a in ("--set", s)]]) == 0
    fold_dir = tmp_path / "runs" / "tiny" / "fold0"
    model = keras.models.load_model(fold_dir / "best.keras", compile=False)
    assert model.input_shape == (None, None, None, 1)
    rows = (fold_dir / "history.csv").read_text().splitlines()
    assert len(rows) == 2 and "val_dice_coe" in rows[0]
    # evaluate scores the held-out records at 204 against their truth cropped to the 20x20 output
    result = evaluate_run(tmp_path / "runs" / "tiny", "0")
    assert result["images"] == 2 and result["input_size"] == [204, 204]
    # it said "scored at that size", of the 204x204 records
    assert result["how"].endswith("scored on the centre 20x20 that the model's output covers (the truth "
                                  "centre-cropped to it)"), result["how"]
    per_image = (tmp_path / "runs" / "tiny" / "evaluate" / "oof" / "per_image.csv").read_text().splitlines()
    assert len(per_image) == 3 and per_image[0].startswith("fold,id,dice,iou")


def test_summary_gathers_folds(tmp_path):
    from tfseg.train import update_summary

    cfg = load_config(None)
    base = {"epochs": 3, "n_train": 8, "n_val": 4, "seconds": 1.0}
    update_summary(tmp_path, cfg, 1, {"best": 0.8, "best_epoch": 2, **base})
    summary = update_summary(tmp_path, cfg, 0, {"best": 0.6, "best_epoch": 3, **base})
    assert list(summary["folds"]) == ["0", "1"]
    assert summary["cv_mean"] == pytest.approx(0.7) and summary["cv_std"] == pytest.approx(0.1)
    assert json.loads((tmp_path / "summary.json").read_text()) == summary


def test_parse_folds():
    from tfseg.train import parse_folds

    assert parse_folds("all", 3) == [0, 1, 2] and parse_folds("0,2", 3) == [0, 2]
    with pytest.raises(ConfigError):
        parse_folds("x", 3)


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_training_step(tmp_path, policy):
    from tfseg.distribute import set_mixed_precision
    from tfseg.train import build_compiled_model

    cfg = load_config(None, ["model.arch=unet_small", "model.encoder_weights=null",
                             "model.options={filters: [8, 16]}", "data.classes=1", "data.channels=1",
                             "data.image_size=[32,32]",
                             "train.loss={bce_dice: 1.0, focal: 1.0}", f"train.mixed_precision={policy}"])
    set_mixed_precision(policy)
    try:
        model, _ = build_compiled_model(cfg, steps_per_epoch=4)
        assert model.layers[1].compute_dtype in ("bfloat16", "float16")
        assert model.output.dtype == "float32"
        rng = np.random.default_rng(0)
        x = rng.uniform(0, 255, (4, 32, 32, 1)).astype("float32")
        y = (x > 127).astype("float32")
        logs = [model.train_on_batch(x, y, return_dict=True) for _ in range(3)]
        assert all(np.isfinite(v) for log in logs for v in log.values())
        assert 0.0 <= logs[-1]["dice_coe"] <= 1.0
    finally:
        set_mixed_precision(None)


def test_time_limit_stops_after_the_epoch_that_passes_it():
    from tfseg.callbacks import TimeLimit

    now = [0.0]
    limit = TimeLimit(minutes=1.0, clock=lambda: now[0])
    inp = keras.Input((2,))
    model = keras.Model(inp, keras.layers.Dense(1)(inp))
    model.compile("sgd", "mse")
    tick = keras.callbacks.LambdaCallback(on_epoch_end=lambda e, logs: now.__setitem__(0, now[0] + 25.0))
    x = np.ones((4, 2), "float32")
    hist = model.fit(x, x[:, :1], epochs=10, verbose=0, callbacks=[tick, limit])
    assert len(hist.history["loss"]) == 3 and limit.stopped_epoch == 2  # 25, 50, 75 s >= 60 s


def test_image_summary_panels_show_image_truth_prediction(tmp_path):
    from tfseg.callbacks import ImageSummary

    inp = keras.Input((24, 24, 1))
    scaled = keras.layers.Rescaling(1 / 255)(inp)
    model = keras.Model(inp, keras.layers.Conv2D(1, 1, activation="sigmoid")(scaled))
    images = np.zeros((2, 24, 24, 1), "float32")
    images[:, 6:18, 6:18] = 255.0
    masks = (images > 0).astype("float32")
    summary = ImageSummary(tmp_path / "tb", images, masks, classes=1)
    summary.set_model(model)
    batch = summary.render(epoch=0)
    assert batch.dtype == np.uint8 and batch.shape[0] == 2 and batch.shape[-1] == 3
    assert batch.shape[2] > 3 * batch.shape[1]  # a row of four pictures
    assert batch.std() > 0


@pytest.mark.skipif(__import__("importlib").util.find_spec("tensorboard") is None,
                    reason="the tensorboard package is not installed (TensorFlow 2.21 does not bring it)")
def test_image_summary_writes_tensorboard_events(tmp_path):
    from tfseg.callbacks import ImageSummary

    inp = keras.Input((16, 16, 1))
    model = keras.Model(inp, keras.layers.Conv2D(1, 1, activation="sigmoid")(inp))
    summary = ImageSummary(tmp_path / "tb", np.ones((1, 16, 16, 1), "float32"), np.ones((1, 16, 16, 1)), 1)
    summary.set_model(model)
    summary.on_epoch_end(0)
    summary.on_train_end()
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_last_keras_keeps_the_last_weights_when_early_stopping_restores_the_best(tmp_path):
    from tfseg.callbacks import SaveLast

    inp = keras.Input((2,))
    model = keras.Model(inp, keras.layers.Dense(1)(inp))
    model.compile(keras.optimizers.SGD(0.1), "mse")
    final = {}
    keep = keras.callbacks.LambdaCallback(on_epoch_end=lambda e, logs: final.update(w=model.get_weights()))
    restore = keras.callbacks.EarlyStopping(monitor="loss", mode="max", patience=10,
                                            restore_best_weights=True)
    x = np.ones((8, 2), "float32")
    save_last = SaveLast(tmp_path / "last.keras")
    model.fit(x, 3 * x[:, :1], epochs=3, verbose=0, callbacks=[keep, save_last, restore])
    last = keras.models.load_model(tmp_path / "last.keras")
    for saved, expected, restored in zip(last.get_weights(), final["w"], model.get_weights()):
        np.testing.assert_allclose(saved, expected)
        assert not np.allclose(saved, restored)  # the model itself went back to epoch 1


def test_summary_of_a_fold_without_a_finite_score_stays_valid_json(tmp_path):
    from tfseg.train import update_summary

    base = {"best_epoch": 0, "epochs": 1, "n_train": 8, "n_val": 4, "seconds": 1.0}
    summary = update_summary(tmp_path, load_config(None), 0, {"best": None, **base})
    assert summary["cv_mean"] is None and summary["folds"]["0"]["best"] is None
    summary = update_summary(tmp_path, load_config(None), 1, {"best": 0.5, **base})
    assert summary["cv_mean"] == 0.5 and json.loads((tmp_path / "summary.json").read_text()) == summary


def test_validation_on_larger_central_windows_than_the_training_crops(tmp_path, capsys, monkeypatch):
    """data.val_size (TernausNet: 768 crops for training, central 1440 windows for validation)."""
    from tfseg.data.folds import fold_split
    from tfseg.data.pipeline import dataset_from_config
    from tfseg.train import run

    params = tiny_config(tmp_path, n=9, size=64)
    over = ["data.fit=random_crop", "data.image_size=[32,32]"]
    # a size the model cannot take: one line, nothing written
    assert cli.main(["train", "--config", str(params), *(f"--set={o}" for o in over),
                     "--set", "data.val_size=[63,63]"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "62 and 64" in err[0]
    assert err[0].startswith("tfseg train: error: --set data.val_size=[63,63]: unet_small: input height 63")
    assert not (tmp_path / "runs").exists() and not (tmp_path / "tfrec").exists()  # checked before the shards
    cfg = load_config(params, [*over, "data.val_size=[64,64]"])
    assert cfg.model.input_shape == (None, None, 1)  # built for any size
    import tfseg.models

    built = []
    build = tfseg.models.build_model
    monkeypatch.setattr(tfseg.models, "build_model", lambda c: built.append(c.input_shape) or build(c))
    summary = run(cfg, "0")
    # the two sizes are probed once (by run, not again by train_fold), then the real model is built
    assert built == [(32, 32, 1), (64, 64, 1), (None, None, 1)]
    split = fold_split(cfg.data.tfrecord_dir, cfg.train.folds, 0, cfg.train.seed)
    images, masks = next(iter(dataset_from_config(cfg, split.val_files, training=False, groups=split.val_groups)))
    assert images.shape[1:] == (64, 64, 1) and masks.shape[1:] == (64, 64, 1)
    images, masks = next(iter(dataset_from_config(cfg, split.train_files, training=True,
                                                  groups=split.train_groups)))
    assert images.shape[1:] == (32, 32, 1)
    assert 0.0 <= summary["folds"]["0"]["best"] <= 1.0
    model = keras.models.load_model(tmp_path / "runs" / "tiny" / "fold0" / "best.keras")
    assert model.input_shape == (None, None, None, 1)
    assert model.predict(np.zeros((1, 64, 64, 1), "float32"), verbose=0).shape == (1, 64, 64, 1)
    with pytest.raises(ConfigError, match="--set data.val_size=\\[64,64\\]: \\[64, 64\\] needs data.fit: random_crop"):
        load_config(params, ["data.val_size=[64,64]"])


def test_compiled_model_traces_its_first_training_step_once(count_traces):
    import tensorflow as tf

    from tfseg.train import build_compiled_model

    cfg = load_config(None, ["model.arch=unet_small", "model.encoder_weights=null",
                             "model.options={filters: [8, 16]}", "data.classes=1", "data.channels=1",
                             "data.image_size=[32,32]", "train.loss={bce_dice: 1.0}"])
    model, _ = build_compiled_model(cfg, steps_per_epoch=2)
    assert model.optimizer.built
    traces = count_traces(model)
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 1)).astype("float32")
    model.fit(tf.data.Dataset.from_tensors((x, (x > 127).astype("float32"))).repeat(), steps_per_epoch=2,
              epochs=2, verbose=0, shuffle=False)
    assert traces[0] == 1


JAX_TRAIN_SCRIPT = """
import os
os.environ["KERAS_BACKEND"] = "jax"
import numpy as np, keras
from tfseg.config import load_config
from tfseg.train import build_compiled_model
cfg = load_config(None, ["model.arch=unet", "model.backbone=efficientnetb0", "model.encoder_weights=null",
                         "data.classes=1", "data.channels=3", "data.image_size=[64,64]",
                         "train.loss={bce_dice: 1.0}"])
model, _ = build_compiled_model(cfg, steps_per_epoch=2)  # prepare_training: on JAX, only the early build
assert keras.config.backend() == "jax" and model.optimizer.built
x = np.random.default_rng(0).uniform(0, 255, (4, 64, 64, 3)).astype("float32")
y = (x.mean(-1, keepdims=True) > 127).astype("float32")
losses = [float(np.ravel(model.train_on_batch(x, y))[0]) for _ in range(4)]
assert losses[-1] < losses[0], losses
print("JAX_TRAIN_OK")
"""


@pytest.mark.slow
def test_compiled_model_trains_on_the_jax_backend():
    import importlib.util

    if importlib.util.find_spec("jax") is None:
        pytest.skip("jax is not installed: the JAX backend cannot be checked here")
    proc = subprocess.run([sys.executable, "-c", JAX_TRAIN_SCRIPT], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert "JAX_TRAIN_OK" in proc.stdout, proc.stderr[-3000:]


def test_whole_device_batches_leave_out_the_uneven_tail_of_validation():
    import tensorflow as tf

    from tfseg.errors import RunError
    from tfseg.train import whole_device_batches

    ds = tf.data.Dataset.range(13).map(lambda i: (tf.fill([2, 2, 1], tf.cast(i, tf.float32)),)).batch(8)
    cut, kept = whole_device_batches(ds, 13, 8, 4, fold=0)
    assert kept == 12
    sizes = [int(b[0].shape[0]) for b in cut]
    assert sizes == [8, 4]
    values = np.concatenate([b[0][:, 0, 0, 0].numpy() for b in cut])
    assert values.tolist() == list(range(12))
    with pytest.raises(RunError, match=r"fold 2: 3 validation record\(s\) for 4 devices"):
        whole_device_batches(ds, 3, 8, 4, fold=2)


def _oof_evaluation(run_dir: Path, folds) -> None:
    """RUN/evaluate/oof as `tfseg evaluate --run RUN` writes it (per_image.csv's fold column; the sweep's best
    threshold in evaluation.json, which infer.threshold_from=oof reads)."""
    out = run_dir / "evaluate" / "oof"
    out.mkdir(parents=True)
    rows = "".join(f"{k},img{i},0.5,0.4,0.9\n" for i, k in enumerate(folds))
    (out / "per_image.csv").write_text("fold,id,dice,iou,pixel_accuracy\n" + rows)
    (out / "evaluation.json").write_text(json.dumps({"data": "oof", "best_threshold": {"threshold": 0.3}}))


def test_a_finished_fold_is_trained_again_only_with_overwrite(tmp_path, capsys):
    """The tester's rerun: `tfseg train` on a finished fold retrained it from scratch, silently, replacing a
    better best.keras, and left RUN/evaluate/oof behind for infer.threshold_from=oof to read."""
    from tfseg.config import InferConfig
    from tfseg.inference import resolve_threshold
    from tfseg.train import run

    params = tiny_config(tmp_path, n=9, epochs=1)
    summary = run(load_config(params), "0")
    run_dir, fold_dir = tmp_path / "runs" / "tiny", tmp_path / "runs" / "tiny" / "fold0"
    _oof_evaluation(run_dir, [0, 0, 0])
    (fold_dir / "stale.txt").write_text("anything the old fold's folder held")
    from tests.test_resume import snapshot

    before = snapshot(run_dir)
    capsys.readouterr()

    assert cli.main(["train", "--config", str(params)]) == 2
    best = summary["folds"]["0"]
    assert capsys.readouterr().err.strip().splitlines() == [
        f"tfseg train: error: {fold_dir} holds fold 0, trained already (best val_dice_coe {best['best']:.4f} at "
        "epoch 1 of 1), and there is no backup to resume from; expected a fold not trained yet. Pass --overwrite "
        "to train fold 0 again from scratch (its results are replaced), or set a new train.name"]
    assert snapshot(run_dir) == before  # not a byte written

    assert cli.main(["train", "--config", str(params), "--overwrite", "--set", "train.epochs=2"]) == 0
    err = capsys.readouterr().err
    assert f"tfseg train: fold 0: removed {fold_dir}, {run_dir / 'evaluate' / 'oof'} (--overwrite; " in err
    assert not (fold_dir / "stale.txt").exists() and not (run_dir / "evaluate" / "oof").exists()
    assert [p.name for p in run_dir.iterdir() if p.name.startswith(".")] == []  # nothing left aside
    with pytest.raises(RunError, match="evaluate/oof/evaluation.json: not found"):
        resolve_threshold(run_dir, InferConfig(threshold_from="oof"))
    assert len((fold_dir / "history.csv").read_text().splitlines()) == 3  # header + the new fold's 2 epochs
    assert json.loads((run_dir / "summary.json").read_text())["folds"]["0"]["epochs"] == 2


@pytest.mark.slow
def test_resuming_a_fold_drops_the_oof_evaluation_that_scored_its_earlier_best_keras(tmp_path, capsys):
    """With `tfseg evaluate`'s own output: an interrupted fold that has a best.keras, evaluated, then resumed
    (its best.keras may change), leaves no out-of-fold sweep for infer.threshold_from=oof to read."""
    from tests.test_resume import interrupt
    from tfseg.config import InferConfig
    from tfseg.inference import resolve_threshold

    params = tiny_config(tmp_path, n=9, epochs=2)
    fold_dir = interrupt(params)
    run_dir = fold_dir.parent
    assert cli.main(["evaluate", "--run", str(run_dir)]) == 0
    assert resolve_threshold(run_dir, InferConfig(threshold_from="oof")).threshold > 0
    assert cli.main(["train", "--config", str(params)]) == 0
    assert f"tfseg train: fold 0: removed {run_dir / 'evaluate' / 'oof'} (the evaluations" in capsys.readouterr().err
    with pytest.raises(RunError, match="evaluate/oof/evaluation.json: not found"):
        resolve_threshold(run_dir, InferConfig(threshold_from="oof"))


def test_the_evaluations_of_a_fold_trained_again_go_and_the_others_stay(tmp_path):
    """RUN/evaluate/<label>/per_image.csv's fold column: k out of fold, 0+1+2 for an ensemble on other data."""
    from tfseg.train_rerun import drop_evaluations

    def table(label, folds):
        (tmp_path / "evaluate" / label).mkdir(parents=True)
        rows = "".join(f"{k},img{i},0.5,0.4,0.9\n" for i, k in enumerate(folds))
        (tmp_path / "evaluate" / label / "per_image.csv").write_text("fold,id,dice,iou,pixel_accuracy\n" + rows)

    table("oof", [0, 0, 1, 2])
    table("test", ["0+1+2", "0+1+2"])
    table("test_fold1", ["1"])
    (tmp_path / "evaluate" / "notes").mkdir()  # not an evaluation: left alone
    gone = drop_evaluations(tmp_path, 0)
    assert [p.name for p in gone] == ["oof", "test"]
    assert sorted(p.name for p in (tmp_path / "evaluate").iterdir()) == ["notes", "test_fold1"]
    assert drop_evaluations(tmp_path, 2) == [] and drop_evaluations(tmp_path / "missing", 0) == []


def test_which_changed_settings_stop_a_resume(tmp_path):
    """Compared with the fold's config.yaml: the model (but its starting weights), the input and classes,
    the optimizer, the stages and the split stop a resume; epochs, rates, callbacks and paths do not."""
    from tfseg.config import dump_config
    from tfseg.train_rerun import blocks_resume, config_changes, describe

    params = tiny_config(tmp_path)
    dump_config(load_config(params), tmp_path / "config.yaml")
    changed = config_changes(tmp_path, load_config(params, [
        "model.options={filters: [8, 32]}", "train.epochs=9", "train.lr=0.01", "data.image_size=[64,64]"]))
    assert [c[0] for c in changed] == ["data.image_size", "model.input_shape", "model.options", "train.epochs",
                                       "train.lr"]
    assert describe(changed[2:3]) == "model.options: {filters: [8, 16]} -> {filters: [8, 32]}"
    assert describe(changed, limit=2).endswith("; and 3 more")
    stop = ["model.arch", "model.options", "model.input_shape", "model.classes", "data.image_size", "data.channels",
            "data.classes", "train.optimizer", "train.freeze_encoder_epochs", "train.folds", "train.seed"]
    go = ["model.encoder_weights", "train.epochs", "train.lr", "train.schedule", "train.batch_size",
          "train.early_stopping_patience", "train.time_limit_minutes", "train.tensorboard", "train.loss",
          "data.root", "data.tfrecord_dir", "augment.ops", "infer.threshold"]
    assert [k for k in stop if not blocks_resume(k)] == [] and [k for k in go if blocks_resume(k)] == []
    assert config_changes(tmp_path / "nothing", load_config(params)) == []


def test_a_data_root_other_than_the_shards_came_from_is_said_in_one_line(tmp_path, capsys):
    """`--set data.root=/nope` at train time was silently ignored once the shards existed."""
    from tfseg.train_checks import warn_other_root

    params = tiny_config(tmp_path)
    assert cli.main(["tfrecords", "--config", str(params)]) == 0  # writes tfrec/config.yaml beside the shards
    capsys.readouterr()
    assert warn_other_root(load_config(params)) is None
    line = warn_other_root(load_config(params, ["data.root=/nope"]))
    assert line == (f"tfseg train: warning: data.root is /nope, but the shards in {tmp_path / 'tfrec'} were "
                    f"written from {tmp_path / 'data'} ({tmp_path / 'tfrec' / 'config.yaml'}); training reads the "
                    "shards as they are (`tfseg tfrecords --overwrite` writes them again from data.root)")
    assert capsys.readouterr().err == line + "\n"
    # `--fold all` checks before every fold: the line is said once
    assert warn_other_root(load_config(params, ["data.root=/nope"])) == line
    assert capsys.readouterr().err == ""
