"""``tfseg train`` on a fold whose folder holds something already: resume it, refuse, skip, or start over.

A fold's folder ``runs/<name>/fold<k>/`` is in one of three states (:func:`fold_state`):

    new          nothing of value: no folder, or what a start killed before its first epoch ended left
    interrupted  a backup to resume from (``backup/``, or ``backup-decoder/`` of a two-stage fold)
    finished     results (``best.keras``, ``last.keras`` or a history row) and no backup: its fit ended

What ``tfseg train`` does with it (:func:`plan_fold`), before anything is written:

    new          trains it
    interrupted  resumes it, unless a setting the backup depends on changed (:data:`RESUME_KEYS`, compared
                 with the fold's ``config.yaml``); then the split (``val_groups.json``) and the backup's
                 weights are checked against the split and the model built now (:func:`check_split`,
                 :func:`check_backup`)
    finished     stops with one line; when several folds are asked (``--fold all``), skips it with one line

``--overwrite`` trains the fold from scratch whatever its state: its folder is moved aside and removed,
and its entry leaves ``summary.json`` (:func:`start_over`). Whenever a fold that has a ``best.keras`` is
trained again (resumed or started over), the evaluations under ``runs/<name>/evaluate/`` that scored that
fold are removed (:func:`drop_evaluations`): ``infer.threshold_from: oof`` cannot read a sweep of a model
that is gone.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import sys
import warnings
from pathlib import Path

import yaml

from tfseg.config import Config, to_dict
from tfseg.errors import RunError, first_line
from tfseg.files import atomic_write_text, make_temp, read_csv_rows

NEW, INTERRUPTED, FINISHED = "new", "interrupted", "finished"
TRAIN, RESUME, SKIP, START_OVER = "train", "resume", "skip", "start over"
BACKUPS = ("backup", "backup-decoder")  # tfseg.train_stages.plan_stages's folders

# What a resume cannot change: the backup holds the weights and optimizer state of one model, trained on
# one split. A key ending in "." stands for its whole section. Any other key may change (epochs, lr,
# callbacks, batch size, paths...); the fold goes on with the new value.
RESUME_KEYS = ("model.", "data.image_size", "data.channels", "data.classes", "train.optimizer",
               "train.freeze_encoder_epochs", "train.folds", "train.seed")
RESUME_FREE = ("model.encoder_weights",)  # only the starting weights, which the backup's replace


# ------------------------------------------------------------------------------------------------
# the fold's state and what to do with it
# ------------------------------------------------------------------------------------------------


def fold_state(fold_dir: Path) -> str:
    """``new``, ``interrupted`` or ``finished`` (see the module docstring)."""
    if any((fold_dir / b).is_dir() and any((fold_dir / b).iterdir()) for b in BACKUPS):
        return INTERRUPTED
    if (fold_dir / "best.keras").is_file() or (fold_dir / "last.keras").is_file() or _history(fold_dir):
        return FINISHED
    return NEW


def plan_fold(cfg: Config, fold: int, fold_dir: Path, overwrite: bool = False,
              several: bool = False) -> tuple[str, list]:
    """What ``tfseg train`` does with fold ``fold``; writes nothing.

    Returns:
        (action, changes): ``train``, ``resume``, ``skip`` (a finished fold when ``several`` folds are
        asked) or ``start over`` (``overwrite``); for ``resume``, the settings that changed since the
        fold's ``config.yaml`` (``(key, then, now)``), which a resume may change; for ``skip``, all changes.

    Raises:
        RunError: a finished fold, asked alone, without ``overwrite``; an interrupted fold whose
            :data:`RESUME_KEYS` changed.
    """
    state = fold_state(fold_dir)
    if overwrite:
        return START_OVER, []
    changes = config_changes(fold_dir, cfg)
    if state == FINISHED:
        if several:
            return SKIP, changes
        raise RunError(f"{trained_already(fold_dir, fold)}, and there is no backup to resume from; expected a "
                       f"fold not trained yet. Pass --overwrite to train fold {fold} again from scratch "
                       "(its results are replaced), or set a new train.name")
    if state == INTERRUPTED:
        blocking = [c for c in changes if blocks_resume(c[0])]
        if blocking:
            backup = next(fold_dir / b for b in BACKUPS if (fold_dir / b).is_dir())
            raise RunError(f"{backup}: fold {fold} was interrupted and its backup was trained with other settings, "
                           f"which a resume cannot change: {describe(blocking)}. Expected the settings of "
                           f"{fold_dir / 'config.yaml'} to resume it; or pass --overwrite to start fold {fold} over, "
                           "or set a new train.name")
        return RESUME, changes
    return TRAIN, []


def trained_already(fold_dir: Path, fold: int) -> str:
    """``runs/x/fold0 holds fold 0, trained already (best val_dice_coe 0.9327 at epoch 4 of 4)``."""
    summary = _read_json(fold_dir.parent / "summary.json")
    entry = summary.get("folds", {}).get(str(fold)) if isinstance(summary.get("folds"), dict) else None
    if isinstance(entry, dict) and isinstance(entry.get("best"), (int, float)):
        best = (f"best {summary.get('monitor', 'score')} {entry['best']:.4f} at epoch {entry.get('best_epoch')} "
                f"of {entry.get('epochs')}")
    else:
        rows = _history(fold_dir)
        best = (f"{len(rows)} epoch(s) in history.csv" if rows else "a checkpoint") + \
            " and no entry in summary.json: it stopped early, e.g. on a NaN loss"
    return f"{fold_dir} holds fold {fold}, trained already ({best})"


def skip_line(fold_dir: Path, fold: int, changes: list) -> str:
    """The line said when ``--fold all`` skips a finished fold."""
    other = f"; it was trained with other settings: {describe(changes)}" if changes else ""
    return f"tfseg train: fold {fold}: skipped: {trained_already(fold_dir, fold)}{other}. --overwrite trains it again"


# ------------------------------------------------------------------------------------------------
# settings: the fold's config.yaml against the config now
# ------------------------------------------------------------------------------------------------


def config_changes(fold_dir: Path, cfg: Config) -> list[tuple[str, object, object]]:
    """``(section.key, value in fold_dir/config.yaml, value now)`` for each key that differs.

    A key the saved config lacks (an older tfseg) is not compared; no saved config, no changes.
    """
    try:
        saved = yaml.safe_load((fold_dir / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return []
    if not isinstance(saved, dict):
        return []
    changes = []
    for section, values in to_dict(cfg).items():
        then = saved.get(section)
        if isinstance(then, dict):
            changes += [(f"{section}.{key}", then[key], value) for key, value in values.items()
                        if key in then and then[key] != value]
    return changes


def blocks_resume(key: str) -> bool:
    """Whether a change of ``key`` makes the fold's backup unusable (:data:`RESUME_KEYS`)."""
    return key not in RESUME_FREE and any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUME_KEYS)


def describe(changes: list, limit: int = 4) -> str:
    """``model.options: {filters: [8, 16]} -> {batchnorm: true, filters: [8, 16]}; ...`` (at most ``limit``)."""
    text = "; ".join(f"{key}: {_flow(then)} -> {_flow(now)}" for key, then, now in changes[:limit])
    return text + (f"; and {len(changes) - limit} more" if len(changes) > limit else "")


def _flow(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10**9).strip().removesuffix("...").strip()


# ------------------------------------------------------------------------------------------------
# a resume: the split and the backup's weights
# ------------------------------------------------------------------------------------------------


def check_split(fold_dir: Path, fold: int, val_groups: list) -> None:
    """The fold's held-out groups now are those its backup was validated on (``val_groups.json``).

    Raises:
        RunError: the records or the split changed under an interrupted fold.
    """
    saved = _read_json(fold_dir / "val_groups.json").get("val_groups")
    if saved is None or {str(g) for g in saved} == {str(g) for g in val_groups}:
        return
    new = sorted({str(g) for g in val_groups} - {str(g) for g in saved})
    raise RunError(f"{fold_dir / 'val_groups.json'}: fold {fold} was interrupted, and its held-out groups differ "
                   f"now ({len(new)} new, e.g. {new[0] if new else '-'}): the records in data.tfrecord_dir changed. "
                   f"Expected the records it was trained on to resume it; or pass --overwrite to start fold {fold} "
                   "over, or set a new train.name")


def check_backup(model, backup: Path, fold: int) -> None:
    """Load the backup's weights into ``model`` (built and compiled as the fold will train it), as
    ``keras.callbacks.BackupAndRestore`` will, and fail in one line when they do not fit: a setting
    outside :data:`RESUME_KEYS` changed the model or its optimizer (``train.optimizer``'s ``momentum: 0``,
    say), or the fold's ``config.yaml`` no longer records what the backup was trained with.

    Raises:
        RunError: naming the backup, Keras' reason, and the ways out.
    """
    weights = backup / "latest.weights.h5"
    if not weights.is_file():
        return
    from tfseg.distribute import build_optimizer_state

    build_optimizer_state(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            model.load_weights(str(weights))
            problem = next((first_line(w.message) for w in caught if "Skipping" in str(w.message)), None)
        except OSError:  # a damaged file: BackupAndRestore falls back to its previous copy
            return
        except ValueError as err:
            problem = first_line(err)
    if problem:
        raise RunError(f"{backup}: fold {fold}'s backup does not fit the model and optimizer configured now (Keras: "
                       f"{problem.rstrip(':')}). Expected the settings it was trained with to resume it; or pass "
                       f"--overwrite to start fold {fold} over, or set a new train.name")


# ------------------------------------------------------------------------------------------------
# starting over, and the evaluations of a fold trained again
# ------------------------------------------------------------------------------------------------


def clear_for(action: str, fold_dir: Path, fold: int, rerun: bool) -> list[Path]:
    """Before the fold's folder is made: when starting over, the old folder and summary entry go
    (:func:`start_over`); when ``rerun`` (the fold had a ``best.keras`` and trains again), the evaluations
    that scored it go (:func:`drop_evaluations`). Says what went in one line; returns it."""
    folder = [fold_dir] if action == START_OVER and start_over(fold_dir, fold) else []
    evaluations = drop_evaluations(fold_dir.parent, fold) if rerun else []
    why = ["--overwrite"] * bool(folder)
    why += [f"the evaluations scored fold {fold}'s earlier best.keras"] * bool(evaluations)
    if why:
        print(f"tfseg train: fold {fold}: removed {', '.join(map(str, folder + evaluations))} ({'; '.join(why)})",
              file=sys.stderr, flush=True)
    return folder + evaluations


def start_over(fold_dir: Path, fold: int) -> bool:
    """Remove the fold's folder (moved aside first, so it is gone at once) and its ``summary.json``
    entry. Returns whether there was a folder."""
    existed = fold_dir.is_dir()
    if existed:
        _remove(fold_dir)
    path = fold_dir.parent / "summary.json"
    summary = _read_json(path)
    folds = summary.get("folds")
    if isinstance(folds, dict) and folds.pop(str(fold), None) is not None:
        summary["cv_mean"], summary["cv_std"] = cv_stats(folds)
        atomic_write_text(path, json.dumps(summary, indent=1, allow_nan=False))
    return existed


def update_summary(out_dir: Path, cfg: Config, fold: int, result: dict) -> dict:
    """Merge one fold's best score into ``<run>/summary.json`` (CV mean and spread over the folds)."""
    path = out_dir / "summary.json"
    folds = _read_json(path).get("folds", {})
    folds[str(fold)] = {k: result[k] for k in ("best", "best_epoch", "epochs", "n_train", "n_val", "seconds")}
    mean, std = cv_stats(folds)
    summary = {"monitor": cfg.train.monitor, "mode": cfg.train.monitor_mode,
               "folds": dict(sorted(folds.items(), key=lambda kv: int(kv[0]))),
               "cv_mean": mean, "cv_std": std}
    atomic_write_text(path, json.dumps(summary, indent=1, allow_nan=False))
    return summary


def cv_stats(folds: dict) -> tuple[float | None, float | None]:
    """Mean and (population) spread of the folds' finite ``best`` scores; (None, None) without any."""
    scores = [f["best"] for f in folds.values() if isinstance(f.get("best"), (int, float)) and math.isfinite(f["best"])]
    if not scores:
        return None, None
    mean = sum(scores) / len(scores)
    return mean, math.sqrt(sum((s - mean) ** 2 for s in scores) / len(scores))


def drop_evaluations(run: Path, fold: int) -> list[Path]:
    """Remove the folders of ``run/evaluate/`` whose ``per_image.csv`` scored fold ``fold``.

    ``tfseg evaluate`` writes a ``fold`` column: ``k`` for out-of-fold rows (``evaluate/oof``, whose sweep
    ``infer.threshold_from: oof`` reads), ``0+1+2`` for an ensemble on other data. A folder without a
    readable ``per_image.csv`` is left alone. Returns the folders removed.
    """
    removed = []
    root = run / "evaluate"
    for folder in sorted(root.iterdir()) if root.is_dir() else ():
        if folder.is_dir() and fold in _scored_folds(folder / "per_image.csv"):
            _remove(folder)
            removed.append(folder)
    return removed


def _scored_folds(path: Path) -> set[int]:
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            return {int(k) for row in csv.DictReader(fh) for k in str(row.get("fold") or "").split("+")
                    if k.strip().isdigit()}
    except (OSError, csv.Error, UnicodeDecodeError):
        return set()


def _remove(folder: Path) -> None:
    """Rename ``folder`` aside (one atomic step), then delete it."""
    aside = make_temp(folder.parent, f"{folder.name}.removed", directory=True)  # a killed run's: removed later
    os.replace(folder, aside)  # onto the empty folder just made
    shutil.rmtree(aside, ignore_errors=True)


def _history(fold_dir: Path) -> list[dict]:
    try:
        return read_csv_rows(fold_dir / "history.csv")
    except (OSError, csv.Error, UnicodeDecodeError):
        return []


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
