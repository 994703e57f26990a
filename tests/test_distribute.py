"""Strategy choice (mocked TPU / JAX), global batch checks, and real multi-device runs on CPU."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import pytest

from tfseg import distribute
from tfseg.errors import ConfigError, RunError

ROOT = Path(__file__).resolve().parents[1]


def test_no_tpu_is_quick_and_silent(monkeypatch):
    for var in ("TPU_NAME", "COLAB_TPU_ADDR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(distribute.glob, "glob", lambda pattern: [])
    assert distribute.tpu_address() is None
    assert distribute.detect_tpu() is None
    dist = distribute.setup_distribution("auto")
    assert dist.kind == "default" and dist.replicas == 1 and dist.is_chief
    with pytest.raises(RunError, match="no TPU is attached"):
        distribute.choose_strategy("tpu")


def test_tpu_address_from_the_environment(monkeypatch):
    monkeypatch.setattr(distribute.glob, "glob", lambda pattern: [])
    monkeypatch.delenv("TPU_NAME", raising=False)
    monkeypatch.setenv("COLAB_TPU_ADDR", "10.0.0.2:8470")
    assert distribute.tpu_address() == "grpc://10.0.0.2:8470"
    monkeypatch.setenv("TPU_NAME", "local")
    assert distribute.tpu_address() == "local"
    monkeypatch.delenv("TPU_NAME")
    monkeypatch.delenv("COLAB_TPU_ADDR")
    monkeypatch.setattr(distribute.glob, "glob", lambda pat: ["/dev/accel0"] if "accel" in pat else [])
    assert distribute.tpu_address() == "local"


def test_auto_uses_the_tpu_when_the_resolver_connects(monkeypatch):
    import tensorflow as tf

    made = {}

    class FakeTPUStrategy:
        num_replicas_in_sync = 8

        def __init__(self, resolver):
            made["resolver"] = resolver

    monkeypatch.setattr(distribute, "detect_tpu", lambda: "resolver")
    monkeypatch.setattr(tf.distribute, "TPUStrategy", FakeTPUStrategy)
    strategy = distribute.choose_strategy("auto")
    assert isinstance(strategy, FakeTPUStrategy) and made["resolver"] == "resolver"


def test_bad_names_and_tf_config(monkeypatch):
    with pytest.raises(ConfigError, match="did you mean 'mirrored'"):
        distribute.choose_strategy("mirored")
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ConfigError, match="needs the TF_CONFIG"):
        distribute.choose_strategy("multiworker")
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(ConfigError, match="TF_CONFIG: expected JSON"):
        distribute.choose_strategy("multiworker")


def test_global_batch():
    assert distribute.global_batch_size(16, 8) == 128
    with pytest.raises(ConfigError, match="train.batch_size"):
        distribute.global_batch_size(0, 2)


def test_jax_choice_logic_with_mocked_devices(monkeypatch):
    """The JAX path's choice logic (JAX itself is not installed here: untested on real JAX)."""

    class FakeDataParallel:
        def __init__(self, devices):
            self.devices = devices

    monkeypatch.setattr(keras.distribution, "DataParallel", FakeDataParallel)
    two = ["tpu:0", "tpu:1"]
    assert distribute.choose_jax_distribution("auto", devices=two).devices == two
    assert distribute.choose_jax_distribution("auto", devices=["cpu:0"]) is None
    assert distribute.choose_jax_distribution("default", devices=two) is None
    with pytest.raises(RunError, match="sees no TPU"):
        distribute.choose_jax_distribution("tpu", devices=["gpu:0", "gpu:1"])
    with pytest.raises(ConfigError, match="TensorFlow-only"):
        distribute.choose_jax_distribution("multiworker", devices=two)


MIRRORED_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    from tfseg.distribute import prepare_training, setup_distribution
    from tfseg.losses import build_loss
    from tfseg.metrics import build_metrics

    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (16, 16, 16, 3)).astype("float32")
    y = (x.mean(-1, keepdims=True) > 127).astype("float32")

    def run(name):
        dist = setup_distribution(name)
        with dist.scope():
            keras.utils.set_random_seed(1)
            inp = keras.Input((16, 16, 3))
            h = keras.layers.Rescaling(1 / 255)(inp)
            h = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(h)
            out = keras.layers.Conv2D(1, 1, activation="sigmoid")(h)
            model = keras.Model(inp, out)
            model.compile(keras.optimizers.Adam(0.05), loss=build_loss({"bce_dice": 1.0}),
                          metrics=build_metrics(["dice_coe", "dice", "pixel_accuracy"]))
            prepared = prepare_training(model)  # the fused Adam updates each replica's variables
        ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
        losses = [float(model.train_on_batch(xb, yb, return_dict=True)["loss"]) for xb, yb in ds.repeat(2)]
        scores = model.evaluate(ds, return_dict=True, verbose=0)
        return {"kind": dist.kind, "replicas": dist.replicas, "losses": losses, "scores": scores,
                "prepared": prepared}

    print("RESULT " + json.dumps({"default": run("default"), "mirrored": run("mirrored")}))
""")


@pytest.mark.slow  # a TensorFlow subprocess: about 30 s alone, more on a loaded machine
def test_mirrored_over_two_cpu_devices_matches_single_device():
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-c", MIRRORED_SCRIPT], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    single, mirrored = result["default"], result["mirrored"]
    assert mirrored["kind"] == "mirrored" and mirrored["replicas"] == 2
    assert single["replicas"] == 1
    assert single["prepared"]["optimizer"] and mirrored["prepared"]["optimizer"]
    assert single["losses"][0] > single["losses"][-1]  # it learns
    assert mirrored["losses"] == pytest.approx(single["losses"], rel=1e-3, abs=1e-4)
    for name in ("dice_coe", "dice", "pixel_accuracy", "loss"):  # metric sums across replicas
        assert mirrored["scores"][name] == pytest.approx(single["scores"][name], rel=1e-4, abs=1e-5)


MIRRORED_FIT_SCRIPT = textwrap.dedent("""
    import json, sys
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from pathlib import Path
    from tests.test_train import tiny_config
    from tfseg.config import load_config
    from tfseg.train import train_fold

    cfg = load_config(tiny_config(Path(sys.argv[1]), epochs=4, strategy="mirrored", batch_size=2,
                                  steps_per_execution=4))
    result = train_fold(cfg, 0, verbose=0)
    print("RESULT " + json.dumps(result))
""")


def test_tfseg_train_under_a_mirrored_strategy_validates_every_epoch(tmp_path):
    """Keras 3.15 under a tf.distribute strategy pulled a batch from the cached validation iterator
    in every evaluate; with validation_steps set, the fold's one validation batch ran out and fit
    stopped with StopIteration at the third epoch (multi-GPU and TPU runs). tfseg.distribute.prebuild
    builds from the element spec instead. train.steps_per_execution > 1 fails there too, inside Keras'
    multi-step loop (keras-team/keras#19246): it runs as 1, and the run says so."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-c", MIRRORED_FIT_SCRIPT, str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(mirrored, 2 replica(s))" in proc.stderr
    assert "train.steps_per_execution=4 runs as 1 under MirroredStrategy" in proc.stderr
    result = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))[len("RESULT "):])
    assert result["epochs"] == 4 and result["n_val"] == 4
    import csv

    with open(Path(result["fold_dir"]) / "history.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2, 3]
    assert all(r["val_loss"] and r["val_dice_coe"] for r in rows)  # validated every epoch


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.mark.slow
def test_multiworker_two_processes_train_one_epoch_together(tmp_path):
    """The real ``tfseg train`` in two worker processes on 127.0.0.1 (TF_CONFIG), bounded, cleaned up."""
    from tests.test_train import tiny_config
    from tfseg.config import load_config
    from tfseg.data.tfrecord import write_tfrecords

    params = tiny_config(tmp_path, epochs=1, strategy="multiworker")
    write_tfrecords(load_config(params).data, progress=False)  # before the workers, not by both
    workers = [f"127.0.0.1:{p}" for p in _free_ports(2)]
    procs = []
    try:
        for index in range(2):
            tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
            env = {**os.environ, "TF_CONFIG": json.dumps(tf_config), "TF_CPP_MIN_LOG_LEVEL": "2",
                   "CUDA_VISIBLE_DEVICES": ""}
            procs.append(subprocess.Popen([sys.executable, "-m", "tfseg", "train", "--config", str(params),
                                           "--fold", "0"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))
        outputs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for proc, out in zip(procs, outputs):
        assert proc.returncode == 0, out[-3000:]
        assert "(multiworker, 2 replica(s))" in out
    losses = [[ln.split(" - loss: ")[1].split(" ")[0] for ln in out.splitlines() if " - loss: " in ln]
              for out in outputs]
    assert losses[0] and losses[0] == losses[1]  # one all-reduced model
    fold_dir = tmp_path / "runs" / "tiny" / "fold0"
    assert (fold_dir / "best.keras").is_file() and (fold_dir / "history.csv").is_file()
    assert json.loads((tmp_path / "runs" / "tiny" / "summary.json").read_text())["folds"]["0"]["epochs"] == 1
    assert len(list(fold_dir.glob(".worker-*"))) == 1  # the other worker wrote beside the chief


def _bn_net(seed: int = 1):
    """Conv -> BN -> ReLU -> BN (no center, other momentum) inside a nested model -> sigmoid conv."""
    keras.utils.set_random_seed(seed)
    inner_in = keras.Input((16, 16, 8))
    inner = keras.Model(inner_in, keras.layers.BatchNormalization(momentum=0.9, center=False)(inner_in),
                        name="encoder")
    inp = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(8, 3, padding="same")(inp)
    x = keras.layers.Activation("relu")(keras.layers.BatchNormalization()(x))
    out = keras.layers.Conv2D(1, 1, activation="sigmoid")(inner(x))
    model = keras.Model(inp, out)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="binary_crossentropy")
    return model


def _ops(model, training: bool) -> list[str]:
    import tensorflow as tf

    fn = tf.function(lambda x: model(x, training=training))
    return [op.type for op in fn.get_concrete_function(tf.TensorSpec((2, 16, 16, 3))).graph.get_operations()]


@pytest.mark.parametrize("policy", [None, "mixed_bfloat16"])
def test_fused_batch_norm_trains_exactly_as_keras_batch_norm(policy, tmp_path):
    """The fused kernel gives Keras 3's losses, weights and moving statistics, nested layers too."""
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.normal(1.0, 3.0, (4, 16, 16, 3)).astype("float32")
    y = (x[..., :1] > 1).astype("float32")
    try:
        keras.mixed_precision.set_global_policy(policy or "float32")
        plain, fused = _bn_net(), _bn_net()
        assert distribute.fuse_batch_norm(fused) == 2 and distribute.fuse_batch_norm(fused) == 0  # once
        for model, count in ((plain, 0), (fused, 2)):  # the fused kernel is what actually runs
            assert _ops(model, training=True).count("FusedBatchNormV3") == count
            assert _ops(model, training=False).count("FusedBatchNormV3") == count
        tol = 1e-5 if policy is None else 2e-2
        for _ in range(3):
            np.testing.assert_allclose(fused.train_on_batch(x, y), plain.train_on_batch(x, y), rtol=tol)
        for a, b in zip(plain.weights, fused.weights):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=tol, atol=tol, err_msg=a.path)
        moved = [w for w in fused.weights if "moving_variance" in w.path]
        assert all(np.abs(np.asarray(w) - 1.0).max() > 0.01 for w in moved)  # the statistics did move
        np.testing.assert_allclose(fused.predict(x, verbose=0), plain.predict(x, verbose=0), atol=tol)
        # the saved file is a plain Keras model: it reloads and predicts the same
        fused.save(tmp_path / "m.keras")
        again = keras.models.load_model(tmp_path / "m.keras")
        np.testing.assert_allclose(again.predict(x, verbose=0), fused.predict(x, verbose=0), atol=1e-6)
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_fused_batch_norm_leaves_other_backends_and_layers_alone(monkeypatch):
    model = _bn_net()
    renorm = keras.Sequential([keras.Input((4, 4, 2)), keras.layers.BatchNormalization(renorm=True)])
    assert distribute.fuse_batch_norm(renorm) == 0
    monkeypatch.setattr(keras.config, "backend", lambda: "jax")
    assert distribute.fuse_batch_norm(model) == 0
    from tfseg.models.common import all_layers

    assert not any("call" in vars(layer) for layer in all_layers(model))


def test_optimizer_built_before_the_first_step_traces_the_step_once(count_traces):
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(0)
    x = rng.normal(1.0, 3.0, (4, 16, 16, 3)).astype("float32")
    y = (x[..., :1] > 1).astype("float32")
    data = tf.data.Dataset.from_tensors((x, y)).repeat()
    plain, built = _bn_net(), _bn_net()
    for model in (plain, built):
        model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="binary_crossentropy")
    assert distribute.build_optimizer_state(built) and not distribute.build_optimizer_state(built)
    assert len(built.optimizer.variables) > 1  # the moments exist before any step
    traces = {}
    for name, model in (("plain", plain), ("built", built)):
        traces[name] = count_traces(model)
        model.fit(data, steps_per_epoch=3, epochs=2, verbose=0, shuffle=False)
    # Keras alone traces the first step twice (variables created inside it); built first: once
    assert traces["plain"][0] == 2 and traces["built"][0] == 1
    for a, b in zip(plain.weights + plain.optimizer.variables, built.weights + built.optimizer.variables):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6, err_msg=a.path)
    assert int(built.optimizer.iterations) == 6


@pytest.mark.parametrize("make", [
    lambda: keras.optimizers.Adam(1e-2),
    lambda: keras.optimizers.AdamW(1e-2, weight_decay=0.05),
    lambda: keras.optimizers.SGD(0.05, momentum=0.9, nesterov=True),
    lambda: keras.optimizers.SGD(0.05),
], ids=["adam", "adamw", "sgd-nesterov", "sgd"])
def test_fused_optimizer_kernel_updates_as_keras_does(make):
    import numpy as np
    import tensorflow as tf

    def net():  # no bias before a BatchNorm: its gradient would be rounding noise, which Adam scales up
        keras.utils.set_random_seed(3)
        inp = keras.Input((16, 16, 3))
        x = keras.layers.Conv2D(8, 3, padding="same", use_bias=False)(inp)
        x = keras.layers.Activation("relu")(keras.layers.BatchNormalization()(x))
        model = keras.Model(inp, keras.layers.Conv2D(1, 1, activation="sigmoid")(x))
        model.compile(optimizer=make(), loss="binary_crossentropy")
        return model

    rng = np.random.default_rng(0)
    x = rng.normal(1.0, 3.0, (4, 16, 16, 3)).astype("float32")
    y = (x[..., :1] > 1).astype("float32")
    plain, fused = net(), net()
    assert distribute.fuse_optimizer(fused.optimizer) and not distribute.fuse_optimizer(fused.optimizer)
    for _ in range(3):
        np.testing.assert_allclose(fused.train_on_batch(x, y), plain.train_on_batch(x, y), rtol=1e-5)
    for a, b in zip(plain.weights + plain.optimizer.variables, fused.weights + fused.optimizer.variables):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6, err_msg=a.path)
    assert not np.allclose(np.asarray(plain.weights[0]), np.asarray(net().weights[0]))  # it trained
    # one kernel op per variable is what runs
    kernel = "ResourceApplyAdam"
    if isinstance(fused.optimizer, keras.optimizers.SGD):
        kernel = "ResourceApplyKerasMomentum" if fused.optimizer.momentum else "ResourceApplyGradientDescent"
    grads = [tf.ones_like(v.value) for v in fused.trainable_variables]
    graph = tf.function(lambda: fused.optimizer.apply(grads, fused.trainable_variables)).get_concrete_function().graph
    ops = [op.type for op in graph.get_operations()]
    assert ops.count(kernel) == len(fused.trainable_variables)


def test_fused_optimizer_leaves_the_rest_to_keras(monkeypatch):
    assert not distribute.fuse_optimizer(keras.optimizers.Adam(amsgrad=True))
    assert not distribute.fuse_optimizer(keras.optimizers.RMSprop())

    class ClippedAdam(keras.optimizers.Adam):  # a user's own update must not be replaced
        def update_step(self, gradient, variable, learning_rate):
            super().update_step(keras.ops.clip(gradient, -1.0, 1.0), variable, learning_rate)

    assert not distribute.fuse_optimizer(ClippedAdam())
    assert not distribute.fuse_optimizer(None)
    scaled = keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam())
    assert distribute.fuse_optimizer(scaled) and "update_step" in vars(scaled.inner_optimizer)
    monkeypatch.setattr(keras.config, "backend", lambda: "jax")
    assert not distribute.fuse_optimizer(keras.optimizers.Adam())
