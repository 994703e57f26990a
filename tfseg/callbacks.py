"""Training callbacks that survive a restart: history, best checkpoint, warm-up, NaN guard, images.

Keras' own ``CSVLogger`` and ``ModelCheckpoint`` forget their state when a preempted run resumes
through ``BackupAndRestore`` (the checkpoint's best value starts again from -inf, the CSV gets
duplicate rows) and write their files in place. These callbacks read the fold's ``history.csv``
back on resume, and write every file atomically (:func:`tfseg.files.atomic_path`).

Order matters: ``BackupAndRestore`` first (it sets the initial epoch), then :class:`HistoryCSV`
(it drops rows of epochs that will run again), then :class:`BestCheckpoint` (it takes the best
value so far from the history).
"""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path

import keras
import numpy as np

from tfseg.files import atomic_path, atomic_write_text, read_csv_rows


def current_lr(model) -> float:
    """The optimizer's learning rate now (evaluating a schedule at the current step)."""
    opt = model.optimizer
    lr = opt.learning_rate
    if isinstance(getattr(opt, "_learning_rate", None), keras.optimizers.schedules.LearningRateSchedule):
        lr = opt._learning_rate(opt.iterations)
    return float(keras.ops.convert_to_numpy(lr))


class HistoryCSV(keras.callbacks.Callback):
    """One row per epoch (``epoch``, the logs, ``lr``) in ``path``; rewritten atomically each epoch.

    On (re)start, rows of epochs at or after the initial epoch are dropped, so a resumed run
    continues the file without duplicates and a fresh run starts it again.
    """

    def __init__(self, path: str | os.PathLike):
        super().__init__()
        self.path = Path(path)
        self.rows: list[dict] = []

    def on_train_begin(self, logs=None):
        start = int(getattr(self.model, "_initial_epoch", None) or 0)
        self.rows = [r for r in read_csv_rows(self.path) if int(float(r["epoch"])) < start]
        self._write()

    def on_epoch_end(self, epoch, logs=None):
        row = {"epoch": epoch}
        row.update({k: float(v) for k, v in (logs or {}).items() if np.ndim(v) == 0})
        row["lr"] = current_lr(self.model)
        self.rows.append(row)
        self._write()

    def _write(self):
        columns: list[str] = []
        for row in self.rows:
            columns += [k for k in row if k not in columns]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns or ["epoch"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.path, buf.getvalue())


class BestCheckpoint(keras.callbacks.Callback):
    """Save the whole model to ``path`` (``.keras``) when ``monitor`` improves; atomic.

    The best value so far is read from ``history`` at the start, so a resumed run only replaces
    ``best.keras`` with a better model.
    """

    def __init__(self, path: str | os.PathLike, monitor: str, mode: str, history: str | os.PathLike):
        super().__init__()
        self.path = Path(path)
        self.monitor = monitor
        self.mode = mode
        self.history = Path(history)
        self.best = -math.inf if mode == "max" else math.inf
        self.best_epoch = -1

    def _better(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        return value > self.best if self.mode == "max" else value < self.best

    def on_train_begin(self, logs=None):
        for row in read_csv_rows(self.history):
            value = float(row.get(self.monitor) or "nan")
            if self._better(value):
                self.best, self.best_epoch = value, int(float(row["epoch"]))

    def on_epoch_end(self, epoch, logs=None):
        value = float((logs or {}).get(self.monitor, math.nan))
        if self._better(value):
            self.best, self.best_epoch = value, epoch
            with atomic_path(self.path) as tmp:
                self.model.save(tmp)


class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
    """``EarlyStopping(restore_best_weights=True)`` whose patience runs across a resumed fit.

    Keras' callback starts counting afresh at every ``fit``, so a fold resumed after an interruption
    waited ``patience`` epochs more than an uninterrupted one, and restored "the best epoch" among the
    resumed epochs only. At the first epoch of a ``fit``, this one replays the ``monitor`` column of
    ``history`` for the epochs before it, from epoch ``since`` (the stage's first: a two-stage fold's
    frozen-encoder epochs do not count), giving the best value, the best epoch and the epochs waited. When the best
    epoch is one from before the resume, its weights are not in memory: stopping restores them from
    ``best_path`` (``best.keras``, which :class:`BestCheckpoint` wrote at that epoch).

    ``restore_best_weights=False`` (what ``tfseg train`` passes) stops without putting any weights back:
    ``best.keras`` holds the fold's best already, over all its stages, and the model in memory is dropped
    after the fold. Keras' restore would copy every weight to the host at each improvement, and in a
    two-stage fold say it restored the best epoch of the last stage, which need not be the fold's best.
    """

    def __init__(self, monitor: str, mode: str, patience: int, history: str | os.PathLike,
                 best_path: str | os.PathLike, since: int = 0, verbose: int = 1, restore_best_weights: bool = True):
        super().__init__(monitor=monitor, mode=mode, patience=patience, restore_best_weights=restore_best_weights,
                         verbose=verbose)
        self.history = Path(history)
        self.best_path = Path(best_path)
        self.since = int(since)
        self._replayed = False
        self._best_from_file = False

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self._replayed = self._best_from_file = False

    def on_epoch_begin(self, epoch, logs=None):
        if self._replayed:
            return
        self._replayed = True
        if self.monitor_op is None:
            self._set_monitor_op()
        for row in read_csv_rows(self.history):
            past, value = int(float(row["epoch"])), float(row.get(self.monitor) or "nan")
            if not self.since <= past < epoch or not math.isfinite(value):
                continue
            self.wait += 1
            if self.best is None or self._is_improvement(value, self.best):
                self.best, self.best_epoch, self.wait = value, past, 0
                self._best_from_file = self.best_path.is_file()
        if self._best_from_file and self.restore_best_weights:
            self.best_weights = []  # not None: Keras would take the current weights for the best ones

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, logs)
        if self.best_epoch == epoch:
            self._best_from_file = False

    def on_train_end(self, logs=None):
        if not (self._best_from_file and self.restore_best_weights):
            return super().on_train_end(logs)
        if self.stopped_epoch > 0 and self.verbose > 0:
            print(f"Epoch {self.stopped_epoch + 1}: early stopping", flush=True)
        if self.verbose > 0:
            print(f"Restoring model weights from the end of the best epoch: {self.best_epoch + 1} "
                  f"(before the resume; from {self.best_path.name}).", flush=True)
        self.model.load_weights(self.best_path)


class Warmup(keras.callbacks.Callback):
    """Linear warm-up of a constant learning rate over ``steps`` optimizer steps.

    Sets the optimizer's learning-rate variable before each batch while ``iterations < steps``,
    so ReduceLROnPlateau can still act on it afterwards (the LGG post's warm-up).
    """

    def __init__(self, lr: float, steps: int):
        super().__init__()
        self.lr = float(lr)
        self.steps = int(steps)

    def on_train_batch_begin(self, batch, logs=None):
        step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        if step < self.steps:
            self.model.optimizer.learning_rate = self.lr * (step + 1) / self.steps
        elif step == self.steps:
            self.model.optimizer.learning_rate = self.lr


class NanGuard(keras.callbacks.Callback):
    """Stop at the first non-finite training loss and remember where (``self.where``)."""

    def __init__(self):
        super().__init__()
        self.where: tuple[int, int, float] | None = None
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)) and self.where is None:
            self.where = (self.epoch, batch, float(loss))
            self.model.stop_training = True


class ImageSummary(keras.callbacks.Callback):
    """Each epoch, write panels (image, truth, prediction, overlay) of a few validation images to
    TensorBoard (the Carvana post's TensorboardVisualizerCallback, the tutorial's DisplayCallback).

    Args:
        logdir: TensorBoard folder (``fold<k>/tensorboard/images``).
        images: float32 [N, H, W, C] in 0..255. masks: [N, H', W', 1].
        classes: model output channels. threshold: binary threshold.
    """

    def __init__(self, logdir: str | os.PathLike, images, masks, classes: int, threshold: float = 0.5):
        super().__init__()
        self.logdir = str(logdir)
        self.images = np.asarray(images)
        self.masks = np.asarray(masks)
        self.classes = classes
        self.threshold = threshold
        self._writer = None

    def render(self, epoch: int) -> np.ndarray:
        """The panels of this epoch: uint8 [N, h, w, 3], one row picture per validation image."""
        from tfseg import viz

        probs = np.asarray(self.model.predict_on_batch(self.images))
        panels = []
        for image, mask, prob in zip(self.images, self.masks, probs):
            if self.classes == 1:
                pred = (prob[..., 0] > self.threshold).astype(np.uint8)
            else:
                pred = prob.argmax(-1).astype(np.uint8)
            if pred.shape != image.shape[:2]:  # smaller output (valid convolutions): crop the image
                dy, dx = (image.shape[0] - pred.shape[0]) // 2, (image.shape[1] - pred.shape[1]) // 2
                image = image[dy:dy + pred.shape[0], dx:dx + pred.shape[1]]
            panels.append(viz.panel(np.clip(image, 0, 255).astype(np.uint8), pred,
                                    mask[..., 0].astype(np.uint8), title=f"epoch {epoch + 1}"))
        height = min(p.shape[0] for p in panels)
        width = min(p.shape[1] for p in panels)
        return np.stack([p[:height, :width] for p in panels])

    def on_epoch_end(self, epoch, logs=None):
        import tensorflow as tf

        if self._writer is None:
            self._writer = tf.summary.create_file_writer(self.logdir)
        with self._writer.as_default():
            tf.summary.image("validation/panels", self.render(epoch), step=epoch,
                             max_outputs=len(self.images))
        self._writer.flush()

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()


class TimeLimit(keras.callbacks.Callback):
    """Stop after the epoch during which ``minutes`` of training have passed (benchmarks with a
    fixed time budget; the epoch in progress finishes and is validated and checkpointed).

    ``start``: the ``clock()`` time the budget counts from (a two-stage fold passes its start to
    the callback of each stage); None: the start of ``fit``.
    """

    def __init__(self, minutes: float, clock=None, start: float | None = None):
        super().__init__()
        import time

        self.seconds = float(minutes) * 60.0
        self.clock = clock or time.monotonic
        self.start = start
        self.stopped_epoch: int | None = None

    def on_train_begin(self, logs=None):
        if self.start is None:
            self.start = self.clock()

    def on_epoch_end(self, epoch, logs=None):
        if self.clock() - self.start >= self.seconds:
            self.stopped_epoch = epoch
            self.model.stop_training = True
            print(f"tfseg train: time limit of {self.seconds / 60:g} minutes reached after epoch {epoch + 1}",
                  flush=True)


class SaveLast(keras.callbacks.Callback):
    """Save the model as the run ended (``last.keras``, atomic) unless the loss went NaN.

    Place it before ``EarlyStopping(restore_best_weights=True)``, whose ``on_train_end`` puts the
    best weights back: ``last.keras`` keeps the last epoch's weights, ``best.keras`` the best.
    """

    def __init__(self, path: str | os.PathLike, nan_guard: NanGuard | None = None):
        super().__init__()
        self.path = Path(path)
        self.nan_guard = nan_guard

    def on_train_end(self, logs=None):
        if self.nan_guard is not None and self.nan_guard.where is not None:
            return
        with atomic_path(self.path) as tmp:
            self.model.save(tmp)
