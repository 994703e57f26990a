"""The whole command line on Keras' JAX backend (``KERAS_BACKEND=jax``), in subprocesses.

The GPU machines have JAX but no TensorFlow, and on TPUs JAX is Keras' fastest backend, so a run
must train, checkpoint, predict and evaluate there as it does on TensorFlow (tf.data still feeds
it), and a checkpoint trained on JAX must give TensorFlow the same probabilities. With two host
devices (``--xla_force_host_platform_device_count=2``) ``train.strategy: auto`` is
``keras.distribution.DataParallel``: a real two-replica run, not the mocked choice logic of
tests/test_distribute.py.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.test_train import tiny_config

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(importlib.util.find_spec("jax") is None,
                                reason="jax is not installed (it comes with `make install`)")


def tfseg(backend: str, *args: str, xla_devices: int = 1, returncode: int = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, "KERAS_BACKEND": backend, "PYTHONPATH": str(ROOT)}
    if xla_devices > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={xla_devices}"
    proc = subprocess.run([sys.executable, "-m", "tfseg.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == returncode, \
        f"tfseg {' '.join(args)} on {backend}:\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}"
    return proc


def history(run: Path) -> list[dict]:
    with open(run / "fold0" / "history.csv", newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


@pytest.mark.slow  # 90 s of nine CLI processes; JAX training itself is checked in make test
def test_train_predict_evaluate_on_jax_and_the_checkpoint_predicts_the_same_on_tensorflow(tmp_path):
    params = tiny_config(tmp_path, n=12, size=32, epochs=3, lr=0.003)
    proc = tfseg("jax", "train", "--config", str(params), "--fold", "0")
    assert "(default, 1 replica(s))" in proc.stdout + proc.stderr
    run = tmp_path / "runs" / "tiny"
    rows = history(run)
    assert len(rows) == 3 and all(np.isfinite(list(r.values())).all() for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"], rows
    summary = json.loads((run / "summary.json").read_text())
    assert summary["folds"]["0"]["epochs"] == 3, summary

    images = tmp_path / "data" / "images"
    probs = {}
    for backend in ("jax", "tensorflow"):
        out = tmp_path / f"pred-{backend}"
        tfseg(backend, "predict", "--run", str(run), "--input", str(images), "--output", str(out),
              "--set", "infer.save_probabilities=true")
        probs[backend] = {p.name: np.load(p) for p in sorted(out.glob("*.npy"))}
        assert len(sorted(out.glob("*.png"))) == 12
    assert sorted(probs["jax"]) == sorted(probs["tensorflow"]) and len(probs["jax"]) == 12
    for name, p in probs["jax"].items():
        assert p.shape[:2] == (32, 32)
        # The maps are written as float16: one step there is up to 4.9e-4.
        np.testing.assert_allclose(p, probs["tensorflow"][name], atol=5e-4, rtol=0, err_msg=name)

    # Export writes TensorFlow graphs: on JAX it says so in one line; on TensorFlow the JAX-trained
    # checkpoint exports and serves the probabilities that predict wrote.
    saved = tmp_path / "export-sm"
    proc = tfseg("jax", "export", "--run", str(run), "--format", "savedmodel", "--output", str(saved), returncode=2)
    assert "needs KERAS_BACKEND=tensorflow, not 'jax'" in proc.stderr and "Traceback" not in proc.stderr
    assert not saved.exists()
    tfseg("tensorflow", "export", "--run", str(run), "--format", "savedmodel", "--output", str(saved))
    from PIL import Image

    from tfseg.export import load_serving

    first = sorted(images.glob("*.png"))[0]
    served = load_serving("savedmodel", saved)(np.asarray(Image.open(first))[None, ..., None])[0]
    np.testing.assert_allclose(served, probs["jax"][first.stem + "_prob.npy"].reshape(served.shape), atol=5e-4, rtol=0)

    scores = {}
    for backend in ("jax", "tensorflow"):
        out = tmp_path / f"eval-{backend}"
        tfseg(backend, "evaluate", "--run", str(run), "--fold", "0", "--output", str(out))
        scores[backend] = json.loads((out / "evaluation.json").read_text())
    assert scores["jax"]["images"] == 4 and scores["jax"]["data"] == "oof"
    assert scores["jax"]["mean"] == pytest.approx(scores["tensorflow"]["mean"], abs=1e-4)


@pytest.mark.slow  # 30 s of a two-device CLI run; make test keeps the jit-compiled JAX training step
def test_data_parallel_over_two_host_devices_with_an_uneven_validation_fold(tmp_path):
    # 32 px images: on 2 cores, XLA's CPU runtime can deadlock a two-device all-reduce when both of its
    # intra-op threads are busy with large tensors (seen from 256 px up); GPUs and TPUs have no such pool.
    # 15 records in 3 folds: fold 0 validates on 5, which two devices cannot share evenly; the last
    # validation batch used to fail inside fit after the first epoch (jax's IndivisibleError).
    params = tiny_config(tmp_path, n=15, size=32, epochs=2, strategy="auto", batch_size=2)
    proc = tfseg("jax", "train", "--config", str(params), "--fold", "0", xla_devices=2)
    out = proc.stdout + proc.stderr
    assert ("10 train / 5 val records, 2 steps of 4 (jax_data_parallel, 2 replica(s)); "
            "validating on 4 of the 5 records") in out, out[-2000:]
    rows = history(tmp_path / "runs" / "tiny")
    assert len(rows) == 2 and all(np.isfinite(list(r.values())).all() for r in rows)


def test_the_training_step_is_jit_compiled_on_jax_whatever_train_jit_compile_says():
    # train.jit_compile is TensorFlow's XLA switch (off by default); on JAX, Keras runs a step that is
    # not jit-compiled op by op, so tfseg compiles it there in any case.
    script = """
import keras
from tfseg.config import load_config
from tfseg.train import build_compiled_model
cfg = load_config(None, ["model.arch=unet_small", "model.encoder_weights=null", "model.options={filters: [4, 8]}",
                         "data.classes=1", "data.channels=1", "data.image_size=[16,16]", "train.loss={bce: 1.0}",
                         "train.jit_compile=false"])
model, _ = build_compiled_model(cfg, steps_per_epoch=1)
print("BACKEND", keras.config.backend(), "JIT", model.jit_compile)
"""
    env = {**os.environ, "KERAS_BACKEND": "jax", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert "BACKEND jax JIT True" in proc.stdout, proc.stdout[-1000:] + proc.stderr[-2000:]
