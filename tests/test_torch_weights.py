"""torchvision VGG state dicts onto TernausNet's Keras encoders (tfseg.models.torch_weights).

The state dicts are made here with random arrays in torchvision's key layout; the Keras conv
outputs are compared with a NumPy cross-correlation of torchvision-normalized input.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

from tfseg.config import ModelConfig
from tfseg.errors import ModelError
from tfseg.models import build_model
from tfseg.models.torch_weights import (
    TORCHVISION_CFGS,
    conv_indices,
    find_vgg_prefix,
    load_torch_vgg_state_dict,
    read_state_dict,
    vgg_conv_layers,
)

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


def make_state_dict(arch: str, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 arrays under torchvision's VGG keys (features.i.weight [out, in, 3, 3])."""
    rng = np.random.default_rng(seed)
    state, i, prev = {}, 0, 3
    for item in TORCHVISION_CFGS[arch]:
        if item == "M":
            i += 1
            continue
        state[f"features.{i}.weight"] = rng.normal(0, 0.05, (item, prev, 3, 3)).astype("float32")
        state[f"features.{i}.bias"] = rng.normal(0, 0.05, (item,)).astype("float32")
        prev, i = item, i + 2
    state["classifier.6.bias"] = np.zeros(1000, "float32")  # not an encoder key: ignored
    return state


def torch_conv_relu(image: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """torchvision's first layer on [H, W, 3] 0..255: normalize, 3x3 conv padding 1, ReLU."""
    z = (image / 255.0 - MEAN) / STD
    z = np.pad(z, ((1, 1), (1, 1), (0, 0)))
    h, w = image.shape[:2]
    out = np.zeros((h, w, weight.shape[0]))
    for dy in range(3):
        for dx in range(3):
            out += np.einsum("hwc,oc->hwo", z[dy:dy + h, dx:dx + w], weight[:, :, dy, dx])
    return np.maximum(out + bias, 0.0)


def _keras_kernel(state, index: int) -> np.ndarray:
    """torchvision [out, in, kh, kw] -> Keras [kh, kw, in, out]."""
    return state[f"features.{index}.weight"].transpose(2, 3, 1, 0)


def _model(arch, path, shape=(32, 32, 3)):
    return build_model(ModelConfig(arch=arch, input_shape=shape, classes=1, encoder_weights=str(path),
                                   options={"num_filters": 2}))


def _first_conv_output(model, layer):
    """Model from the image to ``layer``'s output (inside the nested VGG16 encoder if there is one)."""
    if "encoder" in [x.name for x in model.layers]:
        encoder = model.get_layer("encoder")
        return keras.Model(encoder.input, encoder.get_layer(layer.name).output)
    return keras.Model(model.input, layer.output)


def test_conv_indices_follow_torchvision():
    assert conv_indices("vgg11") == [0, 3, 6, 8, 11, 13, 16, 18]
    assert conv_indices("vgg16") == [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
    with pytest.raises(ModelError, match=r"arch='vgg13'. Expected one of \['vgg11', 'vgg16'\]"):
        conv_indices("vgg13")


def test_npz_onto_ternaus_unet11_equals_torch_conv(tmp_path):
    state = make_state_dict("vgg11")
    path = tmp_path / "vgg11.npz"
    np.savez(path, **state)
    model = _model("ternaus_unet11", path)
    layers = vgg_conv_layers(model)
    assert [layer.name for layer in layers][:3] == ["encoder_block1_conv1", "encoder_block2_conv1",
                                                    "encoder_block3_conv1"]
    for index, layer in zip(conv_indices("vgg11"), layers):
        np.testing.assert_array_equal(layer.kernel.numpy(), _keras_kernel(state, index))
        np.testing.assert_array_equal(layer.bias.numpy(), state[f"features.{index}.bias"])
    image = np.random.default_rng(1).uniform(0, 255, (32, 32, 3)).astype("float32")
    got = np.asarray(_first_conv_output(model, layers[0])(image[None]))[0]
    want = torch_conv_relu(image, state["features.0.weight"], state["features.0.bias"])
    np.testing.assert_allclose(got, want, atol=2e-4)


def test_npz_onto_ternaus_unet16_folds_the_normalization(tmp_path):
    state = make_state_dict("vgg16")
    path = tmp_path / "vgg16.npz"
    np.savez(path, **state)
    model = _model("ternaus_unet16", path)
    layers = vgg_conv_layers(model)
    assert len(layers) == 13 and layers[0].name == "block1_conv1"
    for index, layer in zip(conv_indices("vgg16")[1:], layers[1:]):
        np.testing.assert_array_equal(layer.kernel.numpy(), _keras_kernel(state, index))
    image = np.random.default_rng(2).uniform(0, 255, (32, 32, 3)).astype("float32")
    got = np.asarray(_first_conv_output(model, layers[0])(image[None]))[0]
    want = torch_conv_relu(image, state["features.0.weight"], state["features.0.bias"])
    np.testing.assert_allclose(got[1:-1, 1:-1], want[1:-1, 1:-1], atol=2e-4)  # exact inside
    np.testing.assert_allclose(got, want, atol=0.01)  # zero padding reads a slightly different value


def test_one_channel_input_sums_the_rgb_kernel(tmp_path):
    state = make_state_dict("vgg11", seed=3)
    model = build_model(ModelConfig(arch="ternaus_unet11", input_shape=(32, 32, 1), classes=1,
                                    encoder_weights=None, options={"num_filters": 2}))
    names = load_torch_vgg_state_dict(model, state, arch="vgg11")
    assert len(names) == 8
    first = model.get_layer("encoder_block1_conv1").kernel.numpy()
    np.testing.assert_allclose(first, state["features.0.weight"].transpose(2, 3, 1, 0).sum(2, keepdims=True),
                               rtol=1e-6)


def test_wrong_shape_names_the_key_and_both_shapes(tmp_path):
    state = make_state_dict("vgg11")
    state["features.3.weight"] = np.zeros((128, 32, 3, 3), "float32")
    path = tmp_path / "bad.npz"
    np.savez(path, **state)
    with pytest.raises(ModelError) as err:
        _model("ternaus_unet11", path)
    text = str(err.value)
    assert "bad.npz: features.3.weight has shape [128, 32, 3, 3]" in text
    assert "encoder_block2_conv1 expects Keras kernel [3, 3, 64, 128]" in text
    assert "\n" not in text


def test_wrong_layout_missing_file_and_suffix(tmp_path):
    model = build_model(ModelConfig(arch="ternaus_unet11", input_shape=(32, 32, 3), classes=1,
                                    encoder_weights=None, options={"num_filters": 2}))
    with pytest.raises(ModelError, match=r"^state dict: holds 13 convolutions under 'features.': it looks like "
                                         r"torchvision's vgg16; vgg11 has 8 \(ternaus_unet11 takes a vgg11 state "
                                         r"dict, ternaus_unet16 a vgg16 one\)$"):
        load_torch_vgg_state_dict(model, make_state_dict("vgg16"), arch="vgg11")
    with pytest.raises(ModelError, match="has 8 VGG convolutions named block<b>_conv<k>; vgg16 needs 13"):
        load_torch_vgg_state_dict(model, make_state_dict("vgg16"), arch="vgg16")
    with pytest.raises(ModelError, match="nope.npz: weights file not found"):
        read_state_dict(tmp_path / "nope.npz")
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(ModelError, match=r"unknown weights file type '.bin'; expected .npz, .pth or .pt"):
        read_state_dict(tmp_path / "w.bin")
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    with pytest.raises(ModelError, match="broken.npz: not a readable .npz file"):
        read_state_dict(tmp_path / "broken.npz")


def test_a_file_of_the_other_vgg_is_named_by_its_convolution_count(tmp_path):
    path = tmp_path / "vgg16-397923af.npz"
    np.savez(path, **make_state_dict("vgg16"))
    with pytest.raises(ModelError) as err:
        _model("ternaus_unet11", path)
    assert str(err.value) == (f"{path}: holds 13 convolutions under 'features.': it looks like torchvision's vgg16; "
                              "vgg11 has 8 (ternaus_unet11 takes a vgg11 state dict, ternaus_unet16 a vgg16 one)")
    np.savez(path, **make_state_dict("vgg11"))
    with pytest.raises(ModelError, match=r"holds 8 convolutions under 'features.': it looks like torchvision's vgg11; "
                                         "vgg16 has 13"):
        _model("ternaus_unet16", path)


@pytest.mark.parametrize("arch, vgg, channels", [("ternaus_unet16", "vgg16", 3), ("ternaus_unet16", "vgg16", 1),
                                                  ("ternaus_unet11", "vgg11", 3)])
def test_loading_onto_a_built_model_equals_loading_at_build(tmp_path, arch, vgg, channels):
    """ternaus_unet16 normalizes caffe-style: the loader folds torchvision's normalization into block1_conv1
    whether the file comes with encoder_weights or onto a model built with encoder_weights=None."""
    state = make_state_dict(vgg, seed=8)
    path = tmp_path / f"{vgg}.npz"
    np.savez(path, **state)
    at_build = build_model(ModelConfig(arch=arch, input_shape=(32, 32, channels), classes=1,
                                       encoder_weights=str(path), options={"num_filters": 2}))
    later = build_model(ModelConfig(arch=arch, input_shape=(32, 32, channels), classes=1, encoder_weights=None,
                                    options={"num_filters": 2}))
    load_torch_vgg_state_dict(later, state, arch=vgg)
    for a, b in zip(vgg_conv_layers(at_build), vgg_conv_layers(later)):
        np.testing.assert_allclose(a.kernel.numpy(), b.kernel.numpy(), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(a.bias.numpy(), b.bias.numpy(), rtol=1e-6, atol=1e-6)
    if channels == 3:  # on an image, the first layer is torchvision's (inside the zero-padding border)
        first = vgg_conv_layers(later)[0]
        image = np.random.default_rng(9).uniform(0, 255, (32, 32, 3)).astype("float32")
        got = np.asarray(_first_conv_output(later, first)(image[None]))[0]
        want = torch_conv_relu(image, state["features.0.weight"], state["features.0.bias"])
        np.testing.assert_allclose(got[1:-1, 1:-1], want[1:-1, 1:-1], atol=2e-4)


def test_pth_checkpoint_with_prefix(tmp_path):
    torch = pytest.importorskip("torch", reason="torch is optional: .pth support is tested only where it is "
                                                "installed (.npz is always tested)")
    state = make_state_dict("vgg11", seed=4)
    wrapped = {"model": {k.replace("features.", "encoder."): torch.from_numpy(v) for k, v in state.items()}}
    path = tmp_path / "TernausNet.pt"
    torch.save(wrapped, path)
    model = build_model(ModelConfig(arch="ternaus_unet11", input_shape=(32, 32, 3), classes=1,
                                    encoder_weights=None, options={"num_filters": 2}))
    load_torch_vgg_state_dict(model, path, arch="vgg11", prefix="encoder.")
    np.testing.assert_array_equal(model.get_layer("encoder_block5_conv2").kernel.numpy(),
                                  state["features.18.weight"].transpose(2, 3, 1, 0))
    from_config = _model("ternaus_unet11", path)  # the prefix found in the file
    np.testing.assert_array_equal(from_config.get_layer("encoder_block5_conv2").kernel.numpy(),
                                  state["features.18.weight"].transpose(2, 3, 1, 0))


def ternausnet_checkpoint(state: dict[str, np.ndarray], prefix: str = "encoder.") -> dict[str, np.ndarray]:
    """A whole-TernausNet-like state dict: the VGG under ``prefix``, plus decoder keys that look alike
    (UNet11's ``conv1`` is ``encoder[0]``, UNet16's ``conv1`` a Sequential of ``encoder[0]`` and ``[2]``)."""
    out = {k.replace("features.", prefix): v for k, v in state.items() if k.startswith("features.")}
    out["conv1.weight"] = state["features.0.weight"]
    out["conv1.0.weight"] = state["features.0.weight"]
    out["center.block.0.conv.weight"] = np.zeros((8, 16, 3, 3), "float32")
    out["dec1.conv.weight"] = np.zeros((2, 4, 3, 3), "float32")
    out["final.weight"] = np.zeros((1, 2, 1, 1), "float32")
    return out


@pytest.mark.parametrize("arch, vgg", [("ternaus_unet11", "vgg11"), ("ternaus_unet16", "vgg16")])
def test_ternausnet_checkpoint_loads_from_the_config_as_the_torchvision_one(tmp_path, arch, vgg):
    state = make_state_dict(vgg, seed=5)
    np.savez(tmp_path / "torchvision.npz", **state)
    np.savez(tmp_path / "ternausnet.npz", **ternausnet_checkpoint(state))
    assert find_vgg_prefix(ternausnet_checkpoint(state), vgg) == "encoder."
    from_torchvision = vgg_conv_layers(_model(arch, tmp_path / "torchvision.npz"))
    from_ternausnet = vgg_conv_layers(_model(arch, tmp_path / "ternausnet.npz"))
    assert len(from_ternausnet) == len(conv_indices(vgg))
    for a, b in zip(from_torchvision, from_ternausnet):
        np.testing.assert_array_equal(a.kernel.numpy(), b.kernel.numpy())
        np.testing.assert_array_equal(a.bias.numpy(), b.bias.numpy())
    np.testing.assert_array_equal(from_ternausnet[-1].kernel.numpy(), _keras_kernel(state, conv_indices(vgg)[-1]))


def test_prefix_found_when_it_is_neither_features_nor_encoder():
    state = make_state_dict("vgg11", seed=6)
    parallel = {f"module.{k}": v for k, v in ternausnet_checkpoint(state).items()}  # DataParallel
    assert find_vgg_prefix(parallel, "vgg11") == "module.encoder."
    bare = {k.removeprefix("features."): v for k, v in state.items()}  # vgg.features.state_dict()
    assert find_vgg_prefix(bare, "vgg11") == ""
    model = build_model(ModelConfig(arch="ternaus_unet11", input_shape=(32, 32, 3), classes=1,
                                    encoder_weights=None, options={"num_filters": 2}))
    load_torch_vgg_state_dict(model, parallel, arch="vgg11")
    np.testing.assert_array_equal(model.get_layer("encoder_block4_conv2").kernel.numpy(), _keras_kernel(state, 13))
    twice = {**parallel, **{f"copy.{k}": v for k, v in state.items()}}
    with pytest.raises(ModelError, match=r"several key prefixes hold all vgg11 convolutions \['copy.features.', "
                                         r"'module.encoder.'\]; pass one as load_torch_vgg_state_dict"):
        find_vgg_prefix(twice, "vgg11")


def test_an_explicit_prefix_is_used_as_given():
    state = ternausnet_checkpoint(make_state_dict("vgg11", seed=7))
    model = build_model(ModelConfig(arch="ternaus_unet11", input_shape=(32, 32, 3), classes=1,
                                    encoder_weights=None, options={"num_filters": 2}))
    assert len(load_torch_vgg_state_dict(model, state, arch="vgg11", prefix="encoder.")) == 8
    with pytest.raises(ModelError, match=r"missing key 'features.0.weight' for vgg11"):
        load_torch_vgg_state_dict(model, state, arch="vgg11", prefix="features.")


def test_unrelated_keys_give_one_line_naming_the_file_prefixes_and_keys(tmp_path):
    path = tmp_path / "resnet.npz"
    np.savez(path, **{"conv1.weight": np.zeros((64, 3, 7, 7), "float32"), "bn1.weight": np.ones(64, "float32"),
                      "layer2.0.downsample.0.weight": np.zeros((128, 64, 1, 1), "float32"),
                      "fc.weight": np.zeros((10, 512), "float32")})
    with pytest.raises(ModelError) as err:
        _model("ternaus_unet11", path)
    text = str(err.value)
    assert text.startswith(f"{path}: no vgg11 convolutions found: looked for keys 'features.<i>.weight' "
                           "(torchvision), 'encoder.<i>.weight' (TernausNet) or one prefix with all of <i> in "
                           "[0, 3, 6, 8, 11, 13, 16, 18]; its 4 keys start ['bn1.weight', 'conv1.weight', "
                           "'fc.weight', 'layer2.0.downsample.0.weight']")
    assert "\n" not in text
