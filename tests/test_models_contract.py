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
on 4-channel input built under ``mixed_bfloat16`` and under ``mixed_float16`` still outputs finite
float32 softmax; a 3-class ``linear`` model on 3 channels gives logits; an input size the
architecture cannot take is a ModelError naming the nearest sizes that work. Those use
``encoder_weights=None``. Then the pretrained encoder: with ``encoder_freeze`` the encoder's
layers are frozen and one fit step moves none of its weights (its BatchNorm moving statistics
included) while the decoder trains; the frozen state survives ``.keras`` save/load, and there
``unfreeze_encoder`` makes every layer trainable (BatchNorm back in training mode) and
``freeze_encoder`` restores the frozen count; a weights file made in the test (the 3-channel
keras model's ``.weights.h5``, or a torchvision state dict for TernausNet-11) loads into 1- and
3-channel models, the first kernel adapted as ``tfseg.models.weights`` documents; offline,
``imagenet`` is a ModelError saying to pass a file. The architectures trained from scratch
(``FROM_SCRATCH``) have no encoder: there ``encoder_freeze`` is an error and the helpers are no-ops.
``slow``: every architecture takes training steps on the PyTorch and on the JAX backend (subprocesses,
``KERAS_BACKEND``).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from tfseg.config import ModelConfig
from tfseg.errors import ModelError
from tfseg.models import ARCHS, arch_names, build_model
from tfseg.models.common import all_layers, freeze_encoder, unfreeze_encoder
from tfseg.models.encoders import get_encoder_spec
from tfseg.models.torch_weights import conv_indices, vgg_conv_layers


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


def _build(arch, backbone, channels, classes, activation="auto", size=None, encoder_weights=None,
           encoder_freeze=False):
    meta = _meta(arch)
    size = size or meta["size"]
    cfg = ModelConfig(arch=arch, backbone=backbone, input_shape=(size, size, channels), classes=classes,
                      activation=activation, encoder_weights=encoder_weights, encoder_freeze=encoder_freeze,
                      options=meta["options"])
    return build_model(cfg)


def _images(n, size, channels, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (n, size, size, channels)).astype("float32")


def _targets(n, out):
    """n <= 2 binary masks [n, out, out, 1]: below the anti-diagonal, above the diagonal."""
    yy, xx = np.mgrid[:out, :out]
    return np.stack([(xx + yy < out), (xx > yy)][:n])[..., None].astype("float32")


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
    y = _targets(2, out)
    # Small Adam steps (its first update moves every weight by about lr, whatever the gradient);
    # train_on_batch returns the loss before its update, so losses[1:] follow 1, 2, 3 updates.
    model.compile(optimizer=keras.optimizers.Adam(3e-4), loss="binary_crossentropy", run_eagerly=True)
    losses = [float(model.train_on_batch(x, y)) for _ in range(4)]
    assert np.isfinite(losses[0]) and min(losses[1:]) < losses[0] - 1e-4, f"loss stayed: {losses}"


# Encoders whose random-init activations overflow float16 in inference mode (see the test below).
FLOAT16_OVERFLOWS_AT_INIT = {"resnet50"}


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
@pytest.mark.parametrize("arch,backbone", CASES)
def test_multiclass_mixed_precision_four_channels_outputs_float32_softmax(arch, backbone, policy):
    meta = _meta(arch)
    size, out = meta["size"], meta["out"](meta["size"])
    try:
        keras.config.set_dtype_policy(policy)
        model = _build(arch, backbone, channels=4, classes=3)
    finally:
        keras.config.set_dtype_policy("float32")
    convs = [layer for layer in all_layers(model) if isinstance(layer, keras.layers.Conv2D)]
    assert convs and {layer.compute_dtype for layer in convs} == {policy.removeprefix("mixed_")}
    assert model.output.dtype == "float32"
    # BatchNorm at its initial statistics (mean 0, variance 1) normalizes nothing in inference mode, and a
    # random-init sm ResNet50's activations pass float16's largest value (65504) by its third stage (1e4 at
    # stage 2 in float32): for it the output is checked as a float16 training step sees it (batch statistics).
    training = policy == "mixed_float16" and backbone in FLOAT16_OVERFLOWS_AT_INIT
    pred = keras.ops.convert_to_numpy(model(_images(1, size, 4), training=training))
    assert pred.dtype == np.float32 and pred.shape == (1, out, out, 3)
    assert np.isfinite(pred).all()
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


# ---------------------------------------------------------------------------------------------
# Pretrained encoders: freezing, weights files, offline ImageNet
# ---------------------------------------------------------------------------------------------

# Trained from scratch (each module's docstring says so): no pretrained encoder, so ``encoder_weights``
# and ``encoder_freeze`` do not apply, and building with them (the config's default is ``imagenet``) is a
# no-op. Every other architecture must have an encoder: a nested model named ``encoder`` (the encoder
# table's) or layers named ``encoder_*`` (TernausNet-11's own VGG11).
FROM_SCRATCH = {"unet_original", "unet1024", "unet_small"}
# Architectures whose encoder is fixed whatever ``cfg.backbone`` says; ``torchvision:vgg11`` takes a
# torchvision state dict (``.npz``, tfseg.models.torch_weights), not a keras.applications file.
FIXED_ENCODER = {"pix2pix_unet": "mobilenetv2", "ternaus_unet16": "vgg16", "ternaus_unet11": "torchvision:vgg11"}
ENCODER_CASES = [case for case in CASES if case.values[0] not in FROM_SCRATCH]


def _walk(layers):
    """Every layer of ``layers`` and, depth first, the layers of the nested models among them."""
    for layer in layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from _walk(layer.layers)


def _encoder(model) -> list:
    """The model's encoder layers (top level): the nested ``encoder`` model or the ``encoder_*`` layers."""
    return [layer for layer in model.layers if layer.name == "encoder" or layer.name.startswith("encoder_")]


def _values(variables) -> list[np.ndarray]:
    return [np.array(keras.ops.convert_to_numpy(v)) for v in variables]


def test_from_scratch_and_fixed_encoder_name_registered_archs():
    assert FROM_SCRATCH | set(FIXED_ENCODER) <= set(arch_names())


@pytest.mark.parametrize("arch,backbone", CASES)
def test_encoder_freeze_keeps_encoder_still_survives_save_load_and_unfreezes(arch, backbone, tmp_path):
    meta = _meta(arch)
    size, out = meta["size"], meta["out"](meta["size"])
    keras.utils.set_random_seed(0)
    if arch in FROM_SCRATCH:  # nothing to freeze: encoder_freeze is refused, both helpers leave every layer trainable
        with pytest.raises(ModelError, match=f"^{arch}: encoder_freeze=true, but {arch} is trained from scratch"):
            _build(arch, backbone, channels=1, classes=1, encoder_freeze=True)
        model = _build(arch, backbone, channels=1, classes=1)
        assert not _encoder(model)
        trainable = len(_build(arch, backbone, channels=1, classes=1).trainable_weights)
        assert trainable and all(layer.trainable for layer in _walk(model.layers))
        assert len(model.trainable_weights) == trainable
        assert len(freeze_encoder(model).trainable_weights) == trainable
        assert len(unfreeze_encoder(model).trainable_weights) == trainable
        return

    model = _build(arch, backbone, channels=1, classes=1, encoder_freeze=True)
    encoder = _encoder(model)
    assert encoder, f"{arch} has no layer named 'encoder' or 'encoder_*' (add it to FROM_SCRATCH if it has none)"
    assert not any(layer.trainable for layer in _walk(encoder))
    encoder_vars = [v for layer in encoder for v in layer.weights]
    decoder_vars = model.trainable_weights
    assert decoder_vars and not {id(v) for v in encoder_vars} & {id(v) for v in decoder_vars}
    bns = [layer for layer in _walk(encoder) if isinstance(layer, keras.layers.BatchNormalization)]
    moving_means = _values([bn.moving_mean for bn in bns])
    encoder_before, decoder_before = _values(encoder_vars), _values(decoder_vars)

    # One fit step: the frozen encoder's BatchNorm stays in inference mode (its moving statistics, still
    # at their initial values, would move in training mode); the decoder trains.
    x = _images(2, size, 1)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy", run_eagerly=True)
    model.train_on_batch(x, _targets(2, out))
    for bn, before in zip(bns, moving_means):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(bn.moving_mean), before, err_msg=bn.name)
    for v, before in zip(encoder_vars, encoder_before):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(v), before, err_msg=v.path)
    moved = [not np.array_equal(now, before) for now, before in zip(_values(decoder_vars), decoder_before)]
    assert np.mean(moved) > 0.9, f"{sum(moved)} of {len(moved)} decoder weights moved"

    # The frozen state is saved with the model; the helpers work on the loaded model (two-stage recipe).
    path = tmp_path / f"{arch}-frozen.keras"
    model.save(path)
    loaded = keras.models.load_model(path, compile=False)
    assert [(layer.name, layer.trainable) for layer in _walk(loaded.layers) if layer.weights] == [
        (layer.name, layer.trainable) for layer in _walk(model.layers) if layer.weights]
    assert len(loaded.trainable_weights) == len(decoder_vars)

    unfreeze_encoder(loaded)
    assert all(layer.trainable for layer in _walk(loaded.layers))
    assert len(loaded.trainable_weights) > len(decoder_vars)
    assert all(layer.trainable_weights for layer in _encoder(loaded) if layer.weights)
    loaded_bns = [layer for layer in _walk(_encoder(loaded)) if isinstance(layer, keras.layers.BatchNormalization)]
    before = _values([bn.moving_mean for bn in loaded_bns])
    loaded(x, training=True)  # unfrozen, BatchNorm is back in training mode: moving statistics move
    for bn, mean in zip(loaded_bns, before):
        assert not np.array_equal(keras.ops.convert_to_numpy(bn.moving_mean), mean), bn.name

    freeze_encoder(loaded)
    assert len(loaded.trainable_weights) == len(decoder_vars)
    assert not any(layer.trainable for layer in _walk(_encoder(loaded)))


@pytest.fixture(scope="session")
def encoder_weights_file(tmp_path_factory):
    """``make(encoder) -> (path, source)``: a weights file made here from random values, and what it holds.

    For an encoder of the table: the 3-channel keras model without top that ``load_pretrained`` loads the
    file into, every weight offset from its initial value (so a loaded encoder differs from a fresh one),
    saved as ``.weights.h5``. For ``torchvision:vgg11``: a torchvision-layout state dict saved as ``.npz``.
    """
    folder = tmp_path_factory.mktemp("encoder_weights")
    made = {}

    def make(encoder: str):
        if encoder in made:
            return made[encoder]
        rng = np.random.default_rng(7)
        if encoder == "torchvision:vgg11":
            from tests.test_torch_weights import make_state_dict

            source = make_state_dict("vgg11", seed=7)
            path = folder / "vgg11.npz"
            np.savez(path, **source)
        else:
            spec = get_encoder_spec(encoder)
            side = None if spec.exact else max(spec.min_size, 75)
            source = spec.make(include_top=False, weights=None, input_shape=(side, side, 3))
            for layer in source.layers:
                if layer.weights and not isinstance(layer, keras.layers.Normalization):
                    layer.set_weights([v + rng.uniform(0.01, 0.1, v.shape).astype(v.dtype)
                                       for v in layer.get_weights()])
            path = folder / f"{encoder}.weights.h5"
            source.save_weights(path)
        made[encoder] = (str(path), source)
        return made[encoder]

    return make


def _assert_holds_keras_file(encoder, source, channels: int, bgr: bool):
    """Every weighted layer of ``encoder`` holds the same-named layer's weights of ``source``; the first
    convolution's kernel adapted as tfseg.models.weights documents (C = 1 sums RGB; caffe's BGR kernel is
    flipped to RGB), a per-channel layer on the input itself (sm ResNets' ``bn_data``) averaged for C = 1."""
    weighted = [layer for layer in encoder.layers
                if layer.weights and not isinstance(layer, keras.layers.Normalization)]
    assert weighted
    first = True
    for layer in weighted:
        for want, got in zip(source.get_layer(layer.name).get_weights(), layer.get_weights()):
            if first and want.ndim == 4 and want.shape[2] == 3:
                first = False
                want = want.sum(2, keepdims=True) if channels == 1 else want[:, :, ::-1] if bgr else want
            elif first and channels == 1 and want.shape == (3,):
                want = want.mean(keepdims=True)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=f"{layer.name}, {channels} channels")
    assert not first, "no first convolution with 3 input channels in the weights file"


def _assert_holds_torch_state(model, state, channels: int):
    """TernausNet-11's VGG11 convolutions hold the state dict's (torchvision [out, in, kh, kw] -> Keras)."""
    layers = vgg_conv_layers(model)
    assert len(layers) == len(conv_indices("vgg11"))
    for n, (layer, index) in enumerate(zip(layers, conv_indices("vgg11"))):
        kernel = state[f"features.{index}.weight"].transpose(2, 3, 1, 0)
        if n == 0 and channels == 1:
            kernel = kernel.sum(2, keepdims=True)
        np.testing.assert_allclose(keras.ops.convert_to_numpy(layer.kernel), kernel, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer.bias), state[f"features.{index}.bias"])


@pytest.mark.parametrize("arch,backbone", ENCODER_CASES)
def test_encoder_weights_from_a_local_file_gray_and_rgb(arch, backbone, encoder_weights_file):
    name = FIXED_ENCODER.get(arch, backbone)
    path, source = encoder_weights_file(name)
    for channels in (1, 3):
        model = _build(arch, backbone, channels=channels, classes=1, encoder_weights=path)
        assert model.input_shape[-1] == channels
        if name == "torchvision:vgg11":
            _assert_holds_torch_state(model, source, channels)
        else:
            _assert_holds_keras_file(model.get_layer("encoder"), source, channels, get_encoder_spec(name).bgr)


@pytest.mark.parametrize("arch,backbone", CASES)
def test_offline_imagenet_is_a_model_error_that_says_to_pass_a_file(arch, backbone, monkeypatch):
    from keras.src.utils import file_utils

    calls = []

    def offline(*args, **kwargs):  # what keras' get_file raises without a network
        calls.append(args)
        raise Exception("URL fetch failure on https://storage.googleapis.com/x.h5: None -- [Errno -3] Temporary "
                        "failure in name resolution")

    monkeypatch.setattr(file_utils, "get_file", offline)  # keras.applications' download
    monkeypatch.setattr(keras.utils, "get_file", offline)  # tfseg.models.sm_resnet's download
    if arch in FROM_SCRATCH:  # nothing to download: the config's default encoder_weights builds offline
        model = _build(arch, backbone, channels=1, classes=1, encoder_weights="imagenet")
        assert not calls and model.output_shape[-1] == 1
        return
    with pytest.raises(ModelError) as err:
        _build(arch, backbone, channels=1, classes=1, encoder_weights="imagenet")
    message = str(err.value)
    assert "ImageNet" in message and re.search(r"encoder_weights\W.*\bfile\b", message), message


# ---------------------------------------------------------------------------------------------
# PyTorch and JAX backends
# ---------------------------------------------------------------------------------------------

# Training steps per architecture on another Keras backend (argv[1]: torch or jax), with tfseg's loss
# and metrics as ``tfseg train`` compiles them (tfseg.train.build_compiled_model); argv[2] is a JSON
# list of [arch, backbone, size, output size, options] (the fast tier's cases).
BACKEND_TRAIN_SCRIPT = """
import json, os, sys
os.environ["KERAS_BACKEND"] = backend = sys.argv[1]
import numpy as np, keras
from tfseg.config import load_config
from tfseg.train import build_compiled_model
assert keras.config.backend() == backend, keras.config.backend()
for arch, backbone, size, out, options in json.loads(sys.argv[2]):
    cfg = load_config(None, [f"model.arch={arch}", f"model.backbone={backbone}", "model.encoder_weights=null",
                             f"model.options={json.dumps(options)}", "data.classes=1", "data.channels=1",
                             f"data.image_size=[{size},{size}]", "train.loss={bce_dice: 1.0}", "train.lr=0.0003"])
    model, _ = build_compiled_model(cfg, steps_per_epoch=4)
    x = np.random.default_rng(0).uniform(0, 255, (2, size, size, 1)).astype("float32")
    yy, xx = np.mgrid[:out, :out]
    y = np.stack([(xx + yy < out), (xx > yy)])[..., None].astype("float32")
    pred = keras.ops.convert_to_numpy(model(x, training=False))
    assert pred.shape == (2, out, out, 1) and pred.dtype == np.float32, (arch, pred.shape, pred.dtype)
    assert model.output_shape == (None, out, out, 1), (arch, model.output_shape)
    logs = [model.train_on_batch(x, y, return_dict=True) for _ in range(4)]
    losses = [float(log["loss"]) for log in logs]
    assert np.isfinite(losses[0]) and min(losses[1:]) < losses[0] - 1e-4, (arch, losses)
    assert all(0.0 <= float(log[name]) <= 1.0 for log in logs for name in ("dice_coe", "iou", "pixel_accuracy")), logs
    print("STEP", backend, arch, [round(v, 4) for v in losses], flush=True)
print("BACKEND_OK", backend)
"""


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_every_architecture_trains_on_another_backend(backend):
    compile(BACKEND_TRAIN_SCRIPT, "backend-script", "exec")  # checked here too, where the backend is missing
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed: the {backend} backend cannot be checked here")
    cases = []
    for arch in arch_names():
        meta = _meta(arch)
        cases.append([arch, meta["backbones"][0], meta["size"], meta["out"](meta["size"]), meta["options"]])
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "KERAS_BACKEND": backend, "PYTHONPATH": str(root)}
    proc = subprocess.run([sys.executable, "-c", BACKEND_TRAIN_SCRIPT, backend, json.dumps(cases)], cwd=root,
                          env=env, capture_output=True, text=True, timeout=1200)
    assert f"BACKEND_OK {backend}" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count(f"STEP {backend} ") == len(cases)
