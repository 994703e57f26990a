"""Shard files -> decoded, fitted, augmented, batched ``tf.data.Dataset`` for Keras ``fit``.

The steps, in order (each a named stage of :func:`make_dataset`)::

    files -> (training: shuffle files) -> interleave TFRecordDataset -> keep allowed groups
          -> [cache: decode + fit, cache] -> (training: shuffle, repeat)
          -> one map: [decode (tfrecord.decode_example) -> fit to image_size (resize | center crop |
             check)] -> (training: random crop, augment with per-example seeds)
             -> float32 image, mask format, mask_crop
          -> batch -> prefetch(AUTOTUNE)

Without ``cache`` the shuffle buffer holds serialized records and decoding happens in the same
parallel map as the augmentation; with ``cache`` decoded examples are cached and shuffled.

Yields ``(image float32 [B, H, W, C] 0..255, mask [B, H, W, 1])``; the mask is float32 0/1 for
one class (sigmoid models) and int32 class indices otherwise. The model normalizes the image.

Randomness: file order, shuffle and augmentation all come from ``seed``; each example gets its own
stateless seed from ``Dataset.random(seed)``, so ``deterministic=True`` gives the same batches on
every run (and a new draw every epoch). ``deterministic=False`` lets parallel stages hand results
over out of order, which is faster.

Distribution: pass the GLOBAL batch (per-replica batch x replicas, :func:`check_global_batch`);
``model.fit`` under a ``tf.distribute`` strategy splits each batch between the replicas. Across
several workers the dataset is auto-sharded by FILE when there are at least as many files as
workers (each worker reads its own shards), else by DATA (each worker reads everything and keeps
every n-th example).
"""

from __future__ import annotations

import os
from collections.abc import Collection, Sequence
from pathlib import Path

import tensorflow as tf

from tfseg.data import tfrecord
from tfseg.data.augment import check_ops, compose
from tfseg.data.geometry import crop, crop_offsets, pad_to
from tfseg.errors import ConfigError, DataError

AUTOTUNE = tf.data.AUTOTUNE
FITS = ("resize", "random_crop", "none")


def check_global_batch(per_replica_batch: int, replicas: int) -> int:
    """Return the global batch ``per_replica_batch x replicas``.

    Raises:
        ConfigError: when either is not a positive integer (one line naming the value).
    """
    for name, value in (("train.batch_size", per_replica_batch), ("replicas", replicas)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name}={value!r}: expected a positive integer "
                              "(global batch = per-replica batch x replicas)")
    return per_replica_batch * replicas


def _check_args(files, batch_size, image_size, fit, mask_crop, groups) -> list[str]:
    if isinstance(files, (str, os.PathLike)):
        files = [files]
    files = [str(f) for f in files]
    if not files:
        raise DataError("no TFRecord files given. Expected at least one shard (see `tfseg tfrecords`).")
    for f in files:
        if not f.startswith(("gs://", "s3://", "hdfs://")) and not Path(f).is_file():
            raise DataError(f"{f}: TFRecord shard not found")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size={batch_size!r}: expected a positive integer")
    if fit not in FITS:
        raise ConfigError(f"data.fit={fit!r}: expected one of {list(FITS)}")
    if fit != "none" and image_size is None:
        raise ConfigError(f"data.image_size=None: fit={fit!r} needs [height, width]")
    for name, size in (("data.image_size", image_size), ("mask_crop", mask_crop)):
        if size is not None and (len(size) != 2 or not all(int(s) > 0 for s in size)):
            raise ConfigError(f"{name}={list(size)!r}: expected [height, width], positive integers")
    if mask_crop is not None and image_size is not None and (
            mask_crop[0] > image_size[0] or mask_crop[1] > image_size[1]):
        raise ConfigError(f"mask_crop={list(mask_crop)} is larger than data.image_size={list(image_size)}")
    if groups is not None and (isinstance(groups, str) or len(groups) == 0):
        raise DataError(f"groups={groups!r}: expected a non-empty collection of group names")
    return files


def _read_records(files: list[str], training: bool, seed: int, deterministic: bool) -> tf.data.Dataset:
    ds = tf.data.Dataset.from_tensor_slices(files)
    if training and len(files) > 1:
        ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    return ds.interleave(lambda f: tf.data.TFRecordDataset(f, buffer_size=1 << 20),
                         cycle_length=min(len(files), 16), block_length=1,
                         num_parallel_calls=AUTOTUNE, deterministic=deterministic)


def _keep_groups(ds: tf.data.Dataset, groups: Collection[str]) -> tf.data.Dataset:
    keys = tf.constant(sorted({str(g) for g in groups}))
    table = tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(keys, tf.ones_like(keys, tf.int32)),
                                      default_value=0)
    return ds.filter(lambda s: table.lookup(tfrecord.parse_index(s)["group"]) > 0)


def _resize(image, mask, size):
    """Image bilinear (back to uint8), mask nearest, to ``size`` [h, w]."""
    image = tf.image.resize(image, size, method="bilinear", antialias=False)
    image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
    return image, tf.image.resize(mask, size, method="nearest")


def _decode_and_fit(channels: int, image_size, fit: str, training: bool):
    """Record -> (image uint8 [h, w, C], mask uint8 [h, w, 1], id), fitted unless a random crop."""

    def decode(serialized):
        ex = tfrecord.decode_example(serialized, channels)
        image, mask = ex["image"], ex["mask"]
        if fit == "resize":  # records already at image_size (tiles written at training size) pass as they are
            same = tf.reduce_all(tf.equal(tf.shape(image)[:2], tf.constant(image_size, tf.int32)))
            image, mask = tf.cond(same, lambda: (image, mask), lambda: _resize(image, mask, image_size))
        elif fit == "random_crop" and not training:  # validation: the central window, padded if small
            image, mask = pad_to(image, mask, image_size)
            offset = (tf.shape(image)[:2] - tf.constant(image_size)) // 2
            image, mask = crop(image, mask, offset, image_size)
        elif fit == "none" and image_size is not None:
            tf.debugging.assert_equal(tf.shape(image)[:2], tf.constant(image_size, tf.int32), message=(
                f"a record's size differs from data.image_size={list(image_size)} with data.fit=none; "
                "use fit: resize or random_crop"))
        if image_size is not None and not (fit == "random_crop" and training):
            image.set_shape([*image_size, channels])
            mask.set_shape([*image_size, 1])
        return image, mask, ex["id"]

    return decode


def _finish(classes: int, mask_crop, with_ids: bool):
    """uint8 pair -> (image float32 0..255, mask float32 0/1 or int32, [id])."""

    def finish(image, mask, ident):
        image = tf.cast(image, tf.float32)
        if mask_crop is not None:
            offset = (tf.shape(mask)[:2] - tf.constant(mask_crop)) // 2
            mask = tf.slice(mask, [offset[0], offset[1], 0], [mask_crop[0], mask_crop[1], 1])
            mask.set_shape([*mask_crop, 1])
        mask = tf.cast(mask, tf.float32 if classes == 1 else tf.int32)
        return (image, mask, ident) if with_ids else (image, mask)

    return finish


def make_dataset(files: Sequence[str], *, batch_size: int, training: bool,
                 image_size: Sequence[int] | None = None, fit: str = "resize", augment_ops=(),
                 channels: int = 3, classes: int = 1, groups: Collection[str] | None = None,
                 shuffle_buffer: int = 256, seed: int = 0, deterministic: bool = False,
                 cache: bool | str = False, repeat: bool | int | None = None,
                 drop_remainder: bool | None = None, mask_crop: Sequence[int] | None = None,
                 with_ids: bool = False, num_workers: int = 1) -> tf.data.Dataset:
    """Build the input pipeline over TFRecord shards.

    Args:
        files: shard paths (``tfrecord.shard_files(dir)`` or a fold's ``train_files``).
        batch_size: examples per batch; under a strategy the GLOBAL batch.
        training: True = shuffle, repeat, random crop, augment, drop the last partial batch.
        image_size: [height, width] of the output; None only with ``fit="none"``.
        fit: ``resize`` (image bilinear, mask nearest), ``random_crop`` (padded when smaller;
            the central window when not training), or ``none`` (records must have image_size).
        augment_ops: the ``augment.ops`` list; checked here, before any data flows.
        channels: image channels, 1 or 3. classes: 1 = binary float mask, else int32 indices.
        groups: keep only records whose group is in it (the fold's groups); None keeps all.
        shuffle_buffer: examples in the shuffle buffer (training; 0 or 1 = no shuffle).
        seed: seed of the file order, the shuffle and the augmentations.
        deterministic: same batches on every run with the same seed (slower).
        cache: True caches decoded, fitted uint8 examples in memory; a string caches to that file.
        repeat: None = forever when training, once otherwise; True = forever; an int = that many.
        drop_remainder: None = ``training``.
        mask_crop: [h, w] center crop of the mask only (models with smaller outputs).
        with_ids: add the record id (tf.string [B]) as a third element (not for ``fit``).
        num_workers: workers reading this dataset (multi-worker training): chooses the shard policy.

    Returns:
        ``tf.data.Dataset`` of (image float32 [B, H, W, C] in 0..255, mask float32 [B, H, W, 1]
        0/1 when classes == 1, else int32 class indices [, id]).

    Raises:
        ConfigError / DataError: one line, when arguments, ops or files are wrong.
    """
    files = _check_args(files, batch_size, image_size, fit, mask_crop, groups)
    image_size = None if image_size is None else (int(image_size[0]), int(image_size[1]))
    mask_crop = None if mask_crop is None else (int(mask_crop[0]), int(mask_crop[1]))
    steps = check_ops(augment_ops, channels)  # always checked, used only when training
    augment = compose(steps)

    ds = _read_records(files, training, seed, deterministic)
    if groups is not None:
        ds = _keep_groups(ds, groups)
    decode = _decode_and_fit(channels, image_size, fit, training)
    if cache:  # cache decoded examples; shuffle them
        ds = ds.map(decode, num_parallel_calls=AUTOTUNE, deterministic=deterministic)
        ds = ds.cache(cache if isinstance(cache, str) else "")
        decode = None
    # Without a cache the shuffle holds the serialized records (JPEG/PNG bytes, ~15x smaller than
    # the decoded pixels) and decode, augment and finish run in ONE parallel map: no decoded image
    # goes through a buffer or a stage hand-over (measured in bench/input_pipeline.py).
    if training and shuffle_buffer > 1:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    if repeat is True or (repeat is None and training):
        ds = ds.repeat()
    elif repeat not in (None, False) and repeat != 1:
        ds = ds.repeat(int(repeat))
    finish = _finish(classes, mask_crop, with_ids)
    if training and (any(s.p > 0 for s in steps) or fit == "random_crop"):
        ds = _augmented(ds, decode, augment, fit, image_size, seed, deterministic, finish)
    else:
        ds = ds.map(finish if decode is None else lambda record: finish(*decode(record)),
                    num_parallel_calls=AUTOTUNE, deterministic=deterministic)
    ds = ds.batch(batch_size, drop_remainder=training if drop_remainder is None else drop_remainder,
                  num_parallel_calls=AUTOTUNE, deterministic=deterministic)
    ds = ds.prefetch(AUTOTUNE)
    return ds.with_options(_options(deterministic, len(files), num_workers))


def _augmented(ds, decode, augment, fit, image_size, seed, deterministic, finish):
    """Zip a per-example seed stream in; (decode unless cached,) random crop, augment and
    ``finish`` in one map (one parallel stage instead of several: less per-example overhead)."""
    seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)

    def apply(example, draw):
        image, mask, ident = example if decode is None else decode(example)
        key = tf.stack([tf.constant(seed, tf.int64), draw])
        crop_seed, op_seed = tf.unstack(tf.random.experimental.stateless_split(key, 2))
        if fit == "random_crop":
            image, mask = pad_to(image, mask, image_size)
            offset = crop_offsets(crop_seed, tf.shape(image)[:2], tf.constant(image_size))
            image, mask = crop(image, mask, offset, image_size)
        image, mask = augment(image, mask, op_seed)  # uint8 in, float32 out
        return finish(image, mask, ident)

    return tf.data.Dataset.zip((ds, seeds)).map(apply, num_parallel_calls=AUTOTUNE,
                                                 deterministic=deterministic)


def _options(deterministic: bool, n_files: int, num_workers: int) -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = deterministic
    policy = tf.data.experimental.AutoShardPolicy
    options.experimental_distribute.auto_shard_policy = (
        policy.FILE if n_files >= max(1, num_workers) else policy.DATA)
    return options


def dataset_from_config(cfg, files: Sequence[str], *, training: bool, groups: Collection[str] | None = None,
                        global_batch: int | None = None, mask_crop: Sequence[int] | None = None,
                        num_workers: int = 1, with_ids: bool = False) -> tf.data.Dataset:
    """:func:`make_dataset` with the settings of a :class:`tfseg.config.Config`.

    Args:
        cfg: the whole config (``data``, ``augment`` and ``train.seed`` / ``train.batch_size`` are read);
            validation (``training=False``) takes windows of ``data.val_size`` when it is set.
        files: shard paths. training: see :func:`make_dataset`. groups: the fold's groups.
        global_batch: batch size across replicas (:func:`check_global_batch`); None = train.batch_size.
        mask_crop: [h, w] center crop of the mask. num_workers: workers of a multi-worker strategy.
        with_ids: add the record ids.
    """
    data = cfg.data
    size = data.image_size if training else data.validation_size()[0]
    return make_dataset(
        files, batch_size=global_batch or cfg.train.batch_size, training=training,
        image_size=size, fit=data.fit, augment_ops=cfg.augment.ops, channels=data.channels,
        classes=data.classes, groups=groups, shuffle_buffer=data.shuffle_buffer, seed=cfg.train.seed,
        deterministic=data.deterministic, cache=data.cache, mask_crop=mask_crop, with_ids=with_ids,
        num_workers=num_workers)
