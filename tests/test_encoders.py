"""The encoder table, pretrained weights with channel adaptation, and freezing.

Weights files are made in the test (a ``weights=None`` keras.applications model's weights, saved);
the ImageNet download is made to fail so the offline message is checked without a network.
"""

from __future__ import annotations

import subprocess
import sys

import keras
import numpy as np
import pytest

from tests.conftest import require_sm, sm_env
from tfseg.errors import ModelError
from tfseg.models.common import freeze_encoder, unfreeze_encoder
from tfseg.models.encoders import ENCODERS, adapt_constants, build_encoder, encoder_names, get_encoder_spec
from tfseg.models.fpn import FPN
from tfseg.models.unet import Unet
from tfseg.models.weights import adapt_first_kernel


def _np(x):
    return keras.ops.convert_to_numpy(x)


def _images(n, size, channels, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (n, size, size, channels)).astype("float32")


def _saved_weights(tmp_path, ctor: str) -> tuple[str, keras.Model]:
    keras.utils.set_random_seed(1)
    model = getattr(keras.applications, ctor)(include_top=False, weights=None, input_shape=(None, None, 3))
    path = str(tmp_path / f"{ctor}.weights.h5")
    model.save_weights(path)
    return path, model


def test_table_lists_the_issue_encoders_and_real_constructors():
    names = set(encoder_names())
    wanted = {f"efficientnetb{i}" for i in range(8)} | {"efficientnetv2b0", "efficientnetv2s", "mobilenetv2",
                                                        "vgg16", "vgg19", "densenet121", "densenet169",
                                                        "densenet201", "inceptionv3"}
    wanted |= {f"resnet{d}{v}" for d in (50, 101, 152) for v in ("", "v1", "v2")} | {"resnet18", "resnet34"}
    wanted |= {"mobilenetv3small", "mobilenetv3large"} | {f"convnext{v}" for v in ("tiny", "small", "base", "large",
                                                                                  "xlarge")}
    wanted |= {"nasnetmobile", "nasnetlarge"}
    assert wanted <= names
    for name, spec in ENCODERS.items():
        assert callable(spec.resolve()), name
        assert spec.strides[0] == 32 and set(spec.features) >= {4, 8, 16}, name
        assert 2 in spec.features or name.startswith("convnext"), name  # ConvNeXt's stem has stride 4
    # every keras.applications image model is in the table
    used = {spec.constructor for _, spec in ENCODERS.items()}
    models = {n for n in dir(keras.applications) if n[0].isupper() and callable(getattr(keras.applications, n))}
    assert {"NASNetMobile", "NASNetLarge", "VGG16"} <= models and models - used == set(), sorted(models - used)


def test_unknown_backbone_names_the_nearest():
    with pytest.raises(ModelError, match=r"backbone='efficientnet-b5' \(did you mean 'efficientnetb5'\?\)"):
        get_encoder_spec("efficientnet-b5")


def test_bad_stride_and_unfixed_size_are_clear_errors():
    with pytest.raises(ModelError, match="no features at stride 1; it has strides"):
        build_encoder("mobilenetv2", (64, 64, 3), strides=(32, 1))
    with pytest.raises(ModelError, match="inceptionv3 needs a fixed input size"):
        build_encoder("inceptionv3", (None, None, 3))
    with pytest.raises(ModelError, match="too small; the smallest size that works is 75"):
        build_encoder("inceptionv3", (64, 64, 3))
    # keras' NASNet cells compare static shapes to decide when to downsample: with None sizes keras builds
    # another network (no downsampling adjust blocks) that fails when it runs
    with pytest.raises(ModelError, match="nasnetmobile needs a fixed input size"):
        build_encoder("nasnetmobile", (None, 64, 3))
    with pytest.raises(ModelError, match="input width 16 is too small; the smallest size that works is 32$"):
        build_encoder("nasnetlarge", (64, 16, 3))


def test_adapt_first_kernel_follows_smp_rule():
    k = np.random.default_rng(0).normal(size=(3, 3, 3, 5)).astype("float32")
    np.testing.assert_allclose(adapt_first_kernel(k, 1), k.sum(2, keepdims=True), rtol=1e-6)
    np.testing.assert_array_equal(adapt_first_kernel(k, 3), k)
    np.testing.assert_array_equal(adapt_first_kernel(k, 3, bgr=True), k[:, :, ::-1])
    k4 = adapt_first_kernel(k, 4)
    np.testing.assert_allclose(k4, np.concatenate([k, k[:, :, :1]], axis=2) * 0.75, rtol=1e-6)
    assert adapt_first_kernel(k, 2).shape == (3, 3, 2, 5)
    assert adapt_constants([1, 2, 6], 1) == [3.0]
    assert adapt_constants([1, 2, 6], 5) == [1.0, 2.0, 6.0, 1.0, 2.0]


def test_weights_file_loads_and_gray_encoder_equals_rgb_on_gray_images(tmp_path):
    path, source = _saved_weights(tmp_path, "MobileNetV2")
    rgb = build_encoder("mobilenetv2", (32, 32, 3), weights=path, strides=(32, 4))
    conv = rgb.get_layer("Conv1").get_weights()[0]
    np.testing.assert_array_equal(conv, source.get_layer("Conv1").get_weights()[0])
    np.testing.assert_array_equal(rgb.get_layer("block_16_project").get_weights()[0],
                                  source.get_layer("block_16_project").get_weights()[0])

    gray = build_encoder("mobilenetv2", (32, 32, 1), weights=path, strides=(32, 4))
    kernel = gray.get_layer("Conv1").get_weights()[0]
    np.testing.assert_allclose(kernel, conv.sum(2, keepdims=True), rtol=1e-6)
    g = _images(2, 32, 1)
    for a, b in zip(gray(g), rgb(np.repeat(g, 3, axis=-1))):
        np.testing.assert_allclose(_np(a), _np(b), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name,ctor", [("convnexttiny", "ConvNeXtTiny"), ("mobilenetv3small", "MobileNetV3Small")])
def test_encoder_with_keras_own_preprocessing_equals_keras_model(tmp_path, name, ctor):
    """ConvNeXt and MobileNetV3 normally normalize inside the keras model (include_preprocessing); tfseg
    builds them without it and normalizes itself: loaded from a weights file, tfseg's encoder gives what
    keras' own model with its preprocessing gives. MobileNetV3's constants are the same for R, G and B,
    so its gray encoder gives exactly that on the gray image repeated to RGB too."""
    keras.utils.set_random_seed(3)
    source = getattr(keras.applications, ctor)(include_top=False, weights=None, input_shape=(None, None, 3),
                                               include_preprocessing=False)
    path = str(tmp_path / f"{ctor}.weights.h5")
    source.save_weights(path)
    reference = getattr(keras.applications, ctor)(include_top=False, weights=None, input_shape=(None, None, 3))
    weighted = [[layer for layer in m.layers if layer.weights and not isinstance(layer, keras.layers.Normalization)]
                for m in (source, reference)]  # in order: keras auto-names some layers differently per model
    assert len(weighted[0]) == len(weighted[1])
    for a, b in zip(*weighted):
        b.set_weights(a.get_weights())

    spec = get_encoder_spec(name)
    x = _images(2, 64, 3)
    features = [_np(f) for f in build_encoder(name, (64, 64, 3), weights=path, strides=spec.strides)(x)]
    assert [f.shape[1] for f in features] == [64 // s for s in spec.strides]
    np.testing.assert_allclose(features[0], _np(reference(x)), rtol=1e-4, atol=1e-4)
    if name.startswith("mobilenet"):
        g = _images(2, 64, 1)
        gray = build_encoder(name, (64, 64, 1), weights=path, strides=(32,))(g)
        gray = gray[0] if isinstance(gray, list) else gray
        np.testing.assert_allclose(_np(gray), _np(reference(np.repeat(g, 3, axis=-1))), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# NASNet (keras.applications' NASNetMobile and NASNetLarge)
# ---------------------------------------------------------------------------------------------

# keras' NASNet layers whose ReLU a segmentation model should skip from, at strides 16, 8, 4 and 2: the last
# normal cell before each reduction cell, the stem's first reduction cell, the stem's convolution.
_NASNET_LAST_CELLS = {"NASNetMobile": ("normal_concat_8", "normal_concat_3", "reduction_concat_stem_1", "stem_bn1"),
                      "NASNetLarge": ("normal_concat_12", "normal_concat_5", "reduction_concat_stem_1", "stem_bn1")}


def _kvasir(size: int) -> tuple[np.ndarray, np.ndarray]:
    """The first Kvasir-SEG image [1, size, size, 3] in 0..255 and its mask [1, size, size, 1] in {0, 1}."""
    from PIL import Image

    from tests.conftest import shared_path

    root = shared_path("kvasir_seg")
    path = sorted((root / "images").glob("*.jpg"))[0]
    image = np.asarray(Image.open(path).convert("RGB").resize((size, size), Image.BILINEAR), "float32")
    mask = np.asarray(Image.open(root / "masks" / path.name).convert("L").resize((size, size), Image.NEAREST)) > 127
    return image[None], mask[None, ..., None].astype("float32")


def _nasnet_source(ctor: str, size: int, path: str) -> keras.Model:
    """keras' ``ctor`` (weights=None) at a fixed size, BatchNorm statistics and affine terms moved from their
    defaults (a wrongly matched BatchNorm then shows), its weights saved to ``path``."""
    keras.utils.set_random_seed(5)
    model = getattr(keras.applications, ctor)(include_top=False, weights=None, input_shape=(size, size, 3))
    rng = np.random.default_rng(0)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(0.5, 1.5, n), rng.normal(0, 0.1, n), rng.normal(0, 0.2, n),
                               rng.uniform(0.5, 1.5, n)])
    model.save_weights(path)
    return model


def _nasnet_features(source: keras.Model, ctor: str, image: np.ndarray) -> list[np.ndarray]:
    """keras' own features at strides 32, 16, 8, 4, 2 on ``image`` (0..255, keras' preprocess_input applied),
    found apart from tfseg's table: the model's output, the ReLU of :data:`_NASNET_LAST_CELLS`; the stem's is
    valid-padded (input/2 - 1 wide) and is zero-padded at the bottom and right, where a 'same' one pads."""
    names = _NASNET_LAST_CELLS[ctor]
    model = keras.Model(source.input, [source.output] + [source.get_layer(n).output for n in names])
    out = [_np(f) for f in model(keras.applications.nasnet.preprocess_input(image.copy()))]
    out[1:] = [np.maximum(f, 0.0) for f in out[1:]]
    assert out[-1].shape[1] == image.shape[1] // 2 - 1
    out[-1] = np.pad(out[-1], ((0, 0), (0, 1), (0, 1), (0, 0)))
    return out


def _assert_features(got, expected):
    for stride, a, b in zip((32, 16, 8, 4, 2), got, expected):
        assert a.shape == b.shape, (stride, a.shape, b.shape)
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max(), err_msg=f"stride {stride}")


@pytest.fixture(scope="module")
def nasnet_mobile(tmp_path_factory):
    """(weights file, keras' NASNetMobile at 64x64 holding those weights)."""
    path = str(tmp_path_factory.mktemp("nasnet") / "NASNetMobile.weights.h5")
    return path, _nasnet_source("NASNetMobile", 64, path)


@pytest.mark.slow  # 21 s with the fixture; make test keeps the other encoders' weights-file and skip tests
def test_nasnetmobile_unet_loads_a_weights_file_and_skips_from_each_strides_last_cell(nasnet_mobile):
    """tfseg's nasnetmobile, loaded from a file of keras' NASNetMobile(weights=None), gives keras' own features
    on a real Kvasir image (tf-style preprocessing inside the model, keras' preprocess_input outside): the
    output at stride 32, the ReLU of normal cells 8 and 3 and of the stem's first reduction cell at 16, 8, 4,
    and the stem's 31x31 ReLU zero-padded to 32x32 at stride 2; the U-Net skips from all four and trains (its
    encoder frozen: an eager step through NASNet's backward pass takes 5 to 15 s here; the slow NASNetLarge
    test trains one unfrozen)."""
    path, source = nasnet_mobile
    image, mask = _kvasir(64)
    model = Unet("nasnetmobile", input_shape=(64, 64, 3), classes=1, encoder_weights=path, encoder_freeze=True,
                 decoder_filters=(16, 16, 8, 8, 8))
    got = [_np(f) for f in model.get_layer("encoder")(image)]
    _assert_features(got, _nasnet_features(source, "NASNetMobile", image))
    concat_inputs = [layer.input for layer in model.layers if isinstance(layer, keras.layers.Concatenate)]
    skips = [tuple(inputs[1].shape[1:]) for inputs in concat_inputs]  # (upsampled, skip)
    assert skips == [(4, 4, 528), (8, 8, 264), (16, 16, 44), (32, 32, 32)]
    assert model.output.shape == (None, 64, 64, 1)
    head = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)][-1]
    kernel = _np(head.kernel).copy()
    model.compile(optimizer="adam", loss="binary_crossentropy", run_eagerly=True)  # tracing takes minutes
    assert np.isfinite(model.train_on_batch(image, mask))
    assert not np.allclose(_np(head.kernel), kernel)


@pytest.mark.slow  # 13 s
def test_nasnetmobile_gray_fpn_at_another_size_loads_the_file_and_trains(nasnet_mobile):
    """With 1 input channel (and at 96x96, the file made at 64x64) FPN loads the same file: the stem kernel is
    the sum of the RGB kernels, every other weight is the file's; its features are input/stride and it trains
    (encoder frozen, as in the U-Net test)."""
    path, source = nasnet_mobile
    image, mask = _kvasir(96)
    gray = image.mean(-1, keepdims=True)
    model = FPN("nasnetmobile", input_shape=(96, 96, 1), classes=1, activation="sigmoid", encoder_weights=path,
                encoder_freeze=True, pyramid_block_filters=16)
    encoder = model.get_layer("encoder")
    assert [tuple(t.shape[1:3]) for t in encoder.outputs] == [(96 // s, 96 // s) for s in (32, 16, 8, 4, 2)]
    weighted = [[layer for layer in m.layers if layer.weights and layer.name != "preprocess"]
                for m in (source, encoder)]
    assert [layer.name for layer in weighted[0]] == [layer.name for layer in weighted[1]]
    kernel = encoder.get_layer("stem_conv1").get_weights()[0]
    np.testing.assert_allclose(kernel, source.get_layer("stem_conv1").get_weights()[0].sum(2, keepdims=True), rtol=1e-6)
    for a, b in zip(*weighted):
        if a.name != "stem_conv1":
            for u, v in zip(a.get_weights(), b.get_weights(), strict=True):
                np.testing.assert_array_equal(u, v, err_msg=a.name)
    assert model.output.shape == (None, 96, 96, 1)
    model.compile(optimizer="adam", loss="binary_crossentropy", run_eagerly=True)
    assert np.isfinite(model.train_on_batch(gray, mask))


@pytest.mark.slow
def test_nasnetlarge_loads_a_weights_file_and_linknet_pspnet_take_nasnet(tmp_path):
    """NASNetLarge (85M parameters, 1039 layers) as NASNetMobile: loaded from a file of keras' own model it gives
    keras' features (the ReLU of normal cells 12 and 5 at strides 16 and 8) on a real Kvasir image, and its
    U-Net takes a training step with the encoder trainable, every NASNet weight getting a gradient; Linknet and
    PSPNet build on nasnetmobile."""
    from tfseg.models.linknet import Linknet
    from tfseg.models.pspnet import PSPNet

    image, mask = _kvasir(64)
    path = str(tmp_path / "NASNetLarge.weights.h5")
    source = _nasnet_source("NASNetLarge", 64, path)
    model = Unet("nasnetlarge", input_shape=(64, 64, 3), classes=1, encoder_weights=path,
                 decoder_filters=(16, 16, 8, 8, 8))
    got = [_np(f) for f in model.get_layer("encoder")(image)]
    _assert_features(got, _nasnet_features(source, "NASNetLarge", image))
    encoder = model.get_layer("encoder")
    before = [_np(w).copy() for w in encoder.trainable_weights]
    model.compile(optimizer="adam", loss="binary_crossentropy", run_eagerly=True)
    assert np.isfinite(model.train_on_batch(image, mask))
    unchanged = [w.path for w, b in zip(encoder.trainable_weights, before) if np.array_equal(_np(w), b)]
    assert not unchanged, unchanged[:5]

    assert Linknet("nasnetmobile", input_shape=(128, 128, 3), encoder_weights=None).output.shape == (None, 128, 128, 1)
    psp = PSPNet("nasnetmobile", input_shape=(96, 96, 3), classes=2, encoder_weights=None, psp_conv_filters=16)
    assert psp.output.shape == (None, 96, 96, 2)


def test_caffe_encoder_takes_rgb_and_equals_keras_on_its_preprocessed_bgr(tmp_path):
    path, source = _saved_weights(tmp_path, "VGG16")
    encoder = build_encoder("vgg16", (32, 32, 3), weights=path, strides=(32,))
    x = _images(2, 32, 3)
    expected = source(keras.applications.vgg16.preprocess_input(x.copy()))
    out = encoder(x)  # Keras returns a lone output eagerly as a tensor, symbolically as a list
    out = out[0] if isinstance(out, list) else out
    np.testing.assert_allclose(_np(out), _np(expected), rtol=1e-4, atol=1e-3)


def test_missing_weights_file_and_offline_imagenet_are_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(ModelError, match=r"encoder_weights='.*nope.h5': no such file"):
        build_encoder("vgg16", (32, 32, 3), weights=str(tmp_path / "nope.h5"))

    from keras.src.utils import file_utils

    def offline(*args, **kwargs):
        raise Exception("URL fetch failure on https://storage.googleapis.com/...: None -- [Errno -3]")

    monkeypatch.setattr(file_utils, "get_file", offline)
    with pytest.raises(ModelError, match=r"could not download ImageNet weights for vgg16 \(offline\?\); pass "
                                         r"encoder_weights=<path"):
        build_encoder("vgg16", (32, 32, 3), weights="imagenet")


def test_efficientnet_normalization_is_set_for_any_channels_and_survives_saving(tmp_path):
    encoder = build_encoder("efficientnetb0", (32, 32, 1), strides=(32,))
    norm = next(layer for layer in encoder.layers if isinstance(layer, keras.layers.Normalization))
    np.testing.assert_allclose(_np(norm.mean).ravel(), [np.mean([0.485, 0.456, 0.406])], rtol=1e-5)
    model = keras.Sequential([keras.Input((32, 32, 1)), encoder])
    x = _images(1, 32, 1)
    before = _np(model(x))
    model.save(tmp_path / "e.keras")
    np.testing.assert_allclose(_np(keras.models.load_model(tmp_path / "e.keras")(x)), before, atol=1e-6)
    assert before.shape == (1, 1, 1, 1280)


def test_freeze_keeps_encoder_batchnorm_still_and_survives_load(tmp_path):
    model = Unet("mobilenetv2", input_shape=(32, 32, 3), classes=1, encoder_weights=None, encoder_freeze=True,
                 decoder_filters=(8, 8, 8, 8, 8))
    encoder = model.get_layer("encoder")
    assert not encoder.trainable and not encoder.trainable_weights
    n_frozen = len(model.trainable_weights)
    bn = encoder.get_layer("bn_Conv1")
    mean_before = _np(bn.moving_mean).copy()
    model.compile(optimizer="adam", loss="binary_crossentropy", run_eagerly=True)
    model.train_on_batch(_images(2, 32, 3), np.ones((2, 32, 32, 1), "float32"))
    np.testing.assert_array_equal(_np(bn.moving_mean), mean_before)  # inference mode while frozen

    unfreeze_encoder(model)
    assert encoder.trainable and len(model.trainable_weights) > n_frozen
    model.save(tmp_path / "u.keras")
    loaded = keras.models.load_model(tmp_path / "u.keras", compile=False)
    freeze_encoder(loaded)
    assert len(loaded.trainable_weights) == n_frozen


@pytest.mark.slow
@pytest.mark.parametrize("name", encoder_names())
def test_every_encoder_gives_features_at_its_strides(name):
    spec = get_encoder_spec(name)
    size = 96
    encoder = build_encoder(name, (size, size, 1), strides=spec.strides)
    for stride, out in zip(spec.strides, encoder.outputs):
        assert tuple(out.shape[1:3]) == (size // stride, size // stride), (name, stride)


# ---------------------------------------------------------------------------------------------
# segmentation_models' ResNets (tfseg.models.sm_resnet)
# ---------------------------------------------------------------------------------------------

SM_RESNET_FEATURES = ("relu1", "stage4_unit1_relu1", "stage3_unit1_relu1", "stage2_unit1_relu1", "relu0")


def _sm_features(name: str) -> tuple[str, ...]:
    """sm's layers at strides 32 (the network's output), 16, 8, 4, 2 for its network ``name`` ("sm": its
    output and its own skip list, which gives indices for the SE networks)."""
    if name.startswith("se"):
        return ("sm",)
    return ("stage4_unit3_relu", *SM_RESNET_FEATURES[1:]) if name.startswith("resnext") else SM_RESNET_FEATURES
_SM_RESNET_SCRIPT = """
import os, sys
import numpy as np
os.environ["SM_FRAMEWORK"] = "tf.keras"
import segmentation_models as sm
from tensorflow import keras
name, size, image_path, h5_path, out_path, names = sys.argv[1:]
keras.utils.set_random_seed(1)
model = sm.Backbones.get_backbone(name, input_shape=(int(size), int(size), 3), weights=None, include_top=False,
                                  backend=keras.backend, layers=keras.layers, models=keras.models,
                                  utils=keras.utils)
rng = np.random.default_rng(0)
for layer in model.layers:  # BatchNorm statistics and affine terms away from their defaults
    if isinstance(layer, keras.layers.BatchNormalization):
        n = layer.get_weights()[0].shape[0]
        if layer.name == "bn_data":  # the same for R, G and B, so a gray image is a gray image
            layer.set_weights([np.full(n, 0.1), np.full(n, 110.0), np.full(n, 3000.0)])
            continue
        affine = [rng.uniform(0.5, 1.5, n), rng.normal(0, 0.1, n)] if layer.scale else [rng.normal(0, 0.1, n)]
        layer.set_weights(affine + [rng.normal(0, 0.2, n), rng.uniform(0.5, 1.5, n)])
model.save_weights(h5_path)
if names == "sm":  # the output, then the layers sm's U-Net skips from (names or, for SE networks, indices)
    layers = [model.layers[-1]] + [model.layers[r] if isinstance(r, int) else model.get_layer(r)
                                   for r in sm.Backbones.get_feature_layers(name, n=4)]
else:
    layers = [model.get_layer(n) for n in names.split(",")]
image = sm.get_preprocessing(name)(np.load(image_path))
features = keras.Model(model.input, [layer.output for layer in layers]).predict(image, verbose=0)
np.savez(out_path, *features)
print("SM_DONE")
"""


def _sm_resnet(tmp_path, name: str, image: np.ndarray) -> tuple[str, list]:
    """sm's own ``name`` encoder: its weights saved as sm saves them (HDF5) and its feature maps on ``image``."""
    require_sm()
    np.save(tmp_path / "image.npy", image)
    h5 = str(tmp_path / f"{name}_sm.h5")
    args = [name, str(image.shape[1]), str(tmp_path / "image.npy"), h5, str(tmp_path / "features.npz"),
            ",".join(_sm_features(name))]
    proc = subprocess.run([sys.executable, "-c", _SM_RESNET_SCRIPT, *args], env=sm_env(legacy_keras=True),
                          capture_output=True, text=True, timeout=600)
    assert "SM_DONE" in proc.stdout, proc.stderr[-3000:]
    features = np.load(tmp_path / "features.npz")
    return h5, [features[f"arr_{i}"] for i in range(5)]


@pytest.mark.parametrize("name", ["resnet18",  # basic blocks; SE (12 s) and grouped ones (30 s) are slow
                                  *(pytest.param(n, marks=pytest.mark.slow)
                                    for n in ("seresnet18", "resnext50", "resnet50", "seresnet50", "seresnext50"))])
def test_sm_resnet_loads_sms_weights_file_and_gives_its_features(tmp_path, name, monkeypatch):
    """tfseg's resnet18/50, seresnet18, resnext50 and seresnet50/seresnext50 are classification_models' networks:
    sm's own weights file loads into them (by layer name; generated-name layers, ResNeXt's 32 slices of
    each grouped convolution and every layer of the SE networks, in their numbered order) and every
    feature map sm's U-Net skips from is sm's, on a real Kvasir image (sm's preprocessing outside,
    tfseg's inside); with 1 input channel, for the networks that normalize their own input, the gray
    image gives the RGB features of the same gray image. ``imagenet`` downloads the file from its URL
    (here a file:// URL), checks its md5 and loads it the same way."""
    import hashlib

    from PIL import Image

    from tests.conftest import shared_path
    from tfseg.models import sm_resnet

    path = sorted((shared_path("kvasir_seg") / "images").glob("*.jpg"))[0]
    image = np.asarray(Image.open(path).convert("RGB").resize((64, 64), Image.BILINEAR), "float32")[None]
    h5, expected = _sm_resnet(tmp_path, name, image)

    rgb = build_encoder(name, (64, 64, 3), weights=h5)  # strides 32, 16, 8, 4, 2: as SM_RESNET_FEATURES
    got = [_np(f) for f in rgb(image)]
    # The SE networks differ from sm by float32 rounding only (sm normalizes outside, tfseg inside; one
    # grouped kernel against 32 slices), ~1e-7 after the stem, which their 16 units with this test's
    # random BatchNorm statistics grow about 1.7x a unit (measured unit by unit: 8e-7 after the first,
    # 4e-4 after the 11th); a wrongly mapped weight would be off by the output's own size.
    tol = 1e-4 if get_encoder_spec(name).norm is None else 3e-3
    for stride, a, b in zip((32, 16, 8, 4, 2), got, expected):
        assert a.shape == b.shape, stride
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol * np.abs(b).max(), err_msg=f"stride {stride}")

    if get_encoder_spec(name).norm is None:  # the same constants for R, G and B (its input BatchNorm)
        gray = build_encoder(name, (64, 64, 1), weights=h5)
        g = image.mean(-1, keepdims=True)
        for a, b in zip(gray(g), rgb(np.repeat(g, 3, axis=-1))):
            np.testing.assert_allclose(_np(a), _np(b), rtol=1e-4, atol=1e-4 * np.abs(_np(b)).max())

    if name.startswith("se"):
        table, depth = sm_resnet.IMAGENET_SENET, name
    else:
        table = sm_resnet.IMAGENET_RESNEXT if name.startswith("resnext") else sm_resnet.IMAGENET
        depth = int(name.removeprefix("resnext").removeprefix("resnet"))
    served = tmp_path / "release"
    served.mkdir()
    file_name = table[depth][0]
    (served / file_name).write_bytes(open(h5, "rb").read())
    md5 = hashlib.md5((served / file_name).read_bytes()).hexdigest()
    monkeypatch.setattr(sm_resnet, "WEIGHTS_URL", served.as_uri() + "/")
    monkeypatch.setitem(table, depth, (file_name, md5))
    get_file = keras.utils.get_file  # into this test's directory, not ~/.keras
    (tmp_path / "cache").mkdir()
    monkeypatch.setattr(keras.utils, "get_file", lambda *a, **k: get_file(*a, **k, cache_dir=str(tmp_path / "cache")))
    downloaded = build_encoder(name, (64, 64, 3), weights="imagenet", strides=(32,))
    out = downloaded(image)
    out = out[0] if isinstance(out, list) else out
    np.testing.assert_array_equal(_np(out), got[0])
    assert (tmp_path / "cache" / "models" / file_name).is_file()


def test_sm_resnet_weights_errors(tmp_path, monkeypatch):
    from tfseg.models import sm_resnet

    with pytest.raises(ModelError, match=r"encoder_weights='.*nope.h5': no such file"):
        build_encoder("resnet34", (64, 64, 3), weights=str(tmp_path / "nope.h5"))
    import h5py

    wrong = str(tmp_path / "vgg.h5")  # an HDF5 weights file (sm's format) of another network

    with h5py.File(wrong, "w") as f:
        f.attrs["layer_names"] = [b"block1_conv1"]
    with pytest.raises(ModelError, match=r"has no weights for layer 'bn_data' of resnet34 \(\d+ layers missing\); "
                                         r"expected sm's resnet34_imagenet_1000_no_top.h5"):
        build_encoder("resnet34", (64, 64, 3), weights=wrong)
    with pytest.raises(ModelError, match=r"depth=20; expected one of \[18, 34, 50, 101, 152\]"):
        sm_resnet.SMResNet(20)

    from tfseg.models import sm_senet

    with pytest.raises(ModelError, match=r"name='seresnext18'; expected one of \['senet154', 'seresnet101', "):
        sm_senet.SMSENet("seresnext18")
    with pytest.raises(ModelError, match="include_top=True is not supported"):
        sm_senet.SEResNeXt50(include_top=True)

    # a ResNeXt file whose named layers are all there but whose 32-way grouped kernels are not
    model = sm_resnet.ResNeXt50(input_shape=(64, 64, 3))
    no_groups = str(tmp_path / "resnext50_no_groups.h5")
    with h5py.File(no_groups, "w") as f:
        kept = [layer for layer in model.layers if layer.weights and getattr(layer, "groups", 1) == 1]
        f.attrs["layer_names"] = [layer.name.encode() for layer in kept]
        for layer in kept:
            g = f.create_group(layer.name)
            g.attrs["weight_names"] = [f"{layer.name}/w{i}".encode() for i in range(len(layer.weights))]
            for i, w in enumerate(layer.get_weights()):
                g.create_dataset(f"{layer.name}/w{i}", data=w)
    with pytest.raises(ModelError, match=r"has 0 generated-name conv2d layers, resnext50 takes 512; expected sm's "
                                         r"resnext50_imagenet_1000_no_top.h5"):
        build_encoder("resnext50", (64, 64, 3), weights=no_groups)

    def offline(*args, **kwargs):
        raise Exception("URL fetch failure on https://github.com/qubvel/...: None -- [Errno -3]")

    monkeypatch.setattr(keras.utils, "get_file", offline)
    with pytest.raises(ModelError, match=r"could not download ImageNet weights for resnet34 \(offline\?\); pass "
                                         r"encoder_weights=<path"):
        build_encoder("resnet34", (64, 64, 3), weights="imagenet")


def test_sm_resnet_saves_and_loads_its_own_weights_file(tmp_path):
    keras.utils.set_random_seed(2)
    from tfseg.models.sm_resnet import ResNet34

    source = ResNet34(input_shape=(None, None, 3))
    source.save_weights(str(tmp_path / "r34.weights.h5"))
    encoder = build_encoder("resnet34", (64, 64, 3), weights=str(tmp_path / "r34.weights.h5"), strides=(32,))
    x = _images(1, 64, 3)
    out = encoder(x)
    out = out[0] if isinstance(out, list) else out
    np.testing.assert_allclose(_np(out), _np(source(x)), rtol=1e-5, atol=1e-5)


def test_encoder_without_stride_2_features_in_unet_linknet_and_fpn(tmp_path):
    """ConvNeXt's stem has stride 4: U-Net and Linknet skip from strides 16, 8, 4 and still reach full
    resolution; FPN says to use upsampling 4; the U-Net (ConvNeXt's LayerScale layers included) saves
    and loads without custom_objects."""
    from tfseg.config import ModelConfig
    from tfseg.models import build_model

    x = _images(1, 64, 3)
    common = dict(backbone="convnexttiny", input_shape=(64, 64, 3), classes=2, activation="softmax",
                  encoder_weights=None, decoder_filters=(16, 16, 8, 8, 8))
    unet = build_model(ModelConfig(arch="unet", **common))
    concat_inputs = [layer.input for layer in unet.layers if isinstance(layer, keras.layers.Concatenate)]
    assert [[t.shape[1] for t in inputs] for inputs in concat_inputs] == [[4, 4], [8, 8], [16, 16]]  # 3 skips
    before = _np(unet(x))
    assert before.shape == (1, 64, 64, 2)
    unet.save(tmp_path / "u.keras")
    np.testing.assert_allclose(_np(keras.models.load_model(tmp_path / "u.keras")(x)), before, atol=1e-6)

    assert build_model(ModelConfig(arch="linknet", **common)).output.shape == (None, 64, 64, 2)
    with pytest.raises(ModelError, match="fpn: encoder convnexttiny has no stride-2 features for sm's upsampling: 2; "
                                         "set model.options.upsampling: 4"):
        build_model(ModelConfig(arch="fpn", **common))
    fpn = build_model(ModelConfig(arch="fpn", **{**common, "options": {"upsampling": 4}}))
    assert fpn.output.shape == (None, 64, 64, 2)
