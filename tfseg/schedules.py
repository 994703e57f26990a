"""Optimizers and learning-rate schedules from the ``train`` section.

Optimizers: ``adam``, ``adamw``, ``sgd`` (with ``momentum``; the U-Net paper used 0.99) and
``rmsprop`` (the Carvana post's 2e-4). Schedules:

    constant    ``lr`` (linear warm-up first when ``warmup_epochs`` > 0); ReduceLROnPlateau on
                val_loss applies when ``reduce_lr_patience`` > 0.
    plateau     the same: constant, reduced by ReduceLROnPlateau (the HuBMAP notebook).
    cosine      linear warm-up, then cosine decay from ``lr`` to ``min_lr`` over the run.
    polynomial  linear warm-up, then linear (power 1) decay from ``lr`` to ``min_lr``.

Warm-up of the constant schedules is done by :class:`tfseg.callbacks.Warmup` on the learning-rate
variable, so that ReduceLROnPlateau can still change it; cosine and polynomial are one
serializable :class:`WarmupDecay` schedule.
"""

from __future__ import annotations

import math

import keras
from keras import ops

from tfseg.config import TrainConfig
from tfseg.errors import ConfigError

DECAYING = ("cosine", "polynomial")


@keras.saving.register_keras_serializable(package="tfseg")
class WarmupDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up from 0 to ``lr`` over ``warmup_steps``, then cosine or linear decay to ``min_lr``.

    Args:
        lr: peak learning rate. min_lr: final learning rate.
        warmup_steps: optimizer steps of the warm-up (0 = none).
        total_steps: optimizer steps of the whole run (warm-up included).
        kind: ``cosine`` or ``polynomial``.
    """

    def __init__(self, lr: float, min_lr: float, warmup_steps: int, total_steps: int, kind: str = "cosine"):
        if kind not in DECAYING:
            raise ConfigError(f"train.schedule: expected one of {list(DECAYING)}, got {kind!r}")
        self.lr = float(lr)
        self.min_lr = float(min(min_lr, lr))
        self.warmup_steps = int(warmup_steps)
        self.total_steps = max(int(total_steps), self.warmup_steps + 1)
        self.kind = kind

    def __call__(self, step):
        step = ops.cast(step, "float32")
        warm = float(max(self.warmup_steps, 1))
        warmup = self.lr * ops.minimum(step + 1.0, warm) / warm
        span = float(self.total_steps - self.warmup_steps)
        progress = ops.clip((step - self.warmup_steps) / span, 0.0, 1.0)
        if self.kind == "cosine":
            shape = 0.5 * (1.0 + ops.cos(math.pi * progress))
        else:
            shape = 1.0 - progress
        decayed = self.min_lr + (self.lr - self.min_lr) * shape
        if self.warmup_steps == 0:
            return decayed
        return ops.where(step < self.warmup_steps, warmup, decayed)

    def get_config(self) -> dict:
        return {"lr": self.lr, "min_lr": self.min_lr, "warmup_steps": self.warmup_steps,
                "total_steps": self.total_steps, "kind": self.kind}


def learning_rate(cfg: TrainConfig, steps_per_epoch: int):
    """The optimizer's learning rate: a float (constant, plateau) or a :class:`WarmupDecay`."""
    if cfg.schedule in DECAYING:
        return WarmupDecay(cfg.lr, cfg.min_lr, warmup_steps(cfg, steps_per_epoch),
                           cfg.epochs * steps_per_epoch, cfg.schedule)
    return float(cfg.lr)


def warmup_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    """Optimizer steps of the linear warm-up (``warmup_epochs`` x steps per epoch)."""
    return int(round(cfg.warmup_epochs * steps_per_epoch))


def build_optimizer(cfg: TrainConfig, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    """The optimizer that ``cfg.optimizer`` names, with its schedule (build it under the strategy scope).

    Raises:
        ConfigError: unknown optimizer (listing the valid ones).
    """
    lr = learning_rate(cfg, steps_per_epoch)
    decay = cfg.weight_decay or None
    if cfg.optimizer == "adam":
        return keras.optimizers.Adam(lr, weight_decay=decay)
    if cfg.optimizer == "adamw":
        return keras.optimizers.AdamW(lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return keras.optimizers.SGD(lr, momentum=cfg.momentum, weight_decay=decay)
    if cfg.optimizer == "rmsprop":
        return keras.optimizers.RMSprop(lr, momentum=cfg.momentum, weight_decay=decay)
    from tfseg.registry import unknown_name_message

    raise ConfigError("train.optimizer: " + unknown_name_message("optimizer", cfg.optimizer,
                                                                 ["adam", "adamw", "sgd", "rmsprop"]))


def uses_plateau(cfg: TrainConfig) -> bool:
    """Whether ReduceLROnPlateau runs: a constant/plateau schedule and a positive patience."""
    return cfg.schedule not in DECAYING and cfg.reduce_lr_patience > 0
