"""Preemption: a run killed with SIGKILL in its second epoch resumes from its backup when the same
command runs again, and finishes with the planned number of epochs; on Keras' TensorFlow and JAX
backends."""

from __future__ import annotations

import csv
import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

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
