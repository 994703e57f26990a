"""How one fold is fitted: its stages, the compile of each, and each stage's callbacks.

One stage by default: epochs ``[0, train.epochs)``, the model as built. With
``train.freeze_encoder_epochs: W`` (W > 0) two, the two-stage fine-tuning recipe of the HuBMAP
notebook's commented pretrain (warm up the decoder, then train all):

    1. epochs [0, W): the encoder frozen (its BatchNorm in inference mode), the decoder and head
       trained, with an optimizer and learning-rate schedule of their own over W epochs;
    2. epochs [W, train.epochs): the encoder unfrozen and the model compiled again, with a fresh
       optimizer and schedule over the remaining epochs (a fresh Adam: moments started at the switch
       would make the encoder's first updates several times ``lr``). Early stopping watches this
       stage only.

Each stage backs up to a folder of its own, because the optimizers differ: stage 1 to
``fold<k>/backup-decoder`` (kept until the fold ends, so a run stopped between the stages
resumes at stage 2 from stage 1's weights), stage 2 to ``fold<k>/backup``. A restarted run
starts at the latest stage that has a backup. ``history.csv`` and ``best.keras`` run across both
stages.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from pathlib import Path

from tfseg.config import Config, TrainConfig


@dataclass(frozen=True)
class Stage:
    """Epochs ``[first_epoch, last_epoch)`` of a fold, trained with the encoder ``frozen`` or not."""

    first_epoch: int
    last_epoch: int
    frozen: bool | None  # None: the model's own flags (one stage)
    backup: str  # the BackupAndRestore folder under the fold's folder
    early_stopping: bool

    @property
    def epochs(self) -> int:
        return self.last_epoch - self.first_epoch


def plan_stages(t: TrainConfig) -> list[Stage]:
    """The fold's stages (see the module docstring)."""
    w = t.freeze_encoder_epochs
    if not w:
        return [Stage(0, t.epochs, None, "backup", True)]
    return [Stage(0, w, True, "backup-decoder", False), Stage(w, t.epochs, False, "backup", True)]


def resume_stage(stages: list[Stage], fold_dir: Path) -> int:
    """Index of the stage to start at: the latest one whose backup holds something, else 0."""
    for i in range(len(stages) - 1, -1, -1):
        folder = fold_dir / stages[i].backup
        if folder.is_dir() and any(folder.iterdir()):
            return i
    return 0


def compile_stage(model, cfg: Config, steps_per_epoch: int, stage: Stage, from_logits: bool) -> None:
    """Compile ``model`` for ``stage``: the encoder frozen or unfrozen, loss, metrics, and an optimizer
    whose schedule spans the stage's epochs; then ``prepare_training`` (call under the strategy scope).
    Checkpoints record ``jit_compile: auto`` and ``steps_per_execution: 1``, whatever this run used."""
    import keras

    from tfseg.distribute import prepare_training, steps_per_execution_for
    from tfseg.losses import build_loss
    from tfseg.metrics import build_metrics
    from tfseg.models.common import encoder_layers, set_trainable
    from tfseg.schedules import build_optimizer

    if stage.frozen is not None:
        set_trainable(encoder_layers(model), not stage.frozen)
    classes = int(model.output_shape[-1])
    t = cfg.train
    model.compile(
        optimizer=build_optimizer(replace(t, epochs=stage.epochs), steps_per_epoch),
        loss=build_loss(t.loss, classes=classes, from_logits=from_logits, class_weights=t.class_weights),
        metrics=build_metrics(t.metrics, classes=classes, from_logits=from_logits, threshold=cfg.infer.threshold),
        # On JAX, jax.jit is the only compiled mode: Keras runs a step that is not jit-compiled op by op.
        jit_compile=t.jit_compile or keras.config.backend() == "jax",
        steps_per_execution=steps_per_execution_for(t.steps_per_execution),
    )
    # What the checkpoints say about compiling: each backend's own default, not this run's choice. A JAX run's
    # jit_compile=True made keras.models.load_model on PyTorch call torch.compile, and on TensorFlow's CPU XLA
    # (5x slower there); a TPU run's steps_per_execution is a setting of that run.
    model._compile_config.config.update(jit_compile="auto", steps_per_execution=1)
    prepare_training(model)  # TensorFlow backend: fused BatchNorm and optimizer kernels, one trace


def announce(fold: int, stages: list[Stage], index: int) -> None:
    """One line as each stage of a two-stage fold starts."""
    if len(stages) == 1:
        return
    s = stages[index]
    what = ("the encoder frozen, the decoder trained" if s.frozen
            else "the whole model, encoder unfrozen, with a fresh optimizer")
    print(f"tfseg train: fold {fold}: stage {index + 1}/{len(stages)}, epochs {s.first_epoch + 1}-{s.last_epoch}: "
          f"{what}", file=sys.stderr, flush=True)


def make_callbacks(cfg: Config, fold_dir: Path, steps_per_epoch: int, sample=None, write: bool = True,
                   stage: Stage | None = None, started: float | None = None):
    """The callbacks of one stage of the fold, in the order they must run. Returns (callbacks, nan_guard, best).

    ``stage`` names the backup folder and whether early stopping runs (default: the one stage of a
    fold); ``started`` is when the fold's fit began (``time.monotonic()``), so that
    ``train.time_limit_minutes`` counts both stages.
    """
    import keras

    from tfseg.callbacks import (
        BestCheckpoint,
        HistoryCSV,
        ImageSummary,
        NanGuard,
        ResumableEarlyStopping,
        SaveLast,
        TimeLimit,
        Warmup,
    )
    from tfseg.schedules import uses_plateau, warmup_steps

    t = cfg.train
    stage = stage or plan_stages(replace(t, freeze_encoder_epochs=0))[0]
    save_freq = t.backup_steps if t.backup_steps > 0 else "epoch"
    history = fold_dir / "history.csv"
    nan_guard = NanGuard()
    best = BestCheckpoint(fold_dir / "best.keras", t.monitor, t.monitor_mode, history)
    # An earlier stage's backup is kept at its end: the fold removes it once the last stage has run (tfseg.train).
    backup = keras.callbacks.BackupAndRestore(str(fold_dir / stage.backup), save_freq=save_freq,
                                              delete_checkpoint=stage.last_epoch == t.epochs)
    callbacks = [backup, HistoryCSV(history), best, nan_guard, keras.callbacks.TerminateOnNaN(),
                 SaveLast(fold_dir / "last.keras", nan_guard)]
    warm = warmup_steps(t, steps_per_epoch)
    if t.schedule not in ("cosine", "polynomial") and warm > 0:
        callbacks.append(Warmup(t.lr, warm))
    if uses_plateau(t):
        callbacks.append(keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=t.reduce_lr_factor,
                                                           patience=t.reduce_lr_patience, min_lr=t.min_lr,
                                                           mode="min", verbose=1))
    if t.time_limit_minutes is not None:
        callbacks.append(TimeLimit(t.time_limit_minutes, start=started))
    if t.early_stopping_patience > 0 and stage.early_stopping:
        # no restore: best.keras is the fold's best (over its stages); the weights in memory are dropped
        callbacks.append(ResumableEarlyStopping(t.monitor, t.monitor_mode, t.early_stopping_patience, history,
                                                fold_dir / "best.keras", since=stage.first_epoch,
                                                restore_best_weights=False))
    if t.tensorboard and write and tensorboard_available():  # tfseg.train says once per fold when it is not
        callbacks.append(keras.callbacks.TensorBoard(str(fold_dir / "tensorboard"), write_graph=False))
        if sample is not None:
            classes = cfg.model.classes or cfg.data.classes
            callbacks.append(ImageSummary(fold_dir / "tensorboard" / "images", sample[0], sample[1], classes,
                                          cfg.infer.threshold))
    return callbacks, nan_guard, best


def tensorboard_available() -> bool:
    """Whether ``tf.summary`` can write (TensorFlow 2.21 no longer installs tensorboard itself)."""
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None
