"""Prediction with a trained run: fold ensembles, test-time augmentation, sliding windows or
whole resized images.

    predictor = Predictor.from_run("runs/kvasir", folds="all", infer=cfg.infer)
    probs = predictor.predict(image)        # float32 [H, W, K] in 0..1, any image size
    mask = predictor.predict_mask(image)    # uint8 [H, W]: 0/1 (binary) or class indices

The ensemble is the mean of the folds' probabilities, each fold's being the mean over the TTA
transforms (:mod:`tfseg.tta`) after inverting each. An image meets the model as the run trained
(``infer.fit``, :func:`whole_image_size`): a run trained on whole images resized to
``data.image_size`` (``data.fit: resize``) predicts each image whole at that size and resizes the
probabilities back (:mod:`tfseg.resize_predict`); a run trained on full-resolution crops or tiles
predicts by sliding windows, through the streaming engine of :mod:`tfseg.tiling_predict`, so
huge TIFFs are read window by window (``tfseg.data.tiling``). Binary models are thresholded at
``infer.threshold``, multiclass ones take the argmax.

``tfseg predict`` (:func:`cli_predict`) writes a folder of mask PNGs (0/255 for binary, class
indices otherwise; ``<stem>_prob.npy`` beside them with ``infer.save_probabilities``) or a
streaming submission ``*.csv`` / ``*.csv.gz`` (:mod:`tfseg.submission`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from tfseg.checkpoint_checks import check_checkpoint, check_fixed_size, fixed_input_size
from tfseg.config import Config, DataConfig, InferConfig
from tfseg.errors import ConfigError, DataError, ModelError, RunError, first_line, warn_once
from tfseg.resize_predict import iter_resized, resize_as_training, whole_image_size
from tfseg.tiling_predict import TileSpec, band_to_mask, collect_bands, iter_bands
from tfseg.tta import with_tta

_FOLD_DIR = re.compile(r"^fold(\d+)$")


# ---------------------------------------------------------------------------------------------
# Runs and models
# ---------------------------------------------------------------------------------------------
def trained_folds(run_dir: str | os.PathLike) -> dict[int, Path]:
    """``{k: run_dir/fold<k>/best.keras}`` for every fold that has a best checkpoint."""
    run = Path(run_dir)
    if not run.is_dir():
        raise RunError(f"{run}: run directory not found. Expected runs/<name> written by `tfseg train`.")
    found = {}
    for child in run.iterdir():
        m = _FOLD_DIR.match(child.name)
        if m and (child / "best.keras").is_file():
            found[int(m.group(1))] = child / "best.keras"
    return dict(sorted(found.items()))


def select_folds(run_dir: str | os.PathLike, folds: str | Sequence[int] = "all") -> dict[int, Path]:
    """Checkpoints of the requested folds: ``all`` or ``"0,2"`` / ``[0, 2]``.

    Raises:
        RunError: missing run, no trained fold, or a requested fold not trained (lists those found).
    """
    found = trained_folds(run_dir)
    if not found:
        raise RunError(f"{run_dir}: no trained fold. Expected {run_dir}/fold<k>/best.keras.")
    if isinstance(folds, str):
        if folds.strip() == "all":
            return found
        try:
            wanted = [int(f) for f in folds.split(",") if f.strip()]
        except ValueError:
            raise ConfigError(f"infer.folds: {folds!r}. "
                              "Expected 'all' or a comma list such as '0,2'.") from None
    else:
        wanted = [int(f) for f in folds]
    missing = [k for k in wanted if k not in found]
    if missing or not wanted:
        raise RunError(f"{run_dir}: fold {missing[0] if missing else folds} not trained "
                       f"(no fold{missing[0] if missing else '?'}/best.keras); folds found: {list(found)}.")
    return {k: found[k] for k in wanted}


def load_run_config(run_dir: str | os.PathLike, config: str | None = None, overrides=()) -> Config:
    """The run's own ``config.yaml`` (or ``config`` when given) with ``section.key=value`` overrides."""
    from tfseg.config import load_config

    path = Path(config) if config else Path(run_dir) / "config.yaml"
    if not Path(run_dir).is_dir():
        raise RunError(f"{run_dir}: run directory not found. Expected runs/<name> written by `tfseg train`.")
    if not path.is_file():
        raise RunError(f"{path}: config not found. Expected the run's config.yaml (or pass --config).")
    return load_config(path, overrides)


def resolve_threshold(run_dir: str | os.PathLike, infer: InferConfig) -> InferConfig:
    """``infer`` with ``threshold`` taken from the run's out-of-fold sweep when ``threshold_from: oof``.

    The sweep is ``RUN/evaluate/oof/evaluation.json``, written by ``tfseg evaluate --run RUN``: the
    threshold with the best mean Dice on the folds' held-out images (never on the test data).
    """
    if infer.threshold_from != "oof":
        return infer
    path = Path(run_dir) / "evaluate" / "oof" / "evaluation.json"
    if not path.is_file():
        raise RunError(f"{path}: not found. infer.threshold_from=oof reads the sweep of `tfseg evaluate --run "
                       f"{run_dir}`: run that first, or set infer.threshold")
    try:
        best = float(json.loads(path.read_text())["best_threshold"]["threshold"])
    except (ValueError, KeyError, TypeError):
        raise RunError(f"{path}: no best_threshold.threshold. Expected the out-of-fold evaluation of a binary "
                       "run (multiclass runs have no threshold sweep)") from None
    if not 0.0 <= best <= 1.0:
        raise RunError(f"{path}: best_threshold.threshold is {best}; expected a probability in [0, 1]")
    return replace(infer, threshold=best)


def load_model(path: str | os.PathLike):
    """Load a ``.keras`` checkpoint for inference (no optimizer, no loss)."""
    import keras

    import tfseg.models  # noqa: F401 - registers the custom layers
    for name in ("tfseg.losses", "tfseg.metrics"):
        try:
            __import__(name)
        except ImportError:
            pass
    _import_builders_of(path)
    try:
        return keras.models.load_model(path, compile=False)
    except (OSError, ValueError, TypeError) as err:
        first = first_line(err)
        if len(first) > 200:  # Keras' deserialization errors run on: keep the first sentence
            end = first.find(". ")
            first = first[:end + 1 if 0 < end < 200 else 200].rstrip(".") + " ..."
        raise RunError(f"{path}: cannot load the model ({first}).") from None


# Python modules whose layers and functions a model built through segmentation_models (model.arch sm.*)
# refers to in its .keras file; they load only once segmentation_models has set them up on Keras 3.
_SM_MODULES = ("segmentation_models", "efficientnet", "classification_models")


def _import_builders_of(path: str | os.PathLike) -> None:
    """Import segmentation_models (:func:`tfseg.models.sm_bridge.import_sm`) when the ``.keras`` file at
    ``path`` refers to its modules (sm's EfficientNet: ``FixedDropout``, ``swish``), so that a run trained
    with ``model.arch: sm.Unet`` predicts and evaluates like any other. A file that cannot be read is
    left to ``keras.models.load_model`` to report."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            text = z.read("config.json").decode("utf-8", "replace")
    except (OSError, KeyError, zipfile.BadZipFile):
        return
    modules = set(re.findall(r'"module":\s*"([^"]+)"', text))
    if not any(m.split(".")[0] in _SM_MODULES for m in modules):
        return
    from tfseg.models.sm_bridge import import_sm

    try:
        import_sm()
    except ModelError as err:
        raise RunError(f"{path}: was built through segmentation_models (model.arch sm.*), which it needs to load: "
                       f"{str(err).removeprefix('model.arch sm.*: ')}") from None


def load_checked(paths: dict[int, Path], cfg: Config | None, feed: Sequence[int] | None = None,
                 feed_key: str = "data.image_size", alternative: str = "") -> dict:
    """``{fold: model}`` of the checkpoints ``paths``, each checked against ``cfg`` as it is loaded
    (:func:`tfseg.checkpoint_checks.check_checkpoint`, with ``feed``, ``feed_key`` and ``alternative``);
    ``cfg`` None: loaded unchecked."""
    models = {}
    for k, path in paths.items():
        models[k] = load_model(path)
        if cfg is not None:
            check_checkpoint(models[k], path, cfg, feed, feed_key, alternative)
    return models


def output_is_logits(model) -> bool:
    """True when the model's last layer has a linear activation (it returns logits)."""
    act = getattr(model.layers[-1], "activation", None)
    return getattr(act, "__name__", "") == "linear"


def keras_predict_fn(model) -> Callable[[np.ndarray], np.ndarray]:
    """Batch predictor of a Keras model: float32 [B, H, W, C] -> probabilities [B, H', W', K].

    Logits (linear output) become probabilities (sigmoid for 1 channel, softmax otherwise).
    On TensorFlow, a model that takes any size is predicted through
    :func:`tfseg.export.free_size_traceable` (the same layers and weights): ``predict_on_batch``
    traces its function again with unknown H and W when it meets a second input size (rotated
    rectangular tiles under ``infer.tta: 8``), and Keras 3.15's bilinear ``UpSampling2D`` cannot be
    traced that way (keras-team/keras#22079).
    """
    import keras

    logits = output_is_logits(model)
    if keras.backend.backend() == "tensorflow" and fixed_input_size(model) is None:
        from tfseg.export import free_size_traceable

        model = free_size_traceable(model)

    def predict(x: np.ndarray) -> np.ndarray:
        y = np.asarray(model.predict_on_batch(x), dtype=np.float32)
        if logits:
            if y.shape[-1] == 1:
                y = 1.0 / (1.0 + np.exp(-y))
            else:
                y = np.exp(y - y.max(axis=-1, keepdims=True))
                y /= y.sum(axis=-1, keepdims=True)
        return y

    return predict


def tile_spec(model, tile_size: int | Sequence[int], key: str = "infer.tile_size") -> TileSpec:
    """Tile sizes of a model: a fixed-size model imposes its own input size, others take ``tile_size``.

    Args:
        model: a Keras model with one image input [B, H, W, C].
        tile_size: side of square tiles, or [height, width], for a model that takes any size.
        key: the config key that set ``tile_size``, for error messages.

    Raises:
        ConfigError: the model cannot take tiles of that size (one line naming the nearest sizes it
            takes, e.g. 96 and 104 for a U-Net that halves its input three times).
        ModelError: several inputs, or a margin (input - output) that is odd.
    """
    in_shape, out_shape = model.input_shape, model.output_shape
    if isinstance(in_shape, list) or len(in_shape) != 4:
        raise ModelError(f"model input {in_shape}. Expected one image input [B, H, W, C].")
    _, h, w, c = in_shape
    if h is not None and w is not None:  # a fixed-size model: its own size, square or not
        oh, ow = out_shape[1:3]
        size, out = (int(h), int(w)), (int(oh or h), int(ow or w))
    else:  # a free-size model: run a tile of this size through it (Keras' compute_output_shape
        # does not check that a U-Net's skips still match, so 100 -> 96 would seem to work)
        size = (int(tile_size), int(tile_size)) if np.isscalar(tile_size) else tuple(int(v) for v in tile_size)
        out = _probe(model, size, int(c), key)
    for i, axis in enumerate(("height", "width")):
        if (size[i] - out[i]) % 2:
            raise ModelError(f"model maps an input {axis} of {size[i]} to {out[i]} pixels. Expected an even margin.")
    return TileSpec(in_size=size[0], out_size=out[0], classes=int(out_shape[-1]), channels=int(c),
                    in_width=size[1], out_width=out[1])


def _output_hw(model, hw: tuple[int, int], channels: int) -> tuple[int, int]:
    # An eager call, not predict_on_batch: its compiled function, once called with several sizes,
    # retraces for any size (None), which some layers cannot trace.
    y = model(np.zeros((1, *hw, channels), np.float32), training=False)
    return int(y.shape[1]), int(y.shape[2])


def _probe(model, hw: tuple[int, int], channels: int, key: str) -> tuple[int, int]:
    """Output [h, w] of ``model`` for an input ``hw``, or a one-line error naming the sizes it takes."""
    try:
        return _output_hw(model, hw, channels)
    except Exception as err:  # noqa: BLE001 - a shape error deep inside the model (Concatenate...)
        first = first_line(err)[:160]
    multiple = _size_multiple(model, channels)
    bad = [v for v in dict.fromkeys(hw) if multiple and v % multiple]
    if not bad:
        raise ModelError(f"{key}: the model cannot predict {hw[0]}x{hw[1]} inputs ({first}).")
    near = sorted({v for b in bad for v in (b // multiple * multiple, (b // multiple + 1) * multiple) if v > 0})
    sizes = f"sizes that work are {' and '.join(map(str, near))}" if len(near) > 1 else f"size that works is {near[0]}"
    value = hw[0] if hw[0] == hw[1] else list(hw)
    raise ConfigError(f"{key}: {value} does not fit the model, whose input sides must be multiples of {multiple}; "
                      f"the nearest {sizes}")


def _size_multiple(model, channels: int, largest: int = 7) -> int | None:
    """The smallest power of two D (up to 2**largest) whose odd multiples the model takes as input sides."""
    def takes(e: int) -> bool:
        d = 2 ** e
        k = max(3, -(-64 // d) | 1)  # odd, and d * k >= 64 (some encoders need a minimum size)
        try:
            _output_hw(model, (d * k, d * k), channels)
            return True
        except Exception:  # noqa: BLE001
            return False

    lo, hi = 0, largest
    if not takes(hi):
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if takes(mid) else (mid + 1, hi)
    return 2 ** lo


# ---------------------------------------------------------------------------------------------
# The predictor
# ---------------------------------------------------------------------------------------------
class Predictor:
    """Fold ensemble x TTA x (sliding windows or one resized whole image).

    Args:
        models: Keras models (or batch predictors ``f(x) -> probs`` with ``spec`` given).
        infer: the ``infer`` section (tile size, overlap, blending, batch, TTA, threshold...).
        spec: tile sizes; derived from the first Keras model when None (for ``resize_to``, its
            input must be ``resize_to`` with an output of the same size).
        resize_to: [height, width]: predict each image whole, resized to this size (the training
            size of a ``data.fit: resize`` run), and resize the probabilities back
            (:mod:`tfseg.resize_predict`); None: sliding windows at the image's resolution.
            :meth:`from_run` takes it from the run's config (:func:`whole_image_size`).
    """

    def __init__(self, models: Sequence, infer: InferConfig | None = None, spec: TileSpec | None = None,
                 resize_to: Sequence[int] | None = None):
        if not models:
            raise RunError("Predictor: no model. Expected at least one fold.")
        self.infer = infer or InferConfig()
        self.resize_to = None if resize_to is None else (int(resize_to[0]), int(resize_to[1]))
        key = "data.image_size" if self.resize_to else "infer.tile_size"
        self.spec = spec or tile_spec(models[0], self.resize_to or self.infer.tile_size, key)
        fixed = fixed_input_size(models[0])
        # a fixed-size valid-convolution model: large windows through its checked copy for any size
        wide, tile = (_large_windows(models, self.infer.tile_size) if spec is None and self.resize_to is None
                      and fixed is not None else (None, None))
        if wide:
            self.spec, fixed = wide[0].spec(tile, self.spec.classes, self.spec.channels), None
        _check_sizes(self.spec, self.resize_to, self.infer.tta, fixed)
        if spec is None and self.resize_to is None:
            _warn_small(self.spec, models[0], self.infer.tile_size, fixed is not None, bool(wide))
        fns = [keras_predict_fn(m) if hasattr(m, "predict_on_batch") else m for m in models]
        if wide:
            fns = [w.predict_fn(keras_predict_fn(w.model)) for w in wide]
        self._fns = [with_tta(f, self.infer.tta) for f in fns]
        self.models = list(models)
        self.trained_hw = wide[0].size if wide else None  # the fixed size of a model predicted by its copy

    @classmethod
    def from_run(cls, run_dir: str | os.PathLike, folds: str | Sequence[int] = "all",
                 infer: InferConfig | None = None, data: DataConfig | None = None, *,
                 config: Config | None = None) -> Predictor:
        """Load ``run_dir/fold<k>/best.keras`` for the requested folds (``infer.threshold_from: oof``
        reads the threshold of the run's out-of-fold sweep, :func:`resolve_threshold`).

        ``data`` (default: ``config.data``, else the run's ``config.yaml``) says how the run trained:
        with ``infer.fit: auto``, a ``data.fit: resize`` run predicts whole images resized to
        ``data.image_size``, others by tiles (:func:`whole_image_size`). With ``config`` (the whole
        config the images are read with), every checkpoint is checked against it first
        (:func:`tfseg.checkpoint_checks.check_checkpoint`: channels, classes, fixed input size).
        """
        paths = select_folds(run_dir, folds)
        infer = resolve_threshold(run_dir, infer or InferConfig())
        data = data or (config.data if config is not None else None)
        if data is None and infer.fit != "tile":
            data = load_run_config(run_dir).data
        resize_to = None if infer.fit == "tile" else whole_image_size(infer, data)
        models = load_checked(paths, config, resize_to, "data.image_size", "infer.fit=tile")
        predictor = cls(list(models.values()), infer, resize_to=resize_to)
        predictor.folds = list(paths)
        return predictor

    @property
    def how(self) -> str:
        """How an image meets the model, for summaries: ``whole images resized to 96x128`` or
        ``tiles of 256x256`` (``at 1/4 scale`` with ``infer.downscale``)."""
        h, w = self.resize_to or self.spec.in_hw
        if self.resize_to:
            return f"whole images resized to {h}x{w}"
        copy = f" (the {self.trained_hw[0]}x{self.trained_hw[1]} model's copy for any size)" if self.trained_hw else ""
        return f"tiles of {h}x{w}{copy}" + (f" at 1/{self.infer.downscale} scale" if self.infer.downscale != 1 else "")

    def predict_batch(self, x: np.ndarray) -> np.ndarray:
        """Mean over folds (each a TTA mean) of float32 [B, in_h, in_w, C] -> [B, out_h, out_w, K]."""
        total = None
        for fn in self._fns:
            y = fn(x)
            total = y.astype(np.float32) if total is None else total + y
        return total / len(self._fns)

    def _kwargs(self, progress: bool) -> dict:
        i = self.infer
        return dict(overlap=i.overlap, blend=i.blend, sigma_scale=i.sigma_scale, batch_size=i.batch_size,
                    downscale=i.downscale, skip_background=i.skip_background, progress=progress)

    def bands(self, image, *, progress: bool = False) -> Iterator[tuple[int, np.ndarray]]:
        """Probabilities of an image [H, W, C] as ``(y0, float32 [h, W, K])`` row bands, top to bottom:
        from the sliding windows, or from the whole image predicted at ``resize_to`` and resized back."""
        image = _checked(image, self.spec)
        if self.resize_to is None:
            yield from iter_bands(self.predict_batch, image, self.spec, **self._kwargs(progress))
            return
        probs = self.predict_batch(resize_as_training(image, self.resize_to)[None])[0]
        yield from iter_resized(probs, image.shape[:2])

    def predict(self, image, *, out: np.ndarray | None = None, progress: bool = False) -> np.ndarray:
        """Probabilities [H, W, K] of an image [H, W, C] (array-like), dtype ``infer.accumulator``
        (float16/float32; ``disk`` needs ``out``, e.g. an ``np.memmap``)."""
        image = _checked(image, self.spec)
        if out is None:
            dtype = "float32" if self.infer.accumulator == "disk" else self.infer.accumulator
            out = np.zeros((*image.shape[:2], self.spec.classes), np.dtype(dtype))
        return collect_bands(self.bands(image, progress=progress), out)

    def predict_mask(self, image, *, out: np.ndarray | None = None, probabilities: np.ndarray | None = None,
                     progress: bool = False) -> np.ndarray:
        """uint8 [H, W] mask (0/1 or class indices) of an image [H, W, C], written band by band."""
        image = _checked(image, self.spec)
        if out is None:
            out = np.zeros(image.shape[:2], np.uint8)
        return collect_bands(self.mask_bands(image, probabilities=probabilities, progress=progress), out)

    def mask_bands(self, image, *, probabilities: np.ndarray | None = None,
                   progress: bool = False) -> Iterator[tuple[int, np.ndarray]]:
        """Stream the mask of an image: ``(y0, uint8 [h, W])`` bands, top to bottom.

        Nothing full-size is kept (write the bands to a file as they come, e.g.
        :func:`tfseg.predict_cli.write_mask_tiff`); ``probabilities`` [H, W, K] is filled too when given.
        """
        for y0, band in self.bands(image, progress=progress):
            if probabilities is not None:
                probabilities[y0:y0 + band.shape[0]] = band
            yield y0, band_to_mask(band, self.infer.threshold)


def _large_windows(models: Sequence, tile_size: int) -> tuple[list | None, int | None]:
    """Every model's checked copy for any size (:func:`tfseg.large_windows.large_windows`) and the side of
    the windows for ``tile_size``, or (None, None) when one model has none or the windows would not grow."""
    from tfseg.large_windows import large_windows

    wide = [large_windows(m) if hasattr(m, "predict_on_batch") else None for m in models]
    if not all(wide) or len({(w.size, w.out, w.period) for w in wide}) != 1:
        return None, None
    tile = wide[0].tile(tile_size)
    return (wide, tile) if tile else (None, None)


def _warn_small(spec: TileSpec, model, tile_size: int, fixed: bool, wide: bool) -> None:
    """:func:`warn_small_output` with the key that would help: ``infer.tile_size`` for a model that takes
    any size or is predicted through its copy for any size (``wide``), or whose copy would take windows
    from ``s + period``; else the size the model was trained at."""
    if not fixed:
        warn_small_output(spec, value=tile_size if wide else None)
        return
    from tfseg.large_windows import large_windows

    wide = large_windows(model) if hasattr(model, "predict_on_batch") else None
    if wide is not None and (wide.size[0] - wide.size[1]) % wide.period == 0:
        least = max(wide.size) + wide.period
        warn_small_output(spec, value=tile_size, fix=f"an infer.tile_size of {least} or more predicts through a "
                          f"copy of the model for any size, each pixel as one of its {wide.size[0]}x{wide.size[1]} "
                          "windows would")
        return
    warn_small_output(spec, "data.image_size", fix="the model was built for that size and cannot take a larger "
                      "one: training at a larger data.image_size (or with data.val_size: any size) wastes less")


def warn_small_output(spec: TileSpec, key: str = "infer.tile_size", value=None, fix: str = "") -> str | None:
    """One line on stderr (once per process) when a model predicts less than a quarter of each window it
    reads (valid convolutions, as the original U-Net's, at a small ``infer.tile_size``, or built for a
    small ``data.image_size``): every pixel then costs more than four pixels' work. Returns the line.

    Args:
        spec: the windows read and the tiles predicted.
        key: the setting to name; ``value``: its value (default: the window's size).
        fix: what to do (default: ``a larger <key> wastes less``).
    """
    (ih, iw), (oh, ow) = spec.in_hw, spec.out_hw
    share = oh * ow / (ih * iw)
    if share >= 0.25:
        return None
    value = value if value is not None else ih if ih == iw else [ih, iw]
    line = (f"tfseg: warning: {key} {value}: the model predicts the central {oh}x{ow} "
            f"of each {ih}x{iw} window it reads ({share * 100:.2g}% of it; its valid convolutions use {(ih - oh) // 2} "
            f"pixels on each side), so prediction is slow; {fix or f'a larger {key} wastes less'}")
    return warn_once(line)


def _check_sizes(spec: TileSpec, resize_to: tuple[int, int] | None, tta: int,
                 fixed: tuple[int, int] | None) -> None:
    """Whole-image prediction needs a model that takes ``resize_to`` and returns that size; quarter
    turns (``infer.tta: 8``) need square inputs unless the model takes any size (``fixed``: None)."""
    if resize_to is not None:
        if spec.in_hw != resize_to:
            raise ModelError(f"model input {spec.in_hw[0]}x{spec.in_hw[1]}, but whole images are predicted at "
                             f"data.image_size {resize_to[0]}x{resize_to[1]} (infer.fit). Expected the run's "
                             "own config, or infer.fit=tile")
        if spec.out_hw != spec.in_hw:
            raise ModelError(f"model maps {spec.in_hw[0]}x{spec.in_hw[1]} to {spec.out_hw[0]}x{spec.out_hw[1]} "
                             "pixels (valid convolutions): it cannot predict whole resized images. Expected "
                             "infer.fit=tile")
    check_fixed_size(fixed, None, tta)


def _checked(image, spec: TileSpec):
    shape = getattr(image, "shape", None)
    if shape is None or len(shape) != 3:
        raise DataError(f"image of shape {shape}. Expected [H, W, C].")
    if shape[-1] != spec.channels:
        raise DataError(f"image has {shape[-1]} channels. "
                        f"Expected {spec.channels}, the model's input channels.")
    return image


def cli_predict(args) -> int:
    """``tfseg predict``: see :mod:`tfseg.predict_cli`."""
    from tfseg.predict_cli import run_predict

    return run_predict(args)
