"""Serving models: uint8 images in, probabilities out, normalisation inside.

    tfseg export --run runs/kvasir --fold 0 --format savedmodel --output serving/kvasir
    tfseg export --run runs/kvasir --format tflite --output kvasir.tflite
    tfseg export --run runs/kvasir --format onnx --output kvasir.onnx   # pip install tfseg[export]

Every format has one input ``image``: uint8 [batch, H, W, C] and one output
``probabilities``: float32 [batch, H', W', K] in 0..1 (sigmoid or softmax applied when the model
returns logits). The tfseg model already contains its input normalisation, so the serving
function only casts to float32. H and W are the model's own input size when it is fixed, else
the run's ``model.input_shape`` (TFLite and ONNX need a static size; the SavedModel keeps the
model's free size). Outputs are written atomically: under a temporary name, renamed at the end.

A free-size SavedModel traces the model with unknown H and W. Keras 3.15's ``UpSampling2D`` with
``interpolation="bilinear"`` (unet_small, ternaus_unet16, fpn, deeplabv3plus) cannot be traced so:
it calls ``keras.ops.image.resize`` with the size ``shape * factor``, a tensor there, and ``resize``
checks ``size[0] <= 0`` in Python (keras-team/keras#22079), raising ``OperatorNotAllowedInGraphError``.
The free-size export therefore traces a copy of the model that shares its weights and has those
layers replaced by an ``UpSampling2D`` subclass (the same ``tf.image.resize`` call Keras' TensorFlow
backend makes, without the check). A model that still cannot be traced is a one-line ModelError.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from tfseg.errors import ConfigError, ModelError, RunError, first_line
from tfseg.files import atomic_write_bytes

FORMATS = ("savedmodel", "tflite", "onnx")
ONNX_OPSET = 17


def serving_function(model, height: int | None, width: int | None):
    """A ``tf.function`` taking uint8 [None, H, W, C] and returning ``{"probabilities": float32}``."""
    import tensorflow as tf

    from tfseg.inference import output_is_logits

    channels = int(model.input_shape[-1])
    logits = output_is_logits(model)
    classes = int(model.output_shape[-1])

    @tf.function(input_signature=[tf.TensorSpec([None, height, width, channels], tf.uint8, name="image")])
    def serve(image):
        y = model(tf.cast(image, tf.float32), training=False)
        if logits:
            y = tf.sigmoid(y) if classes == 1 else tf.nn.softmax(y, axis=-1)
        return {"probabilities": tf.cast(y, tf.float32)}

    return serve


@functools.cache
def _dynamic_upsampling_class():
    """``UpSampling2D`` whose resizing size may be a tensor (defined on first use: keras loads lazily)."""
    import keras
    import tensorflow as tf

    class DynamicUpSampling2D(keras.layers.UpSampling2D):
        """``UpSampling2D`` (not nearest) for unknown H and W: ``tf.image.resize(x, shape * size)``, what
        Keras' TensorFlow backend computes, then cast back to the input's dtype as ``keras.ops.image.resize`` does.
        """

        def call(self, inputs):
            x = tf.transpose(inputs, [0, 2, 3, 1]) if self.data_format == "channels_first" else inputs
            hw = tf.shape(x)[1:3] * tf.constant(self.size, tf.int32)
            y = tf.image.resize(x, hw, method=self.interpolation)
            if y.dtype != x.dtype:
                y = tf.saturate_cast(y, x.dtype)
            return tf.transpose(y, [0, 3, 1, 2]) if self.data_format == "channels_first" else y

    return DynamicUpSampling2D


def free_size_traceable(model):
    """``model`` itself, or a copy sharing its weights that can be traced with unknown H and W.

    Each ``UpSampling2D`` with an interpolation other than ``nearest`` (also inside nested models) is
    replaced by an equivalent layer that resizes to a tensor size; every other layer is the original
    object, so the copy computes what ``model`` computes. See the module docstring for why.
    """
    import keras

    from tfseg.models.common import all_layers

    def resizes(layer) -> bool:
        return isinstance(layer, keras.layers.UpSampling2D) and layer.interpolation != "nearest"

    if not any(resizes(layer) for layer in all_layers(model)):
        return model
    cls = _dynamic_upsampling_class()

    def clone(layer):
        return cls.from_config(layer.get_config()) if resizes(layer) else layer

    return keras.models.clone_model(model, clone_function=clone, recursive=True)


def any_size_copy(model):
    """A copy of a functional ``model`` built for one input size, built again for any H and W and given its
    weights (the same values, in variables of its own), or None when Keras cannot rebuild it (a model that
    is not functional, say).

    The ``batch_shape`` of every ``InputLayer`` in its config (nested models' too) gets ``None`` height and
    width; every layer is rebuilt from its own config and build config, so a layer that fixed a size (a
    pooling window, a resize target, a ``Dense`` over the flattened pixels) keeps it and may fail or
    differ at another size: whether the copy computes what ``model`` computes is for the caller to check
    (:func:`tfseg.large_windows.large_windows` does).
    """
    import keras

    def free(node):
        if isinstance(node, dict):
            if node.get("class_name") == "InputLayer" and isinstance(node.get("config"), dict):
                shape = node["config"].get("batch_shape")
                if shape is not None and len(shape) == 4:
                    node["config"]["batch_shape"] = [shape[0], None, None, shape[3]]
            for value in node.values():
                free(value)
        elif isinstance(node, list):
            for value in node:
                free(value)

    if not isinstance(model, keras.Model) or not hasattr(model, "get_config"):
        return None
    try:
        config = model.get_config()
        free(config)
        copy = type(model).from_config(config)
        copy.set_weights(model.get_weights())
    except Exception:  # noqa: BLE001 - a layer that cannot be built for any size raises many kinds
        return None
    return copy


def _trace_failure(err: BaseException) -> str:
    """What a failed trace says, in one line: Keras' "calling Layer.call()" line and the reason after it."""
    import re

    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(err).splitlines()]
    lines = [line for line in lines if line]
    for i, line in enumerate(lines):
        if "Exception encountered when calling" in line:
            where = line.split("Exception encountered when calling", 1)[1].strip(" .")
            reason = lines[i + 1].split(". ", 1)[0].rstrip(".") if i + 1 < len(lines) else ""
            return f"{type(err).__name__} in {where}: {reason}"[:300]
    return f"{type(err).__name__}: {first_line(err)}"[:300]


@contextlib.contextmanager
def _tracing(height: int | None, width: int | None):
    """Turn a failure to trace the serving function into a one-line ModelError."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 - tracing a layer raises many kinds
        if height is None or width is None:
            raise ModelError(f"the model cannot be traced for any image size ({_trace_failure(err)}). Expected a "
                             "model that runs at unknown H x W; --format tflite or onnx traces it at the run's "
                             "model.input_shape instead.") from None
        raise ModelError(f"the model cannot be traced for {height} x {width} images ({_trace_failure(err)}).") from None


def _size(model, input_shape, static: bool) -> tuple[int | None, int | None]:
    _, h, w, _ = model.input_shape
    if h is not None and w is not None:
        return int(h), int(w)
    if not static:
        return None, None
    if not input_shape or input_shape[0] is None:
        raise ModelError("model takes any image size; static export needs model.input_shape [H, W, C] "
                         "in the run's config.")
    return int(input_shape[0]), int(input_shape[1])


def _fresh_output(path: Path) -> None:
    if path.exists():
        raise RunError(f"{path}: already exists. Expected a new path (remove it or choose another).")


def export_savedmodel(model, path: str | os.PathLike, input_shape=None, static: bool = False) -> Path:
    """Write a SavedModel whose ``serve`` signature maps uint8 images to probabilities.

    Uses ``keras.export.ExportArchive`` (what ``model.export(format="tf_saved_model")`` uses)
    with the uint8 serving function as its endpoint; written to a temporary folder, then renamed.
    """
    import keras

    path = Path(path)
    _fresh_output(path)
    h, w = _size(model, input_shape, static)
    if h is None or w is None:
        model = free_size_traceable(model)
    fn = serving_function(model, h, w)
    archive = keras.export.ExportArchive()
    archive.track(model)
    with _tracing(h, w):
        archive.add_endpoint(name="serve", fn=fn)  # traces the serving function
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        archive.write_out(str(tmp), verbose=False)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def export_tflite(model, path: str | os.PathLike, input_shape=None) -> Path:
    """Write a ``.tflite`` flatbuffer (float32 weights, static H x W, dynamic batch)."""
    import tensorflow as tf

    path = Path(path)
    _fresh_output(path)
    with tempfile.TemporaryDirectory() as tmp:
        saved = export_savedmodel(model, Path(tmp) / "sm", input_shape, static=True)
        converter = tf.lite.TFLiteConverter.from_saved_model(str(saved), signature_keys=["serve"])
        try:
            flat = converter.convert()
        except Exception as err:  # noqa: BLE001 - the converter raises many kinds
            first = first_line(err)[:200]
            raise ModelError(f"TFLite conversion failed for this architecture ({first}).") from None
    return atomic_write_bytes(path, flat)


def export_onnx(model, path: str | os.PathLike, input_shape=None, opset: int = ONNX_OPSET) -> Path:
    """Write a self-contained ONNX model with tf2onnx (``pip install tfseg[export]``: tf2onnx, onnx, onnxruntime).

    The serving function is frozen first: its variables and the tensors it captures (the values of
    Keras' ``Normalization`` layer, which EfficientNet encoders have) become constants of the graph.
    ``tf2onnx.convert.from_function`` would make each captured tensor one more graph input besides
    ``image`` (``.../normalization_1/Sub/y:0``) that a runtime then asks for. The written model has
    exactly one input, ``image``, and one output, ``probabilities``; anything else is a ModelError.
    """
    try:
        import tf2onnx
    except ImportError:
        raise ModelError("ONNX export needs tf2onnx: pip install 'tf2onnx>=1.17' onnx onnxruntime "
                         "(or pip install tfseg[export]).") from None
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    path = Path(path)
    _fresh_output(path)
    h, w = _size(model, input_shape, static=True)
    with _tracing(h, w):
        concrete = serving_function(model, h, w).get_concrete_function()
    frozen = convert_variables_to_constants_v2(concrete)
    inputs = [t.name for t in frozen.inputs]
    outputs = [t.name for t in frozen.outputs]
    rename = {inputs[0]: "image", **dict(zip(outputs, sorted(concrete.structured_outputs)))}
    with _quiet_tf2onnx():
        proto, _ = tf2onnx.convert.from_graph_def(frozen.graph.as_graph_def(), name="serve", input_names=inputs,
                                                  output_names=outputs, opset=opset, tensors_to_rename=rename)
    initializers = {t.name for t in proto.graph.initializer}
    feeds = [i.name for i in proto.graph.input if i.name not in initializers]
    if feeds != ["image"] or [o.name for o in proto.graph.output] != ["probabilities"]:
        raise ModelError(f"ONNX export: the converted graph takes {feeds} and returns "
                         f"{[o.name for o in proto.graph.output]}. Expected ['image'] and ['probabilities'].")
    return atomic_write_bytes(path, proto.SerializeToString())


@contextlib.contextmanager
def _quiet_tf2onnx():
    """Keep tf2onnx's INFO lines and TensorFlow's v1-API deprecation notes (its graph freezing) off stderr."""
    import logging

    loggers = [logging.getLogger(name) for name in ("tf2onnx", "tensorflow")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def require_tensorflow_backend() -> None:
    """The exports are TensorFlow graphs: on Keras' JAX or PyTorch backend, a ModelError saying what to run."""
    import keras

    backend = keras.config.backend()
    if backend != "tensorflow":
        raise ModelError(f"tfseg export writes TensorFlow graphs and needs KERAS_BACKEND=tensorflow, not {backend!r}. "
                         "The run's .keras files do not depend on the backend: run the same command with "
                         "KERAS_BACKEND=tensorflow.")


def export_model(model, fmt: str, path: str | os.PathLike, input_shape=None) -> Path:
    """Export ``model`` as ``fmt`` (savedmodel, tflite, onnx) to ``path``. Returns the path."""
    require_tensorflow_backend()
    if fmt == "savedmodel":
        return export_savedmodel(model, path, input_shape)
    if fmt == "tflite":
        return export_tflite(model, path, input_shape)
    if fmt == "onnx":
        return export_onnx(model, path, input_shape)
    raise ModelError(f"Received: format={fmt!r}. Expected one of {list(FORMATS)}.")


def load_serving(fmt: str, path: str | os.PathLike):
    """Reload an export as ``f(uint8 [B, H, W, C]) -> float32 probabilities`` (used by the tests)."""
    path = str(path)
    if fmt == "savedmodel":
        import tensorflow as tf

        serve = tf.saved_model.load(path).signatures["serve"]
        return lambda x: serve(image=tf.constant(x))["probabilities"].numpy()
    if fmt == "tflite":
        import tensorflow as tf

        def run(x):
            interp = tf.lite.Interpreter(model_path=path)
            runner = interp.get_signature_runner("serve")
            return runner(image=np.asarray(x, np.uint8))["probabilities"]
        return run
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        return lambda x: session.run(["probabilities"], {"image": np.asarray(x, np.uint8)})[0]
    raise ModelError(f"Received: format={fmt!r}. Expected one of {list(FORMATS)}.")


def cli_export(args) -> int:
    """``tfseg export --run RUN_DIR [--fold K] --format F --output PATH``."""
    from tfseg.inference import load_model, load_run_config, select_folds

    require_tensorflow_backend()  # before loading anything
    cfg = load_run_config(args.run, args.config, args.overrides)
    chosen = select_folds(args.run, str(args.fold))
    if len(chosen) != 1:
        raise ConfigError(f"--fold {args.fold}: {len(chosen)} folds. "
                          "Expected one fold to export, e.g. --fold 0.")
    (fold, ckpt), = chosen.items()
    model = load_model(ckpt)
    out = export_model(model, args.format, args.output, cfg.model.input_shape)
    print(f"tfseg export: fold {fold} ({ckpt}) -> {args.format} {out}")
    return 0
