"""K-fold training: ``tfseg train --fold K|all`` and ``python -m tfseg.train --fold 0``.

One fold, top to bottom (:func:`train_fold`):

    1. check invariants (loss, metrics, monitor, augmentations, batch) before anything heavy
    2. choose the strategy (TPU / multi-worker / mirrored / default; JAX DataParallel)
    3. check the model (architecture, options, input sizes; pretrained weights when shards are
       still to be written) and the folds, then write the TFRecord shards if there are none, and
       split the records into folds (grouped, stratified; ``tfseg.data.folds.fold_split``)
    4. build the model, its loss, optimizer and metrics under ``strategy.scope()``
    5. build the datasets (global batch = per-replica batch x replicas; masks centre-cropped to the
       output of models whose output is smaller than their input, for the size each dataset feeds)
    6. create the fold's folder; callbacks: BackupAndRestore, history CSV, best and last
       checkpoints, EarlyStopping, ReduceLROnPlateau, warm-up, TerminateOnNaN, TensorBoard
    7. fit: one stage, or two with ``train.freeze_encoder_epochs`` (the encoder frozen, then all;
       :mod:`tfseg.train_stages`, which also makes each stage's callbacks)
    8. write the fold's outputs and the run's ``summary.json``

Nothing is written under ``runs/<name>`` before step 6, and a fold that fails before its first
epoch ends takes away the folders this call created (a folder that holds results, e.g. a
preempted run's ``backup/``, is never removed, so resuming keeps working).

Outputs (the run directory layout that evaluation, inference and export read)::

    runs/<name>/config.yaml, summary.json
    runs/<name>/fold<k>/config.yaml, best.keras, last.keras, history.csv, curves.png,
                        tensorboard/, backup/ (and backup-decoder/ with two stages), val_groups.json

A run killed mid-epoch (TPU/Colab preemption) and started again with the same command resumes
from ``fold<k>/backup`` and finishes with the planned number of epochs. What a fold that holds something
already gets (resume, an error, a skip, or with ``--overwrite`` a fresh start) is :mod:`tfseg.train_rerun`'s.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from tfseg.config import Config, dump_config, key_origin, load_config
from tfseg.errors import ConfigError, ModelError, RunError
from tfseg.files import atomic_write_text, read_csv_rows
from tfseg.train_checks import (  # noqa: F401 - check_invariants, ensure_tfrecords: part of this module's API
    LOSS_MONITORS,
    check_invariants,
    ensure_tfrecords,
    model_error,
    prepare,
    removed_if_no_results,
)
from tfseg.train_rerun import (  # noqa: F401 - update_summary: part of this module's API
    RESUME,
    SKIP,
    START_OVER,
    check_backup,
    check_split,
    clear_for,
    describe,
    plan_fold,
    skip_line,
    update_summary,
)
from tfseg.train_stages import (  # noqa: F401 - make_callbacks, tensorboard_available: part of this module's API
    Stage,
    announce,
    compile_stage,
    make_callbacks,
    plan_stages,
    resume_stage,
    tensorboard_available,
)

# ------------------------------------------------------------------------------------------------
# 1. invariants (tfseg.train_checks), folds, run folder
# ------------------------------------------------------------------------------------------------


def parse_folds(text: str | int, k: int) -> list[int]:
    """``"all"`` -> [0..k-1]; ``"2"`` -> [2]; ``"0,3"`` -> [0, 3].

    Raises:
        ConfigError: a fold outside [0, k) or not a number.
    """
    if str(text) == "all":
        return list(range(k))
    folds = []
    for part in str(text).split(","):
        if not part.strip().isdigit() or not 0 <= int(part) < k:
            raise ConfigError(f"--fold {text!r}: expected `all` or fold numbers in 0..{k - 1} "
                              f"(train.folds={k})")
        folds.append(int(part))
    return folds


def run_dir(cfg: Config) -> Path:
    """``<train.output_dir>/<train.name>``."""
    return Path(cfg.train.output_dir) / cfg.train.name


# ------------------------------------------------------------------------------------------------
# 4. model
# ------------------------------------------------------------------------------------------------


def build_compiled_model(cfg: Config, steps_per_epoch: int, stage: Stage | None = None):
    """Model + loss + optimizer + metrics (call under ``strategy.scope()``). Returns (model, from_logits).

    Compiled for ``stage`` (default: the fold's first, :func:`tfseg.train_stages.plan_stages`).
    """
    import keras

    from tfseg.models import build_model
    from tfseg.models.common import resolve_activation

    keras.utils.set_random_seed(cfg.train.seed)
    try:
        model = build_model(cfg.model)
    except ModelError as err:
        raise model_error(cfg, err, "model.input_shape" if key_origin(cfg, "model.input_shape")
                          else "data.image_size") from None
    from_logits = resolve_activation(cfg.model.activation, int(model.output_shape[-1])) == "linear"
    compile_stage(model, cfg, steps_per_epoch, stage or plan_stages(cfg.train)[0], from_logits)
    return model, from_logits


def mask_crop_for(model, size: Sequence[int] | None = None) -> tuple[int, int] | None:
    """[h, w] of the model's output for an input of ``size`` [h, w] when smaller than it (the original
    U-Net: 572 -> 388), else None: the size to centre-crop the masks fed with such inputs to.

    A model that takes any size (``[null, null, C]``: ``data.val_size`` set) is fed two sizes, e.g. 188
    to train (output 4) and 508 to validate (output 324), so the crop is asked for the size fed. Keras'
    ``compute_output_shape`` answers without computing; it does not check that a U-Net's skips line up,
    so the size must be one the model was built at already (``tfseg.train_checks.check_model`` builds
    it at every size training feeds; ``tfseg.inference.tile_spec`` runs it once at the size evaluated).

    Args:
        model: a Keras model, one image input [B, H, W, C].
        size: [h, w] fed; None: the model's own fixed input size (None for a model that takes any size).

    Raises:
        ModelError: ``size`` differs from the fixed size of the model.
    """
    (ih, iw), channels = model.input_shape[1:3], model.input_shape[-1]
    if size is None:
        if None in (ih, iw):
            return None
        size = (ih, iw)
    h, w = int(size[0]), int(size[1])
    if None not in (ih, iw) and (int(ih), int(iw)) != (h, w):
        raise ModelError(f"the model takes only {ih}x{iw} inputs; it cannot be fed {h}x{w}")
    if None in (ih, iw):
        oh, ow = model.compute_output_shape((1, h, w, channels))[1:3]
    else:
        oh, ow = model.output_shape[1:3]
    if None in (oh, ow) or (int(oh), int(ow)) == (h, w):
        return None
    return int(oh), int(ow)


def shard_by_data(ds):
    """The dataset with the DATA auto-shard policy: each worker keeps every n-th batch element."""
    import tensorflow as tf

    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return ds.with_options(options)


# ------------------------------------------------------------------------------------------------
# 5. validation under JAX's data parallelism (6. callbacks: tfseg.train_stages.make_callbacks)
# ------------------------------------------------------------------------------------------------


def whole_device_batches(val_ds, n_val: int, global_batch: int, replicas: int, fold: int):
    """The validation batches cut so that JAX's data parallelism can shard every one of them.

    ``keras.distribution.DataParallel`` splits each batch evenly over the devices, so a last batch
    whose size is not a multiple of ``replicas`` fails inside ``fit`` (jax's IndivisibleError) after
    the first training epoch. TensorFlow's strategies take uneven batches; here the last
    ``n_val % replicas`` records (the same ones every epoch: validation is not shuffled) are left out.

    Returns:
        (dataset, records kept).

    Raises:
        RunError: fewer validation records than devices.
    """
    keep = n_val - n_val % replicas
    if keep == 0:
        raise RunError(f"fold {fold}: {n_val} validation record(s) for {replicas} devices; JAX's data parallelism "
                       "needs at least one per device. Use fewer train.folds or fewer devices")
    return val_ds.unbatch().take(keep).batch(global_batch), keep


# ------------------------------------------------------------------------------------------------
# one fold
# ------------------------------------------------------------------------------------------------


def train_fold(cfg: Config, fold: int, dist=None, verbose: int = 2, callbacks: Sequence = (),
               overwrite: bool = False) -> dict:
    """Train fold ``fold`` of ``cfg`` and write its outputs.

    Args:
        cfg: the resolved config (loaded once at the entry point).
        fold: which fold is held out, ``0 <= fold < train.folds``.
        dist: a :class:`tfseg.distribute.Distribution`; None chooses one from ``train.strategy``.
        verbose: Keras ``fit`` verbosity (2 = one line per epoch).
        callbacks: more ``keras.callbacks.Callback`` objects (a notebook's display callback, say);
            they run after tfseg's own, which see each epoch's logs first.
        overwrite: train the fold from scratch even when its folder holds results or a backup
            (:mod:`tfseg.train_rerun`); without it a finished fold is an error and an interrupted one resumes.

    Returns:
        ``{"best", "best_epoch", "epochs", "n_train", "n_val", "fold_dir"}``.

    Raises:
        ConfigError / DataError: bad config or data (one line). RunError: the loss became NaN; the fold
            finished already (without ``overwrite``); its backup cannot resume with this config.
    """
    import keras

    from tfseg.data.folds import fold_split
    from tfseg.data.pipeline import check_global_batch, dataset_from_config
    from tfseg.distribute import prebuild, set_mixed_precision, setup_distribution

    # 1. invariants, and what to do with the fold's folder: train, resume or start over (tfseg.train_rerun)
    check_invariants(cfg)
    callbacks = _check_callbacks(callbacks)
    t = cfg.train
    out_dir = run_dir(cfg)
    fold_dir = out_dir / f"fold{fold}"
    action, changes = plan_fold(cfg, fold, fold_dir, overwrite)
    # 2. strategy
    set_mixed_precision(t.mixed_precision)
    dist = dist or setup_distribution(t.strategy)
    global_batch = check_global_batch(t.batch_size, dist.replicas)
    # 3. model and folds checked, records written, folds split: nothing under runs/ yet
    prepare(cfg)
    split = fold_split(cfg.data.tfrecord_dir, t.folds, fold, t.seed)
    if action == RESUME:
        check_split(fold_dir, fold, split.val_groups)
    steps = t.steps_per_epoch or max(1, split.n_train // global_batch)
    # The whole validation fold each epoch; counted from the manifest, so Keras does not run the
    # (group-filtered, unknown-length) dataset dry and warn that the input "ran out of data".
    val_steps = t.validation_steps or (math.ceil(split.n_val / global_batch) if dist.workers == 1 else None)
    rerun = action in (RESUME, START_OVER) and (fold_dir / "best.keras").is_file()  # its evaluations go (step 6)
    if not dist.is_chief:  # the other workers of a multi-worker run write beside, not over, the chief
        fold_dir = fold_dir / f".worker-{os.getpid()}"
    # 4. model under the strategy scope, compiled for the stage to start at (a resumed run's latest)
    stages = plan_stages(t)
    first = 0 if action == START_OVER else resume_stage(stages, fold_dir)
    with dist.scope():
        model, from_logits = build_compiled_model(cfg, steps, stages[first])
    # 5. datasets; masks cropped to the output of the size each feeds (a model of any size: two crops)
    workers = dist.workers
    train_crop = mask_crop_for(model, cfg.data.image_size)
    val_crop = mask_crop_for(model, cfg.data.validation_size()[0])
    train_ds = dataset_from_config(cfg, split.train_files, training=True, groups=split.train_groups,
                                   global_batch=global_batch, mask_crop=train_crop, num_workers=workers)
    val_ds = dataset_from_config(cfg, split.val_files, training=False, groups=split.val_groups,
                                 global_batch=global_batch, mask_crop=val_crop, num_workers=workers)
    if dist.workers > 1:  # FILE sharding cannot walk past the pipeline's seed stream: shard by DATA
        train_ds, val_ds = shard_by_data(train_ds), shard_by_data(val_ds)
    val_note = ""
    if dist.kind == "jax_data_parallel" and split.n_val % dist.replicas:
        val_ds, n_scored = whole_device_batches(val_ds, split.n_val, global_batch, dist.replicas, fold)
        val_steps = min(val_steps or math.inf, math.ceil(n_scored / global_batch))
        val_note = (f"; validating on {n_scored} of the {split.n_val} records (JAX shards each batch over "
                    f"{dist.replicas} devices; `tfseg evaluate` scores them all)")
    prebuild(model, train_ds)
    if action == RESUME and dist.is_chief:
        check_backup(model, fold_dir / stages[first].backup, fold)
    sample = None
    if t.tensorboard and dist.is_chief and not tensorboard_available():
        print("tfseg train: the tensorboard package is not installed (pip install tensorboard); "
              "no TensorBoard logs", file=sys.stderr)
    if t.tensorboard and dist.kind != "multiworker" and tensorboard_available():
        images, masks = next(iter(val_ds.take(1)))
        sample = (images.numpy()[:3], masks.numpy()[:3])
    # 6. the fold's folder (callbacks: each stage's own, below); a fold started over first loses the old one
    if dist.is_chief:
        clear_for(action, fold_dir, fold, rerun)
    with removed_if_no_results(fold_dir, out_dir, out_dir.parent):  # a fold that cannot start leaves nothing
        fold_dir.mkdir(parents=True, exist_ok=True)
        if dist.is_chief:
            dump_config(cfg, out_dir / "config.yaml")
            dump_config(cfg, fold_dir / "config.yaml")
            atomic_write_text(fold_dir / "val_groups.json", json.dumps({
                "fold": fold, "folds": t.folds, "seed": t.seed, "val_groups": split.val_groups,
                "n_train": split.n_train, "n_val": split.n_val, "train_files": split.train_files,
                "val_files": split.val_files}, indent=1))
        backup = fold_dir / stages[first].backup
        print(f"tfseg train: fold {fold}/{t.folds}: {split.n_train} train / {split.n_val} val records, "
              f"{steps} steps of {global_batch} ({dist.kind}, {dist.replicas} replica(s))" + val_note
              + (f"; resuming from {backup}" if backup.is_dir() else "")
              + (f" with changed settings: {describe(changes)}" if changes and backup.is_dir() else ""),
              file=sys.stderr, flush=True)
        # 7. fit, stage by stage (tfseg.train_stages)
        start, started = time.perf_counter(), time.monotonic()
        for index in range(first, len(stages)):
            stage = stages[index]
            if index > first:  # the encoder unfrozen: compiled again, with a fresh optimizer
                with dist.scope():
                    compile_stage(model, cfg, steps, stage, from_logits)
            announce(fold, stages, index)
            own, nan_guard, best = make_callbacks(cfg, fold_dir, steps, sample, write=dist.is_chief, stage=stage,
                                                  started=started)
            # Keras starts fit at model._initial_epoch when set (BackupAndRestore sets it on restore, and
            # it outlives the fit); HistoryCSV keeps the rows before it.
            model._initial_epoch = stage.first_epoch or None
            model.fit(train_ds, initial_epoch=stage.first_epoch, epochs=stage.last_epoch, steps_per_epoch=steps,
                      validation_data=val_ds, validation_steps=val_steps, callbacks=[*own, *callbacks],
                      verbose=verbose, shuffle=False)  # the dataset shuffles; Keras would warn about shuffle=True
            if nan_guard.where is not None:
                epoch, batch, value = nan_guard.where
                raise RunError(f"fold {fold}: the training loss became {value} at epoch {epoch + 1}, batch "
                               f"{batch}; training stopped. Lower train.lr (now {t.lr}) or check the data and "
                               "loss, then train the fold again with --overwrite")
            if model.stop_training:  # the time limit: no further stage
                break
        for stage in stages[:-1]:  # the earlier stages' backups, kept for a resume between the stages
            shutil.rmtree(fold_dir / stage.backup, ignore_errors=True)
    # 8. outputs (best.keras and last.keras were written by their callbacks)
    best_value = best.best if math.isfinite(best.best) else None  # None: the monitor never had a value
    result = {"best": best_value, "best_epoch": best.best_epoch + 1, "epochs": _epochs_done(fold_dir),
              "n_train": split.n_train, "n_val": split.n_val,
              "seconds": round(time.perf_counter() - start, 1), "fold_dir": str(fold_dir)}
    if dist.is_chief:
        _plot(fold_dir, t.monitor, t.monitor_mode)
        update_summary(out_dir, cfg, fold, result)
    if dist.kind == "default":  # free the fold's graph; a distributed strategy keeps its state
        keras.backend.clear_session()
    return result


def _epochs_done(fold_dir: Path) -> int:
    return len(read_csv_rows(fold_dir / "history.csv"))


def _plot(fold_dir: Path, monitor: str, mode: str) -> None:
    try:
        from tfseg.viz import plot_curves
    except ImportError:  # viz is optional for training
        return
    plot_curves(fold_dir / "history.csv", fold_dir / "curves.png", monitor, mode)


# ------------------------------------------------------------------------------------------------
# several folds and the entry points
# ------------------------------------------------------------------------------------------------


def run(cfg: Config, folds: str | int = 0, callbacks: Sequence = (), overwrite: bool = False) -> dict:
    """Train the folds ``folds`` (``all``, ``K`` or ``K,L``) in turn; returns the run's summary.

    ``callbacks`` are more Keras callbacks for every fold's ``fit`` (see :func:`train_fold`). A fold that
    finished already is an error when asked alone, and skipped with one line when several folds are
    asked (``--fold all`` after a crash resumes the interrupted fold and trains the rest); ``overwrite``
    trains every fold asked from scratch. Every fold is checked so before the first one trains.
    """
    fold_list = parse_folds(folds, cfg.train.folds)
    callbacks = _check_callbacks(callbacks)
    check_invariants(cfg)
    out_dir = run_dir(cfg)
    todo = []
    for fold in fold_list:
        action, changes = plan_fold(cfg, fold, out_dir / f"fold{fold}", overwrite, several=len(fold_list) > 1)
        if action == SKIP:
            print(skip_line(out_dir / f"fold{fold}", fold, changes), file=sys.stderr, flush=True)
        else:
            todo.append(fold)
    from tfseg.distribute import set_mixed_precision, setup_distribution

    set_mixed_precision(cfg.train.mixed_precision)
    dist = setup_distribution(cfg.train.strategy)  # once per process (multi-worker needs that)
    for fold in todo:
        result = train_fold(cfg, fold, dist, callbacks=callbacks, overwrite=overwrite)
        value = "none" if result["best"] is None else f"{result['best']:.4f}"
        print(f"tfseg train: fold {fold}: best {cfg.train.monitor} = {value} at epoch "
              f"{result['best_epoch']} of {result['epochs']}", flush=True)
    path = out_dir / "summary.json"
    summary = json.loads(path.read_text()) if path.is_file() else {}
    if summary.get("cv_mean") is not None:
        print(f"tfseg train: {cfg.train.monitor} cv mean {summary['cv_mean']:.4f} +- {summary['cv_std']:.4f} "
              f"over {len(summary['folds'])} fold(s) -> {path}", flush=True)
    return summary


def _check_callbacks(callbacks: Sequence) -> list:
    import keras

    callbacks = list(callbacks or ())
    for c in callbacks:
        if not isinstance(c, keras.callbacks.Callback):
            raise ConfigError(f"callbacks: expected keras.callbacks.Callback objects, got {type(c).__name__}")
    return callbacks


def cli_train(args) -> int:
    """``tfseg train --config C [--set k=v ...] --fold K|all [--overwrite]``."""
    cfg = load_config(args.config, args.overrides)
    run(cfg, args.fold, overwrite=getattr(args, "overwrite", False))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m tfseg.train --config params.yaml --set train.epochs=5 --fold 0``: ``tfseg train``."""
    from tfseg.cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
