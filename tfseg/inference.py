"""Prediction with a trained run: fold ensembles, test-time augmentation, sliding windows.

    predictor = Predictor.from_run("runs/kvasir", folds="all", infer=cfg.infer)
    probs = predictor.predict(image)        # float32 [H, W, K] in 0..1, any image size
    mask = predictor.predict_mask(image)    # uint8 [H, W]: 0/1 (binary) or class indices

The ensemble is the mean of the folds' probabilities, each fold's being the mean over the TTA
transforms (:mod:`tfseg.tta`) after inverting each. Tiles go through the streaming engine of
:mod:`tfseg.tiling_predict`, so huge TIFFs are read window by window (``tfseg.data.tiling``).
Binary models are thresholded at ``infer.threshold``, multiclass ones take the argmax.

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

from tfseg.config import Config, InferConfig
from tfseg.errors import ConfigError, DataError, ModelError, RunError
from tfseg.tiling_predict import TileSpec, band_to_mask, iter_bands, predict_mask, predict_tiled
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
    try:
        return keras.models.load_model(path, compile=False)
    except (OSError, ValueError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RunError(f"{path}: cannot load the model ({first[:200]}).") from None


def output_is_logits(model) -> bool:
    """True when the model's last layer has a linear activation (it returns logits)."""
    act = getattr(model.layers[-1], "activation", None)
    return getattr(act, "__name__", "") == "linear"


def keras_predict_fn(model) -> Callable[[np.ndarray], np.ndarray]:
    """Batch predictor of a Keras model: float32 [B, H, W, C] -> probabilities [B, H', W', K].

    Logits (linear output) become probabilities (sigmoid for 1 channel, softmax otherwise).
    ``predict_on_batch`` keeps one compiled function per input shape.
    """
    logits = output_is_logits(model)

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


def tile_spec(model, tile_size: int) -> TileSpec:
    """Tile sizes of a model: a fixed-size model imposes its own input size, others take ``tile_size``."""
    in_shape, out_shape = model.input_shape, model.output_shape
    if isinstance(in_shape, list) or len(in_shape) != 4:
        raise ModelError(f"model input {in_shape}. Expected one image input [B, H, W, C].")
    _, h, w, c = in_shape
    if h != w:
        raise ModelError(f"model input {h}x{w}. Expected square tiles (same height and width).")
    size = int(h) if h is not None else int(tile_size)
    out = out_shape[1]
    if h is None:  # a free-size model: ask it what a tile of this size becomes
        try:
            out = model.compute_output_shape((1, size, size, c))[1]
        except Exception:  # noqa: BLE001 - layers without compute_output_shape: same size
            out = size
    out = size if out is None else int(out)
    if (size - int(out)) % 2:
        raise ModelError(f"model maps {size} to {out} pixels. Expected an even margin.")
    return TileSpec(in_size=size, out_size=int(out), classes=int(out_shape[-1]), channels=int(c))


# ---------------------------------------------------------------------------------------------
# The predictor
# ---------------------------------------------------------------------------------------------
class Predictor:
    """Fold ensemble x TTA x sliding windows.

    Args:
        models: Keras models (or batch predictors ``f(x) -> probs`` with ``spec`` given).
        infer: the ``infer`` section (tile size, overlap, blending, batch, TTA, threshold...).
        spec: tile sizes; derived from the first Keras model when None.
    """

    def __init__(self, models: Sequence, infer: InferConfig | None = None, spec: TileSpec | None = None):
        if not models:
            raise RunError("Predictor: no model. Expected at least one fold.")
        self.infer = infer or InferConfig()
        self.spec = spec or tile_spec(models[0], self.infer.tile_size)
        fns = [keras_predict_fn(m) if hasattr(m, "predict_on_batch") else m for m in models]
        self._fns = [with_tta(f, self.infer.tta) for f in fns]
        self.models = list(models)

    @classmethod
    def from_run(cls, run_dir: str | os.PathLike, folds: str | Sequence[int] = "all",
                 infer: InferConfig | None = None) -> Predictor:
        """Load ``run_dir/fold<k>/best.keras`` for the requested folds (``infer.threshold_from: oof``
        reads the threshold of the run's out-of-fold sweep, :func:`resolve_threshold`)."""
        paths = select_folds(run_dir, folds)
        infer = resolve_threshold(run_dir, infer or InferConfig())
        predictor = cls([load_model(p) for p in paths.values()], infer)
        predictor.folds = list(paths)
        return predictor

    def predict_batch(self, x: np.ndarray) -> np.ndarray:
        """Mean over folds (each a TTA mean) of float32 [B, in, in, C] -> [B, out, out, K]."""
        total = None
        for fn in self._fns:
            y = fn(x)
            total = y.astype(np.float32) if total is None else total + y
        return total / len(self._fns)

    def _kwargs(self, progress: bool) -> dict:
        i = self.infer
        return dict(overlap=i.overlap, blend=i.blend, sigma_scale=i.sigma_scale, batch_size=i.batch_size,
                    downscale=i.downscale, skip_background=i.skip_background, progress=progress)

    def predict(self, image, *, out: np.ndarray | None = None, progress: bool = False) -> np.ndarray:
        """Probabilities [H, W, K] of an image [H, W, C] (array-like), dtype ``infer.accumulator``
        (float16/float32; ``disk`` needs ``out``, e.g. an ``np.memmap``)."""
        dtype = "float32" if self.infer.accumulator == "disk" else self.infer.accumulator
        return predict_tiled(self.predict_batch, _checked(image, self.spec), self.spec, dtype=dtype, out=out,
                             **self._kwargs(progress))

    def predict_mask(self, image, *, out: np.ndarray | None = None, probabilities: np.ndarray | None = None,
                     progress: bool = False) -> np.ndarray:
        """uint8 [H, W] mask (0/1 or class indices) of an image [H, W, C], written band by band."""
        return predict_mask(self.predict_batch, _checked(image, self.spec), self.spec,
                            threshold=self.infer.threshold, out=out, probabilities=probabilities,
                            **self._kwargs(progress))


    def mask_bands(self, image, *, probabilities: np.ndarray | None = None,
                   progress: bool = False) -> Iterator[tuple[int, np.ndarray]]:
        """Stream the mask of an image: ``(y0, uint8 [h, W])`` bands, top to bottom.

        Nothing full-size is kept (write the bands to a file as they come, e.g.
        :func:`tfseg.predict_cli.write_mask_tiff`); ``probabilities`` [H, W, K] is filled too when given.
        """
        for y0, band in iter_bands(self.predict_batch, _checked(image, self.spec), self.spec,
                                   **self._kwargs(progress)):
            if probabilities is not None:
                probabilities[y0:y0 + band.shape[0]] = band
            yield y0, band_to_mask(band, self.infer.threshold)


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
