"""Checks that run before anything is written, and the clean-up of a fold that could not start.

What ``tfseg train`` checks, in order, before a shard or a run folder exists (docs/training.md):

    1. names and values: loss, metrics, monitor, augmentations (:func:`check_invariants`; builds
       nothing: a multi-worker strategy must be created before any TensorFlow state)
    2. the model: architecture, options, and the sizes training feeds it (:func:`check_model`)
    3. the folds: enough groups for ``train.folds`` (:func:`check_folds`)
    4. when the shards are still to be written: the pretrained encoder weights (download), then
       the shards (:func:`prepare`)

A ModelError of the builders becomes a ConfigError naming the key to change and where it was set
(:func:`model_error`). A fold that fails before its first epoch ends removes the folders it created
(:func:`removed_if_no_results`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from pathlib import Path

import yaml

from tfseg.config import Config, blame, key_origin, model_error  # noqa: F401 - model_error: used by train
from tfseg.errors import ConfigError, DataError, ModelError, warn_once
from tfseg.files import read_csv_rows

LOSS_MONITORS = ("loss", "val_loss")


# ------------------------------------------------------------------------------------------------
# 1. invariants
# ------------------------------------------------------------------------------------------------


def check_invariants(cfg: Config) -> None:
    """Fail early, with one line, on what would otherwise fail after minutes of work.

    Raises:
        ConfigError: unknown loss or metric, a monitor that no metric produces, an unknown
            augmentation or parameter (naming where ``augment.ops`` was set).
    """
    from tfseg.losses import check_loss
    from tfseg.metrics import check_metric_names

    # No TensorFlow state may be created before the strategy (MultiWorkerMirroredStrategy must
    # configure the collective ops at program start-up): check names, build nothing.
    classes = cfg.model.classes or cfg.data.classes
    try:
        check_loss(cfg.train.loss, classes, cfg.train.class_weights)
    except ConfigError as err:
        key = "train.class_weights" if str(err).startswith("train.class_weights") else "train.loss"
        raise ConfigError(blame(key_origin(cfg, key), key, str(err))) from None
    try:
        metrics = check_metric_names(cfg.train.metrics, classes)
    except ConfigError as err:
        raise ConfigError(blame(key_origin(cfg, "train.metrics"), "train.metrics", str(err))) from None
    valid = [*LOSS_MONITORS, *metrics, *(f"val_{m}" for m in metrics)]
    if cfg.train.monitor not in valid:
        from tfseg.registry import unknown_name_message

        raise ConfigError(blame(key_origin(cfg, "train.monitor"), "train.monitor",
                                "train.monitor: " + unknown_name_message("monitor", cfg.train.monitor, valid)))
    if cfg.train.monitor in LOSS_MONITORS and cfg.train.monitor_mode != "min":
        raise ConfigError(f"train.monitor_mode: {cfg.train.monitor} should be minimised; "
                          "set train.monitor_mode=min")
    check_stages(cfg)
    from tfseg.data.augment import check_ops

    try:
        check_ops(cfg.augment.ops, cfg.data.channels)
    except ConfigError as err:
        raise ConfigError(blame(key_origin(cfg, "augment.ops"), "augment.ops", str(err))) from None


def check_stages(cfg: Config) -> None:
    """``train.freeze_encoder_epochs`` leaves epochs to the second stage, and ``model.encoder_freeze`` is off."""
    t, key = cfg.train, "train.freeze_encoder_epochs"
    if not t.freeze_encoder_epochs:
        return
    if t.freeze_encoder_epochs >= t.epochs:
        raise ConfigError(blame(key_origin(cfg, key), key, (
            f"{key}: {t.freeze_encoder_epochs} leaves no epoch to train the unfrozen model; expected fewer than "
            f"train.epochs ({t.epochs})")))
    if cfg.model.encoder_freeze:
        raise ConfigError(blame(key_origin(cfg, key), key, (
            f"{key}: {t.freeze_encoder_epochs}, but model.encoder_freeze keeps the encoder frozen for the whole "
            "run; expected one of the two (model.encoder_freeze: false to unfreeze it after the first stage)")))


# ------------------------------------------------------------------------------------------------
# 2. model
# ------------------------------------------------------------------------------------------------

def check_model(cfg: Config, weights: bool = False) -> None:
    """Build the configured model at every input size training feeds it, before anything is written.

    Sizes: ``data.image_size`` (and ``data.val_size`` when set; the model is then built for any
    size, ``[null, null, C]``); a fixed ``model.input_shape`` must equal them. A wrong
    architecture, option or size is then the builder's one-line error naming its key (with the
    nearest sizes that work), not a shape error mid-fit. The probe models are built without
    weights and dropped. With ``weights``, one probe is built with ``model.encoder_weights`` instead
    (downloading them once, before the shards are written). A config is checked once per process.

    Raises:
        ConfigError: the key to change, where it was set, and the builder's message.
    """
    from dataclasses import replace

    from tfseg.models import build_model
    from tfseg.models.common import encoder_layers

    m, d = cfg.model, cfg.data
    shape = tuple(m.input_shape)
    sizes = [("data.image_size", tuple(d.image_size))]
    if d.val_size is not None:
        sizes.append(("data.val_size", tuple(d.val_size)))
    if None not in shape[:2]:  # a fixed input: the pipeline must feed exactly that size
        for key, size in sizes:
            if size != shape[:2]:
                fix = "Expected the same height and width (model.input_shape: null follows data.image_size)"
                if (key_origin(cfg, key) or "").startswith("--set "):
                    raise ConfigError(blame(key_origin(cfg, key), key, f"{key}: {list(size)} differs from the fixed "
                                            f"model.input_shape {list(shape)} "
                                            f"({key_origin(cfg, 'model.input_shape')}). {fix}"))
                raise ConfigError(blame(key_origin(cfg, "model.input_shape"), "model.input_shape",
                                        f"model.input_shape: {list(shape)} is fixed, but {key} is {list(size)} "
                                        f"({key_origin(cfg, key) or 'the default'}). {fix}"))
        size_key = "model.input_shape" if key_origin(cfg, "model.input_shape") else "data.image_size"
        probes = [(size_key, shape)]
    else:
        probes = [(key, (*size, shape[-1])) for key, size in sizes]
    if weights:  # the sizes were checked without weights: now the weights, once
        if not m.encoder_weights:
            return
        probes = probes[:1]
    two_stage = bool(cfg.train.freeze_encoder_epochs)
    checked = repr((m, probes, weights, two_stage))
    if checked in _MODELS_CHECKED:
        return
    for key, probe in probes:
        try:
            model = build_model(replace(m, input_shape=probe, encoder_weights=m.encoder_weights if weights else None))
        except ModelError as err:
            raise model_error(cfg, err, key) from None
        check_output_size(cfg, model)
        if two_stage and not encoder_layers(model):
            stages = "train.freeze_encoder_epochs"
            raise ConfigError(blame(key_origin(cfg, stages), stages, (
                f"{stages}: {cfg.model.arch} has no pretrained encoder to freeze (it is trained from scratch); "
                "expected 0")))
    _MODELS_CHECKED.add(checked)


# Architectures whose output is a centre crop of their input (valid convolutions); training crops the
# masks to it, for the size each dataset feeds (``tfseg.train.mask_crop_for(model, size)``: a model of
# any size, data.val_size set, gets one crop to train and another to validate). The probes of
# check_model are built at those sizes, so this check sees each. Any other model must give a map of
# its input's size.
CROPPED_OUTPUT_ARCHS = ("unet_original",)


def check_output_size(cfg: Config, model) -> None:
    """A smaller output is a centre crop only for :data:`CROPPED_OUTPUT_ARCHS`. Elsewhere it is a decoder
    with fewer upsampling stages than the encoder has stride-2 steps (``sm.Unet`` allows that), whose
    map is downscaled, not cropped: training on centre crops of the masks would be silently wrong.

    Raises:
        ConfigError: naming ``model.decoder_filters`` (or ``model.options``) and the sizes.
    """
    (ih, iw), (oh, ow) = model.input_shape[1:3], model.output_shape[1:3]
    if None in (ih, iw, oh, ow) or (oh, ow) == (ih, iw) or cfg.model.arch in CROPPED_OUTPUT_ARCHS:
        return
    key = next((k for k in ("model.decoder_filters", "model.options") if key_origin(cfg, k)), "model.arch")
    steps = next((k for k in range(1, 8) if (ih, iw) == (oh << k, ow << k)), None)  # a downscaled map
    hint = (f"; the decoder is {steps} upsampling stage(s) short: expected one stage per stride-2 step of the "
            "encoder" if steps else "")
    raise ConfigError(blame(key_origin(cfg, key), key, (
        f"{key}: {cfg.model.arch} gives a {oh}x{ow} output for a {ih}x{iw} input; training needs an output of "
        f"the input's size (only {', '.join(CROPPED_OUTPUT_ARCHS)}'s valid convolutions give a smaller, "
        f"centre-cropped one){hint}")))


_MODELS_CHECKED: set[str] = set()


# ------------------------------------------------------------------------------------------------
# 3. records and folds
# ------------------------------------------------------------------------------------------------


def existing_shards(cfg: Config) -> list[str]:
    """The shard files already in ``data.tfrecord_dir`` (none when the folder does not exist)."""
    from tfseg.data.tfrecord import shard_files

    directory = cfg.data.tfrecord_dir
    return shard_files(directory) if Path(directory).is_dir() or "://" in directory else []


def ensure_tfrecords(cfg: Config, files: list[str] | None = None) -> list[str]:
    """The shard files of ``data.tfrecord_dir``; writes them first when the folder has none.

    ``files``: the folder's shards when the caller has listed them already.
    """
    from tfseg.data.tfrecord import shard_files, write_tfrecords

    files = existing_shards(cfg) if files is None else files
    if not files:
        print(f"tfseg train: no shards in {cfg.data.tfrecord_dir}; writing them first (tfseg tfrecords)",
              file=sys.stderr)
        write_tfrecords(cfg.data)
        files = shard_files(cfg.data.tfrecord_dir)
    return files


def prepare(cfg: Config) -> list[str]:
    """Step 3 up to the split: check the model and the folds, then make sure the shards exist.

    Everything that can be checked without the records is checked before they are written
    (writing Kvasir-SEG's 900 images takes minutes): the model builds at the sizes training feeds
    it, the data has enough groups for ``train.folds``; when the shards are still to be written, the
    pretrained encoder weights are fetched first too (an offline ImageNet download fails here).

    Returns:
        The shard files.
    """
    files = existing_shards(cfg)
    if files:
        warn_other_root(cfg)
    check_model(cfg)
    check_folds(cfg, bool(files))
    if not files:
        check_model(cfg, weights=True)
    return ensure_tfrecords(cfg, files)


def warn_other_root(cfg: Config) -> str | None:
    """One line on stderr when the shards were written from another ``data.root`` than the one set now.

    Training reads existing shards and never ``data.root``, so a mistyped ``--set data.root=...`` would
    pass unnoticed. The root they came from is known when ``tfseg tfrecords`` wrote them (its
    ``config.yaml`` beside the shards; shards written by ``tfseg train`` record none). Returns the line;
    prints it once per process.
    """
    folder = Path(cfg.data.tfrecord_dir)
    try:
        saved = yaml.safe_load((folder / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return None
    root = saved.get("data", {}).get("root") if isinstance(saved, dict) and isinstance(saved.get("data"), dict) \
        else None
    if not root or not cfg.data.root or os.path.abspath(root) == os.path.abspath(cfg.data.root):
        return None
    line = (f"tfseg train: warning: data.root is {cfg.data.root}, but the shards in {folder} were written from "
            f"{root} ({folder / 'config.yaml'}); training reads the shards as they are (`tfseg tfrecords "
            "--overwrite` writes them again from data.root)")
    return warn_once(line)  # `--fold all` checks before every fold: said once


def check_folds(cfg: Config, have_shards: bool) -> None:
    """Raise the one-line DataError of a fold split that cannot be made (fewer groups than folds).

    With shards, from their manifest; without, from the source's entries (listing files only),
    where each entry is one image file whose group its records keep (TFDS entries are chunks of
    a split, whose records have groups of their own: they are checked once written).
    """
    from tfseg.data.folds import assign_folds, fold_split

    t = cfg.train
    if have_shards:
        fold_split(cfg.data.tfrecord_dir, t.folds, 0, t.seed)
        return
    from tfseg.data.sources import list_entries

    entries = list_entries(cfg.data)
    if all(e.image for e in entries):
        try:
            assign_folds([e.group for e in entries], t.folds, t.seed)
        except DataError as err:
            raise DataError(f"data.root {cfg.data.root}: {err}") from None


# ------------------------------------------------------------------------------------------------
# clean-up of a fold that could not start
# ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def removed_if_no_results(*folders: Path):
    """Remove the ``folders`` this call creates when the body fails before they hold results.

    A folder that existed before is never touched; a new one is removed (with what the failed
    start wrote: config.yaml, val_groups.json, an empty history.csv, TensorBoard's first events)
    unless it holds results by then (:func:`has_results`), so a run preempted in its second epoch
    keeps its ``backup/`` and resumes. List the deepest folder first.
    """
    new = [f for f in folders if not f.exists()]
    try:
        yield
    except BaseException:
        for folder in new:
            if folder.is_dir() and not has_results(folder):
                shutil.rmtree(folder, ignore_errors=True)
        raise


RESULT_FILES = ("best.keras", "last.keras", "summary.json")


def has_results(folder: Path) -> bool:
    """Whether a run or fold folder holds anything of value: a checkpoint, a summary, a backup to
    resume from, or a history row (an epoch that finished)."""
    if any(next(folder.rglob(name), None) for name in RESULT_FILES):
        return True
    if any(b.is_dir() and any(b.iterdir()) for b in folder.rglob("backup*")):  # backup/, backup-decoder/
        return True
    return any(read_csv_rows(h) for h in folder.rglob("history.csv"))
