"""UNet++ (``unetplusplus``): the nested nodes, smp's decoder and head parameter counts, options, sizes, training.

The reference is segmentation_models_pytorch's ``UnetPlusPlus`` (smp 0.6.0, the PyPI release). Its numbers
below were measured, not computed by hand: smp was installed into a throwaway folder, never into the
project's environment::

    python3 -m pip install -q --target /tmp/smp_ref --no-deps \
        segmentation-models-pytorch timm huggingface-hub safetensors
    SMP_REF=/tmp/smp_ref python3 -m pytest -q tests/test_models_unetpp.py -k smp_reference

which runs :data:`SMP_SCRIPT` under ``PYTHONPATH=/tmp/smp_ref`` (CPU PyTorch): it builds
``UnetPlusPlus(encoder_name=name, encoder_weights=None, classes=1)`` and counts ``model.decoder`` and
``model.segmentation_head``: ``parameters()`` (= tfseg's trainable weights) and those plus the BatchNorm
running means and variances (= tfseg's ``count_params()``). smp's package ``__init__`` imports every encoder,
which needs torchvision (a compiled package, not installed here), so the script stands in for the package
module, the hub mixin and ``get_encoder`` (an empty module with ``out_channels``: for smp's ``resnet*`` and
``vgg*`` the list read from smp's own encoder table, for the others the list given); the decoder, head and
model classes are smp's. ``tu-convnext_tiny`` gets ``[3, 0, 96, 192, 384, 768]``: smp's timm encoder reports
``[in_channels, 0, *feature_info.channels()]`` for encoders without stride-2 features.
The registry-wide contract (save/load, mixed precision, a training step, frozen encoder, weights files) is
tests/test_models_contract.py.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from tests.test_models_fpn_linknet_pspnet import count as _count
from tfseg.config import ModelConfig
from tfseg.errors import ModelError
from tfseg.models import build_model

SMALL = (32, 16, 16, 8, 8)  # decoder_filters of the small test models

# smp 0.6.0, measured by SMP_SCRIPT: decoder + head of UnetPlusPlus(classes=1), (trainable, with BN statistics).
SMP_COUNTS = {
    "resnet34": (4_793_937, 4_797_713),  # smp resnet34 and resnet18: [3, 64, 64, 128, 256, 512]
    "resnet50": (25_477_713, 25_484_561),  # [3, 64, 256, 512, 1024, 2048]
    "vgg16": (24_632_657, 24_642_321),  # [64, 128, 256, 512, 512, 512]; with its unused center block
    "tfseg-mobilenetv2": (10_469_969, 10_475_025),
    "tfseg-efficientnetb0": (11_755_793, 11_761_041),
    "tu-convnext_tiny": (6_517_073, 6_520_593),
}
SMP_VGG_CENTER = (4_720_640, 4_722_688)  # smp's decoder.center for vgg*: built, never called in forward
# Encoders not in smp's resnet/vgg tables: their channels at strides 1 (dropped by the decoder), 2 ... 32.
SMP_EXTRA_CHANNELS = {"tfseg-mobilenetv2": [3, 96, 144, 192, 576, 1280],
                      "tfseg-efficientnetb0": [3, 96, 144, 240, 672, 1280],
                      "tu-convnext_tiny": [3, 0, 96, 192, 384, 768]}
# smp's blocks for resnet34: x_{d}_{l} -> [conv1 input channels, output channels] (measured by SMP_SCRIPT).
SMP_RESNET34_BLOCKS = {"x_0_0": [768, 256], "x_0_1": [512, 128], "x_1_1": [384, 128], "x_0_2": [320, 64],
                       "x_1_2": [256, 64], "x_2_2": [192, 64], "x_0_3": [320, 32], "x_1_3": [256, 64],
                       "x_2_3": [192, 64], "x_3_3": [128, 64], "x_0_4": [32, 16]}
# tfseg encoder -> smp model with the same feature channels at strides 2 ... 32.
SAME_CHANNELS = {"resnet34": "resnet34", "resnet18": "resnet34", "resnet50": "resnet50", "resnet50v1": "resnet50",
                 "mobilenetv2": "tfseg-mobilenetv2", "efficientnetb0": "tfseg-efficientnetb0",
                 "convnexttiny": "tu-convnext_tiny"}

SMP_SCRIPT = r'''
import ast, importlib.util, json, sys, types
from functools import wraps
from pathlib import Path

import torch

root = Path(importlib.util.find_spec("segmentation_models_pytorch").submodule_search_locations[0])
version = ast.literal_eval((root / "__version__.py").read_text().split("=", 1)[1].strip())
# smp's __init__ imports every encoder (torchvision, timm) and its hub mixin (huggingface_hub), none of which
# the decoder or head uses: stand-ins for the package, the mixin and get_encoder; the rest is smp's own code.
pkg = types.ModuleType("segmentation_models_pytorch")
pkg.__path__ = [str(root)]
hub = types.ModuleType("segmentation_models_pytorch.base.hub_mixin")
hub.SMPHubMixin = type("SMPHubMixin", (), {"__new__": lambda cls, *a, **k: object.__new__(cls)})
hub.supports_config_loading = lambda f: wraps(f)(lambda self, *a, **k: f(self, *a, **k))
enc = types.ModuleType("segmentation_models_pytorch.encoders")
CHANNELS = {}  # smp's encoder table: name -> params["out_channels"], read from its source (no torchvision)


def fields(node):  # a dict literal's constant keys -> value nodes ({} for anything else)
    return dict(zip([getattr(k, "value", None) for k in getattr(node, "keys", [])], getattr(node, "values", [])))


for path in ("encoders/resnet.py", "encoders/vgg.py"):
    for node in ast.walk(ast.parse((root / path).read_text())):
        for key, value in fields(node).items():
            params = fields(fields(value).get("params"))
            if isinstance(key, str) and "out_channels" in params:
                CHANNELS[key] = ast.literal_eval(params["out_channels"])
CHANNELS.update(json.loads(sys.argv[1]))  # more encoders: name -> channels at strides 1, 2, 4, 8, 16, 32


class Encoder(torch.nn.Module):  # get_encoder's result, as far as UnetPlusPlus.__init__ reads it
    def __init__(self, name, in_channels=3, depth=5, weights=None, **kwargs):
        super().__init__()
        self.out_channels = CHANNELS[name][: depth + 1]


enc.get_encoder = Encoder
sys.modules.update({m.__name__: m for m in (pkg, hub, enc)})
from segmentation_models_pytorch.decoders.unetplusplus.model import UnetPlusPlus  # noqa: E402


def count(module):
    params = sum(p.numel() for p in module.parameters())
    stats = sum(b.numel() for n, b in module.named_buffers() if n.endswith(("running_mean", "running_var")))
    return params, params + stats


for name in sys.argv[2:]:
    model = UnetPlusPlus(encoder_name=name, encoder_weights=None, classes=1).eval()
    (dp, dt), (hp, ht), center = count(model.decoder), count(model.segmentation_head), count(model.decoder.center)
    calls = []
    model.decoder.center.register_forward_hook(lambda *args: calls.append(1))
    feats = [torch.zeros(1, c, 64 >> k, 64 >> k) for k, c in enumerate(model.encoder.out_channels)]
    with torch.no_grad():
        out = model.segmentation_head(model.decoder(feats))
    blocks = {k: [b.conv1[0].in_channels, b.out_channels] if b.conv1 is not None else [0, 0]
              for k, b in model.decoder.blocks.items()}
    print(json.dumps({"smp": version, "encoder": name, "channels": model.encoder.out_channels, "trainable": dp + hp,
                      "total": dt + ht, "center": list(center), "center_called": bool(calls),
                      "out": list(out.shape), "blocks": blocks}))
'''


def _build(backbone="resnet18", shape=(64, 64, 3), classes=1, activation="auto", filters=(256, 128, 64, 32, 16),
           **kw):
    kw.setdefault("encoder_weights", None)
    return build_model(ModelConfig(arch="unetplusplus", backbone=backbone, input_shape=shape, classes=classes,
                                   activation=activation, decoder_filters=filters, **kw))


def _decoder_counts(model) -> tuple[int, int]:
    """(trainable, all) parameters of the model less its ``encoder`` sub-model's."""
    encoder = model.get_layer("encoder")
    return (_count(model.trainable_weights) - _count(encoder.trainable_weights),
            model.count_params() - encoder.count_params())


def _nodes(model) -> set[tuple[int, int]]:
    return {tuple(int(v) for v in layer.name[len("decoder_x"):-len("a_conv")].split("_"))
            for layer in model.layers if layer.name.startswith("decoder_x") and layer.name.endswith("a_conv")}


def _in_out(model, i, j) -> list[int]:
    conv = model.get_layer(f"decoder_x{i}_{j}a_conv")
    return [int(conv.input.shape[-1]), int(conv.filters)]


def test_structure_nested_nodes_channels_and_output_size():
    model = _build("resnet34", shape=(64, 96, 3), classes=3)
    encoder = model.get_layer("encoder")
    assert [tuple(t.shape) for t in encoder.outputs] == [
        (None, 2, 3, 512), (None, 4, 6, 256), (None, 8, 12, 128), (None, 16, 24, 64), (None, 32, 48, 64)]
    # X(i, j) at stride 2**i; the path up X(4, 1) ... X(0, 5), the grid inside it at levels 1 to 3.
    assert _nodes(model) == {(4, 1), (3, 1), (3, 2), (2, 1), (2, 2), (2, 3), (1, 1), (1, 2), (1, 3), (1, 4), (0, 5)}
    for i, j in _nodes(model):
        assert tuple(model.get_layer(f"decoder_x{i}_{j}b_relu").output.shape[1:3]) == (64 >> i, 96 >> i)
        assert model.get_layer(f"decoder_x{i}_{j}_upsampling").interpolation == "nearest"
        assert model.get_layer(f"decoder_x{i}_{j}a_conv").kernel_size == (3, 3)
        assert not model.get_layer(f"decoder_x{i}_{j}a_conv").use_bias  # BatchNorm follows
    # smp's x_{d}_{l} is X(4 - l, l - d + 1): same conv input and output channels, block for block.
    for key, in_out in SMP_RESNET34_BLOCKS.items():
        d, level = (int(v) for v in key[2:].split("_"))
        assert _in_out(model, 4 - level, level - d + 1) == in_out, key
    # The concatenation in smp's order: the upsampled node, then the level's nodes newest first, the encoder's last.
    concat = model.get_layer("decoder_x1_3_concat")
    x13_inputs = [t._keras_history[0].name for t in concat.input]
    assert x13_inputs == ["decoder_x1_3_upsampling", "decoder_x1_2b_relu", "decoder_x1_1b_relu", "encoder"]
    assert "decoder_x0_5_concat" not in {layer.name for layer in model.layers}  # no stride-1 feature: no skip
    assert model.get_layer("final_conv").kernel_size == (3, 3)
    assert model.output_shape == (None, 64, 96, 3)
    x = np.random.default_rng(0).uniform(0, 255, (2, 64, 96, 3)).astype("float32")
    out = keras.ops.convert_to_numpy(model(x, training=False))
    assert out.shape == (2, 64, 96, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out.sum(-1), 1.0, atol=1e-5)


@pytest.mark.parametrize("backbone", ["resnet34", "mobilenetv2", "convnexttiny", *(
    pytest.param(name, marks=pytest.mark.slow) for name in ("resnet18", "resnet50", "resnet50v1", "efficientnetb0"))])
def test_decoder_and_head_parameters_equal_smps(backbone):
    """Total less the encoder's = smp's ``decoder`` + ``segmentation_head`` for the same feature channels."""
    model = _build(backbone)
    smp_name = SAME_CHANNELS[backbone]
    if smp_name in SMP_EXTRA_CHANNELS:
        channels = [c for c in SMP_EXTRA_CHANNELS[smp_name][1:] if c][::-1]
        assert [int(t.shape[-1]) for t in model.get_layer("encoder").outputs] == channels
    assert _decoder_counts(model) == SMP_COUNTS[smp_name]


def test_vgg16_has_smps_decoder_less_the_center_block_smp_never_calls():
    model = _build("vgg16")
    assert [int(t.shape[-1]) for t in model.get_layer("encoder").outputs] == [512, 512, 512, 256, 128]
    assert not any(layer.name.startswith("center") for layer in model.layers)
    smp = SMP_COUNTS["vgg16"]
    assert _decoder_counts(model) == (smp[0] - SMP_VGG_CENTER[0], smp[1] - SMP_VGG_CENTER[1]) == (19_912_017,
                                                                                                  19_919_633)


def test_smp_reference_numbers_reproduce():
    """Runs SMP_SCRIPT where smp is at $SMP_REF (see the module docstring); skipped elsewhere."""
    compile(SMP_SCRIPT, "smp-script", "exec")
    ref = os.environ.get("SMP_REF")
    if not ref or importlib.util.find_spec("torch") is None:
        pytest.skip("set SMP_REF to a folder holding segmentation_models_pytorch (pip --target), and have torch")
    names = ["resnet34", "resnet18", *(n for n in SMP_COUNTS if n != "resnet34")]
    proc = subprocess.run([sys.executable, "-c", SMP_SCRIPT, json.dumps(SMP_EXTRA_CHANNELS), *names],
                          env={**os.environ, "PYTHONPATH": ref}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {row["encoder"]: row for row in map(json.loads, proc.stdout.splitlines())}
    for name, row in rows.items():
        assert row["smp"] == "0.6.0" and row["out"] == [1, 1, 64, 64] and not row["center_called"]
        assert (row["trainable"], row["total"]) == SMP_COUNTS["resnet34" if name == "resnet18" else name], name
    assert rows["resnet34"]["blocks"] == SMP_RESNET34_BLOCKS
    assert tuple(rows["vgg16"]["center"]) == SMP_VGG_CENTER


def test_convnext_has_no_stride_2_feature_so_level_1_has_its_path_up_node_only():
    model = _build("convnexttiny", filters=SMALL)
    assert _nodes(model) == {(4, 1), (3, 1), (3, 2), (2, 1), (2, 2), (2, 3), (1, 4), (0, 5)}
    assert "decoder_x1_4_concat" not in {layer.name for layer in model.layers}
    assert _in_out(model, 1, 4) == [16, 8]  # X(2, 3)'s 16 filters, upsampled: no skip at stride 2


def test_encoder_features_option_strides_and_layer_names():
    short = _build("mobilenetv2", filters=SMALL, options={"encoder_features": [16, 8, 4]})
    assert _nodes(short) == {(4, 1), (3, 1), (3, 2), (2, 1), (2, 2), (2, 3), (1, 4), (0, 5)}
    names = ["block_13_expand_relu", "block_6_expand_relu", "block_3_expand_relu"]  # sm's names for 16, 8, 4
    assert _build("mobilenetv2", filters=SMALL, options={"encoder_features": names}).count_params() == \
        short.count_params()
    # VGG's full-resolution block: level 0 gets its grid X(0, 1) ... X(0, 4) of 64 filters, X(0, 5) their skips.
    vgg = _build("vgg16", shape=(32, 32, 3), filters=SMALL, options={"encoder_features": [16, 8, 4, 2, 1]})
    assert {(0, j) for j in range(1, 6)} <= _nodes(vgg) and len(_nodes(vgg)) == 15
    assert _in_out(vgg, 0, 1) == [128 + 64, 64] and _in_out(vgg, 0, 5) == [8 + 5 * 64, 8]
    assert vgg.output_shape == (None, 32, 32, 1)


@pytest.mark.parametrize("backbone, shape, kw, message", [
    ("resnet18", (64, 64, 3), {"options": {"encoder_feature": [16]}},
     r"unetplusplus: unknown option 'encoder_feature' \(did you mean 'encoder_features'\?\)"),
    ("resnet18", (64, 64, 3), {"options": {"encoder_features": [16, 4]}},
     r"option encoder_features=\[16, 4\] gives strides \[16, 4\]; expected .* in a row from 16"),
    ("resnet18", (64, 64, 3), {"options": {"encoder_features": []}},
     r"option encoder_features=\[\] gives strides \[\]; expected"),
    ("mobilenetv2", (64, 64, 3), {"options": {"encoder_features": [16, 8, 4, 2, 1]}},
     "unetplusplus: encoder_features=.*1 is not a feature of mobilenetv2; expected 'default', or strides"),
    ("resnet18", (64, 64, 3), {"filters": (256, 128, 64, 32)},
     r"decoder_filters=\[256, 128, 64, 32\]; expected 5 positive integers"),
    ("resnet18", (64, 64, 3), {"filters": (256, 128, 0, 32, 16)}, "decoder_filters=.*; expected 5 positive integers"),
    ("resnet18", (64, 64, 3), {"decoder_block_type": "transpose"},
     "unetplusplus: decoder_block_type='transpose'; expected 'upsampling'"),
    ("resnet18", (72, 64, 3), {}, "unetplusplus: input height 72 is not divisible by 32; the nearest sizes that "
                                  "work are 64 and 96"),
    ("resnet18", (16, 64, 3), {}, "input height 16 is too small; the smallest size that works is 32"),
    ("inceptionv3", (None, None, 3), {}, "inceptionv3 needs a fixed input size"),
    ("resnet99", (64, 64, 3), {}, "resnet99"),
])
def test_option_and_size_errors_are_one_line_model_errors(backbone, shape, kw, message):
    with pytest.raises(ModelError, match=message) as err:
        _build(backbone, shape, **kw)
    assert "\n" not in str(err.value)


def test_no_batchnorm_and_null_size_survive_save_load(tmp_path):
    model = _build(shape=(None, None, 3), classes=2, filters=SMALL, decoder_use_batchnorm=False)
    convs = [layer for layer in model.layers if layer.name.startswith("decoder_x")
             and isinstance(layer, keras.layers.Conv2D)]
    assert len(convs) == 22 and all(conv.use_bias for conv in convs)
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in model.layers)
    x = np.random.default_rng(1).uniform(0, 255, (1, 64, 96, 3)).astype("float32")
    pred = keras.ops.convert_to_numpy(model(x, training=False))
    assert pred.shape == (1, 64, 96, 2)
    model.save(tmp_path / "unetpp.keras")
    loaded = keras.models.load_model(tmp_path / "unetpp.keras")  # built-in layers only: no custom_objects
    np.testing.assert_allclose(keras.ops.convert_to_numpy(loaded(x, training=False)), pred, rtol=0, atol=1e-6)


def test_a_few_training_steps_lower_the_loss():
    keras.utils.set_random_seed(0)
    model = _build("resnet18", shape=(32, 32, 3), classes=3, filters=SMALL)
    x = np.random.default_rng(3).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    yy, xx = np.mgrid[:32, :32]
    y = np.stack([(xx > yy).astype("int32") + (xx + yy > 32 + k) for k in range(2)])[..., None]  # classes 0..2
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy", run_eagerly=True)
    losses = [float(model.train_on_batch(x, y)) for _ in range(3)]  # eager: tracing costs more than 3 steps
    assert np.isfinite(losses).all() and losses[2] < losses[1] < losses[0] - 1e-3, losses
