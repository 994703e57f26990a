"""``tfseg evaluate --run RUN [--fold K|all] [--data PATH]``: per-image scores and a threshold sweep.

What is scored:

* no ``--data``: each fold's best model on its own held-out records (``fold<k>/val_groups.json``),
  i.e. out-of-fold predictions, at the validation pipeline's size (records resized to
  ``data.image_size``, or their central window of ``data.val_size`` / ``data.image_size``, as
  ``data.fit``), the truth fitted alike;
* ``--data`` a folder of TFRecord shards: every record, at the pipeline's size, likewise;
* ``--data`` a folder of images + masks (read with the run's data config, ``root`` replaced; e.g.
  ``--set data.split=test`` for Kvasir-SEG's fixed split): every pair at its own resolution,
  predicted as ``tfseg predict`` predicts it (:class:`tfseg.inference.Predictor`): as the run
  trained (``infer.fit``), either whole, resized to ``data.image_size`` with the probabilities
  resized back (``data.fit: resize`` runs), or by sliding windows of ``infer.tile_size`` at full
  resolution (runs trained on crops or tiles); so the scores are those of the masks ``predict``
  writes.

With external data and several folds, the folds' probabilities are averaged (the ensemble). Each
model's predictions are those of ``tfseg predict``: averaged over the ``infer.tta`` transforms.

Outputs, in ``--output`` (default ``RUN/evaluate/<oof|data folder name>``):

* ``per_image.csv``: fold, id, dice, iou, pixel_accuracy (binary: also ``dice_background``, the
  Dice of class 0, e.g. ISBI's membranes) at ``infer.threshold`` (with ``--data`` and
  ``infer.threshold_from: oof``: at the best threshold of the run's out-of-fold sweep; multiclass:
  the argmax, no threshold);
* ``sweep.csv`` (binary models): mean Dice and IoU per image, and the global Dice, for thresholds
  0.1..0.9 (TernausNet picked 0.3 this way; pick it on out-of-fold predictions, never on the test);
* ``evaluation.json``: the means, the number of images, the best threshold; how the images met
  the model: ``mode`` (``pipeline``: records at the pipeline's size, scored at that size;
  ``resize`` or ``tiles``: image files predicted as ``tfseg predict`` does, scored at full
  resolution), ``input_size`` (the model's input [h, w]) and ``how`` (the sentence the summary
  prints); ``classes``, and ``threshold`` (null for a multiclass run, which takes the argmax).

The same image can score differently as a record and as an image file (DSB2018's 512 x 512 image
under an ISBI run: one central 512 x 512 window, ``data.val_size``, vs overlapping 256 x 256 tiles
blended): the summary line and ``evaluation.json`` say which ran.

Every checkpoint is checked against the config before an image is read
(:func:`tfseg.checkpoint_checks.check_checkpoint`, as ``tfseg predict`` does): channels, classes,
and a fixed input size against the size it will be fed.

Conventions as :mod:`tfseg.metrics`: an empty prediction of an empty mask scores 1; the mean
Dice is the mean over images of each image's Dice (the Kvasir benchmark's "mean Dice"); a
multiclass image's Dice and IoU are the means over the classes present in its truth or prediction.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np

from tfseg.config import Config
from tfseg.errors import DataError, RunError
from tfseg.files import atomic_write_text

THRESHOLDS = tuple(round(0.1 * i, 1) for i in range(1, 10))


# ------------------------------------------------------------------------------------------------
# Scores of one image (NumPy)
# ------------------------------------------------------------------------------------------------


def _overlap(truth: np.ndarray, pred: np.ndarray) -> tuple[float, float]:
    inter = float(np.logical_and(truth, pred).sum())
    total = float(truth.sum() + pred.sum())
    union = total - inter
    dice = 1.0 if total == 0 else 2.0 * inter / total
    iou = 1.0 if union == 0 else inter / union
    return dice, iou


def image_scores(truth: np.ndarray, probs: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """Dice, IoU and pixel accuracy of one image.

    Args:
        truth: [H, W] or [H, W, 1]; 0/1 (binary) or class indices.
        probs: [H, W, K] probabilities (K = 1: foreground probability).
        threshold: binary threshold (foreground when ``prob > threshold``).

    Returns:
        Binary: dice, iou, pixel_accuracy, dice_background. Multiclass: dice and iou are the means
        over the classes present in the truth or the prediction (1 when neither has any).
    """
    truth = np.asarray(truth).reshape(probs.shape[:2]).astype(np.int64)
    if probs.shape[-1] == 1:
        pred = probs[..., 0] > threshold
        fg = truth > 0
        dice, iou = _overlap(fg, pred)
        dice_bg, _ = _overlap(~fg, ~pred)
        return {"dice": dice, "iou": iou, "pixel_accuracy": float(np.mean(fg == pred)),
                "dice_background": dice_bg}
    pred = probs.argmax(-1)
    dices, ious = [], []
    for c in range(probs.shape[-1]):
        t, p = truth == c, pred == c
        if t.any() or p.any():
            d, i = _overlap(t, p)
            dices.append(d)
            ious.append(i)
    return {"dice": float(np.mean(dices)) if dices else 1.0, "iou": float(np.mean(ious)) if ious else 1.0,
            "pixel_accuracy": float(np.mean(truth == pred))}


class Sweep:
    """Accumulates per-image and global scores of binary predictions at several thresholds."""

    def __init__(self, thresholds=THRESHOLDS):
        self.thresholds = tuple(thresholds)
        n = len(self.thresholds)
        self.dice_sum, self.iou_sum = np.zeros(n), np.zeros(n)
        self.inter, self.total = np.zeros(n), np.zeros(n)
        self.count = 0

    def add(self, truth: np.ndarray, prob: np.ndarray) -> None:
        """truth: [H, W] 0/1; prob: [H, W] foreground probability."""
        fg = truth.reshape(prob.shape) > 0
        for i, t in enumerate(self.thresholds):
            pred = prob > t
            dice, iou = _overlap(fg, pred)
            self.dice_sum[i] += dice
            self.iou_sum[i] += iou
            self.inter[i] += np.logical_and(fg, pred).sum()
            self.total[i] += fg.sum() + pred.sum()
        self.count += 1

    def rows(self) -> list[dict]:
        n = max(self.count, 1)
        return [{"threshold": t, "mean_dice": self.dice_sum[i] / n, "mean_iou": self.iou_sum[i] / n,
                 "global_dice": 1.0 if self.total[i] == 0 else 2 * self.inter[i] / self.total[i]}
                for i, t in enumerate(self.thresholds)]

    def best(self) -> dict:
        return max(self.rows(), key=lambda r: r["mean_dice"])


# ------------------------------------------------------------------------------------------------
# Where the images come from: (fold, id, image batch, truth batch) -> probabilities
# ------------------------------------------------------------------------------------------------


def _shard_batches(cfg: Config, files, groups, mask_crop) -> Iterator[tuple[list[str], np.ndarray,
                                                                          np.ndarray]]:
    from tfseg.data.pipeline import dataset_from_config

    ds = dataset_from_config(cfg, files, training=False, groups=groups, global_batch=cfg.infer.batch_size,
                             mask_crop=mask_crop, with_ids=True)
    for images, masks, ids in ds.as_numpy_iterator():
        yield [i.decode() if isinstance(i, bytes) else str(i) for i in ids], images, masks


def _folder_pairs(cfg: Config, root: Path) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    from tfseg.data import sources

    source = cfg.data.source if cfg.data.source != "tfds" else "folder"
    data = replace(cfg.data, root=str(root), source=source)
    for entry in sources.list_entries(data):
        for sample in sources.read_entry(data, entry):
            yield sample.id, sample.image, sample.mask


# ------------------------------------------------------------------------------------------------
# The evaluation
# ------------------------------------------------------------------------------------------------


def _pipeline_feed(cfg: Config) -> tuple[tuple[int, int], str, str]:
    """[h, w] of the records the validation pipeline feeds the model, the key that sets it, and how
    (:func:`tfseg.data.pipeline.dataset_from_config` with ``training=False``), without how they are scored."""
    (h, w), key = cfg.data.validation_size()
    how = {"resize": f"records resized to {h}x{w} ({key})",
           "random_crop": f"central {h}x{w} windows of the records ({key})"}.get(cfg.data.fit, f"records of {h}x{w}")
    return (h, w), key, how


def evaluate_run(run: str | Path, folds: str = "all", data: str | Path | None = None,
                 cfg: Config | None = None, output: str | Path | None = None) -> dict:
    """Score a run's best models; write per_image.csv, sweep.csv and evaluation.json.

    Args:
        run: ``runs/<name>`` of a training run.
        folds: ``all``, ``K`` or ``K,L``.
        data: None (out-of-fold records), a shard folder, or a folder of images + masks.
        cfg: the config to use (default: the run's ``config.yaml``).
        output: output folder (default ``run/evaluate/<oof|folder name>``).

    Returns:
        The content of ``evaluation.json``.

    Raises:
        RunError: missing run, fold or checkpoint. DataError: unreadable or empty data. ConfigError: a
        checkpoint that does not match the config (:func:`tfseg.checkpoint_checks.check_checkpoint`).
    """
    from tfseg.data.tfrecord import shard_files
    from tfseg.inference import (
        Predictor,
        keras_predict_fn,
        load_checked,
        load_run_config,
        resolve_threshold,
        select_folds,
        tile_spec,
    )
    from tfseg.resize_predict import whole_image_size
    from tfseg.train import mask_crop_for
    from tfseg.tta import with_tta

    run = Path(run)
    cfg = cfg or load_run_config(run)
    checkpoints = select_folds(run, folds)
    if data is not None and not Path(data).is_dir():
        raise DataError(f"{data}: not a folder. Expected a folder of .tfrec shards or of images + masks")
    files = shard_files(data) if data is not None else []
    # how images meet the model: the validation pipeline's records (out-of-fold, shards), or as
    # `tfseg predict` predicts an image file (whole and resized, or tiles at full resolution)
    pipeline = data is None or bool(files)
    resize_to = None if pipeline else whole_image_size(cfg.infer, cfg.data)
    if pipeline:
        feed, feed_key, how = _pipeline_feed(cfg)
    else:
        feed, feed_key = resize_to, "data.image_size"
    # each checkpoint against the config, before any image
    models = load_checked(checkpoints, cfg, feed, feed_key, "" if pipeline else "infer.fit=tile")
    crops = {}  # pipeline records: the truth centre-cropped to each model's output at the records' size
    if pipeline:  # a model of any size: can it take the records' size? (one line naming the key if not)
        for k, model in models.items():
            tile_spec(model, feed, feed_key)
            crops[k] = mask_crop_for(model, feed)
        cropped = sorted({crop for crop in crops.values() if crop is not None})
        # a valid-convolution model (unet_original) scores the centre of the records only
        how += (", scored on the centre " + " / ".join(f"{h}x{w}" for h, w in cropped)
                + " that the model's output covers (the truth centre-cropped to it)" if cropped
                else ", scored at that size")
    # held-out data is scored at the out-of-fold threshold when asked (infer.threshold_from: oof)
    threshold = (cfg.infer if data is None else resolve_threshold(run, cfg.infer)).threshold
    # records are scored as `tfseg predict` would predict them: with the run's test-time augmentation
    # (image files go through a Predictor, which does the same)
    predicts = {k: with_tta(keras_predict_fn(m), cfg.infer.tta) for k, m in models.items()} if pipeline else {}
    classes = int(next(iter(models.values())).output_shape[-1])
    binary = classes == 1
    sweep = Sweep() if binary else None
    rows: list[dict] = []

    def score(fold, ident, truth, probs):
        rows.append({"fold": fold, "id": ident, **image_scores(truth, probs, threshold)})
        if sweep is not None:
            sweep.add(np.asarray(truth).reshape(probs.shape[:2]), probs[..., 0])

    ensemble = "+".join(str(k) for k in models)
    if data is None:
        label = "oof"
        for k in models:
            held = run / f"fold{k}" / "val_groups.json"
            if not held.is_file():
                raise RunError(f"{held}: not found. Expected the held-out groups written by `tfseg train`.")
            split = json.loads(held.read_text())
            fold_files = [f for f in shard_files(cfg.data.tfrecord_dir) if f in set(split["val_files"])] \
                or split["val_files"]
            for ids, images, masks in _shard_batches(cfg, fold_files, split["val_groups"], crops[k]):
                for ident, truth, probs in zip(ids, masks, predicts[k](images)):
                    score(k, ident, truth, probs)
    elif files:
        label = Path(data).name
        for ids, images, masks in _shard_batches(cfg, files, None, next(iter(crops.values()))):
            probs = np.mean([p(images) for p in predicts.values()], axis=0)
            for ident, truth, prob in zip(ids, masks, probs):
                score(ensemble, ident, truth, prob)
    else:  # every pair at its own resolution, predicted exactly as `tfseg predict` predicts it
        label = Path(data).name
        infer = replace(cfg.infer, threshold=threshold, accumulator="float32")
        predictor = Predictor(list(models.values()), infer, resize_to=resize_to)
        how = f"{predictor.how}, scored at full resolution"
        for ident, image, mask in _folder_pairs(cfg, Path(data)):
            score(ensemble, ident, mask, predictor.predict(image))
    if not rows:
        raise DataError(f"{data or cfg.data.tfrecord_dir}: no images to evaluate")
    mode = {"mode": "pipeline" if pipeline else "resize" if resize_to else "tiles",
            "input_size": list(feed or predictor.spec.in_hw), "how": how, "classes": classes}
    return _write(Path(output) if output else run / "evaluate" / label, rows, sweep,
                  threshold if binary else None, label, cfg.infer.tta, mode)


def _csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: f"{v:.6f}" if isinstance(v, float) else v for k, v in row.items()})
    return buf.getvalue()


def _write(out: Path, rows: list[dict], sweep: Sweep | None, threshold: float | None, label: str,
           tta: int = 1, mode: dict | None = None) -> dict:
    """Write the tables and ``evaluation.json``; ``threshold`` None: a multiclass run (argmax);
    ``mode``: how the images met the model (mode, input_size, how) and the model's classes."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "per_image.csv", _csv(rows))
    names = [k for k in rows[0] if k not in ("fold", "id")]
    result = {"data": label, "images": len(rows), **(mode or {}), "threshold": threshold, "tta": tta,
              "mean": {n: float(np.mean([r[n] for r in rows])) for n in names}}
    folds = sorted({str(r["fold"]) for r in rows})
    if len(folds) > 1:  # out-of-fold: the means of each fold too (cross-validation spread)
        result["folds"] = {f: {n: float(np.mean([r[n] for r in rows if str(r["fold"]) == f])) for n in names}
                           for f in folds}
    if sweep is not None:
        atomic_write_text(out / "sweep.csv", _csv(sweep.rows()))
        best = sweep.best()
        result["best_threshold"] = {"threshold": best["threshold"], "mean_dice": float(best["mean_dice"]),
                                    "mean_iou": float(best["mean_iou"])}
    atomic_write_text(out / "evaluation.json", json.dumps(result, indent=1))
    result["output"] = str(out)
    return result


def cli_evaluate(args) -> int:
    """``tfseg evaluate --run RUN [--fold K|all] [--data PATH] [--output DIR] [--config C] [--set k=v]``."""
    from tfseg.inference import load_run_config

    cfg = load_run_config(args.run, args.config, args.overrides)
    result = evaluate_run(args.run, args.fold, args.data, cfg, args.output)
    mean = result["mean"]
    # binary: foreground where prob > threshold; multiclass: the argmax, Dice/IoU averaged over classes
    cut = f"threshold {result['threshold']}" if result["threshold"] is not None else \
        f"argmax over {result.get('classes', 'the')} classes"
    print(f"{result['images']} images ({result['data']}; {result['how']}), {cut}: "
          f"mean Dice {mean['dice']:.4f}, mean IoU {mean['iou']:.4f}, "
          f"pixel accuracy {mean['pixel_accuracy']:.4f}")
    if "best_threshold" in result:
        best = result["best_threshold"]
        print(f"threshold sweep: best {best['threshold']} (mean Dice {best['mean_dice']:.4f})")
    print(f"-> {result['output']}", file=sys.stderr)
    return 0
