"""Choose how training is spread over devices: TPU, multi-worker, mirrored GPUs, or one device.

On the TensorFlow backend this picks a ``tf.distribute.Strategy``; on the JAX backend it sets a
``keras.distribution.DataParallel`` over the visible devices (Colab TPU VMs ship JAX now). Either
way :func:`setup_distribution` returns a :class:`Distribution` whose ``scope()`` the model,
optimizer and metrics are built under, and whose ``replicas`` gives the global batch
(per-replica batch x replicas, the HuBMAP notebook's ``BATCH_COE x replicas``).

Strategy names (``train.strategy``):
    auto        a TPU if one is attached, else MirroredStrategy over 2+ GPUs, else the default
                strategy (one GPU or the CPU).
    default     the default strategy (no distribution).
    mirrored    MirroredStrategy over the visible GPUs, or over the logical CPU devices when
                there are no GPUs and several CPU devices were configured.
    multiworker MultiWorkerMirroredStrategy from the ``TF_CONFIG`` environment variable.
    tpu         TPUStrategy; an error when no TPU is attached.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import sys
from dataclasses import dataclass
from typing import Any

import keras

from tfseg.errors import ConfigError, RunError

STRATEGIES = ("auto", "default", "mirrored", "multiworker", "tpu")


@dataclass
class Distribution:
    """What training needs to know about the device layout.

    Attributes:
        kind: ``tpu``, ``multiworker``, ``mirrored``, ``default`` or ``jax_data_parallel``.
        replicas: number of replicas that each take ``batch_size`` examples per step.
        strategy: the ``tf.distribute.Strategy`` (TensorFlow backend), else None.
        distribution: the ``keras.distribution.Distribution`` (JAX backend), else None.
        is_chief: False on the non-chief workers of a multi-worker run (they write no outputs).
        workers: processes that read the input (multi-worker), else 1.
    """

    kind: str
    replicas: int
    strategy: Any = None
    distribution: Any = None
    is_chief: bool = True
    workers: int = 1

    def scope(self):
        """Context under which the model, optimizer and metrics must be created."""
        return self.strategy.scope() if self.strategy is not None else contextlib.nullcontext()


def tpu_address() -> str | None:
    """The TPU to connect to, judged from the environment only (quick and silent), or None.

    ``TPU_NAME`` (Kaggle, GCE), ``COLAB_TPU_ADDR`` (old Colab TPU nodes), or ``local`` on a TPU
    VM (``/dev/accel*`` or ``/dev/vfio`` devices). Asking the cluster resolver with no TPU around
    can wait on the GCE metadata server, so it is only asked when one of these is present.
    """
    if os.environ.get("TPU_NAME"):
        return os.environ["TPU_NAME"]
    if os.environ.get("COLAB_TPU_ADDR"):
        return "grpc://" + os.environ["COLAB_TPU_ADDR"]
    if glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"):
        return "local"
    return None


def detect_tpu():
    """Connect to the attached TPU and return its ``TPUClusterResolver``, or None (no TPU)."""
    address = tpu_address()
    if address is None:
        return None
    import tensorflow as tf

    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=address)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except (ValueError, RuntimeError, tf.errors.OpError):
        return None
    return resolver


def _tf_config() -> dict:
    text = os.environ.get("TF_CONFIG")
    if not text:
        raise ConfigError("train.strategy=multiworker needs the TF_CONFIG environment variable "
                          '({"cluster": {"worker": [...]}, "task": {"type": "worker", "index": i}})')
    try:
        config = json.loads(text)
        workers = config["cluster"]["worker"]
        task = config["task"]
        assert isinstance(workers, list) and workers and task["type"] in ("worker", "chief")
    except (ValueError, KeyError, TypeError, AssertionError):
        raise ConfigError("TF_CONFIG: expected JSON with cluster.worker (a list of host:port) and "
                          f"task.type/index, got {text[:80]!r}") from None
    return config


def choose_strategy(name: str):
    """The ``tf.distribute.Strategy`` that ``train.strategy`` names (TensorFlow backend).

    Raises:
        ConfigError: unknown name, or ``multiworker`` without a valid ``TF_CONFIG``.
        RunError: ``tpu`` asked for and no TPU attached.
    """
    if name not in STRATEGIES:
        from tfseg.registry import unknown_name_message

        raise ConfigError("train.strategy: " + unknown_name_message("strategy", name, STRATEGIES))
    import tensorflow as tf

    if name in ("auto", "tpu"):
        resolver = detect_tpu()
        if resolver is not None:
            return tf.distribute.TPUStrategy(resolver)
        if name == "tpu":
            raise RunError("train.strategy=tpu but no TPU is attached (no TPU_NAME, COLAB_TPU_ADDR or "
                           "/dev/accel*); use auto")
    if name == "multiworker":
        _tf_config()
        return tf.distribute.MultiWorkerMirroredStrategy()
    gpus = tf.config.list_logical_devices("GPU")
    if name == "mirrored":
        if gpus:
            return tf.distribute.MirroredStrategy([d.name for d in gpus])
        cpus = tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy([d.name for d in cpus])
    if name == "auto" and len(gpus) > 1:
        return tf.distribute.MirroredStrategy([d.name for d in gpus])
    return tf.distribute.get_strategy()


def _strategy_kind(strategy) -> str:
    kind = type(strategy).__name__
    return {"TPUStrategy": "tpu", "MultiWorkerMirroredStrategy": "multiworker",
            "CollectiveAllReduceStrategy": "multiworker", "MirroredStrategy": "mirrored"}.get(kind, "default")


def _is_chief(strategy) -> bool:
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not getattr(resolver, "task_type", None):
        return True
    return resolver.task_type == "chief" or (resolver.task_type == "worker" and resolver.task_id == 0
                                              and "chief" not in resolver.cluster_spec().as_dict())


def choose_jax_distribution(name: str, devices=None):
    """A ``keras.distribution.DataParallel`` over the visible devices for the JAX backend, or None.

    ``multiworker`` is not supported on JAX (use ``jax.distributed`` yourself); ``default`` and a
    single device give None (no distribution).
    """
    if name not in STRATEGIES:
        from tfseg.registry import unknown_name_message

        raise ConfigError("train.strategy: " + unknown_name_message("strategy", name, STRATEGIES))
    if name == "multiworker":
        raise ConfigError("train.strategy=multiworker is TensorFlow-only; on the JAX backend use auto")
    devices = list(devices if devices is not None else keras.distribution.list_devices())
    if name == "tpu" and not any("tpu" in str(d).lower() for d in devices):
        raise RunError(f"train.strategy=tpu but JAX sees no TPU (devices: {devices[:4]})")
    if name == "default" or len(devices) < 2:
        return None
    return keras.distribution.DataParallel(devices=devices)


def setup_distribution(name: str, backend: str | None = None) -> Distribution:
    """Pick the strategy (TensorFlow) or set the distribution (JAX) that ``train.strategy`` names.

    Args:
        name: one of :data:`STRATEGIES`.
        backend: Keras backend; None = ``keras.backend.backend()``.

    Returns:
        A :class:`Distribution`. On JAX the distribution is also installed globally with
        ``keras.distribution.set_distribution`` (tests/test_jax_backend.py trains over two host devices).
    """
    backend = backend or keras.backend.backend()
    if backend == "jax":
        dist = choose_jax_distribution(name)
        if dist is None:
            return Distribution("default", 1)
        keras.distribution.set_distribution(dist)
        return Distribution("jax_data_parallel", len(dist.device_mesh.devices.ravel()), distribution=dist)
    if backend != "tensorflow":
        if name not in ("auto", "default"):
            raise ConfigError(f"train.strategy={name} needs the tensorflow or jax backend, not {backend}")
        return Distribution("default", 1)
    strategy = choose_strategy(name)
    kind = _strategy_kind(strategy)
    workers = len(_tf_config()["cluster"]["worker"]) if kind == "multiworker" else 1
    return Distribution(kind, int(strategy.num_replicas_in_sync), strategy=strategy,
                        is_chief=_is_chief(strategy), workers=workers)


def global_batch_size(per_replica: int, replicas: int) -> int:
    """Global batch = per-replica batch x replicas, checked.

    Raises:
        ConfigError: a non-positive batch or replica count.
    """
    if int(per_replica) < 1:
        raise ConfigError(f"train.batch_size: expected a positive per-replica batch, got {per_replica}")
    if int(replicas) < 1:
        raise ConfigError(f"replicas: expected at least 1, got {replicas}")
    return int(per_replica) * int(replicas)


# Strategies under which Keras 3's multi-step loop (steps_per_execution > 1) fails: it runs the step's
# strategy.run inside tf.cond in a tf.while_loop, and the optimizer's cross-replica merge_call there
# fails with "You must feed a value for placeholder tensor" (keras-team/keras#19246, open).
_TOLD_STEPS: list[int] = []


def steps_per_execution_for(requested: int) -> int:
    """``train.steps_per_execution`` as the current strategy can run it (call under its scope).

    Under a mirrored or multi-worker strategy on the TensorFlow backend a value above 1 fails in
    Keras 3.15's multi-step loop (keras-team/keras#19246), so it becomes 1, with one line on stderr
    (once per process). TPUs, one device and the other backends keep it.
    """
    if requested <= 1 or keras.config.backend() != "tensorflow":
        return requested
    import tensorflow as tf

    strategy = tf.distribute.get_strategy()
    if _strategy_kind(strategy) not in ("mirrored", "multiworker"):
        return requested
    name = type(strategy).__name__
    if not _TOLD_STEPS:
        _TOLD_STEPS.append(requested)
        print(f"tfseg train: train.steps_per_execution={requested} runs as 1 under {name}: Keras 3's multi-step "
              "loop fails there (keras-team/keras#19246); it is a TPU setting", file=sys.stderr, flush=True)
    return 1


def set_mixed_precision(policy: str | None) -> None:
    """Set the global Keras dtype policy (None = float32)."""
    keras.mixed_precision.set_global_policy(policy or "float32")


def prebuild(model: keras.Model, dataset) -> None:
    """Build the model's compiled loss and metrics from ``dataset.element_spec`` before ``fit``.

    Keras 3 (3.15, TensorFlow backend), under any ``tf.distribute`` strategy, builds them with a
    batch it pulls out of the data: in ``fit`` from the training iterator, and in every ``evaluate``
    (each epoch's validation too) from the *cached* validation iterator, *before* resetting it. With
    ``validation_steps`` set, that iterator is not restarted between epochs, so the pulled batches run
    a finite validation set dry and ``fit`` stops with ``StopIteration`` at the third epoch
    (MirroredStrategy over two devices, 4 validation records in one batch: tests/test_distribute.py).
    Under MultiWorkerMirroredStrategy the pulled batch, averaged across replicas, fails outright
    ("Attempt to convert a value (PerReplica...)", keras-team/keras#20585). Under every strategy this
    builds from the element spec instead and makes the model's later builds use the spec too (the
    model is built by then, so nothing is pulled). Without a strategy Keras builds inside the traced
    step and nothing changes here.
    """
    strategy = getattr(model, "_distribute_strategy", None)
    if strategy is None:
        return
    spec = dataset.element_spec
    batch = tuple(spec[:2]) if isinstance(spec, tuple) else spec

    def build_from_spec(iterator=None, data_batch=None):
        with strategy.scope():
            model._symbolic_build(data_batch=data_batch if data_batch is not None else batch)

    build_from_spec()
    model._maybe_symbolic_build = build_from_spec
    if _strategy_kind(strategy) == "multiworker":
        # The same Keras version reduces the step logs across workers with MEAN over axis 0, which
        # fails for scalar logs ("Invalid reduction dimension 0"); give them that axis.
        for step in ("train_step", "test_step"):
            model.__dict__[step] = _with_rank1_logs(getattr(model, step))


def _with_rank1_logs(step):
    def wrapped(data):
        logs = step(data)
        return {k: keras.ops.reshape(v, (1,)) if len(getattr(v, "shape", ())) == 0 else v
                for k, v in logs.items()}

    return wrapped


# ------------------------------------------------------------------------------------------------
# Fused BatchNorm on the TensorFlow backend
# ------------------------------------------------------------------------------------------------

FUSED_MIN_EPSILON = 1.001e-5  # TensorFlow's fused kernel raises smaller epsilons to this


def fuse_batch_norm(model: keras.Model) -> int:
    """Run the model's BatchNormalization layers through TensorFlow's fused kernel.

    Keras 3 normalises with separate moment, subtract, scale and shift ops on every backend; on
    the TensorFlow backend that is 2.4 to 2.9x slower per layer (forward + backward) than the one
    FusedBatchNormV3 op that tf.keras 2 used (``bench/train_step.py --bn-micro``,
    docs/BENCHMARKS.md). On the TensorFlow backend this swaps the *call* of each plain
    ``keras.layers.BatchNormalization`` (nested encoders included) in this process for the fused
    op: the same statistics (float32, the biased batch variance in the moving average, as Keras 3),
    the same variables, the same saved ``.keras`` file. Layers with renorm, synchronized statistics,
    a mask, a channel axis other than the last or an epsilon below the kernel's minimum keep Keras'
    call; on another backend nothing changes (the model stays pure ``keras.ops``).

    Returns:
        How many layers now use the fused op.
    """
    if keras.config.backend() != "tensorflow":
        return 0
    from tfseg.models.common import all_layers

    swapped = 0
    for layer in all_layers(model):
        if (type(layer) is keras.layers.BatchNormalization and not layer.renorm and not layer.synchronized
                and layer.epsilon >= FUSED_MIN_EPSILON and "call" not in vars(layer)):
            layer.call = _fused_call(layer, layer.call)
            swapped += 1
    return swapped


def _fused_call(layer, keras_call):
    import tensorflow as tf

    def call(inputs, training=None, mask=None):
        axis = layer.axis if layer.axis >= 0 else len(inputs.shape) + layer.axis
        if mask is not None or len(inputs.shape) != 4 or axis != 3:
            return keras_call(inputs, training=training, mask=mask)
        x = tf.cast(inputs, tf.float32)  # statistics in float32, as Keras 3's layer
        channels = x.shape[-1]
        gamma = tf.cast(layer.gamma.value, tf.float32) if layer.scale else tf.ones([channels], tf.float32)
        beta = tf.cast(layer.beta.value, tf.float32) if layer.center else tf.zeros([channels], tf.float32)
        if training and layer.trainable:
            y, mean, variance = tf.compat.v1.nn.fused_batch_norm(
                x, gamma, beta, epsilon=layer.epsilon, data_format="NHWC", is_training=True)
            # the kernel returns the Bessel-corrected batch variance; Keras 3 averages the biased one
            n = tf.cast(tf.size(x) // channels, tf.float32)
            variance = variance * (n - 1.0) / tf.maximum(n, 1.0)
            m = layer.momentum
            layer.moving_mean.assign(layer.moving_mean.value * m + mean * (1.0 - m))
            layer.moving_variance.assign(layer.moving_variance.value * m + variance * (1.0 - m))
        else:
            y, _, _ = tf.compat.v1.nn.fused_batch_norm(
                x, gamma, beta, mean=tf.cast(layer.moving_mean.value, tf.float32),
                variance=tf.cast(layer.moving_variance.value, tf.float32), epsilon=layer.epsilon,
                data_format="NHWC", is_training=False)
        return tf.cast(y, layer.compute_dtype)

    return call


# ------------------------------------------------------------------------------------------------
# Fused optimizer updates and the first step traced once, on the TensorFlow backend
# ------------------------------------------------------------------------------------------------


def fuse_optimizer(optimizer) -> bool:
    """Run the optimizer's per-variable update through TensorFlow's fused training kernel.

    Keras 3 updates each variable with about twenty separate ops (``keras.ops`` arithmetic and
    three assigns for Adam); on the TensorFlow backend a U-Net's 243 variables make some 5000 small
    ops per step, which take seconds to trace and optimise (the first step of
    ``bench/train_step.py --mode fit``: 31.9 s with them, 22.0 s fused). The kernels
    ``ResourceApplyAdam`` (Adam, AdamW: the same formula, term for term),
    ``ResourceApplyKerasMomentum`` (SGD with momentum, Nesterov too) and
    ``ResourceApplyGradientDescent`` (plain SGD) do one variable's whole update in one op, on the
    same variables. Weight decay, gradient clipping, accumulation and EMA stay Keras' own (they
    run around the update). The swap is on this optimizer object only (``update_step``), so its
    config and saved state are unchanged. A ``LossScaleOptimizer`` has its inner optimizer
    swapped. Left as Keras runs them: other backends, TPUStrategy, AMSGrad, other optimizers
    (subclasses with their own ``update_step`` too), and per call any variable that is not
    float32 or any sparse gradient.

    Returns:
        Whether the optimizer now uses a fused kernel.
    """
    if keras.config.backend() != "tensorflow" or optimizer is None:
        return False
    import tensorflow as tf

    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        return fuse_optimizer(optimizer.inner_optimizer)
    if "TPU" in type(tf.distribute.get_strategy()).__name__ or "update_step" in vars(optimizer):
        return False
    update = type(optimizer).update_step  # a subclass with its own update keeps it
    if update is keras.optimizers.Adam.update_step and not optimizer.amsgrad:  # Adam, AdamW
        apply = _fused_adam
    elif update is keras.optimizers.SGD.update_step:
        apply = _fused_sgd
    else:
        return False
    keras_update = optimizer.update_step

    def update_step(gradient, variable, learning_rate):
        if variable.dtype != tf.float32 or isinstance(gradient, tf.IndexedSlices):
            return keras_update(gradient, variable, learning_rate)
        return apply(optimizer, tf.cast(gradient, tf.float32), variable, tf.cast(learning_rate, tf.float32))

    optimizer.update_step = update_step
    return True


def _fused_adam(opt, gradient, variable, lr):
    import tensorflow as tf

    i = opt._get_variable_index(variable)
    step = tf.cast(opt.iterations + 1, tf.float32)  # Keras' local step: updates come before the increment
    beta_1, beta_2 = tf.constant(opt.beta_1, tf.float32), tf.constant(opt.beta_2, tf.float32)
    tf.raw_ops.ResourceApplyAdam(
        var=variable.handle, m=opt._momentums[i].value.handle, v=opt._velocities[i].value.handle,
        beta1_power=tf.pow(beta_1, step), beta2_power=tf.pow(beta_2, step), lr=lr, beta1=beta_1,
        beta2=beta_2, epsilon=tf.constant(opt.epsilon, tf.float32), grad=gradient)


def _fused_sgd(opt, gradient, variable, lr):
    import tensorflow as tf

    if opt.momentum == 0:
        tf.raw_ops.ResourceApplyGradientDescent(var=variable.handle, alpha=lr, delta=gradient)
        return
    tf.raw_ops.ResourceApplyKerasMomentum(
        var=variable.handle, accum=opt.momentums[opt._get_variable_index(variable)].value.handle, lr=lr,
        grad=gradient, momentum=tf.constant(opt.momentum, tf.float32), use_nesterov=bool(opt.nesterov))


def prepare_training(model: keras.Model, *, batch_norm: bool = True, optimizer: bool = True,
                     build: bool = True) -> dict:
    """What ``tfseg train`` does to a compiled model before its first step, for speed alone.

    On the TensorFlow backend: BatchNormalization through the fused kernel
    (:func:`fuse_batch_norm`), the optimizer's update through a fused kernel
    (:func:`fuse_optimizer`), and the optimizer's variables built before the first step so that
    it is traced once (:func:`build_optimizer_state`). The training itself is unchanged. The
    keywords turn each part off (``bench/train_step.py`` measures them one by one).

    Returns:
        ``{"batch_norm": layers fused, "optimizer": fused or not, "built": built here or not}``.
    """
    return {
        "batch_norm": fuse_batch_norm(model) if batch_norm else 0,
        "optimizer": fuse_optimizer(model.optimizer) if optimizer else False,
        "built": build_optimizer_state(model) if build else False,
    }


def build_optimizer_state(model: keras.Model) -> bool:
    """Create the compiled optimizer's variables now, before the first training step is traced.

    Keras 3 on the TensorFlow backend, outside an explicit distribution strategy, builds the
    optimizer (Adam's moments, the iteration counter) inside the first traced train step.
    ``tf.function`` then traces the whole step a second time, because a function that created
    variables must be traced again without creating them: the first step pays two traces. Built
    here, as Keras itself does under a strategy (its symbolic build), the step is traced once:
    unet efficientnetb0 at 256x256, batch 8, first step 33.1 s -> 22.0 s on 2 cores
    (docs/BENCHMARKS.md). The variables are the ones the first step would create (the model's
    trainable variables at this point), so training is unchanged; harmless on other backends.

    Returns:
        True when the optimizer was built here, False when there is none or it was already built.
    """
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None or optimizer.built:
        return False
    optimizer.build(model.trainable_variables)
    return True
