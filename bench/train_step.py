"""Training images/s: tfseg's ``unet`` (Keras 3) against ``sm.Unet`` (segmentation_models on tf_keras).

Each variant runs in its own process (built one after another, so the time to the first step is
measured on an otherwise idle benchmark), then the rounds are interleaved: every round runs
``--steps`` training steps in each process in turn, rotating the order. The figures are the
median images/s over the rounds, and the time from process start to the end of the first training
step (import + build + compile + trace + one step).

Two ways of stepping (``--mode``):
    fit    one ``model.fit`` over a repeated in-memory tf.data batch, as training runs; epoch 0
           (``--steps`` steps, the first included) is the warm-up, then one epoch per round.
    batch  ``model.train_on_batch`` on the numpy batch: the first step, ``--warmup`` more, then
           ``--steps`` calls per round. Each call also pays the framework's per-call overhead
           (tf_keras builds a data handler per call), so this mode favours Keras 3.

All variants train the same U-Net on the same random batch (images uint8-valued floats, masks
from a fixed pattern) with Adam(1e-3) and binary cross-entropy, ``encoder_weights=None``.

Variants:
    sm            sm.Unet on tf_keras (TF_USE_LEGACY_KERAS=1): Keras 2, fused BatchNorm.
    sm-unfused    the same with tf_keras' BatchNormalization forced to fused=False.
    sm-keras3     sm.Unet on Keras 3 (SM_FRAMEWORK=tf.keras without the legacy switch).
    tfseg         tfseg.models.unet.Unet on Keras 3 (TensorFlow backend) as ``tfseg train`` runs it
                  (tfseg.distribute.prepare_training): BatchNorm and Adam through TensorFlow's fused
                  kernels, the optimizer built before the first step.
    tfseg-keras3  the same model with none of that: Keras 3 as it comes.
    tfseg-unfused tfseg less the fused BatchNorm (Keras 3's own BatchNormalization call).
    tfseg-keras-adam  tfseg less the fused Adam (Keras 3's per-variable update ops).
    tfseg-unbuilt tfseg less the early optimizer build (Keras traces the first step twice).
    tfseg-bf16    tfseg with the mixed_bfloat16 policy (train.mixed_precision; AMX on this CPU).
    tfseg-xla     tfseg compiled with jit_compile=True.
    tfseg-jax, tfseg-torch  tfseg's model on Keras' JAX or PyTorch backend (KERAS_BACKEND), compiled as
                  ``tfseg train`` compiles it there (the optimizer built first; the fused kernels are
                  TensorFlow's; on JAX the step is jax.jit-compiled), fed by the same tf.data pipeline.
    tfseg-jax-eager   tfseg-jax with jit_compile=False: Keras runs the JAX step op by op.
    <variant>-interop1  any of these with TF_NUM_INTEROP_THREADS=1 (TensorFlow runs one op at a time,
                  each on both cores; the default lets independent ops share them).
    <variant>-fusible   any of these with TensorFlow's auto-clustering of the element-wise ops only
                  (TF_XLA_FLAGS: --tf_xla_auto_jit=2 --tf_xla_cpu_global_jit
                  --tf_xla_ops_to_cluster=FUSIBLE): XLA fuses the chains of element-wise ops between
                  the convolutions, which stay oneDNN's.

Usage (``--bn-micro`` times one BatchNormalization layer, Keras 3 against tf_keras fused/unfused;
``--profile`` sums the op time of a training step by op type for each variant; ``--kernels`` times
every oneDNN kernel of a step (``ONEDNN_VERBOSE``, one op at a time) and gives the convolutions'
achieved GFLOP/s against this machine's float32 matmul rate):
    python3 bench/train_step.py --bn-micro --size 256 --batch 8 --rounds 5
    python3 bench/train_step.py --profile --size 256 --batch 8 --steps 3 --variants sm,tfseg
    python3 bench/train_step.py --mode fit --size 256 --batch 8 --rounds 7 --steps 3 \
        --variants sm,tfseg,tfseg-keras3,tfseg-unfused,tfseg-keras-adam,tfseg-unbuilt
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchlib import interleaved_rounds, machine, reply, say, serve_rounds

T0 = time.perf_counter()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(variant: str) -> dict:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": ROOT}
    env.pop("TF_USE_LEGACY_KERAS", None)
    if variant.endswith("-interop1"):
        env["TF_NUM_INTEROP_THREADS"] = "1"
        variant = variant.removesuffix("-interop1")
    if variant.endswith("-fusible"):
        env["TF_XLA_FLAGS"] = "--tf_xla_auto_jit=2 --tf_xla_cpu_global_jit --tf_xla_ops_to_cluster=FUSIBLE"
        variant = variant.removesuffix("-fusible")
    if variant.startswith("sm"):
        env["SM_FRAMEWORK"] = "tf.keras"
        if variant != "sm-keras3":
            env["TF_USE_LEGACY_KERAS"] = "1"
    env["KERAS_BACKEND"] = {"tfseg-jax": "jax", "tfseg-jax-eager": "jax", "tfseg-torch": "torch"}.get(
        variant, "tensorflow")
    return env


def _data(size: int, batch: int):
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (batch, size, size, 3)).astype("float32")
    yy, xx = np.mgrid[:size, :size]
    y = np.broadcast_to(((xx + yy) % 64 < 32)[None, ..., None], (batch, size, size, 1)).astype("float32")
    return x, y


def _build(variant: str, size: int):
    """Return (model, input preprocessing for numpy images in 0..255)."""
    if variant.startswith("sm"):
        if variant == "sm-unfused":
            import tf_keras

            bn_init = tf_keras.layers.BatchNormalization.__init__

            def unfused(self, *args, **kwargs):
                kwargs["fused"] = False
                bn_init(self, *args, **kwargs)

            tf_keras.layers.BatchNormalization.__init__ = unfused
        import segmentation_models as sm

        model = sm.Unet("efficientnetb0", input_shape=(size, size, 3), classes=1, encoder_weights=None)
        return model, sm.get_preprocessing("efficientnetb0")
    import keras

    from tfseg.models.unet import Unet

    if variant == "tfseg-bf16":
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
    model = Unet("efficientnetb0", input_shape=(size, size, 3), classes=1, encoder_weights=None)
    return model, lambda x: x  # tfseg normalizes inside the model


def worker(args) -> None:
    """Build, compile, take the first step, warm up, then run rounds on request from stdin."""
    import numpy as np

    variant = args.worker.removesuffix("-interop1").removesuffix("-fusible")
    model, prep = _build(variant, args.size)
    keras = sys.modules[type(model).__module__.split(".")[0]]
    x, y = _data(args.size, args.batch)
    x = prep(x.copy()).astype("float32")
    jit = {"tfseg-xla": True, "tfseg-jax": True, "tfseg-jax-eager": False}.get(variant)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy",
                  **({} if jit is None else {"jit_compile": jit}))
    if variant.startswith("tfseg"):  # as tfseg train prepares it, less the part a variant turns off
        from tfseg.distribute import prepare_training

        plain = variant == "tfseg-keras3"
        prepare_training(model, batch_norm=not plain and variant != "tfseg-unfused",
                         optimizer=not plain and variant != "tfseg-keras-adam",
                         build=not plain and variant != "tfseg-unbuilt")
    if args.profile:
        _profile_worker(model, x, y, args)
        return
    if args.mode == "fit" or args.kernels:
        _fit_worker(model, keras, x, y, args)
        return
    loss = float(np.asarray(model.train_on_batch(x, y)).ravel()[0])
    first = time.perf_counter() - T0
    for _ in range(args.warmup):
        model.train_on_batch(x, y)
    say(ready=args.worker, first_step_s=first, loss0=loss, keras=keras.__version__,
        params=int(model.count_params()))

    def run_round(steps: int) -> None:
        for _ in range(steps):
            model.train_on_batch(x, y)

    serve_rounds(run_round, args.steps, args.batch)


def _fit_worker(model, keras, x, y, args) -> None:
    """``--mode fit``: one fit call; epoch 0 warms up, each later epoch is a round run on request.

    With ``--kernels`` (ONEDNN_VERBOSE set by the parent) each round's verbose lines go to a file and
    the round's reply carries their :func:`kernel_table`; the ready reply, this machine's matmul rate."""
    import tensorflow as tf

    capture = _VerboseCapture() if args.kernels else None

    class Rounds(keras.callbacks.Callback):
        first = None
        started = 0.0

        def on_train_batch_end(self, batch, logs=None):
            if self.first is None:
                self.first = time.perf_counter() - T0

        def on_epoch_begin(self, epoch, logs=None):
            if epoch:
                sys.stdin.readline()  # the parent's "run"
                if capture:
                    capture.start()
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            seconds = time.perf_counter() - self.started
            if epoch == 0:
                extra = {"matmul_gflops": _matmul_gflops()} if capture else {}
                say(ready=args.worker, first_step_s=self.first, loss0=float(logs["loss"]),
                    keras=keras.__version__, params=int(self.model.count_params()), **extra)
            else:
                extra = {"kernels": kernel_table(capture.stop(), args.steps)} if capture else {}
                say(img_s=args.steps * args.batch / seconds, **extra)

    data = tf.data.Dataset.from_tensors((x, y)).repeat()
    model.fit(data, steps_per_epoch=args.steps, epochs=1 + args.rounds, verbose=0, callbacks=[Rounds()])


class _VerboseCapture:
    """Sends what C code writes to stdout (oneDNN's verbose lines) to a file between start() and stop(),
    and to /dev/null otherwise, while Python's ``print`` (the ``@@`` replies) keeps the real stdout."""

    def __init__(self):
        import ctypes

        self._fflush = ctypes.CDLL(None).fflush
        sys.stdout.flush()
        sys.stdout = os.fdopen(os.dup(1), "w", buffering=1)
        self._null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(self._null, 1)

    def start(self) -> None:
        import tempfile

        self._fflush(None)
        fd, self._path = tempfile.mkstemp(prefix="onednn-", suffix=".log")
        os.dup2(fd, 1)
        os.close(fd)

    def stop(self) -> list[str]:
        self._fflush(None)
        os.dup2(self._null, 1)
        path = Path(self._path)
        lines = path.read_text().splitlines()
        path.unlink()
        return lines


def _matmul_gflops() -> float:
    """This machine's float32 rate: a 4096x4096 matmul, median of 5."""
    import tensorflow as tf

    a = tf.random.normal([4096, 4096])
    matmul = tf.function(lambda a: tf.matmul(a, a))
    matmul(a).numpy()
    times = []
    for _ in range(5):
        t = time.perf_counter()
        matmul(a).numpy()
        times.append(time.perf_counter() - t)
    return 2 * 4096**3 / statistics.median(times) / 1e9


def _profile_worker(model, x, y, args) -> None:
    """``--profile``: op time per step by op type (TensorFlow profiler), over ``--steps`` fit steps."""
    import collections
    import glob
    import tempfile

    import tensorflow as tf
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    data = tf.data.Dataset.from_tensors((x, y)).repeat()
    model.fit(data, steps_per_epoch=2, epochs=1, verbose=0)  # trace and warm up
    with tempfile.TemporaryDirectory() as logdir:
        tf.profiler.experimental.start(logdir)
        model.fit(data, steps_per_epoch=args.steps, epochs=1, verbose=0)
        tf.profiler.experimental.stop()
        space = xplane_pb2.XSpace()
        space.ParseFromString(Path(glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True)[0]).read_bytes())
    by_type = collections.Counter()
    for plane in space.planes:
        for line in plane.lines:
            for event in line.events:
                name = plane.event_metadata[event.metadata_id].name  # "scope/op_name:OpType" for ops
                if ":" in name and "/" in name:
                    by_type[name.rsplit(":", 1)[-1]] += event.duration_ps / 1e12 / args.steps
    say(ready=args.worker, op_s=by_type)


def profile(args, variants, base: list[str]) -> None:
    """Op time per training step by op type, each variant in its own process, side by side."""
    tables = {}
    for v in variants:
        p = subprocess.Popen([*base, "--profile", "--worker", v], stdout=subprocess.PIPE, text=True, env=_env(v),
                             cwd=ROOT)
        answer = reply(p)
        if p.wait() or answer is None:
            raise SystemExit(f"variant {v} failed (exit {p.returncode})")
        tables[v] = answer["op_s"]
    conv = {v: sum(t for k, t in ops.items() if "Conv" in k) for v, ops in tables.items()}
    total = {v: sum(ops.values()) for v, ops in tables.items()}
    top = sorted({k for ops in tables.values() for k in ops}, key=lambda k: -max(o.get(k, 0) for o in tables.values()))
    print(f"\nop time per step, seconds (summed over threads; {args.steps} fit steps after 2):")
    print(f"{'op type':<48}" + "".join(f"{v:>14}" for v in variants))
    for k in top[:20]:
        print(f"{k:<48}" + "".join(f"{tables[v].get(k, 0):>14.3f}" for v in variants))
    print(f"{'all convolution ops':<48}" + "".join(f"{conv[v]:>14.3f}" for v in variants))
    print(f"{'all ops':<48}" + "".join(f"{total[v]:>14.3f}" for v in variants))


_CONV = re.compile(r"(?:g(\d+))?mb(\d+)_ic(\d+)oc(\d+)_(?:id\d+od\d+kd\d+\S*?_)?ih\d+oh(\d+)kh(\d+)"
                   r"\S*?_iw\d+ow(\d+)kw(\d+)")


def kernel_table(lines, steps: int) -> dict:
    """Per-step milliseconds of the oneDNN kernels in ``ONEDNN_VERBOSE`` lines (``exec`` lines only),
    by primitive kind; the convolutions also by pass and shape class (``kxk``, ``1x1``, ``dw``) with
    their GFLOPs (2 x multiply-adds, from the problem descriptor). Returns {"kinds": {kind: ms},
    "conv": {"pass, class": [ms, GFLOPs]}}, all per step."""
    kinds: dict = {}
    conv: dict = {}
    for line in lines:
        fields = line.rstrip("\n").split(",")
        if len(fields) < 8 or not fields[0].endswith("_verbose") or "exec" not in fields[:4]:
            continue
        at = fields.index("exec")
        kind, prop, desc = fields[at + 2], fields[at + 4], fields[-2]
        try:
            ms = float(fields[-1]) / steps
        except ValueError:
            continue
        kinds[kind] = kinds.get(kind, 0.0) + ms
        if kind != "convolution":
            continue
        m = _CONV.search(desc)
        if m is None:
            raise ValueError(f"unparsed oneDNN convolution descriptor {desc!r}")
        groups, mb, ic, oc, oh, kh, ow, kw = (int(v) if v else 1 for v in m.groups())
        gflops = 2 * mb * oh * ow * (ic // groups) * oc * kh * kw / 1e9 / steps
        shape = "dw" if groups > 1 else ("1x1" if kh == kw == 1 else "kxk")
        row = conv.setdefault(f"{prop}, {shape}", [0.0, 0.0])
        row[0] += ms
        row[1] += gflops
    return {"kinds": kinds, "conv": conv}


def kernels(args, variants, base: list[str]) -> None:
    """Every oneDNN kernel of a training step, each variant in its own process with one op at a time
    (so that a kernel's time is its own, not shared with a concurrent op), in interleaved rounds (the
    process that runs first on this machine is some 10 % faster); medians over the rounds."""
    rounds: dict = {v: [] for v in variants}
    ready, speeds = interleaved_rounds(
        variants, lambda v: [*base, "--kernels", "--worker", v],
        lambda v: {**_env(v), "ONEDNN_VERBOSE": "1", "TF_NUM_INTEROP_THREADS": "1"}, args.rounds, cwd=ROOT,
        on_reply=lambda v, answer: rounds[v].append(answer["kernels"]))

    tables = {}
    for v in variants:
        conv_keys = {k for r in rounds[v] for k in r["conv"]}
        kinds = {k for r in rounds[v] for k in r["kinds"]}
        tables[v] = {
            "conv": {k: tuple(statistics.median(r["conv"].get(k, (0.0, 0.0))[i] for r in rounds[v]) for i in (0, 1))
                     for k in conv_keys},
            "kinds": {k: statistics.median(r["kinds"].get(k, 0.0) for r in rounds[v]) for k in kinds}}
    peak = max(ready[v]["matmul_gflops"] for v in variants)
    conv_total = {v: [t["kinds"].get("convolution", 0.0), sum(g for _, g in t["conv"].values())]
                  for v, t in tables.items()}

    def cells(rows) -> str:  # "ms  GFLOP/s" per variant from (ms, GFLOPs) pairs; no rate where no FLOPs
        return "".join(f"{ms:>14.1f}" + (f"{gf / ms * 1e3:>9.0f}" if gf and ms else f"{'':>9}") for ms, gf in rows)

    def row(label: str, rows, gflops: float = 0.0) -> None:
        print(f"{label:<34}" + (f"{gflops:>8.1f}" if gflops else f"{'':>8}") + cells(rows))

    keys = sorted({k for t in tables.values() for k in t["conv"]},
                  key=lambda k: -max(t["conv"].get(k, [0])[0] for t in tables.values()))
    print(f"\noneDNN kernels per training step (medians of {args.rounds} rounds of {args.steps} fit steps, one op "
          f"at a time); float32 matmul 4096x4096 on this machine: {peak:.0f} GFLOP/s")
    print(f"{'kernels':<34}{'GFLOP':>8}" + "".join(f"{v + ' ms':>14}{'GFLOP/s':>9}" for v in variants))
    for k in keys:
        rows = [t["conv"].get(k, (0.0, 0.0)) for t in tables.values()]
        row(f"convolution {k}", rows, max(gf for _, gf in rows))
    row("all convolutions", conv_total.values(), max(gf for _, gf in conv_total.values()))
    for kind in sorted({k for t in tables.values() for k in t["kinds"]} - {"convolution"}):
        row(kind, [(t["kinds"].get(kind, 0.0), 0) for t in tables.values()])
    row("all oneDNN kernels", [(sum(t["kinds"].values()), 0) for t in tables.values()])
    row("training step (wall, under verbose)", [(args.batch / statistics.median(speeds[v]) * 1e3, 0)
                                                 for v in variants])
    row("all convolutions at the matmul rate", [(gf / peak * 1e3, 0) for _, gf in conv_total.values()])


def bn_micro(args) -> None:
    """Forward + backward of one BatchNormalization (training mode) on a stride-4 EfficientNet-B0
    sized activation, Keras 3 vs tf_keras (fused and not), in tf.function, interleaved rounds."""
    import keras
    import numpy as np
    import tensorflow as tf
    import tf_keras

    shape = (args.batch, args.size // 4, args.size // 4, 144)
    x = tf.constant(np.random.default_rng(0).normal(size=shape).astype("float32"))
    layers = {
        "keras3": keras.layers.BatchNormalization(),
        "tf_keras-fused": tf_keras.layers.BatchNormalization(fused=True),
        "tf_keras-unfused": tf_keras.layers.BatchNormalization(fused=False),
    }
    @keras.ops.custom_gradient
    def bn_manual(x, gamma, beta):
        """Training-mode BN in keras.ops with the closed-form backward (candidate for tfseg)."""
        axes = (0, 1, 2)
        mean = keras.ops.mean(x, axis=axes)
        xc = x - mean
        var = keras.ops.mean(keras.ops.square(xc), axis=axes)
        inv = keras.ops.rsqrt(var + 1e-3)
        xhat = xc * inv
        y = xhat * gamma + beta

        def grad(*args, upstream=None):
            dy = args[0] if upstream is None else upstream
            dbeta = keras.ops.sum(dy, axis=axes)
            dgamma = keras.ops.sum(dy * xhat, axis=axes)
            n = float(np.prod(x.shape[:3]))
            dx = (gamma * inv / n) * (n * dy - dbeta - xhat * dgamma)
            return dx, dgamma, dbeta

        return y, grad

    steps = {}
    for name, layer in layers.items():
        layer(x, training=True)

        def step(layer=layer):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x, training=True)
                loss = tf.reduce_sum(y * y)
            return tape.gradient(loss, [x, *layer.trainable_weights])

        steps[name] = tf.function(step)
        steps[name + "-xla"] = tf.function(step, jit_compile=True)
    gamma, beta = tf.ones(shape[-1:]), tf.zeros(shape[-1:])

    def manual_step():
        with tf.GradientTape() as tape:
            tape.watch([x, gamma, beta])
            y = bn_manual(x, gamma, beta)
            loss = tf.reduce_sum(y * y)
        return tape.gradient(loss, [x, gamma, beta])

    steps["keras.ops-custom-gradient"] = tf.function(manual_step)
    times = {k: [] for k in steps}
    for fn in steps.values():
        fn()
    for _ in range(args.rounds):
        for name, fn in steps.items():
            t = time.perf_counter()
            for _ in range(20):
                fn()
            times[name].append((time.perf_counter() - t) / 20 * 1e3)
    ref = statistics.median(times["tf_keras-fused"])
    print(f"\nBatchNormalization forward+backward on {list(shape)} float32, ms per call (median of "
          f"{args.rounds} rounds x 20 calls):")
    for name, t in times.items():
        med = statistics.median(t)
        print(f"  {name:<22} {med:8.2f} ms   {med / ref:5.2f}x tf_keras-fused")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="training steps per round")
    parser.add_argument("--warmup", type=int, default=2, help="--mode batch: steps after the first, untimed")
    parser.add_argument("--mode", choices=("fit", "batch"), default="fit",
                        help="step with model.fit (as training runs) or model.train_on_batch")
    parser.add_argument("--variants", default="sm,tfseg,tfseg-keras3")
    parser.add_argument("--bn-micro", action="store_true", help="time one BatchNormalization layer instead")
    parser.add_argument("--profile", action="store_true",
                        help="op time per step by op type for each variant (TensorFlow profiler), instead")
    parser.add_argument("--kernels", action="store_true",
                        help="every oneDNN kernel of a training step (ONEDNN_VERBOSE) by kind, the convolutions' "
                             "GFLOP/s against this machine's matmul rate, for each variant, instead")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return 0

    print("command:", " ".join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]))
    print("machine:", machine())
    if args.bn_micro:
        bn_micro(args)
        return 0
    variants = args.variants.split(",")
    base = [sys.executable, os.path.abspath(__file__), "--size", str(args.size), "--batch", str(args.batch),
            "--steps", str(args.steps), "--warmup", str(args.warmup), "--mode", args.mode,
            "--rounds", str(args.rounds)]
    if args.profile:
        profile(args, variants, base)
        return 0
    if args.kernels:
        kernels(args, variants, base)
        return 0
    ready, speeds = interleaved_rounds(variants, lambda v: [*base, "--worker", v], _env, args.rounds, cwd=ROOT)
    for v in variants:
        print(f"  {v}: keras {ready[v]['keras']}, {ready[v]['params']:,} params")
    print("machine after:", machine())
    ref = statistics.median(speeds[variants[0]])
    print(f"\n{'variant':<16} {'first step s':>12} {'median img/s':>13} {'min':>6} {'max':>6} "
          f"{'vs ' + variants[0]:>10}")
    for v in variants:
        med = statistics.median(speeds[v])
        print(f"{v:<16} {ready[v]['first_step_s']:>12.1f} {med:>13.2f} {min(speeds[v]):>6.2f} "
              f"{max(speeds[v]):>6.2f} {med / ref:>9.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
