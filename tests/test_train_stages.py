"""Two-stage fine-tuning in ``tfseg train`` (``train.freeze_encoder_epochs``): the encoder frozen, then
trained; a fold stopped between or inside the stages resumes where it was; the config checks."""

from __future__ import annotations

import csv

import keras
import numpy as np
import pytest
import yaml

from tests.test_train import tiny_config
from tfseg import cli
from tfseg.config import load_config
from tfseg.train_stages import plan_stages, resume_stage

ENCODER_OVERRIDES = ["model.arch=unet", "model.backbone=mobilenet", "model.options={}",
                     "model.decoder_filters=[16,16,8,8,8]"]


class Watch(keras.callbacks.Callback):
    """Snapshots, at each epoch's end, of an encoder convolution, an encoder BatchNorm's moving mean and
    the head's kernel; ``stop_at`` raises KeyboardInterrupt as that epoch begins (a preemption)."""

    def __init__(self, stop_at: int | None = None):
        super().__init__()
        self.stop_at = stop_at
        self.start = None
        self.epochs: dict[int, dict] = {}

    def _snap(self) -> dict:
        encoder = self.model.get_layer("encoder")
        return {"conv": encoder.get_layer("conv1").kernel.numpy().copy(),
                "bn": encoder.get_layer("conv1_bn").moving_mean.numpy().copy(),
                "head": self.model.get_layer("final_conv").kernel.numpy().copy(),
                "encoder_trainable": encoder.trainable}

    def on_train_begin(self, logs=None):
        if self.start is None:
            self.start = self._snap()

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.stop_at:
            raise KeyboardInterrupt(f"preempted at epoch {epoch}")

    def on_epoch_end(self, epoch, logs=None):
        self.epochs[epoch] = self._snap()


def history(fold_dir) -> list[dict]:
    with (fold_dir / "history.csv").open() as fh:
        return list(csv.DictReader(fh))


def test_plan_and_resume_stage(tmp_path):
    cfg = load_config(tiny_config(tmp_path), ["train.epochs=5", "train.freeze_encoder_epochs=2"])
    one, two = plan_stages(cfg.train)
    assert (one.first_epoch, one.last_epoch, one.frozen, one.backup, one.early_stopping) == (0, 2, True,
                                                                                             "backup-decoder", False)
    assert (two.first_epoch, two.last_epoch, two.frozen, two.backup, two.early_stopping) == (2, 5, False, "backup",
                                                                                             True)
    [only] = plan_stages(load_config(tiny_config(tmp_path / "b")).train)
    assert (only.first_epoch, only.last_epoch, only.frozen, only.backup) == (0, 2, None, "backup")
    fold = tmp_path / "fold0"
    assert resume_stage([one, two], fold) == 0
    (fold / "backup-decoder").mkdir(parents=True)
    assert resume_stage([one, two], fold) == 0  # empty: nothing to resume from
    (fold / "backup-decoder" / "latest.weights.h5").write_bytes(b"x")
    assert resume_stage([one, two], fold) == 0
    (fold / "backup").mkdir()
    (fold / "backup" / "latest.weights.h5").write_bytes(b"x")
    assert resume_stage([one, two], fold) == 1


@pytest.mark.slow  # 32 s; make test keeps the freeze/unfreeze contract of every model and the two-stage time limit
def test_encoder_frozen_for_the_first_epochs_then_trained(tmp_path, capsys):
    from tfseg.train import train_fold

    cfg = load_config(tiny_config(tmp_path), [*ENCODER_OVERRIDES, "train.epochs=3", "train.freeze_encoder_epochs=2",
                                              "train.early_stopping_patience=1"])
    watch = Watch()
    result = train_fold(cfg, 0, callbacks=[watch])
    start, e = watch.start, watch.epochs
    assert sorted(e) == [0, 1, 2] and result["epochs"] == 3
    for epoch in (0, 1):  # stage 1: the encoder's weights and BatchNorm statistics do not move; the head does
        assert not e[epoch]["encoder_trainable"]
        np.testing.assert_array_equal(e[epoch]["conv"], start["conv"])
        np.testing.assert_array_equal(e[epoch]["bn"], start["bn"])
        assert not np.array_equal(e[epoch]["head"], start["head"])
    assert e[2]["encoder_trainable"]  # stage 2: all of it trains
    assert not np.allclose(e[2]["conv"], e[1]["conv"]) and not np.allclose(e[2]["bn"], e[1]["bn"])
    fold_dir = tmp_path / "runs" / "tiny" / "fold0"
    assert [int(r["epoch"]) for r in history(fold_dir)] == [0, 1, 2]
    assert not (fold_dir / "backup").exists() and not (fold_dir / "backup-decoder").exists()
    out, err = capsys.readouterr()
    # early stopping puts no weights back (Keras' restore named stage 2's best epoch, not the fold's best.keras)
    assert "Restoring model weights" not in out
    assert "fold 0: stage 1/2, epochs 1-2: the encoder frozen, the decoder trained" in err
    assert "fold 0: stage 2/2, epochs 3-3: the whole model, encoder unfrozen, with a fresh optimizer" in err
    # the last model is the unfrozen one, and reloads as such
    last = keras.models.load_model(fold_dir / "last.keras")
    assert last.get_layer("encoder").trainable


@pytest.mark.slow  # 35 s and 50 s; make test keeps test_plan_and_resume_stage and the two-stage time limit
@pytest.mark.parametrize("stop_at", [1, 2], ids=["between-the-stages", "inside-stage-2"])
def test_a_fold_stopped_in_stage_two_resumes_there(tmp_path, capsys, stop_at):
    """Epoch 0 is stage 1; preempted as epoch 1 begins (stage 2 has no backup yet: resume from stage 1's)
    or as epoch 2 begins (stage 2's own backup): the same call finishes the fold, each epoch once."""
    from tfseg.train import train_fold

    cfg = load_config(tiny_config(tmp_path), [*ENCODER_OVERRIDES, "train.epochs=3", "train.freeze_encoder_epochs=1",
                                              "train.early_stopping_patience=0"])
    first = Watch(stop_at=stop_at)
    with pytest.raises(KeyboardInterrupt):
        train_fold(cfg, 0, callbacks=[first])
    fold_dir = tmp_path / "runs" / "tiny" / "fold0"
    assert (fold_dir / "backup-decoder").is_dir()
    assert (fold_dir / "backup").is_dir() == (stop_at == 2)
    done = history(fold_dir)
    assert [int(r["epoch"]) for r in done] == list(range(stop_at))
    capsys.readouterr()
    again = Watch()
    result = train_fold(cfg, 0, callbacks=[again])
    err = capsys.readouterr().err
    resumed_from = fold_dir / ("backup" if stop_at == 2 else "backup-decoder")
    assert f"resuming from {resumed_from}" in err
    assert ("stage 1/2" in err) == (stop_at == 1)  # stage 1 only restores its weights (no epoch runs)
    assert sorted(again.epochs) == list(range(stop_at, 3)) and result["epochs"] == 3
    rows = history(fold_dir)
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]
    assert rows[:stop_at] == done  # the epochs before the stop are kept, not run again
    # the resumed run starts from the weights the stopped one had reached
    np.testing.assert_array_equal(again.start["conv"], first.epochs[stop_at - 1]["conv"])
    assert again.start["encoder_trainable"] == (stop_at == 2)
    assert not (fold_dir / "backup").exists() and not (fold_dir / "backup-decoder").exists()


def test_the_time_limit_counts_both_stages(tmp_path, capsys):
    """A limit reached in stage 1 ends the fold there: stage 2 does not start."""
    from tfseg.train import train_fold

    cfg = load_config(tiny_config(tmp_path), [*ENCODER_OVERRIDES, "train.epochs=3", "train.freeze_encoder_epochs=2",
                                              "train.time_limit_minutes=0"])
    result = train_fold(cfg, 0)
    assert result["epochs"] == 1
    err = capsys.readouterr().err
    assert "stage 1/2" in err and "stage 2/2" not in err


@pytest.mark.parametrize(("overrides", "message"), [
    (["train.freeze_encoder_epochs=2"],
     "--set train.freeze_encoder_epochs=2: 2 leaves no epoch to train the unfrozen model; expected fewer than "
     "train.epochs (2)"),
    ([*ENCODER_OVERRIDES, "train.freeze_encoder_epochs=1", "model.encoder_freeze=true"],
     "--set train.freeze_encoder_epochs=1: 1, but model.encoder_freeze keeps the encoder frozen for the whole run; "
     "expected one of the two"),
    (["train.freeze_encoder_epochs=1"],
     "--set train.freeze_encoder_epochs=1: unet_small has no pretrained encoder to freeze (it is trained from "
     "scratch); expected 0"),
])
def test_two_stage_config_errors_are_one_line_and_write_nothing(tmp_path, capsys, overrides, message):
    params = tiny_config(tmp_path)
    argv = ["train", "--config", str(params)]
    for override in overrides:
        argv += ["--set", override]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"tfseg train: error: {message}"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "params.yaml"]


def test_the_key_in_a_params_file(tmp_path):
    params = tiny_config(tmp_path)
    values = yaml.safe_load(params.read_text())
    values["train"]["freeze_encoder_epochs"] = 1
    params.write_text(yaml.safe_dump(values))
    assert load_config(params).train.freeze_encoder_epochs == 1


def test_checkpoints_record_each_backends_own_compile_mode_not_this_runs(tmp_path):
    """A JAX run compiles with jit_compile=True; saved as such, keras.models.load_model then compiled with
    torch.compile on PyTorch (the tester's failure) and with XLA on TensorFlow's CPU. The checkpoint says
    `auto`, which each backend resolves for itself, and steps_per_execution 1 (a TPU run's setting)."""
    import json
    import zipfile

    from tfseg.train import build_compiled_model

    cfg = load_config(tiny_config(tmp_path), ["train.jit_compile=true", "train.steps_per_execution=4"])
    model, _ = build_compiled_model(cfg, steps_per_epoch=2)
    assert model.jit_compile is True and model.steps_per_execution == 4  # this run trains as asked
    path = tmp_path / "m.keras"
    model.save(path)
    saved = json.loads(zipfile.ZipFile(path).read("config.json"))["compile_config"]
    assert (saved["jit_compile"], saved["steps_per_execution"]) == ("auto", 1)
    loaded = keras.models.load_model(path)  # TensorFlow on a CPU: auto is no XLA
    assert loaded.jit_compile is False and loaded.steps_per_execution == 1
