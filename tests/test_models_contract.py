"""The shared model contract, run over every registered architecture (DESIGN habit 8).

Each architecture module may declare, next to its builder:

- ``TEST_SIZE``: a small input side the architecture takes (default 64);
- ``TEST_BACKBONES``: encoders to test it with (default: the config's default backbone);
  the first one runs in the fast tier, the others are ``slow``;
- ``TEST_OPTIONS``: ``cfg.options`` that make the test model small (default none);
- ``output_size(input_size)``: the output side when it differs from the input's (valid
  convolutions, as in ``unet_original``).

For each (architecture, encoder): a binary model on 1-channel input gives float32 probabilities of
the right shape, survives ``.keras`` save/load with identical predictions and no
``custom_objects``, and one training step on a fixed tiny batch lowers the loss; a 3-class model
on 4-channel input built under ``mixed_bfloat16`` still outputs float32 softmax; a 3-class
``linear`` model on 3 channels gives logits; an input size the architecture cannot take is a
ModelError naming the nearest sizes that work. All with ``encoder_weights=None``.
"""

from __future__ import annotations

import importlib

import keras
import numpy as np
import pytest

from tfseg.config import ModelConfig
from tfseg.errors import ModelError
from tfseg.models import ARCHS, arch_names, build_model


def _module(arch: str):
    return importlib.import_module(ARCHS.get(arch).__module__)


def _meta(arch: str) -> dict:
    mod = _module(arch)
    backbones = tuple(getattr(mod, "TEST_BACKBONES", (ModelConfig().backbone,)))
    return {
        "size": int(getattr(mod, "TEST_SIZE", 64)),
        "backbones": backbones,
        "options": dict(getattr(mod, "TEST_OPTIONS", {})),
        "out": getattr(mod, "output_size", lambda s: s),
    }


def _cases():
    cases = []
    for arch in arch_names():
        for i, backbone in enumerate(_meta(arch)["backbones"]):
            marks = [pytest.mark.slow] if i else []
            cases.append(pytest.param(arch, backbone, marks=marks, id=f"{arch}-{backbone}"))
    return cases


CASES = _cases()


def _build(arch, backbone, channels, classes, activation="auto", size=None):
    meta = _meta(arch)
    size = size or meta["size"]
    cfg = ModelConfig(arch=arch, backbone=backbone, input_shape=(size, size, channels), classes=classes,
                      activation=activation, encoder_weights=None, options=meta["options"])
    return build_model(cfg)


def _images(n, size, channels, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (n, size, size, channels)).astype("float32")


@pytest.mark.parametrize("arch,backbone", CASES)
def test_binary_gray_shape_save_load_and_train_step(arch, backbone, tmp_path):
    meta = _meta(arch)
    size, out = meta["size"], meta["out"](meta["size"])
    keras.utils.set_random_seed(0)
    model = _build(arch, backbone, channels=1, classes=1)
    assert model.input_shape == (None, size, size, 1)
    assert model.output_shape == (None, out, out, 1)
    assert model.layers[-1].name == "output"

    x = _images(2, size, 1)
    pred = keras.ops.convert_to_numpy(model(x, training=False))
    assert pred.dtype == np.float32 and pred.shape == (2, out, out, 1)
    assert np.all((pred >= 0) & (pred <= 1)), "sigmoid output must be probabilities"

    path = tmp_path / f"{arch}.keras"
    model.save(path)
    loaded = keras.models.load_model(path)  # no custom_objects
    again = keras.ops.convert_to_numpy(loaded(x, training=False))
    np.testing.assert_allclose(again, pred, rtol=0, atol=1e-6)

    # Eager steps: tracing a train function costs more than a few tiny eager steps.
    yy, xx = np.mgrid[:out, :out]
    y = np.stack([(xx + yy < out), (xx > yy)])[..., None].astype("float32")
    # Small Adam steps (its first update moves every weight by about lr, whatever the gradient);
    # train_on_batch returns the loss before its update, so losses[1:] follow 1, 2, 3 updates.
    model.compile(optimizer=keras.optimizers.Adam(3e-4), loss="binary_crossentropy", run_eagerly=True)
    losses = [float(model.train_on_batch(x, y)) for _ in range(4)]
    assert np.isfinite(losses[0]) and min(losses[1:]) < losses[0] - 1e-4, f"loss stayed: {losses}"


@pytest.mark.parametrize("arch,backbone", CASES)
def test_multiclass_mixed_precision_four_channels_outputs_float32_softmax(arch, backbone):
    meta = _meta(arch)
    size, out = meta["size"], meta["out"](meta["size"])
    try:
        keras.config.set_dtype_policy("mixed_bfloat16")
        model = _build(arch, backbone, channels=4, classes=3)
    finally:
        keras.config.set_dtype_policy("float32")
    assert model.output.dtype == "float32"
    pred = keras.ops.convert_to_numpy(model(_images(1, size, 4), training=False))
    assert pred.dtype == np.float32 and pred.shape == (1, out, out, 3)
    np.testing.assert_allclose(pred.sum(-1), 1.0, atol=1e-3)


@pytest.mark.parametrize("arch,backbone", CASES)
def test_linear_gives_logits_and_bad_size_names_nearest(arch, backbone):
    meta = _meta(arch)
    size, out = meta["size"], meta["out"](meta["size"])
    model = _build(arch, backbone, channels=3, classes=3, activation="linear")
    assert model.output_shape == (None, out, out, 3)
    assert model.get_layer("output").get_config()["activation"] == "linear"
    with pytest.raises(ModelError, match="nearest"):
        _build(arch, backbone, channels=3, classes=1, size=size + 1)
