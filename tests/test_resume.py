"""Preemption: a run killed with SIGKILL in its second epoch resumes from its backup when the same
command runs again, and finishes with the planned number of epochs; on Keras' TensorFlow and JAX
backends."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest
import yaml

from tests.test_train import tiny_config

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 4


def _rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
def test_sigkill_in_epoch_two_then_the_same_command_resumes(tmp_path, backend):
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed")
    params = tiny_config(tmp_path, n=12, size=64, epochs=EPOCHS, steps_per_epoch=60, batch_size=2)
    command = [sys.executable, "-m", "tfseg", "train", "--config", str(params), "--fold", "0"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": "", "KERAS_BACKEND": backend}
    fold_dir = tmp_path / "runs" / "tiny" / "fold0"
    history = fold_dir / "history.csv"

    first = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while len(_rows(history)) < 1:  # epoch 1 is written: the run is now in epoch 2
            assert first.poll() is None, first.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "the first epoch never finished"
            time.sleep(0.05)
        time.sleep(0.3)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
    assert first.returncode == -signal.SIGKILL
    before = _rows(history)
    assert len(before) == 1, "killed too late: epoch 2 had already finished"
    assert (fold_dir / "backup").is_dir()
    assert not (fold_dir / "last.keras").exists()

    second = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, (second.stdout + second.stderr)[-3000:]
    assert "resuming from" in second.stderr
    log = second.stdout + second.stderr
    assert "Epoch 1/" not in log and "Epoch 2/4" in log  # continued at epoch 2, not from scratch
    after = _rows(history)
    assert [int(r["epoch"]) for r in after] == list(range(EPOCHS))
    assert after[0] == before[0]  # epoch 1 as the killed run wrote it
    assert (fold_dir / "last.keras").is_file() and (fold_dir / "best.keras").is_file()
    assert not (fold_dir / "backup").exists()


# ------------------------------------------------------------------------------------------------
# Running again: a changed config on resume, a finished fold, --overwrite, --fold all after a crash
# ------------------------------------------------------------------------------------------------


class Preempted(Exception):
    """Stands for the interrupt (SIGINT, a preempted VM) that stops a fold inside fit."""


class PreemptAtEpoch(keras.callbacks.Callback):
    def __init__(self, epoch: int):
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            raise Preempted(f"stopped as epoch {epoch + 1} began")


def interrupt(params: Path, fold: int = 0, epoch: int = 1, overrides=()) -> Path:
    """Train ``fold`` of ``params`` in this process and stop it as epoch ``epoch + 1`` begins, as an
    interrupt in that epoch would: the fold keeps its backup of the epochs before. Returns the fold's folder."""
    from tfseg.config import load_config
    from tfseg.train import run

    with pytest.raises(Preempted):
        run(load_config(params, list(overrides)), str(fold), callbacks=[PreemptAtEpoch(epoch)])
    fold_dir = params.parent / "runs" / "tiny" / f"fold{fold}"
    assert (fold_dir / "backup" / "latest.weights.h5").is_file()
    return fold_dir


def snapshot(folder: Path) -> dict:
    """Every file under ``folder``: its bytes and modification time (what 'nothing written' compares)."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_resume_with_another_model_stops_in_one_line_before_writing_anything(tmp_path, capsys):
    """The tester's kill9b: interrupted in epoch 2, then the same command with other model.options ended in
    Keras' 'A total of 30 objects could not be loaded' traceback, after overwriting fold0/config.yaml with
    settings that no longer matched best.keras and backup/."""
    from tfseg import cli

    params = tiny_config(tmp_path, epochs=3)
    fold_dir = interrupt(params)
    runs = tmp_path / "runs"
    before = snapshot(runs)
    capsys.readouterr()
    new = "model.options={filters: [8, 16], batchnorm: true}"
    assert cli.main(["train", "--config", str(params), "--set", new]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"tfseg train: error: {fold_dir / 'backup'}: fold 0 was interrupted and its backup was trained "
                   "with other settings, which a resume cannot change: model.options: {filters: [8, 16]} -> "
                   "{batchnorm: true, filters: [8, 16]}. Expected the settings of "
                   f"{fold_dir / 'config.yaml'} to resume it; or pass --overwrite to start fold 0 over, or set a "
                   "new train.name"]
    assert snapshot(runs) == before

    # The run the old code left: its config.yaml already says the new options. The backup is then loaded
    # into the model built now, before anything is written, and Keras' refusal becomes the line.
    from tfseg.config import dump_config, load_config

    dump_config(load_config(params, [new]), fold_dir / "config.yaml")
    before = snapshot(runs)
    assert cli.main(["train", "--config", str(params), "--set", new]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0]
    assert err[0].startswith(f"tfseg train: error: {fold_dir / 'backup'}: fold 0's backup does not fit the model "
                             "and optimizer configured now (Keras: A total of ")
    assert err[0].endswith("or pass --overwrite to start fold 0 over, or set a new train.name")
    assert snapshot(runs) == before


@pytest.mark.slow
def test_a_resume_goes_on_with_changed_epochs_and_says_which_settings_changed(tmp_path, capsys):
    """Settings outside tfseg.train_rerun.RESUME_KEYS may change: the fold resumes with them."""
    from tfseg import cli

    params = tiny_config(tmp_path, epochs=2)
    fold_dir = interrupt(params)
    first = _rows(fold_dir / "history.csv")
    capsys.readouterr()
    # model.encoder_weights is free too: the backup's weights replace the starting ones (Kaggle offline)
    assert cli.main(["train", "--config", str(params), "--set", "train.epochs=3", "--set",
                     "model.encoder_weights=null"]) == 0
    err = capsys.readouterr().err
    assert f"resuming from {fold_dir / 'backup'} with changed settings: train.epochs: 2 -> 3\n" in err
    rows = _rows(fold_dir / "history.csv")
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2] and rows[0] == first[0]
    assert yaml.safe_load((fold_dir / "config.yaml").read_text())["train"]["epochs"] == 3


@pytest.mark.slow
def test_fold_all_after_a_crash_skips_the_finished_fold_resumes_the_interrupted_one_trains_the_rest(
        tmp_path, capsys):
    """A Kaggle user's `--fold all` after the session died in fold 1: fold 0 is not trained again."""
    from tfseg import cli
    from tfseg.config import load_config
    from tfseg.train import run

    params = tiny_config(tmp_path, epochs=2)
    run(load_config(params), "0")
    runs = tmp_path / "runs" / "tiny"
    fold0 = snapshot(runs / "fold0")
    interrupt(params, fold=1)
    capsys.readouterr()
    assert cli.main(["train", "--config", str(params), "--fold", "all"]) == 0
    captured = capsys.readouterr()
    err = captured.err.splitlines()
    best = json.loads((runs / "summary.json").read_text())["folds"]["0"]
    assert err[0] == (f"tfseg train: fold 0: skipped: {runs / 'fold0'} holds fold 0, trained already (best "
                      f"val_dice_coe {best['best']:.4f} at epoch {best['best_epoch']} of 2). --overwrite trains it "
                      "again")
    assert any(line.startswith("tfseg train: fold 1/3:") and f"resuming from {runs / 'fold1' / 'backup'}" in line
               for line in err)
    assert snapshot(runs / "fold0") == fold0  # untouched
    summary = json.loads((runs / "summary.json").read_text())
    assert sorted(summary["folds"]) == ["0", "1", "2"]
    assert [int(r["epoch"]) for r in _rows(runs / "fold1" / "history.csv")] == [0, 1]
    assert "tfseg train: fold 0: best" not in captured.out and "tfseg train: fold 2: best" in captured.out


def test_early_stopping_patience_and_best_weights_run_across_a_resume(tmp_path, capsys):
    # A fold resumed at epoch 3: history says the best loss was at epoch 0 and epochs 1 and 2 did not
    # improve. With patience 3 the first resumed epoch that does not improve either is the third one
    # waited, so fitting stops there (Keras' own callback would wait 3 more epochs), and the weights
    # come back from best.keras, written at epoch 0, not from a resumed epoch.
    from tfseg.callbacks import ResumableEarlyStopping

    history = tmp_path / "history.csv"
    history.write_text("epoch,loss\n0,0.01\n1,0.5\n2,0.6\n")
    inp = keras.Input((4,))
    model = keras.Model(inp, keras.layers.Dense(1)(inp))
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    best = tmp_path / "best.keras"
    saved = [np.full(w.shape, 0.25, np.float32) for w in model.get_weights()]
    model.set_weights(saved)
    model.save(best)
    model.set_weights([np.full(w.shape, -1.0, np.float32) for w in saved])
    x, y = np.ones((8, 4), np.float32), np.full((8, 1), 3.0, np.float32)  # loss 49 at every epoch
    stop = ResumableEarlyStopping("loss", "min", 3, history, best)
    fit = model.fit(x, y, initial_epoch=3, epochs=10, callbacks=[stop], verbose=0)
    assert len(fit.history["loss"]) == 1 and stop.stopped_epoch == 3
    for got, want in zip(model.get_weights(), saved):
        np.testing.assert_array_equal(got, want)
    assert "best epoch: 1 (before the resume; from best.keras)" in capsys.readouterr().out

    # The stage's epochs only (since): with the two-stage fold's stage 1 left out, nothing was waited yet.
    model.set_weights([np.full(w.shape, -1.0, np.float32) for w in saved])
    stop = ResumableEarlyStopping("loss", "min", 3, history, best, since=3, verbose=0)
    fit = model.fit(x, y, initial_epoch=3, epochs=10, callbacks=[stop], verbose=0)
    assert len(fit.history["loss"]) == 4  # epoch 3 is the best so far, 4, 5 and 6 wait

    # What tfseg train runs: no restore (best.keras is the fold's best, over both stages of a two-stage fold;
    # a tester read "Restoring ... the best epoch: 2" in stage 2 beside "best ... at epoch 1"): the patience
    # still runs across the resume, and the weights stay the last epoch's.
    last = [np.full(w.shape, -1.0, np.float32) for w in saved]
    model.set_weights(last)
    capsys.readouterr()
    stop = ResumableEarlyStopping("loss", "min", 3, history, best, restore_best_weights=False)
    fit = model.fit(x, y, initial_epoch=3, epochs=10, callbacks=[stop], verbose=0)
    assert len(fit.history["loss"]) == 1 and stop.stopped_epoch == 3
    for got, want in zip(model.get_weights(), last):
        np.testing.assert_array_equal(got, want)
    assert capsys.readouterr().out == "Epoch 4: early stopping\n"
