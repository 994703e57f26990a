"""segmentation_models' weight files in tfseg (tfseg.models.sm_port, encoder_weights=<file>).

sm's models are built in a tf_keras subprocess (as sm runs in Kaggle notebooks: ``SM_FRAMEWORK=tf.keras``,
Keras 2) with random weights and BatchNorm statistics moved away from their defaults (so that a
BatchNorm loaded into the wrong layer shows), saved as sm saves them (``save_weights("x.h5")`` and
``save("x.h5")``), and run on a real Kvasir image resized to 64x64 with sm's preprocessing. tfseg's twins
load those files here and must give sm's outputs on the 0..255 image (tfseg normalizes inside).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import keras
import numpy as np
import pytest

from tests.conftest import require_sm, shared_path, sm_env
from tfseg.errors import ModelError
from tfseg.models import load_sm_weights
from tfseg.models.encoders import build_encoder, get_encoder_spec
from tfseg.models.linknet import Linknet
from tfseg.models.unet import Unet

SM_SCRIPT = """
import json, os, sys
import numpy as np
os.environ["SM_FRAMEWORK"] = "tf.keras"
import segmentation_models as sm
from efficientnet import tfkeras as efn
from tensorflow import keras

out_dir, cases = sys.argv[1], json.loads(sys.argv[2])
rng = np.random.default_rng(0)


def randomize(model):  # BatchNorm statistics and affine terms away from their defaults
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.get_weights()[0].shape[0]
            if layer.name == "bn_data":  # classification_models' input BatchNorm: keep 0..255 input in range
                layer.set_weights([np.full(n, 0.1), np.full(n, 110.0), np.full(n, 3000.0)])
                continue
            affine = [rng.uniform(0.5, 1.5, n), rng.normal(0, 0.1, n)] if layer.scale else [rng.normal(0, 0.1, n)]
            layer.set_weights(affine + [rng.normal(0, 0.2, n), rng.uniform(0.5, 1.5, n)])


for case in cases:
    keras.utils.set_random_seed(1)
    if case["arch"] == "EfficientNetB0":  # the efficientnet package's network, which sm's efficientnet* are
        model = efn.EfficientNetB0(include_top=False, weights=None, input_shape=(None, None, 3))
        randomize(model)
        model.save_weights(os.path.join(out_dir, case["name"] + ".h5"))
        model = keras.Model(model.input, [model.get_layer(n).output for n in case["features"]])
    else:
        model = getattr(sm, case["arch"])(case["backbone"], input_shape=(case["size"], case["size"], 3), classes=1,
                                          activation="linear", encoder_weights=None)
        randomize(model)
        model.save_weights(os.path.join(out_dir, case["name"] + ".h5"))
        if case.get("full"):
            model.save(os.path.join(out_dir, case["name"] + "_model.h5"))
        if case.get("wrapped"):  # the model nested in another, as a notebook wraps it: one group for all its layers
            image = keras.Input(model.input_shape[1:])
            keras.Model(image, model(image)).save_weights(os.path.join(out_dir, case["name"] + "_wrapped.h5"))
    image = np.load(os.path.join(out_dir, f"image{case['size']}.npy"))  # the Kvasir image, size x size
    outputs = model.predict(sm.get_preprocessing(case["backbone"])(image.copy()), verbose=0)
    np.savez(os.path.join(out_dir, case["name"] + ".npz"), *(outputs if isinstance(outputs, list) else [outputs]))
print("SM_DONE")
"""
EFFICIENTNET_FEATURES = ("top_activation", "block6a_expand_activation", "block4a_expand_activation",
                         "block3a_expand_activation", "block2a_expand_activation")  # strides 32, 16, 8, 4, 2
SIZE = 64


def _np(x):
    return keras.ops.convert_to_numpy(x)


def _kvasir(size: int = SIZE) -> np.ndarray:
    """The first Kvasir-SEG image, RGB, resized to size x size: float32 [1, size, size, 3] in 0..255."""
    from PIL import Image

    path = sorted((shared_path("kvasir_seg") / "images").glob("*.jpg"))[0]
    return np.asarray(Image.open(path).convert("RGB").resize((size, size), Image.BILINEAR), "float32")[None]


def _run_sm(out_dir, cases) -> dict:
    """Build, save and run sm's models ``cases`` in a tf_keras subprocess; name -> its outputs on the image."""
    require_sm()
    for size in {case["size"] for case in cases}:
        np.save(out_dir / f"image{size}.npy", _kvasir(size))
    proc = subprocess.run([sys.executable, "-c", SM_SCRIPT, str(out_dir), json.dumps(cases)],
                          env=sm_env(legacy_keras=True), capture_output=True, text=True, timeout=900)
    assert "SM_DONE" in proc.stdout, proc.stderr[-3000:]
    outputs = {}
    for case in cases:
        arrays = np.load(out_dir / f"{case['name']}.npz")
        outputs[case["name"]] = [arrays[f"arr_{i}"] for i in range(len(arrays.files))]
    return outputs


@pytest.fixture(scope="module")
def sm_files(tmp_path_factory):
    """sm's files (``<dir>/<name>.h5``, ``unet_efficientnetb0_model.h5``) and its outputs: (dir, name -> arrays)."""
    out_dir = tmp_path_factory.mktemp("sm_port")
    cases = [{"arch": "EfficientNetB0", "name": "efficientnetb0", "backbone": "efficientnetb0", "size": SIZE,
              "features": EFFICIENTNET_FEATURES},
             {"arch": "Unet", "name": "unet_efficientnetb0", "backbone": "efficientnetb0", "size": SIZE, "full": True},
             {"arch": "Unet", "name": "unet_vgg16", "backbone": "vgg16", "size": SIZE},
             {"arch": "Linknet", "name": "linknet_mobilenetv2", "backbone": "mobilenetv2", "size": SIZE,
              "wrapped": True},
             {"arch": "Unet", "name": "unet_seresnet18", "backbone": "seresnet18", "size": SIZE}]
    return out_dir, _run_sm(out_dir, cases)


def _scramble(model) -> None:
    """New random kernels for the encoder's convolutions."""
    keras.utils.set_random_seed(5)
    for layer in model.get_layer("encoder").layers:
        if isinstance(layer, keras.layers.Conv2D):
            layer.kernel.assign(keras.random.normal(layer.kernel.shape))


def _close(got, expected, tol: float = 1e-4, what: str = ""):
    got = _np(got)
    assert got.shape == expected.shape, what
    np.testing.assert_allclose(got, expected, rtol=tol, atol=tol * np.abs(expected).max(), err_msg=what)


def test_efficientnet_package_file_as_encoder_weights_gives_sms_features(sm_files):
    """The efficientnet package's EfficientNetB0 file (sm's efficientnetb0; no input Normalization, so Keras'
    topological load counts 130 weighted layers against keras.applications' 131) loads by layer name; on the
    0..255 image tfseg's encoder gives every feature sm's network gives on sm.get_preprocessing's image. A gray
    encoder takes the first kernel summed over RGB: on a gray image it gives what the RGB encoder gives on the
    RGB image that its per-channel normalization maps to the same values."""
    out_dir, outputs = sm_files
    path = str(out_dir / "efficientnetb0.h5")
    image = _kvasir()
    rgb = build_encoder("efficientnetb0", (SIZE, SIZE, 3), weights=path)  # strides 32, 16, 8, 4, 2
    for stride, got, expected in zip((32, 16, 8, 4, 2), rgb(image), outputs["efficientnetb0"]):
        _close(got, expected, what=f"stride {stride}")

    gray = build_encoder("efficientnetb0", (SIZE, SIZE, 1), weights=path)
    kernel = rgb.get_layer("stem_conv").get_weights()[0]
    np.testing.assert_allclose(gray.get_layer("stem_conv").get_weights()[0], kernel.sum(2, keepdims=True), rtol=1e-6)
    mean, std = (np.array(c, "float32") for c in get_encoder_spec("efficientnetb0").norm)
    g = image.mean(-1, keepdims=True)
    same = (g - mean.mean()) / std.mean() * std + mean  # normalized per channel, equal to the gray normalized
    for stride, a, b in zip((32, 16, 8, 4, 2), gray(g), rgb(same)):
        _close(a, _np(b), what=f"gray, stride {stride}")


def test_sm_unet_efficientnetb0_ports_whole_from_save_weights_and_from_model_save(sm_files):
    """sm.Unet("efficientnetb0"): its save_weights file and its model.save file (weights under model_weights)
    load into tfseg's Unet (encoder nested) and give sm's output, where Keras' own by-name load leaves the
    encoder as it was."""
    out_dir, outputs = sm_files
    image = _kvasir()
    model = Unet("efficientnetb0", input_shape=(SIZE, SIZE, 3), classes=1, activation="linear", encoder_weights=None)
    norm = next(layer for layer in model.get_layer("encoder").layers if isinstance(layer, keras.layers.Normalization))
    before = norm.get_weights()
    _scramble(model)
    stem = model.get_layer("encoder").get_layer("stem_conv")
    scrambled = stem.get_weights()[0]
    model.load_weights(str(out_dir / "unet_efficientnetb0.h5"), by_name=True)  # Keras' own: top-level names only
    np.testing.assert_array_equal(stem.get_weights()[0], scrambled)
    for name in ("unet_efficientnetb0.h5", "unet_efficientnetb0_model.h5"):
        _scramble(model)  # so that each file must set the weights
        assert load_sm_weights(model, str(out_dir / name)) is model
        _close(model(image), outputs["unet_efficientnetb0"][0], what=name)
    for a, b in zip(norm.get_weights(), before):
        np.testing.assert_array_equal(a, b)  # tfseg's preprocessing is the table's, not the file's


@pytest.mark.parametrize("name,build", [
    ("unet_vgg16", lambda: Unet("vgg16", input_shape=(SIZE, SIZE, 3), classes=1, activation="linear",
                                encoder_weights=None)),
    ("linknet_mobilenetv2", lambda: Linknet("mobilenetv2", input_shape=(SIZE, SIZE, 3), classes=1,
                                            activation="linear", encoder_weights=None)),
    ("unet_seresnet18", lambda: Unet("seresnet18", input_shape=(SIZE, SIZE, 3), classes=1, activation="linear",
                                     encoder_weights=None)),
])
def test_sm_models_port_whole(sm_files, name, build):
    """sm.Unet("vgg16") (caffe style: sm's first kernel takes BGR, tfseg's RGB), sm.Linknet("mobilenetv2")
    (whose last convolution sm leaves unnamed; also nested in another model, its file then one group) and
    sm.Unet("seresnet18") (whose SE convolutions sm's file names conv2d_N, placed in their numbered order)
    give sm's output in tfseg's twin."""
    out_dir, outputs = sm_files
    model = build()
    for file in (f"{name}.h5", f"{name}_wrapped.h5") if name.startswith("linknet") else (f"{name}.h5",):
        _scramble(model)  # so that each file must set the weights
        load_sm_weights(model, str(out_dir / file))
        _close(model(_kvasir()), outputs[name][0], what=file)


def _edited_copy(src, dst, drop: str | None = None, add: tuple[str, str | None] | None = None,
                 widen: str | None = None) -> str:
    """A copy of the Keras 2 HDF5 weights file ``src``: without layer ``drop``; with a layer ``add`` = (name,
    after which layer, None: last); with layer ``widen``'s first array one output channel wider."""
    import h5py

    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        names = [n.decode() if isinstance(n, bytes) else n for n in f.attrs["layer_names"]]
        if drop:
            del f[drop]
            names.remove(drop)
        if add:
            name, after = add
            g = f.create_group(name)
            g.attrs["weight_names"] = [f"{name}/kernel:0".encode()]
            g.create_dataset(f"{name}/kernel:0", data=np.zeros((1, 1, 4, 4), "float32"))
            names.insert(names.index(after) + 1 if after else len(names), name)
        if widen:
            key = f[widen].attrs["weight_names"][0]
            key = key.decode() if isinstance(key, bytes) else key
            wide = np.concatenate([f[widen][key][()]] * 2, axis=-1)[..., :f[widen][key].shape[-1] + 1]
            del f[widen][key]
            f[widen].create_dataset(key, data=wide)
        f.attrs["layer_names"] = [n.encode() for n in names]
    return str(dst)


def test_load_sm_weights_errors_name_the_file_and_layer(sm_files, tmp_path):
    """Another backbone's file, a missing, an extra or a reshaped layer, a Keras 3 file, no file, no backbone,
    an encoder whose layers Keras named (their numbers depend on the session)."""
    out_dir, _ = sm_files
    unet_file = str(out_dir / "unet_efficientnetb0.h5")
    vgg_file = str(out_dir / "unet_vgg16.h5")

    def unet(backbone, classes=1):
        return Unet(backbone, input_shape=(SIZE, SIZE, 3), classes=classes, activation="linear", encoder_weights=None)

    effb0 = unet("efficientnetb0")
    with pytest.raises(ModelError, match=r"unet_vgg16.h5 has no weights for layer 'stem_conv' of unet_efficientnetb0 "
                                         r"\(130 of 151 weighted layers missing; a file of another backbone"):
        load_sm_weights(effb0, vgg_file)
    missing = _edited_copy(unet_file, tmp_path / "missing.h5", drop="block3a_expand_conv")
    with pytest.raises(ModelError, match=r"missing.h5 has no weights for layer 'block3a_expand_conv' of "
                                         r"unet_efficientnetb0 \(1 of 151 weighted layers missing"):
        load_sm_weights(effb0, missing)
    extra = _edited_copy(unet_file, tmp_path / "extra.h5", add=("extra_conv", None))
    with pytest.raises(ModelError, match=r"extra.h5: 1 weighted layers of the file fit no layer of "
                                         r"unet_efficientnetb0, the first 'extra_conv' \(a file of another "
                                         r"architecture or decoder\?\)"):
        load_sm_weights(effb0, extra)
    with pytest.raises(ModelError, match=r"unet_efficientnetb0.h5: layer 'final_conv' has weights of shapes "
                                         r"\[\(3, 3, 16, 1\), \(1,\)\]; layer 'final_conv' of unet_efficientnetb0 "
                                         r"takes \[\(3, 3, 16, 2\), \(2,\)\]"):
        load_sm_weights(unet("efficientnetb0", classes=2), unet_file)
    effb0.save_weights(str(tmp_path / "tfseg.weights.h5"))
    with pytest.raises(ModelError, match=r"tfseg.weights.h5: no 'layer_names' attribute; expected the Keras 2 HDF5 "
                                         r"file that sm's \(tf_keras'\) model.save_weights\('x.h5'\)"):
        load_sm_weights(effb0, str(tmp_path / "tfseg.weights.h5"))
    with pytest.raises(ModelError, match=r"nope.h5: no such file"):
        load_sm_weights(effb0, str(tmp_path / "nope.h5"))
    renamed = keras.Model(effb0.input, effb0.output, name="mine")
    with pytest.raises(ModelError, match=r"cannot tell the encoder of model 'mine' from its name .*; pass "
                                         r"backbone='<encoder name>'"):
        load_sm_weights(renamed, unet_file)
    load_sm_weights(renamed, unet_file, backbone="efficientnetb0")  # told, it loads
    inception = Unet("inceptionv3", input_shape=(96, 96, 3), classes=1, encoder_weights=None)
    with pytest.raises(ModelError, match=r"188 weighted layers of unet_inceptionv3 have names Keras generated \(the "
                                         r"first 'conv2d(_\d+)?'\), which depend on what the session built"):
        load_sm_weights(inception, vgg_file)


def test_encoder_weights_by_name_errors_name_the_file_and_layer(sm_files, tmp_path):
    """encoder_weights=<Keras 2 .h5> by name needs every weighted layer of the encoder with its shapes, and no
    stray layer among them (a file of another size)."""
    out_dir, _ = sm_files
    vgg_file = str(out_dir / "unet_vgg16.h5")
    with pytest.raises(ModelError, match=r"encoder_weights='.*unet_vgg16.h5' has no weights for layer 'stem_conv' "
                                         r"of EfficientNetB0 \(130 of 130 weighted layers missing\) \(Keras' "
                                         r"topological load failed too: ValueError: Layer count mismatch"):
        build_encoder("efficientnetb0", (SIZE, SIZE, 3), weights=vgg_file)
    backbone_file = str(out_dir / "efficientnetb0.h5")
    missing = _edited_copy(backbone_file, tmp_path / "b0_missing.h5", drop="block3a_expand_conv")
    with pytest.raises(ModelError, match=r"b0_missing.h5' has no weights for layer 'block3a_expand_conv' of "
                                         r"EfficientNetB0 \(1 of 130"):
        build_encoder("efficientnetb0", (SIZE, SIZE, 3), weights=missing)
    wide = _edited_copy(backbone_file, tmp_path / "b0_wide.h5", widen="stem_conv")
    with pytest.raises(ModelError, match=r"b0_wide.h5': layer 'stem_conv' has weights of shapes \[\(3, 3, 3, 33\)\]; "
                                         r"layer 'stem_conv' of EfficientNetB0 takes \[\(3, 3, 3, 32\)\]"):
        build_encoder("efficientnetb0", (SIZE, SIZE, 3), weights=wide)
    stray = _edited_copy(backbone_file, tmp_path / "b0_stray.h5", add=("block1b_dwconv", "block1a_project_bn"))
    with pytest.raises(ModelError, match=r"b0_stray.h5': its layer 'block1b_dwconv' lies among the layers of "
                                         r"EfficientNetB0 but is none of them \(1 such layers; a file of another "
                                         r"network or size\?\)"):
        build_encoder("efficientnetb0", (SIZE, SIZE, 3), weights=stray)


def test_whole_sm_unet_file_as_encoder_weights(sm_files):
    """A whole sm model's file also serves as encoder_weights: the encoder's layers are taken from it, the
    decoder's left aside."""
    out_dir, outputs = sm_files
    encoder = build_encoder("efficientnetb0", (SIZE, SIZE, 3), weights=str(out_dir / "unet_efficientnetb0.h5"),
                            strides=(32,))
    model = load_sm_weights(Unet("efficientnetb0", input_shape=(SIZE, SIZE, 3), classes=1, activation="linear",
                                 encoder_weights=None), str(out_dir / "unet_efficientnetb0.h5"))
    for layer in encoder.layers:
        if layer.weights and not isinstance(layer, keras.layers.Normalization):
            for a, b in zip(layer.get_weights(), model.get_layer("encoder").get_layer(layer.name).get_weights()):
                np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_sm_models_on_classification_models_networks_port_whole(tmp_path):
    """sm.Unet("seresnext50") (every layer of the SE network unnamed in sm's file: placed in the network's
    construction order) and sm.Linknet("resnext50") (32 unnamed slices per grouped convolution, and the unnamed
    head after them) give sm's output in tfseg's twin. sm.PSPNet("seresnext50") keeps only the encoder's layers
    up to stride 8, whose numbered order cannot be placed: a clear error."""
    from tfseg.models.pspnet import PSPNet

    cases = [{"arch": "Unet", "name": "unet_seresnext50", "backbone": "seresnext50", "size": SIZE},
             {"arch": "Linknet", "name": "linknet_resnext50", "backbone": "resnext50", "size": SIZE},
             {"arch": "PSPNet", "name": "pspnet_seresnext50", "backbone": "seresnext50", "size": 96}]
    outputs = _run_sm(tmp_path, cases)
    common = dict(classes=1, activation="linear", encoder_weights=None)
    for name, model in (("unet_seresnext50", Unet("seresnext50", input_shape=(SIZE, SIZE, 3), **common)),
                        ("linknet_resnext50", Linknet("resnext50", input_shape=(SIZE, SIZE, 3), **common))):
        load_sm_weights(model, str(tmp_path / f"{name}.h5"))
        # seresnext50 is off by float32 rounding (one grouped kernel against sm's 32 slices) grown through 16
        # units with random BatchNorm statistics (measured 4.9e-4 of the largest value; resnext50 5e-6), as
        # test_encoders measured for the encoder alone; a misplaced layer is off by the output's own size.
        _close(model(_kvasir()), outputs[name][0], tol=1e-3, what=name)
    psp = PSPNet("seresnext50", input_shape=(96, 96, 3), **common)
    with pytest.raises(ModelError, match=r"pspnet_seresnext50.h5: sm's seresnext50 encoder, whose layers Keras "
                                         r"named, does not fit in their numbered order: .*; sm's PSPNet keeps only "
                                         r"part of its encoder, which this order cannot place"):
        load_sm_weights(psp, str(tmp_path / "pspnet_seresnext50.h5"))
