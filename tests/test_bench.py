"""The benchmarks' shared driver and bench/gpu_train.py's FLOP counts (the GPU runs themselves are not
tests: they need a lent accelerator, and timings do not belong in tests)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import benchlib  # noqa: E402
import gpu_train  # noqa: E402
import train_step  # noqa: E402

# A worker of the interleaved-rounds protocol: "ready" once, then one reply per "run" line, the
# reply numbering the calls so that the test can check the order of the rounds.
WORKER = """
import json, sys
name = sys.argv[1]
print("library chatter that is not a reply")
print("@@" + json.dumps({"ready": name, "first_step_s": 0.5}), flush=True)
n = 0
for line in sys.stdin:
    if line.strip() != "run":
        break
    n += 1
    if name == "dies" and n == 2:
        sys.exit(3)
    print("@@" + json.dumps({"img_s": float(n) + (10 if name == "b" else 0)}), flush=True)
"""


def test_interleaved_rounds_collects_each_variants_rounds(capsys):
    seen = []
    ready, speeds = benchlib.interleaved_rounds(
        ["a", "b"], lambda v: [sys.executable, "-c", WORKER, v], lambda v: None, rounds=3,
        on_reply=lambda v, answer: seen.append((v, answer["img_s"])))
    assert ready == {"a": {"ready": "a", "first_step_s": 0.5}, "b": {"ready": "b", "first_step_s": 0.5}}
    assert speeds == {"a": [1.0, 2.0, 3.0], "b": [11.0, 12.0, 13.0]}
    assert seen == [("a", 1.0), ("b", 11.0), ("b", 12.0), ("a", 2.0), ("a", 3.0), ("b", 13.0)]  # order rotates
    assert "a: first step after 0.5 s" in capsys.readouterr().out


def test_interleaved_rounds_names_a_worker_that_stops():
    with pytest.raises(SystemExit, match=r"variant dies stopped in round 2 \(exit 3\)"):
        benchlib.interleaved_rounds(["ok", "dies"], lambda v: [sys.executable, "-c", WORKER, v],
                                    lambda v: None, rounds=3)
    with pytest.raises(SystemExit, match=r"variant mute failed to start \(exit 0\)"):
        benchlib.interleaved_rounds(["mute"], lambda v: [sys.executable, "-c", "pass"], lambda v: None, rounds=1)


def test_keras_flop_count_by_layer_shapes():
    import keras

    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same")(inputs)  # 8*8*4 outputs x 3*3*3 = 6912 MACs
    x = keras.layers.DepthwiseConv2D(3, strides=2, padding="same")(x)  # 4*4*4 x 3*3 = 576
    x = keras.layers.Conv2DTranspose(2, 2, strides=2)(x)  # 4*4*4 inputs x 2*2*2 = 512
    x = keras.layers.Dense(5)(x)  # 8*8*5 x 2 = 640
    inner = keras.Model(inputs, x)
    outer_in = keras.Input((8, 8, 3))
    model = keras.Model(outer_in, keras.layers.Conv2D(1, 1)(inner(outer_in)))  # nested + 8*8*1 x 5 = 320
    assert gpu_train.keras_training_gflops(model) * 1e9 == pytest.approx(6 * (6912 + 576 + 512 + 640 + 320))


@pytest.mark.slow
def test_keras_flop_count_gives_the_reference_figure_for_unet_effb5():
    """The count convention reproduces issue #3's 205.7 training GFLOPs/image (sm-style U-Net B5, 512)."""
    from tfseg.models.unet import Unet

    model = Unet("efficientnetb5", input_shape=(512, 512, 3), classes=1, encoder_weights=None)
    assert gpu_train.keras_training_gflops(model) == pytest.approx(205.7, abs=0.05)


def test_torch_flop_count_by_forward_hooks():
    torch = pytest.importorskip("torch")

    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1),  # 8*8*4 x 3*3*3 = 6912 MACs per image
        torch.nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=4),  # 4*4*4 x 3*3 = 576
        torch.nn.ConvTranspose2d(4, 2, 2, stride=2),  # 4*4*4 inputs x 2*2*2 = 512
        torch.nn.Flatten(),
        torch.nn.Linear(128, 5),  # 5 x 128 = 640
    )
    gflops = gpu_train.torch_training_gflops(model, torch.zeros(2, 3, 8, 8))
    assert gflops * 1e9 == pytest.approx(6 * (6912 + 576 + 512 + 640))
    assert not any(m._forward_hooks for m in model.modules())


@pytest.mark.slow
def test_gpu_benchmark_runs_end_to_end_on_the_cpu():
    """The whole script at a CPU size: tfseg on JAX, and smp eager where segmentation_models_pytorch is
    installed (it is not a dependency)."""
    if importlib.util.find_spec("jax") is None:
        pytest.skip("jax not installed: bench/gpu_train.py runs tfseg on Keras' JAX backend")
    with_smp = importlib.util.find_spec("segmentation_models_pytorch") is not None
    variants = ["tfseg-jax", "smp-eager"] if with_smp else ["tfseg-jax"]
    proc = subprocess.run(
        [sys.executable, "bench/gpu_train.py", "--encoder", "efficientnetb0", "--size", "64", "--batch", "2",
         "--rounds", "2", "--steps", "1", "--warmup", "1", "--batches", "1", "--variants", ",".join(variants)],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines()
            if line.startswith(tuple(f"{v} " for v in variants))}
    assert set(rows) == set(variants)
    assert all(float(row[2]) > 0 for row in rows.values()), rows
    if with_smp:
        assert "against tfseg-jax: smp-eager" in proc.stdout


def test_gpu_benchmark_rejects_an_unknown_variant():
    proc = subprocess.run([sys.executable, "bench/gpu_train.py", "--variants", "tfseg-jax,smp-eagre"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "unknown variant(s) smp-eagre: expected some of tfseg-jax, smp-eager, smp-compile" in proc.stderr
    assert "Traceback" not in proc.stderr


# A convolution and a depthwise convolution, forward and both backward passes, under ONEDNN_VERBOSE.
ONEDNN_RUN = """
import tensorflow as tf
x = tf.random.normal([2, 8, 8, 3])
w = tf.random.normal([3, 3, 3, 4])
dw = tf.random.normal([3, 3, 4, 1])

@tf.function
def step(x, w, dw):
    with tf.GradientTape() as tape:
        tape.watch([x, w, dw])
        y = tf.nn.depthwise_conv2d(tf.nn.conv2d(x, w, 1, "SAME"), dw, [1, 2, 2, 1], "SAME")
        loss = tf.reduce_sum(y * y)
    return tape.gradient(loss, [x, w, dw])

step(x, w, dw)
print("@@timed", flush=True)
step(x, w, dw)
"""


@pytest.mark.slow  # 12 s; make test keeps the parser's test on a descriptor it cannot read
def test_kernel_table_counts_real_onednn_verbose_lines():
    """bench/train_step.py --kernels parses the verbose lines TensorFlow's oneDNN prints for a real step."""
    proc = subprocess.run([sys.executable, "-c", ONEDNN_RUN], capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "ONEDNN_VERBOSE": "1", "TF_CPP_MIN_LOG_LEVEL": "3",
                               "TF_NUM_INTEROP_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.split("@@timed", 1)[-1].splitlines()
    if not any("exec" in line for line in lines):
        pytest.skip("this TensorFlow build does not run convolutions through oneDNN")
    table = train_step.kernel_table(lines, steps=1)
    conv = 2 * 2 * 8 * 8 * 3 * 4 * 9 / 1e9  # 2 x MACs: batch 2, 8x8 out, 3 -> 4 channels, 3x3
    depthwise = 2 * 2 * 4 * 4 * 4 * 9 / 1e9  # stride 2: 4x4 out, 4 channels, one 3x3 tap set each
    assert set(table["conv"]) == {f"{p}, {s}" for p in ("forward_training", "backward_data", "backward_weights")
                                  for s in ("kxk", "dw")}
    for key, (ms, gflops) in table["conv"].items():
        assert gflops == pytest.approx(conv if key.endswith("kxk") else depthwise), key
        assert ms > 0
    assert table["kinds"]["convolution"] == pytest.approx(sum(ms for ms, _ in table["conv"].values()))
    assert train_step.kernel_table(lines, steps=2)["conv"]["backward_data, dw"][1] == pytest.approx(depthwise / 2)


def test_kernel_table_names_a_descriptor_it_cannot_read():
    line = "onednn_verbose,v1,primitive,exec,cpu,convolution,jit:avx512_core,forward_training,src:f32,,,ic3oc4_odd,1.5"
    with pytest.raises(ValueError, match="unparsed oneDNN convolution descriptor 'ic3oc4_odd'"):
        train_step.kernel_table([line], steps=1)
