"""FPN, Linknet and PSPNet: parity with segmentation_models, options, sizes, sm-style calls, training.

Parity: ``sm.FPN``, ``sm.Linknet`` and ``sm.PSPNet`` and tfseg's twins, called with the same
arguments, have the same trainable parameter count and output shape; so do ``sm.Unet``'s decoder
variants (transpose blocks, no BatchNorm) and tfseg's ``Unet``, with the same total count too.
segmentation_models runs in a subprocess (``SM_FRAMEWORK=tf.keras``) so that its imports (efficientnet,
classification_models, keras_applications) never touch this process; it runs while this process builds
tfseg's twins.

resnet50 is segmentation_models' (classification_models') ResNet50 in both, as ``sm.FPN("resnet50")``
means (tfseg.models.sm_resnet).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from PIL import Image

from tests.conftest import require_sm, shared_path, sm_env
from tfseg.config import ModelConfig
from tfseg.errors import ModelError
from tfseg.models import build_model
from tfseg.models.common import all_layers
from tfseg.models.fpn import FPN
from tfseg.models.linknet import Linknet
from tfseg.models.pspnet import PSPNet
from tfseg.models.unet import Unet

TWINS = {"FPN": FPN, "Linknet": Linknet, "PSPNet": PSPNet, "Unet": Unet}
DEFAULT_SHAPES = (("FPN", (64, 64, 3)), ("Linknet", (64, 64, 3)), ("PSPNet", (96, 96, 3)))

# (case id, sm function, backbone, keyword arguments): the same call goes to sm and to tfseg.
FAST_CASES = [
    (f"{arch}-{backbone}", arch, backbone, {"input_shape": shape})
    for backbone in ("mobilenetv2",)  # efficientnetb0 and vgg16 are in SLOW_CASES (make test-all)
    for arch, shape in DEFAULT_SHAPES
] + [
    (
        "FPN-sum-nobn-dropout",
        "FPN",
        "mobilenetv2",
        {
            "input_shape": (64, 64, 3),
            "pyramid_aggregation": "sum",
            "pyramid_block_filters": 128,
            "pyramid_use_batchnorm": False,
            "pyramid_dropout": 0.2,
        },
    ),
    (
        "Linknet-transpose",
        "Linknet",
        "mobilenetv2",
        {"input_shape": (64, 64, 3), "decoder_block_type": "transpose"},
    ),
    (
        "PSPNet-4-max-nobn",
        "PSPNet",
        "mobilenetv2",
        {
            "input_shape": (48, 48, 3),
            "downsample_factor": 4,
            "psp_pooling_type": "max",
            "psp_conv_filters": 256,
            "psp_use_batchnorm": False,
            "psp_dropout": 0.1,
        },
    ),
]
# sm.Unet's decoder options (the default, upsampling with BatchNorm, is in tests/test_sm_parity.py).
UNET_DECODER_CASES = [
    (f"Unet-{block}-{'bn' if batchnorm else 'nobn'}", "Unet", "mobilenetv2",
     {"input_shape": (64, 64, 3), "decoder_block_type": block, "decoder_use_batchnorm": batchnorm})
    for block, batchnorm in (("transpose", True), ("transpose", False), ("upsampling", False))
]
# keras.applications' EfficientNet has a Normalization layer (mean 3 + variance 3 + count 1) that sm's lacks.
KERAS_EFFICIENTNET_EXTRA = 7
SLOW_CASES = [
    (f"{arch}-{backbone}", arch, backbone, {"input_shape": shape})
    for backbone in ("efficientnetb0", "vgg16", "efficientnetb5", "resnet50")
    for arch, shape in DEFAULT_SHAPES
] + [
    (
        "Linknet-vgg16-nobn-8",
        "Linknet",
        "vgg16",
        {
            "input_shape": (64, 64, 3),
            "decoder_use_batchnorm": False,
            "decoder_filters": (None, None, None, None, 8),
        },
    ),
    (
        "PSPNet-16-efficientnetb0",
        "PSPNet",
        "efficientnetb0",
        {"input_shape": (96, 96, 3), "downsample_factor": 16},
    ),
    ("PSPNet-16-resnet50", "PSPNet", "resnet50", {"input_shape": (96, 96, 3), "downsample_factor": 16}),
]

_SM_SCRIPT = textwrap.dedent("""
    import json, os, sys
    os.environ["SM_FRAMEWORK"] = "tf.keras"
    import segmentation_models as sm
    from tensorflow import keras

    def count(weights):
        return sum(int(w.shape.num_elements()) for w in weights)

    out = {}
    for case_id, arch, backbone, kwargs in json.loads(sys.argv[1]):
        kwargs["input_shape"] = tuple(kwargs["input_shape"])
        if "decoder_filters" in kwargs:
            kwargs["decoder_filters"] = tuple(kwargs["decoder_filters"])
        model = getattr(sm, arch)(backbone, classes=3, activation="softmax", encoder_weights=None, **kwargs)
        out[case_id] = {"trainable": count(model.trainable_weights), "total": count(model.weights),
                        "shape": list(model.output_shape)}
        keras.backend.clear_session()
    print("SM_RESULT " + json.dumps(out))
""")


def start_sm(cases) -> subprocess.Popen:
    """Start segmentation_models on ``cases`` in a subprocess; :func:`sm_results` collects it."""
    require_sm()
    env = sm_env()
    payload = [[cid, arch, bb, kw] for cid, arch, bb, kw in cases]
    return subprocess.Popen(
        [sys.executable, "-c", _SM_SCRIPT, json.dumps(payload)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def sm_results(proc: subprocess.Popen) -> dict:
    stdout, stderr = proc.communicate(timeout=900)
    lines = [line for line in stdout.splitlines() if line.startswith("SM_RESULT ")]
    assert proc.returncode == 0 and lines, stderr[-3000:]
    return json.loads(lines[-1][len("SM_RESULT ") :])


def count(weights) -> int:
    return sum(int(np.prod(w.shape)) for w in weights)


def check_parity(cases, totals: bool = False) -> None:
    """Same trainable parameters and output shape as sm; with ``totals`` the same total parameters too
    (plus keras' EfficientNet Normalization, which sm's EfficientNet lacks)."""
    proc = start_sm(cases)
    ours = {}
    try:
        for case_id, arch, backbone, kwargs in cases:
            model = TWINS[arch](backbone, classes=3, activation="softmax", encoder_weights=None, **kwargs)
            ours[case_id] = (count(model.trainable_weights), list(model.output_shape), count(model.weights))
            keras.backend.clear_session()
    finally:
        reference = sm_results(proc)
    for case_id, _, backbone, _ in cases:
        ref = reference[case_id]
        assert ours[case_id][:2] == (ref["trainable"], ref["shape"]), case_id
        if totals:
            extra = KERAS_EFFICIENTNET_EXTRA if backbone.startswith("efficientnet") else 0
            assert ours[case_id][2] == ref["total"] + extra, case_id


def test_same_trainable_parameters_and_output_shape_as_segmentation_models():
    check_parity(FAST_CASES)


def test_unet_decoder_variants_same_parameters_and_output_shape_as_segmentation_models():
    """sm.Unet("mobilenetv2") with transpose blocks (with and without BatchNorm) and upsampling blocks
    without BatchNorm, and tfseg's Unet called the same: same trainable and total parameters, same shape."""
    check_parity(UNET_DECODER_CASES, totals=True)


@pytest.mark.slow
def test_same_trainable_parameters_as_segmentation_models_efficientnetb5_resnet50_and_variants():
    check_parity(SLOW_CASES)


# ---------------------------------------------------------------------------------------------
# Options and sizes: errors before anything is built
# ---------------------------------------------------------------------------------------------


def cfg(arch: str, size=(64, 64, 3), **kwargs) -> ModelConfig:
    return ModelConfig(
        arch=arch, backbone="mobilenetv2", input_shape=size, classes=1, encoder_weights=None, **kwargs
    )


@pytest.mark.parametrize(
    "arch,key,match",
    [
        (
            "fpn",
            "pyramid_filters",
            r"fpn: unknown option 'pyramid_filters' \(did you mean 'pyramid_block_filters'",
        ),
        ("pspnet", "pooling_type", r"pspnet: unknown option 'pooling_type'.*'psp_pooling_type'"),
        (
            "linknet",
            "decoder_filters",
            r"linknet: unknown option 'decoder_filters'; linknet takes no options",
        ),
        ("unet", "encoder_feature", r"unet: unknown option 'encoder_feature' \(did you mean 'encoder_features'\?\)"),
    ],
)
def test_unknown_option_names_it_and_lists_the_valid_ones(arch, key, match):
    with pytest.raises(ModelError, match=match):
        build_model(cfg(arch, options={key: 1}))


@pytest.mark.parametrize(
    "arch,options,match",
    [
        (
            "fpn",
            {"pyramid_aggregation": "mean"},
            r"pyramid_aggregation='mean': expected one of \['concat', 'sum'\]",
        ),
        ("fpn", {"pyramid_block_filters": 0}, "pyramid_block_filters=0: expected a positive integer"),
        ("fpn", {"upsampling": 8}, r"upsampling=8: expected one of \[2, 4\]"),
        ("fpn", {"pyramid_dropout": 1.5}, r"pyramid_dropout=1.5: expected null or a rate in \[0, 1\)"),
        ("pspnet", {"downsample_factor": 32}, r"downsample_factor=32: expected one of \[4, 8, 16\]"),
        ("pspnet", {"psp_pooling_type": "min"}, r"psp_pooling_type='min': expected one of \['avg', 'max'\]"),
    ],
)
def test_bad_option_values_are_model_errors(arch, options, match):
    with pytest.raises(ModelError, match=match):
        build_model(cfg(arch, size=(96, 96, 3), options=options))


def test_linknet_bad_decoder_settings():
    with pytest.raises(ModelError, match="decoder_block_type='deconv'"):
        build_model(cfg("linknet", decoder_block_type="deconv"))
    with pytest.raises(ModelError, match="has 6 entries; expected 1 to 5"):
        build_model(cfg("linknet", decoder_filters=(16,) * 6))


@pytest.mark.parametrize(
    "arch,size,options,match",
    [
        (
            "fpn",
            (100, 64, 3),
            {},
            "fpn: input height 100 is not divisible by 32; the nearest sizes that work are 96 and 128",
        ),
        ("linknet", (64, 70, 1), {}, "linknet: input width 70 .* 64 and 96"),
        (
            "pspnet",
            (64, 64, 3),
            {},
            "pspnet: input height 64 is not divisible by 48; the nearest sizes that work are 48 and 96",
        ),
        (
            "pspnet",
            (96, 100, 3),
            {"downsample_factor": 16},
            "width 100 is not divisible by 96; .* 96 and 192",
        ),
        (
            "pspnet",
            (24, 24, 3),
            {"downsample_factor": 4},
            "height 24 is too small; the smallest size that works is 48",
        ),
        (
            "pspnet",
            (None, None, 3),
            {},
            r"pspnet: input_shape=\[None, None, 3\] needs a fixed height and width",
        ),
    ],
)
def test_input_size_is_checked_up_front_with_the_sizes_that_work(arch, size, options, match):
    with pytest.raises(ModelError, match=match):
        build_model(cfg(arch, size=size, options=options))


@pytest.mark.parametrize("arch", ["unet", "fpn", "linknet"])
def test_an_encoders_smallest_size_is_rounded_to_the_architectures_multiple(arch):
    # InceptionV3 takes 75 pixels at least; the smallest size these stride-32 architectures can take is 96.
    with pytest.raises(ModelError, match=f"{arch}: input height 64 is too small; the smallest size that works is 96"):
        build_model(ModelConfig(arch=arch, backbone="inceptionv3", input_shape=(64, 128, 3), classes=1,
                                encoder_weights=None))


def test_sm_style_calls_reject_other_encoder_features():
    with pytest.raises(ModelError, match="encoder_features=.*'default'"):
        FPN(
            "mobilenetv2",
            input_shape=(64, 64, 3),
            encoder_weights=None,
            encoder_features=["block_1_expand_relu"],
        )
    with pytest.raises(ModelError, match="unknown backbone|backbone='mobilenet_v2'"):
        Linknet("mobilenet_v2", input_shape=(64, 64, 3), encoder_weights=None)


# ---------------------------------------------------------------------------------------------
# Built models
# ---------------------------------------------------------------------------------------------


def isbi_batch(size: int, n: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """``n`` real ISBI 2012 crops: float32 images [n, size, size, 1] in 0..255 and masks in {0, 1}."""
    root = shared_path("isbi2012_em_membrane")
    images, masks = [], []
    for i in range(n):
        image = np.asarray(Image.open(root / "images" / f"{i}.png").convert("L"), dtype="float32")
        mask = np.asarray(Image.open(root / "masks" / f"{i}.png").convert("L")) > 127
        y0, x0 = 100 + 37 * i, 200 - 23 * i
        images.append(image[y0 : y0 + size, x0 : x0 + size, None])
        masks.append(mask[y0 : y0 + size, x0 : x0 + size, None].astype("float32"))
    return np.stack(images), np.stack(masks)


def test_sm_style_call_equals_build_model_and_loads_weights(tmp_path):
    options = {"downsample_factor": 4, "psp_conv_filters": 32, "psp_pooling_type": "max"}
    from_cfg = build_model(
        ModelConfig(
            arch="pspnet",
            backbone="mobilenetv2",
            input_shape=(48, 48, 1),
            classes=2,
            activation="softmax",
            encoder_weights=None,
            options=options,
        )
    )
    path = tmp_path / "pspnet.weights.h5"
    from_cfg.save_weights(path)
    ported = PSPNet(
        "mobilenetv2", input_shape=(48, 48, 1), classes=2, encoder_weights=None, weights=str(path), **options
    )
    assert [layer.name for layer in ported.layers] == [layer.name for layer in from_cfg.layers]
    assert count(ported.weights) == count(from_cfg.weights)
    x, _ = isbi_batch(48)
    np.testing.assert_allclose(ported.predict(x, verbose=0), from_cfg.predict(x, verbose=0), atol=1e-6)
    # Only the encoder up to the cut (stride 4 = block_3_expand_relu) is in the model, as in sm.
    encoder = ported.get_layer("encoder")
    names = {layer.name for layer in encoder.layers}
    assert "block_3_expand_relu" in names and "block_4_expand" not in names and "out_relu" not in names


def test_options_come_from_the_params_file(project_root):
    from tfseg.config import load_config

    overrides = ["model.arch=pspnet", "model.backbone=mobilenetv2", "model.encoder_weights=null",
                 "model.options={downsample_factor: 16, psp_pooling_type: max, psp_conv_filters: 32}",
                 "data.image_size=[96, 96]", "data.channels=1", "data.classes=1"]
    model = build_model(load_config(project_root / "params.yaml", overrides=overrides).model)
    assert model.input_shape == (None, 96, 96, 1) and model.output_shape == (None, 96, 96, 1)
    assert isinstance(model.get_layer("psp_level1_pooling"), keras.layers.MaxPooling2D)
    assert model.get_layer("psp_level1_conv").filters == 32
    names = {layer.name for layer in model.get_layer("encoder").layers}
    assert "block_13_expand_relu" in names and "out_relu" not in names  # cut at stride 16


def test_encoder_freeze_leaves_only_the_decoder_trainable():
    model = FPN(
        "mobilenetv2",
        input_shape=(64, 64, 3),
        classes=1,
        activation="sigmoid",
        encoder_weights=None,
        encoder_freeze=True,
        pyramid_block_filters=32,
    )
    assert not model.get_layer("encoder").trainable
    decoder = [
        w
        for layer in model.layers
        if layer.name not in ("encoder", "image")
        for w in layer.weights
        if "moving" not in w.path
    ]
    assert count(model.trainable_weights) == count(decoder) > 0


def test_fpn_upsampling_4_drops_the_stride_2_level_and_keeps_full_resolution():
    model = FPN(
        "mobilenetv2",
        input_shape=(64, 96, 3),
        classes=2,
        encoder_weights=None,
        pyramid_block_filters=32,
        pyramid_aggregation="sum",
        upsampling=4,
    )
    names = {layer.name for layer in model.layers}
    assert {"fpn_stage_p3_add", "segm_stage3a_conv"} <= names and "fpn_stage_p2_add" not in names
    assert model.get_layer("final_upsampling").get_config()["size"] == (4, 4)
    assert model.output_shape == (None, 64, 96, 2)


VARIANTS = {
    "fpn-sum-dropout": (
        64,
        lambda: FPN(
            "mobilenetv2",
            input_shape=(64, 64, 1),
            classes=1,
            activation="sigmoid",
            encoder_weights=None,
            pyramid_block_filters=32,
            pyramid_aggregation="sum",
            pyramid_dropout=0.1,
        ),
    ),
    "linknet-transpose": (
        64,
        lambda: Linknet(
            "mobilenetv2",
            input_shape=(64, 64, 1),
            encoder_weights=None,
            decoder_block_type="transpose",
            decoder_filters=(None, None, None, None, 8),
        ),
    ),
    "pspnet-max-4": (
        48,
        lambda: PSPNet(
            "mobilenetv2",
            input_shape=(48, 48, 1),
            classes=1,
            activation="sigmoid",
            encoder_weights=None,
            downsample_factor=4,
            psp_conv_filters=32,
            psp_pooling_type="max",
        ),
    ),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variants_train_on_real_isbi_crops(variant):
    size, build = VARIANTS[variant]
    x, y = isbi_batch(size)
    keras.utils.set_random_seed(0)
    model = build()
    assert model.output_shape == (None, size, size, 1)
    # Eagerly: tracing the train step costs ~30 s of CPU per model here, eager steps ~1 s; the shared
    # contract (tests/test_models_contract.py) trains the compiled default models.
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy", run_eagerly=True)
    first = float(model.train_on_batch(x, y))
    for _ in range(3):
        last = float(model.train_on_batch(x, y))
    assert np.isfinite(first) and last < first, f"loss {first:.4f} -> {last:.4f}"


@pytest.mark.slow
def test_builds_and_predicts_on_the_jax_backend():
    script = textwrap.dedent("""
        import numpy as np
        from tfseg.models.fpn import FPN
        from tfseg.models.linknet import Linknet
        from tfseg.models.pspnet import PSPNet
        for model in (FPN("mobilenetv2", input_shape=(64, 64, 3), encoder_weights=None, classes=2),
                      Linknet("mobilenetv2", input_shape=(64, 64, 3), encoder_weights=None),
                      Linknet("mobilenetv3small", input_shape=(64, 64, 3), encoder_weights=None),
                      PSPNet("mobilenetv2", input_shape=(48, 48, 3), encoder_weights=None, classes=2)):
            size = model.input_shape[1]
            out = np.asarray(model.predict(np.zeros((1, size, size, 3), "float32"), verbose=0))
            assert out.shape[:3] == (1, size, size) and np.isfinite(out).all()
        print("JAX_OK")
    """)
    compile(script, "jax-backend-script", "exec")  # checked here too, where jax is missing and the run skips
    if importlib.util.find_spec("jax") is None:
        pytest.skip("jax is not installed: the JAX backend cannot be checked here")
    env = {**os.environ, "KERAS_BACKEND": "jax"}
    proc = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert "JAX_OK" in proc.stdout, proc.stderr[-3000:]


_SM_WEIGHTS_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import numpy as np
    os.environ["SM_FRAMEWORK"] = "tf.keras"
    import segmentation_models as sm
    from tensorflow import keras
    keras.utils.set_random_seed(1)
    arch, backbone, kwargs, image_path, out_path = json.loads(sys.argv[1])
    kwargs["input_shape"] = tuple(kwargs["input_shape"])
    model = getattr(sm, arch)(backbone, classes=2, activation="linear", encoder_weights=None, **kwargs)
    image = np.load(image_path)
    arrays = {"output": model.predict(sm.get_preprocessing(backbone)(image.copy()), verbose=0)}
    head = model.layers[-2]  # Linknet's head convolution has no name in sm; tfseg calls it final_conv
    for layer in model.layers:
        name = "final_conv" if (layer is head and arch == "Linknet") else layer.name
        for i, w in enumerate(layer.get_weights()):
            arrays[f"{name}/{i}"] = w
    np.savez(out_path, **arrays)
    print("SM_DONE")
""")


@pytest.mark.slow
@pytest.mark.parametrize(
    "arch,kwargs",
    [
        ("FPN", {"input_shape": (64, 64, 3)}),
        ("Linknet", {"input_shape": (64, 64, 3)}),
        ("PSPNet", {"input_shape": (96, 96, 3), "psp_pooling_type": "max"}),
    ],
)
def test_same_predictions_as_segmentation_models_with_its_weights(arch, kwargs, tmp_path):
    """sm's weights, copied layer by layer (same names), give tfseg's twin the same logits on a real
    Kvasir image: tfseg normalizes inside, sm is fed ``sm.get_preprocessing(backbone)(image)``."""
    require_sm()
    size = kwargs["input_shape"][0]
    path = sorted((shared_path("kvasir_seg") / "images").glob("*.jpg"))[0]
    image = np.asarray(Image.open(path).convert("RGB").resize((size, size), Image.BILINEAR), "float32")[None]
    np.save(tmp_path / "image.npy", image)
    env = sm_env()
    payload = [arch, "mobilenetv2", kwargs, str(tmp_path / "image.npy"), str(tmp_path / "sm.npz")]
    proc = subprocess.run(
        [sys.executable, "-c", _SM_WEIGHTS_SCRIPT, json.dumps(payload)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert "SM_DONE" in proc.stdout, proc.stderr[-3000:]
    arrays = np.load(tmp_path / "sm.npz")

    model = TWINS[arch]("mobilenetv2", classes=2, activation="linear", encoder_weights=None, **kwargs)
    copied = 0
    for layer in all_layers(model):
        if layer.weights and not isinstance(layer, keras.Model):  # the nested encoder's layers come next
            layer.set_weights([arrays[f"{layer.name}/{i}"] for i in range(len(layer.weights))])
            copied += 1
    sm_names = {key.split("/")[0] for key in arrays.files if key != "output"}
    assert copied == len(sm_names), "every sm layer with weights has its tfseg twin, by name"
    logits = arrays["output"]  # compared as logits: a softmax near 0.5 would hide differences
    assert logits.std() > 1e-3 * np.abs(logits).max() > 0, "sm's logits are too flat to compare"
    np.testing.assert_allclose(model.predict(image, verbose=0), logits, rtol=1e-4,
                               atol=1e-5 * np.abs(logits).max())
