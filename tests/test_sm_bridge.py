"""``model.arch: sm.<Name>`` (tfseg/models/sm_bridge.py): the bridged model applies exactly
``sm.get_preprocessing(backbone)`` to tfseg's float RGB 0..255 images.

segmentation_models runs in a subprocess (``SM_FRAMEWORK=tf.keras``) so that its imports never touch
this process.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import require_sm, sm_env

# One backbone of each sm preprocessing family; the script checks every other sm backbone as well.
FAMILIES = {"vgg16": "caffe", "vgg19": "caffe", "efficientnetb0": "torch", "seresnet50": "torch",
            "densenet121": "torch", "mobilenetv2": "tf", "inceptionv3": "tf", "resnet34": "none",
            "seresnet18": "none", "resnext50": "none"}

_SCRIPT = textwrap.dedent("""
    import json, os, sys, tempfile
    import keras
    import numpy as np
    import segmentation_models as sm
    from tfseg.config import ModelConfig
    from tfseg.models import build_model
    from tfseg.models.sm_bridge import sm_preprocessing

    rng = np.random.default_rng(0)
    image = rng.uniform(0, 255, (2, 32, 48, 3)).astype("float32")  # RGB, as tfseg's pipeline feeds it
    out = {"backbones": {}}
    for name in sorted(sm.Backbones.models_names()):
        expected = np.asarray(sm.get_preprocessing(name)(image.copy()), "float32")
        layer = sm_preprocessing(name, 3)
        got = image if layer is None else np.asarray(layer(image))
        out["backbones"][name] = {"diff": float(np.abs(got - expected).max()), "identity": layer is None,
                                  "changed": float(np.abs(expected - image).max())}

    # The bridged model itself: its "preprocess" layer, and the whole model = sm's model on sm's input.
    model = build_model(ModelConfig(arch="sm.Unet", backbone="vgg16", input_shape=(64, 64, 3), classes=1,
                                    activation="linear", encoder_weights=None))
    big = rng.uniform(0, 255, (2, 64, 64, 3)).astype("float32")
    inner = next(layer for layer in model.layers if isinstance(layer, keras.Model) and layer.name != "preprocess")
    expected = np.asarray(inner(sm.get_preprocessing("vgg16")(big.copy())))
    got = np.asarray(model(big))
    out["preprocess_layer"] = float(np.abs(np.asarray(model.get_layer("preprocess")(big))
                                           - sm.get_preprocessing("vgg16")(big.copy())).max())
    out["model"] = float(np.abs(got - expected).max())
    out["model_scale"] = float(np.abs(expected).max())
    # Saved and loaded as .keras with no custom_objects: the preprocessing is Keras' own layers.
    path = os.path.join(tempfile.mkdtemp(), "bridge.keras")
    model.save(path)
    loaded = keras.models.load_model(path, compile=False)
    out["loaded"] = float(np.abs(np.asarray(loaded(big)) - got).max())
    # An EfficientNet one, whose .keras file names sm's own FixedDropout and swish (loaded in another process).
    eff = build_model(ModelConfig(arch="sm.Unet", backbone="efficientnetb0", input_shape=(64, 64, 3), classes=1,
                                  encoder_weights=None))
    out["effb0"] = os.path.join(os.path.dirname(path), "sm_effb0.keras")
    eff.save(out["effb0"])
    np.save(out["effb0"] + ".npy", np.asarray(eff(big)))
    np.save(out["effb0"] + ".in.npy", big)
    print("RESULT " + json.dumps(out))
""")


@pytest.fixture(scope="module")
def bridge_results() -> dict:
    require_sm()
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], env=sm_env(), capture_output=True, text=True,
                          timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.parametrize("backbone", sorted(FAMILIES))
def test_bridge_preprocessing_equals_sm_get_preprocessing(bridge_results, backbone):
    """vgg16/vgg19 (caffe: RGB -> BGR, minus the BGR mean), torch, tf and none: same numbers as sm's."""
    result = bridge_results["backbones"][backbone]
    assert result["diff"] <= 1e-4, f"{backbone} ({FAMILIES[backbone]}): max |tfseg - sm| = {result['diff']}"
    assert result["identity"] == (FAMILIES[backbone] == "none")
    assert (result["changed"] > 1.0) == (FAMILIES[backbone] != "none")  # the image really is transformed


def test_bridge_preprocessing_equals_sm_for_every_sm_backbone(bridge_results):
    backbones = bridge_results["backbones"]
    assert len(backbones) > 25 and set(FAMILIES) <= set(backbones)
    wrong = {name: r["diff"] for name, r in backbones.items() if not r["diff"] <= 1e-4}
    assert not wrong, wrong


def test_bridged_vgg16_is_sm_model_on_sm_preprocessed_input_and_loads_without_custom_objects(bridge_results):
    assert bridge_results["preprocess_layer"] <= 1e-4
    assert bridge_results["model"] <= 1e-5 * max(1.0, bridge_results["model_scale"])
    assert bridge_results["loaded"] == 0.0


_LOAD_SM_CHECKPOINT = textwrap.dedent("""
    import os, sys
    import keras
    import numpy as np
    path = sys.argv[1]
    assert "SM_FRAMEWORK" not in os.environ and "segmentation_models" not in sys.modules
    try:
        keras.models.load_model(path, compile=False)
        print("keras alone: loaded")
    except Exception as err:
        print("keras alone: " + type(err).__name__)
    from tfseg.inference import load_model
    model = load_model(path)
    print("diff", float(np.abs(np.asarray(model(np.load(path + ".in.npy"))) - np.load(path + ".npy")).max()))
""")


def test_a_run_of_sm_efficientnet_loads_for_predict_and_evaluate_without_importing_sm_first(bridge_results):
    """The tester's bug: a run trained with model.arch sm.Unet on efficientnetb0 could not be predicted or
    evaluated, as its .keras file refers to sm's FixedDropout and swish, which Keras finds only once
    segmentation_models is imported. tfseg's loader imports it when the file names its modules."""
    env = sm_env()
    env.pop("SM_FRAMEWORK")
    proc = subprocess.run([sys.executable, "-c", _LOAD_SM_CHECKPOINT, bridge_results["effb0"]], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert "keras alone: TypeError" in lines  # what predict and evaluate used to run into
    assert float(next(x for x in lines if x.startswith("diff ")).split()[1]) == 0.0
