"""The CLI dispatcher: help lists commands; user errors exit 2 with one line and no traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tfseg.cli import COMMANDS, main


def test_help_lists_every_command(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


def test_console_help_runs_as_module(project_root):
    res = subprocess.run([sys.executable, "-m", "tfseg", "--help"], capture_output=True, text=True,
                         cwd=project_root, timeout=120)
    assert res.returncode == 0
    assert "tfrecords" in res.stdout and "predict" in res.stdout


def test_unknown_command_exits_2_one_line(capsys):
    try:
        main(["frobnicate"])
    except SystemExit as exit_:
        assert exit_.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'frobnicate'" in err
    assert err.count("\n") == 1


def test_bad_config_key_exits_2_without_traceback(tmp_path, project_root):
    res = subprocess.run([sys.executable, "-m", "tfseg", "tfrecords", "--config", "params.yaml",
                          "--set", "data.sorce=folder"], capture_output=True, text=True, cwd=project_root,
                         timeout=300)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert "unknown key 'data.sorce' (did you mean 'data.source'?)" in res.stderr
    assert res.stderr.strip().count("\n") == 0


def test_error_after_tensorflow_starts_is_still_one_line(tmp_path, project_root):
    """TensorFlow's C++ start-up lines are kept off stderr, so the user sees only the error."""
    res = subprocess.run([sys.executable, "-m", "tfseg", "verify", str(tmp_path)], capture_output=True,
                         text=True, cwd=project_root, timeout=300)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        f"tfseg verify: error: {tmp_path}: no .tfrec shards. Expected the output of `tfseg tfrecords`."]


def test_atomic_write_leaves_normal_permissions(tmp_path):
    import os

    from tfseg.files import atomic_write_text

    umask = os.umask(0)
    os.umask(umask)
    path = atomic_write_text(tmp_path / "a.txt", "x")
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask


def test_main_job_offline_stops_at_once_and_leaves_nothing(tmp_path, project_root):
    """The README's main command without the Pets data and without a network: one clear error line
    that points to the local recipes, and no run or shard folder left behind."""
    from tfseg.data import sources_tfds

    if sources_tfds.is_online(sources_tfds.layout_for("oxford_iiit_pet").download_host):
        pytest.skip("the download host answers: this machine is online, the offline path cannot run")
    res = subprocess.run([sys.executable, "-m", "tfseg", "train", "--config", str(project_root / "params.yaml"),
                          "--fold", "0", "--set", f"data.tfds_data_dir={tmp_path / 'tfds'}"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert res.returncode == 2, res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("tfseg train: error: TFDS data set 'oxford_iiit_pet' is not in")
    assert "offline" in last and "configs/isbi2012.yaml" in last
    assert "Traceback" not in res.stderr and "WARNING" not in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no runs/, no tfrecords/, no tfds/


def test_models_lists_every_architecture_and_encoder(capsys):
    from tfseg.models import arch_names
    from tfseg.models.encoders import encoder_names

    assert main(["models"]) == 0
    out = capsys.readouterr().out
    listed = {line.split()[0] for line in out.splitlines() if line.startswith("  ")}
    assert set(arch_names()) | set(encoder_names()) <= listed
    assert "  convnexttiny         ConvNeXtTiny           32 16 8 4          torch" in out
    assert "  inceptionv3          InceptionV3            32 16 8 4 2        tf: x/127.5-1; valid padding" in out


def test_models_describes_the_configured_model(capsys):
    import keras

    from tfseg.models.unet import Unet

    assert main(["models", "--set", "model.arch=unet", "--set", "model.backbone=mobilenetv2", "--set",
                 "data.image_size=[64,64]", "--set", "data.classes=3", "--set", "model.encoder_freeze=true"]) == 0
    out = capsys.readouterr().out.splitlines()
    twin = Unet("mobilenetv2", input_shape=(64, 64, 3), classes=3, encoder_weights=None, encoder_freeze=True)
    trainable = sum(int(keras.ops.size(w)) for w in twin.trainable_weights)
    assert out[:5] == [
        "model.arch unet, backbone mobilenetv2",
        "input  [B, 64, 64, 3]  float32, 0..255 (the model normalizes)",
        "output [B, 64, 64, 3]  float32, softmax",
        f"parameters {twin.count_params():,} ({trainable:,} trainable)",
        f"encoder    {twin.get_layer('encoder').count_params():,} of them (frozen)"]
    assert "not loaded here" in out[5]  # params.yaml's encoder_weights: imagenet is not downloaded


def test_models_names_the_backbone_only_where_the_architecture_takes_one(capsys):
    """ternaus_unet16 said `backbone resnet34` (the setting, unused: its encoder is always VGG16)."""
    assert main(["models", "--set", "model.arch=ternaus_unet16", "--set", "model.backbone=resnet34", "--set",
                 "data.image_size=[32,32]", "--set", "model.encoder_weights=null"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "model.arch ternaus_unet16"
    assert main(["models", "--set", "model.arch=fpn", "--set", "model.backbone=mobilenetv2", "--set",
                 "data.image_size=[32,32]", "--set", "model.encoder_weights=null"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "model.arch fpn, backbone mobilenetv2"


def test_models_with_an_impossible_size_or_name_exits_2_one_line_naming_the_key(project_root, tmp_path, capsys):
    res = subprocess.run([sys.executable, "-m", "tfseg", "models", "--set", "model.arch=pix2pix_unet", "--set",
                          "data.image_size=[100,100]"], capture_output=True, text=True, cwd=project_root,
                         timeout=300)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        "tfseg models: error: --set data.image_size=[100,100]: pix2pix_unet: input height 100 is not divisible by "
        "32; the nearest sizes that work are 96 and 128"]
    # a name the builders refuse is reported against the file and key that set it, as `tfseg train` does
    params = tmp_path / "bad.yaml"
    params.write_text("model:\n  arch: unet\n  backbone: efficientnetb9\n")
    assert main(["models", "--config", str(params)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"tfseg models: error: {params}: model.backbone: Received: "
                          "backbone='efficientnetb9' (did you mean 'efficientnetb7'?)"), err


@pytest.mark.parametrize(("argv", "flag"), [
    (["evaluate", "--run", "runs/x", "--fold", "x"], "--fold"),
    (["evaluate", "--run", "runs/x", "--fold", "0,"], "--fold"),
    (["predict", "--run", "runs/x", "--folds", "0,x", "--input", "a.png", "--output", "out"], "--folds"),
    (["train", "--fold", "first"], "--fold"),
])
def test_fold_arguments_name_the_flag(capsys, argv, flag):
    """The audit: `evaluate --fold x` was reported as `infer.folds: 'x'`, a key the user never set."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    value = argv[argv.index(flag) + 1]
    assert capsys.readouterr().err == (f"tfseg {argv[0]}: error: argument {flag}: {value!r}: expected `all` or "
                                       "fold numbers such as 0 or 0,2\n")


def test_train_takes_overwrite_and_passes_it_on(monkeypatch, project_root):
    """`tfseg train --overwrite` (and `make train SET=--overwrite`) trains finished folds again; without it
    the flag is off (tfseg.train_rerun)."""
    from tfseg import cli, train

    seen = []
    monkeypatch.setattr(train, "run", lambda cfg, folds, overwrite=False: seen.append((folds, overwrite)))
    params = str(project_root / "params.yaml")
    assert cli.main(["train", "--config", params, "--fold", "all", "--overwrite"]) == 0
    assert cli.main(["train", "--config", params, "--fold", "0"]) == 0
    assert seen == [("all", True), ("0", False)]


def test_evaluate_on_a_damaged_shard_is_one_line_naming_it(tmp_path, capsys):
    """The audit: `tfseg evaluate --data <folder with a truncated shard>` ended in a 27-line DataLossError,
    whose message names no file; the CLI finds the shard and names it."""
    import keras

    from tests.conftest import shared_path
    from tfseg.config import dump_config, load_config
    from tfseg.data import sources
    from tfseg.data.tfrecord import shard_files, write_tfrecords

    cfg = load_config(None, [f"data.root={shared_path('isbi2012_em_membrane')}", "data.source=folder",
                             "data.classes=1", "data.channels=1", "data.image_size=[32,32]", "data.fit=resize",
                             "data.image_format=png", "data.shards=2", "data.workers=1",
                             f"data.tfrecord_dir={tmp_path / 'shards'}"])
    write_tfrecords(cfg.data, entries=sources.list_entries(cfg.data)[:4], progress=False)
    run = tmp_path / "run"
    dump_config(cfg, run / "config.yaml")
    inp = keras.Input((32, 32, 1))
    (run / "fold0").mkdir()
    keras.Model(inp, keras.layers.Conv2D(1, 1, activation="sigmoid")(inp)).save(run / "fold0" / "best.keras")
    damaged = shard_files(tmp_path / "shards")[1]
    with open(damaged, "r+b") as fh:
        fh.truncate(100)
    assert main(["evaluate", "--run", str(run), "--data", str(tmp_path / "shards"),
                 "--output", str(tmp_path / "eval")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"tfseg evaluate: error: {damaged}: unreadable (truncated record at 0")
    assert err.count("\n") == 1 and f"tfseg verify {tmp_path / 'shards'}" in err
