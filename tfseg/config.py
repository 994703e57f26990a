"""Typed, frozen configuration that mirrors ``params.yaml`` section for section.

``params.yaml`` has six sections: ``data``, ``augment``, ``model``, ``train``, ``infer`` and
``submit``. Each is a frozen dataclass below whose fields are the section's keys, with the
same defaults (a test keeps the two in step). The config is loaded once, at the entry point:

    cfg = load_config("params.yaml", overrides=["train.lr=1e-4", "model.arch=unet"])

Library functions take a section (``cfg.model``) or explicit arguments, never a global.

An unknown key, a wrong type or an out-of-range value is a :class:`ConfigError` with one line
that names the key and the nearest valid one. ``--set`` values are parsed as YAML, so
``--set data.image_size=[256,256]`` and ``--set model.encoder_weights=null`` work.

Each field carries its documentation in ``metadata["doc"]``; ``docs/config.md`` is generated
from it (see :func:`config_reference`).
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from tfseg.errors import ConfigError
from tfseg.files import atomic_write_text
from tfseg.registry import nearest

SECTIONS = ("data", "augment", "model", "train", "infer", "submit")


def opt(default: Any, doc: str, *, choices=None, min=None, max=None):  # noqa: A002
    """A config field: its default, one line of documentation, optional choices and range."""
    meta = {"doc": doc, "choices": tuple(choices) if choices else None, "min": min, "max": max}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: _freeze_default(d), metadata=meta)
    return field(default=default, metadata=meta)


def _freeze_default(value):
    if isinstance(value, list):
        return tuple(_freeze_default(v) for v in value)
    if isinstance(value, dict):
        return {k: _freeze_default(v) for k, v in value.items()}
    return value


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataConfig:
    """Where the images and masks come from, how they are written to TFRecords and read back."""

    source: str = opt("tfds", "Reader of the data's layout.",
                      choices=["folder", "carvana", "lgg", "hubmap", "tfds"])
    root: Optional[str] = opt(None, "Root folder of the data set (folder, carvana, lgg, hubmap sources); "
                                    "relative paths are relative to the working directory.")
    images: str = opt("images", "folder source: sub-folder of `root` holding the images.")
    masks: str = opt("masks", "folder source: sub-folder of `root` holding the masks.")
    mask_suffix: str = opt("", "Mask file stem = image stem + this suffix (e.g. `_mask`).")
    mask_ext: Optional[str] = opt(None, "Mask file extension (e.g. `.gif`, `.png`); null = the image's.")
    rle_csv: Optional[str] = opt(None, "carvana/hubmap: CSV of run-length encoded masks instead of mask files "
                                       "(Carvana `train_masks.csv`, HuBMAP `train.csv`), relative to `root`.")
    split_file: Optional[str] = opt(None, "JSON file mapping split names to lists of ids "
                                          "(e.g. Kvasir-SEG's split.json); null = use every pair.")
    split: Optional[str] = opt(None, "Which list of `split_file` to read (e.g. `train`).")
    tfds_name: str = opt("oxford_iiit_pet", "tfds source: the TFDS dataset name.")
    tfds_split: str = opt("train", "tfds source: the TFDS split to read.")
    tfds_data_dir: Optional[str] = opt(None, "tfds source: TFDS data_dir; null = TFDS's default "
                                             "(~/tensorflow_datasets).")
    classes: int = opt(3, "Number of classes: 1 = binary (mask values 0/1), N > 1 = class indices 0..N-1.",
                       min=1)
    channels: int = opt(3, "Image channels after decoding: 1 (gray) or 3 (RGB).", choices=[1, 3])
    mask_threshold: int = opt(127, "Binary data: a mask value above this is foreground (handles 0/255 and "
                                   "JPEG-noisy masks).", min=0, max=254)
    tile_size: int = opt(1024, "hubmap source: size of the tiles cut from the big images, in source pixels.",
                         min=16)
    tile_overlap: int = opt(0, "hubmap source: overlap between neighbouring tiles, in source pixels.", min=0)
    tile_reduce: int = opt(1, "hubmap source: downscale factor applied to each tile (the notebooks used 4).",
                           min=1)
    tile_saturation_threshold: int = opt(40, "hubmap source: a pixel is tissue when its HSV saturation "
                                             "(0-255) is above this.", min=0, max=255)
    tile_min_tissue: float = opt(0.05, "hubmap source: keep a tile when at least this fraction of its "
                                       "pixels is tissue (0 keeps every tile).", min=0.0, max=1.0)
    tfrecord_dir: str = opt("tfrecords/oxford_iiit_pet", "Folder of the TFRecord shards (written by "
                                                         "`tfseg tfrecords`, read by training).")
    shards: int = opt(16, "Number of TFRecord shards to write.", min=1)
    image_format: str = opt("jpeg", "Encoding of images in the TFRecords (masks are always PNG).",
                            choices=["jpeg", "png"])
    jpeg_quality: int = opt(95, "JPEG quality when `image_format` is jpeg.", min=1, max=100)
    workers: int = opt(2, "Parallel processes used to write TFRecords.", min=1)
    image_size: tuple[int, int] = opt([128, 128], "Training input size [height, width] produced by the pipeline.")
    fit: str = opt("resize", "How records become `image_size`: resize (image bilinear, mask nearest), "
                             "random_crop (pad if smaller), or none (records already have that size).",
                   choices=["resize", "random_crop", "none"])
    val_size: Optional[tuple[int, int]] = opt(None, "fit random_crop: validation takes the central window of "
                                                    "this [height, width] instead of `image_size` (TernausNet "
                                                    "trained on 768 crops and validated on central 1440 ones); the "
                                                    "model is then built for any input size. null = image_size.")
    shuffle_buffer: int = opt(256, "Examples in the shuffle buffer of the training pipeline.", min=0)
    cache: bool = opt(False, "Cache decoded examples in memory after the first epoch.")
    deterministic: bool = opt(False, "Make the pipeline's order and augmentation reproducible (slower).")

    def validation_size(self) -> tuple[tuple[int, int], str]:
        """[h, w] of the records the validation pipeline feeds the model, and the key that sets it."""
        if self.val_size is not None:
            return (int(self.val_size[0]), int(self.val_size[1])), "data.val_size"
        return (int(self.image_size[0]), int(self.image_size[1])), "data.image_size"


@dataclass(frozen=True)
class AugmentConfig:
    """On-graph augmentations applied to training batches, in order."""

    ops: tuple[dict, ...] = opt(
        [{"name": "flip_left_right", "p": 0.5}],
        "List of augmentations, each `{name: ..., p: probability, ...parameters}`; "
        "see `tfseg.data.augment` for the names and their parameters.")


@dataclass(frozen=True)
class ModelConfig:
    """The architecture and its encoder; `tfseg.models.build_model(cfg.model)` builds it."""

    arch: str = opt("pix2pix_unet", "Architecture name (`tfseg.models.ARCHS`), or `sm.<Name>` to build "
                                    "through segmentation_models.")
    backbone: str = opt("mobilenetv2", "Encoder name for architectures that take one (`tfseg.models.ENCODERS`).")
    input_shape: Optional[tuple[Optional[int], Optional[int], int]] = opt(
        None, "[height, width, channels]; null = data.image_size + data.channels ([null, null, channels], "
              "any size, when data.val_size differs from image_size). Its channels must equal data.channels.")
    classes: Optional[int] = opt(None, "Output classes; null = data.classes.", min=1)
    activation: str = opt("auto", "Output activation: auto (sigmoid for 1 class, softmax otherwise), "
                                  "sigmoid, softmax, or linear (logits).",
                          choices=["auto", "sigmoid", "softmax", "linear"])
    encoder_weights: Optional[str] = opt("imagenet", "null, `imagenet` (downloaded by keras.applications), "
                                                     "or the path of a weights file.")
    encoder_freeze: bool = opt(False, "Freeze the encoder (BatchNorm kept in inference mode).")
    decoder_block_type: str = opt("upsampling", "U-Net decoder block: upsampling or transpose.",
                                  choices=["upsampling", "transpose"])
    decoder_filters: tuple[int, ...] = opt([256, 128, 64, 32, 16], "Filters of the decoder blocks, "
                                                                    "deepest first.")
    decoder_use_batchnorm: bool = opt(True, "BatchNorm in the decoder blocks.")
    dropout: float = opt(0.0, "Dropout rate where the architecture has dropout.", min=0.0, max=0.99)
    bn_momentum: Optional[float] = opt(None, "Momentum of every BatchNormalization layer; null = each layer's own "
                                             "(keras.applications: 0.99, MobileNetV2 0.999). From scratch, 0.999 "
                                             "leaves the moving statistics (and validation) behind for thousands "
                                             "of steps: use 0.99 there.", min=0.0, max=1.0)
    options: dict = opt({}, "Architecture-specific keyword arguments (e.g. `num_filters`, `is_deconv`, "
                            "`batchnorm`), passed to the builder.")


@dataclass(frozen=True)
class TrainConfig:
    """K-fold training: folds, optimizer, schedule, loss, callbacks, strategy."""

    name: str = opt("oxford_pet", "Run name: outputs go to `<output_dir>/<name>/fold<k>/`.")
    output_dir: str = opt("runs", "Folder of the runs.")
    folds: int = opt(5, "Number of cross-validation folds (grouped; stratified when labels exist).", min=2)
    seed: int = opt(42, "Seed of the fold split, the pipeline and the model initialisation.")
    epochs: int = opt(20, "Training epochs.", min=1)
    freeze_encoder_epochs: int = opt(0, "Two-stage fine-tuning: train the first N epochs with the encoder frozen "
                                        "(its BatchNorm in inference mode), then unfreeze it and train the whole "
                                        "model for the rest of `epochs`, compiled again with a fresh optimizer and "
                                        "schedule; 0 = one stage.", min=0)
    batch_size: int = opt(16, "Batch size per replica; the global batch is this x replicas.", min=1)
    steps_per_epoch: Optional[int] = opt(None, "Steps per epoch; null = training records // global batch.",
                                         min=1)
    validation_steps: Optional[int] = opt(None, "Validation steps; null = the whole validation fold.", min=1)
    optimizer: str = opt("adam", "Optimizer.", choices=["adam", "adamw", "sgd", "rmsprop"])
    lr: float = opt(1e-3, "Learning rate (peak rate of a schedule).", min=0.0)
    weight_decay: float = opt(0.0, "Weight decay (adamw; L2-style decay for the others).", min=0.0)
    momentum: float = opt(0.9, "Momentum for sgd and rmsprop (the U-Net paper used 0.99).", min=0.0, max=1.0)
    schedule: str = opt("constant", "Learning-rate schedule.",
                        choices=["constant", "cosine", "polynomial", "plateau"])
    warmup_epochs: float = opt(0.0, "Linear warm-up from 0 to `lr` over this many epochs.", min=0.0)
    min_lr: float = opt(1e-5, "Floor of the schedule and of ReduceLROnPlateau.", min=0.0)
    loss: dict = opt({"sparse_categorical_crossentropy": 1.0},
                     "Loss terms and their weights, e.g. `{bce: 1.0, dice: 1.0}` (see `tfseg.losses`).")
    class_weights: Optional[tuple[float, ...]] = opt(None, "Per-class weights for the cross-entropy terms.")
    metrics: tuple[str, ...] = opt(["dice_coe", "iou", "pixel_accuracy"], "Metrics (see `tfseg.metrics`).")
    monitor: str = opt("val_dice_coe", "Quantity that selects the best checkpoint and stops early.")
    monitor_mode: str = opt("max", "Whether `monitor` should be maximised or minimised.", choices=["max", "min"])
    early_stopping_patience: int = opt(15, "Epochs without improvement before stopping; 0 = off.", min=0)
    reduce_lr_patience: int = opt(8, "ReduceLROnPlateau patience on val_loss; 0 = off.", min=0)
    reduce_lr_factor: float = opt(0.1, "ReduceLROnPlateau factor.", min=0.0, max=1.0)
    tensorboard: bool = opt(True, "Write TensorBoard scalars and validation image summaries.")
    mixed_precision: Optional[str] = opt(None, "null, mixed_float16 (GPU) or mixed_bfloat16 (TPU).",
                                         choices=[None, "mixed_float16", "mixed_bfloat16"])
    jit_compile: bool = opt(False, "TensorFlow backend: compile the train step with XLA (slower on CPU for these "
                                   "convnets). On JAX the step is always jax.jit-compiled.")
    steps_per_execution: int = opt(1, "Steps per call into the compiled function (raise it on TPU; runs as 1 under "
                                      "mirrored and multi-worker strategies, keras-team/keras#19246).", min=1)
    strategy: str = opt("auto", "auto (TPU, else mirrored over GPUs, else default), default, mirrored, "
                                "multiworker (TF_CONFIG) or tpu.",
                        choices=["auto", "default", "mirrored", "multiworker", "tpu"])
    backup_steps: int = opt(0, "BackupAndRestore: 0 = back up at the end of every epoch; N = every N training "
                               "steps as well (long epochs on preemptible TPU/Colab machines).", min=0)
    time_limit_minutes: Optional[float] = opt(None, "Stop training (after the current epoch) once this many "
                                                     "minutes of fit have passed; null = no limit.", min=0.0)


@dataclass(frozen=True)
class InferConfig:
    """Sliding-window prediction, test-time augmentation and fold ensembles."""

    fit: str = opt("auto", "How an image meets the model: resize (the whole image resized to data.image_size, "
                           "bilinear, predicted once, the probabilities resized back, bilinear, before "
                           "thresholding), tile (sliding windows at the image's own resolution, / downscale), or "
                           "auto (as the run trained: resize when data.fit is resize, else tile).",
                   choices=["auto", "resize", "tile"])
    tile_size: int = opt(512, "Side of the square tiles fed to the model, in model-input pixels (a model built "
                              "for a fixed size takes its own).", min=16)
    overlap: float = opt(0.5, "Fraction of a tile shared with its neighbour (nnU-Net uses 0.5).",
                         min=0.0, max=0.95)
    blend: str = opt("gaussian", "Weights of overlapping tiles.", choices=["gaussian", "linear", "constant"])
    sigma_scale: float = opt(0.125, "Gaussian blending: sigma = tile_size x this (nnU-Net's 1/8).", min=0.0)
    batch_size: int = opt(8, "Tiles per model call.", min=1)
    tta: int = opt(1, "Test-time augmentation: 1 (none), 2 (h-flip), 4 (flips), 8 (dihedral group).",
                   choices=[1, 2, 4, 8])
    folds: str = opt("all", "Folds whose models are averaged: `all` or a comma list such as `0,2`.")
    threshold: float = opt(0.5, "Binary models: probability above which a pixel is foreground.",
                           min=0.0, max=1.0)
    threshold_from: Optional[str] = opt(None, "Binary models: `oof` takes the threshold instead from the sweep "
                                              "that `tfseg evaluate --run RUN` wrote on out-of-fold predictions "
                                              "(RUN/evaluate/oof/evaluation.json); null = `threshold`.",
                                        choices=[None, "oof"])
    downscale: int = opt(1, "Predict at 1/downscale of the input resolution, then upsample.", min=1)
    skip_background: bool = opt(False, "Skip tiles that a cheap saturation rule calls background.")
    accumulator: str = opt("float16", "Probability accumulator of huge images: float16, float32 (in memory) "
                                      "or disk (memory-mapped).", choices=["float16", "float32", "disk"])
    save_probabilities: bool = opt(False, "Also write probability maps beside the mask PNGs.")


@dataclass(frozen=True)
class SubmitConfig:
    """Run-length encoded submission files."""

    id_column: str = opt("img", "Name of the id column (Carvana `img`, HuBMAP `id`).")
    rle_column: str = opt("rle_mask", "Name of the mask column (Carvana `rle_mask`, HuBMAP `predicted`).")
    id_format: str = opt("{name}", "How an image becomes its id: `{name}` (file name) or `{stem}` (without "
                                   "extension).", choices=["{name}", "{stem}"])
    pixel_order: str = opt("row", "RLE pixel order: row (Carvana, row-major) or column (HuBMAP, "
                                  "column-major).", choices=["row", "column"])
    class_column: Optional[str] = opt("ClassId", "Multiclass runs: name of the class column, written between the "
                                                 "id and the mask columns (Severstal `ImageId,ClassId,EncodedPixels`); "
                                                 "null = no class column, the id column holds `<id>_<class>` "
                                                 "(Understanding Clouds `Image_Label`). Binary runs have no class "
                                                 "column.")
    class_ids: Optional[tuple[int, ...]] = opt(None, "Multiclass runs: the class indices written, one row per image "
                                                     "and index, in this order; null = every class but the "
                                                     "background 0 (1 .. classes-1). Each must be below the run's "
                                                     "classes.", min=0)
    class_names: Optional[tuple[str, ...]] = opt(None, "Multiclass runs: one name per class index, background "
                                                       "included, written as the class instead of its index "
                                                       "(Understanding Clouds: [bg, Fish, Flower, Gravel, Sugar]); "
                                                       "null = the index (Severstal 1..4).")
    skip_empty: bool = opt(False, "Leave out the row of an empty mask (a class absent from an image; an image "
                                  "without foreground in a binary run); false = every row is written, an empty "
                                  "mask as an empty cell.")


@dataclass(frozen=True)
class Config:
    """The whole configuration: one field per params.yaml section."""

    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    submit: SubmitConfig = field(default_factory=SubmitConfig)

    def replace(self, **sections) -> Config:
        """Return a copy with whole sections or ``section={key: value}`` updates replaced."""
        new = {}
        origins = dict(getattr(self, "_origins", {}))
        for name, value in sections.items():
            changed = value if isinstance(value, dict) else to_dict(getattr(self, name))
            for key in changed:
                origins.pop(f"{name}.{key}", None)  # set here, in code: no file or --set to name
            if isinstance(value, dict):
                value = _build_section(name, {**to_dict(getattr(self, name)), **value})
            new[name] = value
        cfg = _resolve(dataclasses.replace(self, **new), origins)
        object.__setattr__(cfg, "_origins", origins)
        return cfg


SECTION_TYPES = {f.name: f.default_factory for f in fields(Config)}


# ---------------------------------------------------------------------------------------------
# Coercion and validation
# ---------------------------------------------------------------------------------------------


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp, key: str) -> Any:
    """Convert a YAML value to the annotated type ``tp`` or raise a one-line ConfigError."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for candidate in inner:
            try:
                return _coerce(value, candidate, key)
            except ConfigError as err:
                errors.append(err)
        raise errors[0]
    if tp is Any:
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {list(value)!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping such as {{name: value}}, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise TypeError(f"config type {tp!r} of {key} is not supported")


def _check_range(value: Any, f: dataclasses.Field, key: str) -> None:
    meta = f.metadata
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        hint = nearest(value, [c for c in choices if c is not None]) if isinstance(value, str) else None
        did = f" (did you mean {hint!r}?)" if hint else ""
        raise ConfigError(f"{key}: {value!r} is not allowed{did}; expected one of {list(choices)}")
    values = value if isinstance(value, tuple) else (value,)
    for v in values:
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v is None:
            continue
        if meta.get("min") is not None and v < meta["min"]:
            raise ConfigError(f"{key}: {value!r} is out of range; expected at least {meta['min']}")
        if meta.get("max") is not None and v > meta["max"]:
            raise ConfigError(f"{key}: {value!r} is out of range; expected at most {meta['max']}")


def _build_section(name: str, values: dict, origins: dict[str, str] | None = None) -> Any:
    cls = SECTION_TYPES[name]
    hints = typing.get_type_hints(cls)
    valid = {f.name: f for f in fields(cls)}
    kwargs = {}
    for key, value in values.items():
        full = f"{name}.{key}"
        try:
            if key not in valid:
                hint = nearest(key, valid)
                did = f" (did you mean '{name}.{hint}'?)" if hint else ""
                raise ConfigError(f"unknown key '{full}'{did}; valid keys of '{name}': {sorted(valid)}")
            coerced = _coerce(value, hints[key], full)
            _check_range(coerced, valid[key], full)
        except ConfigError as err:
            raise ConfigError(blame((origins or {}).get(full), full, str(err))) from None
        kwargs[key] = coerced
    return cls(**kwargs)


def _resolve(cfg: Config, origins: dict[str, str] | None = None) -> Config:
    """Fill derived values (model input shape and classes from data) and check cross-section rules."""
    origins = origins or {}

    def fail(key: str, message: str):
        raise ConfigError(blame(origins.get(key), key, message))

    model = cfg.model
    updates = {}
    if model.classes is None:
        updates["classes"] = cfg.data.classes
    val_size = cfg.data.val_size
    if val_size is not None and cfg.data.fit != "random_crop":
        fail("data.val_size", f"data.val_size: {list(val_size)} needs data.fit: random_crop (validation windows "
                              f"are central crops), got data.fit: {cfg.data.fit}")
    if val_size is not None and min(val_size) < 1:
        fail("data.val_size", f"data.val_size: expected two positive sizes, got {list(val_size)}")
    if model.input_shape is None:
        flexible = val_size is not None and tuple(val_size) != tuple(cfg.data.image_size)
        updates["input_shape"] = ((None, None) if flexible else tuple(cfg.data.image_size)) + (cfg.data.channels,)
    elif model.input_shape[-1] != cfg.data.channels:
        # The images decode to data.channels channels; a model taking another number fails in its
        # first step (a Keras traceback) or on the first image predicted.
        shape, want, channels = _flow(model.input_shape), model.input_shape[-1], cfg.data.channels
        fix = "Expected the same number (model.input_shape: null follows data.image_size and data.channels)"
        if origins.get("data.channels", "").startswith("--set "):
            fail("data.channels", f"data.channels: images would decode to {channels} channel(s), but "
                                  f"model.input_shape {shape} ({origins.get('model.input_shape', 'the default')}) "
                                  f"takes {want}. {fix}")
        fail("model.input_shape", f"model.input_shape: {shape} takes {want} channel(s), but data.channels is "
                                  f"{channels} ({origins.get('data.channels', 'the default')}). {fix}")
    if updates:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(model, **updates))
    if cfg.model.classes != cfg.data.classes:
        fail("model.classes", f"model.classes: {cfg.model.classes} differs from data.classes: {cfg.data.classes}; "
                              "set one of them (model.classes: null follows data.classes)")
    for i, op in enumerate(cfg.augment.ops):
        if not isinstance(op, dict) or "name" not in op:
            fail("augment.ops", f"augment.ops[{i}]: expected a mapping with a 'name', got {op!r}")
    return cfg


def blame(origin: str | None, key: str, message: str) -> str:
    """``message`` about ``key``, prefixed with where the key's value came from.

    ``origin`` is what :func:`key_origin` returns: ``--set key=value`` replaces the message's own
    leading ``key: `` (``--set train.lr=abc: expected a number, got 'abc'``); a file's path is put in
    front (``configs/x.yaml: train.lr: ...``); None (a default) leaves the message as it is.
    """
    if not origin:
        return message
    if origin.startswith("--set "):
        return f"{origin}: {message.removeprefix(f'{key}: ')}"
    return f"{origin}: {message}"


def key_origin(cfg: Config, key: str) -> str | None:
    """Where the value of ``section.key`` in ``cfg`` came from, for error messages.

    Returns ``--set section.key=value`` (the override as typed), the path of the params file that
    set it, or None when it is a default (or ``cfg`` was not made by :func:`load_config` /
    :func:`config_from_dict`; copies made with ``dataclasses.replace`` forget where keys came from).
    """
    return getattr(cfg, "_origins", {}).get(key)


# A builder's ModelError -> the config key a user changes to fix it (the first pattern found wins).
_MODEL_ERROR_KEYS = (
    (r"Received: arch=", "model.arch"),
    (r"Received: (backbone|encoder)=|backbone=|^encoder \S+ has no features", "model.backbone"),
    (r"Received: activation=", "model.activation"),
    (r"encoder_weights", "model.encoder_weights"),
    (r"encoder_freeze", "model.encoder_freeze"),
    (r"decoder_filters", "model.decoder_filters"),
    (r"decoder_block_type", "model.decoder_block_type"),
    (r"unknown option|option \w+=|encoder_features=", "model.options"),
    (r"input (height|width) |input_shape|input channels|needs a fixed input size", None),  # the size key
)


def model_error(cfg: Config, err: Exception, size_key: str) -> ConfigError:
    """The builder's one-line ModelError as a ConfigError that starts with the key to change.

    Keys are named as the user wrote them: ``--set model.arch=unett: Received: arch='unett' ...``
    or ``configs/x.yaml: model.arch: ...``; the builders' own argument names (``encoder_weights=``)
    become config keys (``model.encoder_weights=``). ``size_key`` is the key of the size being
    built (``data.image_size``, ``data.val_size`` or ``model.input_shape``).
    """
    text = re.sub(r"(?<![\w.])(encoder_weights|encoder_freeze)=", r"model.\1=", str(err))
    key = "model"
    for pattern, name in _MODEL_ERROR_KEYS:
        if re.search(pattern, text):
            key = name or size_key
            break
    return ConfigError(blame(key_origin(cfg, key), key, f"{key}: {text}"))



# ---------------------------------------------------------------------------------------------
# Loading, overriding, dumping
# ---------------------------------------------------------------------------------------------


def _parse_override(text: str) -> tuple[str, str, Any]:
    if "=" not in text:
        raise ConfigError(f"--set {text}: expected section.key=value, e.g. train.lr=1e-4")
    path, raw = text.split("=", 1)
    parts = path.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"--set {text}: expected section.key=value, e.g. train.lr=1e-4")
    section, key = parts
    if section not in SECTIONS:
        hint = nearest(section, SECTIONS)
        did = f" (did you mean '{hint}'?)" if hint else ""
        raise ConfigError(f"--set {text}: unknown section '{section}'{did}; expected one of {list(SECTIONS)}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {text}: the value is not valid YAML ({err.__class__.__name__})") from None
    return section, key, value


def config_from_dict(data: dict | None, overrides=(), source: str = "config") -> Config:
    """Build a :class:`Config` from a params dictionary and ``section.key=value`` overrides.

    A bad value's error names where it came from: ``--set section.key=value`` for an override,
    ``source`` (the params file's path) for a key of ``data``; see :func:`key_origin`.
    """
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections {list(SECTIONS)}, got {type(data).__name__}")
    raw: dict[str, dict] = {}
    origins: dict[str, str] = {}
    for section, values in data.items():
        if section not in SECTIONS:
            hint = nearest(section, SECTIONS)
            did = f" (did you mean '{hint}'?)" if hint else ""
            raise ConfigError(f"{source}: unknown section '{section}'{did}; expected one of {list(SECTIONS)}")
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section '{section}' must be a mapping, got {values!r}")
        raw[section] = dict(values)
        origins.update({f"{section}.{key}": source for key in values})
    for text in overrides:
        section, key, value = _parse_override(text)
        raw.setdefault(section, {})[key] = value
        origins[f"{section}.{key}"] = f"--set {text.strip()}"
    sections = {name: _build_section(name, raw.get(name, {}), origins) for name in SECTIONS}
    cfg = _resolve(Config(**sections), origins)
    object.__setattr__(cfg, "_origins", origins)  # not a field: configs compare by their values only
    return cfg


def load_config(path: str | os.PathLike | None = None, overrides=()) -> Config:
    """Load ``params.yaml`` (or any recipe) and apply ``section.key=value`` overrides.

    Args:
        path: YAML file; None uses the built-in defaults (which equal the shipped params.yaml).
        overrides: iterable of ``"section.key=value"`` strings, values parsed as YAML.

    Returns:
        A frozen :class:`Config` with derived values filled in.

    Raises:
        ConfigError: one line naming the file, the key and what was expected.
    """
    if path is None:
        return config_from_dict({}, overrides, source="defaults")
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML{where}") from None
    return config_from_dict(data, overrides, source=str(path))


def _flow(value: Any) -> str:
    """A value as one line of YAML: ``[null, null, 1]``."""
    return yaml.safe_dump(_plain(value), default_flow_style=True).strip().removesuffix("...").strip()


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def to_dict(obj: Any) -> dict:
    """The config (or one section) as plain YAML-ready Python values."""
    return {f.name: (to_dict(getattr(obj, f.name)) if dataclasses.is_dataclass(getattr(obj, f.name))
                     else _plain(getattr(obj, f.name))) for f in fields(obj)}


def dump_config(cfg: Config, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML, atomically, so a run records exactly what it used."""
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)
    return atomic_write_text(path, text)


def config_reference() -> str:
    """Markdown reference of every section and key, generated from the dataclasses."""
    lines = ["# Configuration reference", "",
             "Generated from `tfseg/config.py` by `python -m tfseg.config > docs/config.md`; "
             "a test fails when this file is stale.", "",
             "Every key can be set in a params file or on the command line with "
             "`--set section.key=value` (values parsed as YAML).", ""]
    for section in SECTIONS:
        cls = SECTION_TYPES[section]
        lines += [f"## `{section}`", "", (cls.__doc__ or "").strip(), "",
                  "| key | type | default | meaning |", "|---|---|---|---|"]
        hints = typing.get_type_hints(cls)
        defaults = to_dict(cls())
        for f in fields(cls):
            meta = f.metadata
            doc = meta.get("doc", "")
            if meta.get("choices"):
                doc += " Choices: " + ", ".join("null" if c is None else f"`{c}`" for c in meta["choices"]) + "."
            rng = [f"min {meta['min']}" if meta.get("min") is not None else "",
                   f"max {meta['max']}" if meta.get("max") is not None else ""]
            rng = ", ".join(r for r in rng if r)
            if rng:
                doc += f" Range: {rng}."
            default = yaml.safe_dump(defaults[f.name], default_flow_style=True).strip()
            default = default.removesuffix("...").strip()
            tname = _type_name(hints[f.name]).replace("|", "or")
            lines.append(f"| `{f.name}` | `{tname}` | `{default}` | {doc.replace('|', '/')} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(config_reference())
