"""The TFRecord schema (encode/decode pair), the sharded writer, ``verify``, and their CLI handlers.

One example per image (or tile)::

    image     bytes   PNG (lossless) or JPEG, uint8 [H, W, C], C = 1 or 3
    mask      bytes   PNG, uint8 [H, W, 1], class indices (binary: 0/1)
    id        bytes   unique id of the example within the data set
    group     bytes   what must stay within one fold (car, patient, source image)
    label     int64   label for stratified folds, -1 when none
    height, width, channels   int64, the image's shape
    image_format      bytes   b"png" or b"jpeg"

Shards are ``<dir>/<prefix>-<shard:03d>-<count>.tfrec`` (the HuBMAP notebooks count records from
the names) and ``<dir>/manifest.json`` lists every record (shard, id, group, label), so folds are
decided without decoding images. The full description is in ``tfrecords/README.md``.

    summary = write_tfrecords(cfg.data)          # parallel, deterministic, atomic
    summary = verify_dir(cfg.data.tfrecord_dir)  # decode everything, check names and shapes
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from tfseg.data.sample import Sample
from tfseg.data.tfrecord_encode import EncodedSample, check_sample, encode_sample
from tfseg.errors import DataError, first_line

if TYPE_CHECKING:
    import tensorflow as tf

# TensorFlow is imported inside the functions that need it, so that `tfseg tfrecords` checks its
# config (and fails on a bad key with one clean line) before the slow, noisy TensorFlow import.

__all__ = ["MANIFEST", "EncodedSample", "check_sample", "cli_tfrecords", "cli_verify",
           "count_records", "decode_example", "encode_example", "example_bytes", "features", "parse_index",
           "read_manifest", "record_index", "shard_files", "shard_name", "shard_prefix", "verify_dir",
           "write_tfrecords"]

MANIFEST = "manifest.json"
SCHEMA_VERSION = 1
SHARD_RE = re.compile(r"^(?P<prefix>.+)-(?P<shard>\d+)-(?P<count>\d+)\.tfrec$")



@functools.cache
def features() -> dict:
    """The ``tf.io.parse_single_example`` spec of a record: every feature, with defaults."""
    import tensorflow as tf

    return {
        "image": tf.io.FixedLenFeature([], tf.string),
        "mask": tf.io.FixedLenFeature([], tf.string),
        "id": tf.io.FixedLenFeature([], tf.string),
        "group": tf.io.FixedLenFeature([], tf.string, default_value=""),
        "label": tf.io.FixedLenFeature([], tf.int64, default_value=-1),
        "height": tf.io.FixedLenFeature([], tf.int64),
        "width": tf.io.FixedLenFeature([], tf.int64),
        "channels": tf.io.FixedLenFeature([], tf.int64),
        "image_format": tf.io.FixedLenFeature([], tf.string, default_value=""),
    }


# ---------------------------------------------------------------------------------------------
# Schema: encode and decode, together
# ---------------------------------------------------------------------------------------------


def _bytes(value: bytes) -> tf.train.Feature:
    import tensorflow as tf

    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def _int(value: int) -> tf.train.Feature:
    import tensorflow as tf

    return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(value)]))


def example_bytes(rec: EncodedSample) -> bytes:
    """Serialize an encoded sample as a ``tf.train.Example`` with the features of :func:`features`."""
    feature = {
        "image": _bytes(rec.image),
        "mask": _bytes(rec.mask),
        "id": _bytes(rec.id.encode("utf-8")),
        "group": _bytes(rec.group.encode("utf-8")),
        "label": _int(rec.label),
        "height": _int(rec.height),
        "width": _int(rec.width),
        "channels": _int(rec.channels),
        "image_format": _bytes(rec.image_format.encode("ascii")),
    }
    import tensorflow as tf

    example = tf.train.Example(features=tf.train.Features(feature=feature))
    return example.SerializeToString(deterministic=True)


def encode_example(sample: Sample, image_format: str = "jpeg", jpeg_quality: int = 95) -> bytes:
    """Serialize one sample as a ``tf.train.Example`` (deterministic bytes).

    Args:
        sample: image uint8 [H, W, C] (C = 1 or 3), mask uint8 [H, W] with class indices.
        image_format: ``"png"`` (lossless) or ``"jpeg"`` for the image; the mask is always PNG.
        jpeg_quality: 1..100, used when ``image_format`` is ``"jpeg"``.

    Returns:
        The serialized example; the same sample and settings always give the same bytes.

    Raises:
        DataError: the sample breaks the contract (:func:`check_sample`), or an unknown format.
    """
    return example_bytes(encode_sample(sample, image_format, jpeg_quality))


def decode_example(serialized: tf.Tensor, channels: int = 3) -> dict[str, tf.Tensor]:
    """Parse and decode one serialized example; graph-safe (use it inside ``Dataset.map``).

    Args:
        serialized: scalar tf.string, one record of a shard.
        channels: image channels to decode to (1 or 3); 0 keeps the stored channels.

    Returns:
        dict with ``image`` uint8 [H, W, channels], ``mask`` uint8 [H, W, 1] (class indices),
        ``id`` and ``group`` tf.string, ``label``, ``height``, ``width``, ``channels`` int64.
    """
    import tensorflow as tf

    ex = tf.io.parse_single_example(serialized, features())
    image = tf.io.decode_image(ex["image"], channels=channels, expand_animations=False)
    image.set_shape([None, None, channels or None])
    mask = tf.io.decode_png(ex["mask"], channels=1)
    mask.set_shape([None, None, 1])
    return {"image": image, "mask": mask, "id": ex["id"], "group": ex["group"], "label": ex["label"],
            "height": ex["height"], "width": ex["width"], "channels": ex["channels"]}


def parse_index(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
    """Parse only ``id``, ``group`` (tf.string) and ``label`` (int64) of a record: no image decoding."""
    import tensorflow as tf

    spec = features()
    return tf.io.parse_single_example(serialized, {k: spec[k] for k in ("id", "group", "label")})


# ---------------------------------------------------------------------------------------------
# Shard names and the manifest
# ---------------------------------------------------------------------------------------------


def shard_name(prefix: str, shard: int, count: int) -> str:
    """``<prefix>-<shard:03d>-<count>.tfrec``."""
    return f"{prefix}-{shard:03d}-{count}.tfrec"


def shard_prefix(directory: str | Path) -> str:
    """The shard prefix of a folder: its base name, with characters other than [A-Za-z0-9_.] -> ``_``."""
    name = Path(str(directory).rstrip("/")).name or "data"
    return re.sub(r"[^A-Za-z0-9_.]+", "_", name).strip("_.") or "data"


def _shard_key(path: str) -> tuple:
    m = SHARD_RE.match(Path(path).name)
    return (m["prefix"], int(m["shard"]), path) if m else (Path(path).name, -1, path)


def shard_files(directory: str | Path) -> list[str]:
    """Every ``*.tfrec`` file in ``directory`` (local or ``gs://``), sorted by prefix then shard number.

    Raises:
        DataError: the folder does not exist.
    """
    import tensorflow as tf

    directory = str(directory).rstrip("/")
    if not tf.io.gfile.isdir(directory):
        raise DataError(f"{directory}: TFRecord folder not found. Expected the output of `tfseg tfrecords`.")
    return sorted(tf.io.gfile.glob(f"{directory}/*.tfrec"), key=_shard_key)


def count_records(files: Sequence[str]) -> int:
    """Total records of ``files``, read from their names ``<prefix>-<shard>-<count>.tfrec``.

    Raises:
        DataError: a name without a count.
    """
    total = 0
    for path in files:
        m = SHARD_RE.match(Path(path).name)
        if not m:
            raise DataError(f"{path}: shard name has no record count. "
                            "Expected <prefix>-<shard>-<count>.tfrec.")
        total += int(m["count"])
    return total


def read_manifest(directory: str | Path) -> dict | None:
    """The manifest of a shard folder, or None when there is none.

    Raises:
        DataError: the manifest exists but is not valid JSON of the expected shape.
    """
    import tensorflow as tf

    path = f"{str(directory).rstrip('/')}/{MANIFEST}"
    if not tf.io.gfile.exists(path):
        return None
    try:
        with tf.io.gfile.GFile(path, "r") as f:
            manifest = json.loads(f.read())
    except (json.JSONDecodeError, UnicodeDecodeError, tf.errors.OpError) as err:
        raise DataError(f"{path}: unreadable manifest ({err.__class__.__name__}). "
                        "Expected the JSON written by `tfseg tfrecords`.") from None
    if not isinstance(manifest, dict) or not {"shards", "records"} <= set(manifest):
        raise DataError(f"{path}: manifest lacks 'shards' or 'records'. Expected the JSON written by "
                        "`tfseg tfrecords`.")
    return manifest


def record_index(directory: str | Path) -> list[dict]:
    """``[{"shard": file name, "id", "group", "label"}]`` of every record, in shard order.

    From ``manifest.json`` when present, otherwise by parsing the id/group/label features of
    every record (no image decoding), so a fold split is decidable from the records alone.
    """
    manifest = read_manifest(directory)
    if manifest is not None:
        return [dict(r) for r in manifest["records"]]
    files = shard_files(directory)
    if not files:
        raise DataError(f"{directory}: no .tfrec shards. Expected the output of `tfseg tfrecords`.")
    import tensorflow as tf

    records = []
    for path in files:
        try:
            for ex in tf.data.TFRecordDataset(path).map(parse_index):
                records.append({"shard": Path(path).name, "id": ex["id"].numpy().decode(),
                                "group": ex["group"].numpy().decode(), "label": int(ex["label"])})
        except tf.errors.OpError as err:
            raise DataError(f"{path}: unreadable shard ({first_line(err)})") from None
    return records


# The writer (tfrecord_writer.py) and verify (tfrecord_verify.py) live beside this module and import
# it; these thin entry points keep ``tfseg.data.tfrecord`` the one way in without an import cycle.


def write_tfrecords(cfg, output_dir: str | Path | None = None, overwrite: bool = False, **kwargs) -> dict:
    """Write the data set of ``cfg`` (a DataConfig) as shards; see :func:`tfrecord_writer.write_tfrecords`."""
    from tfseg.data import tfrecord_writer

    return tfrecord_writer.write_tfrecords(cfg, output_dir, overwrite, **kwargs)


def verify_dir(directory: str | Path) -> dict:
    """Decode and check every record of every shard; see :func:`tfrecord_verify.verify_dir`."""
    from tfseg.data import tfrecord_verify

    return tfrecord_verify.verify_dir(directory)


def cli_tfrecords(args) -> int:
    """``tfseg tfrecords --config C [--set k=v] [--output DIR] [--overwrite]``.

    Loads the config first (a bad key fails before TensorFlow is imported), writes the shards,
    dumps the resolved config beside them as ``config.yaml`` and prints a one-line summary.
    """
    from tfseg.config import load_config

    cfg = load_config(args.config, args.overrides)
    from tfseg.data import tfrecord_writer

    return tfrecord_writer.cli_write(cfg, args)


def cli_verify(args) -> int:
    """``tfseg verify DIR``: print a one-line summary, exit 0; a bad shard exits 2 naming it."""
    directory = str(args.dir)
    if "://" not in directory and not Path(directory).is_dir():
        raise DataError(f"{directory}: TFRecord folder not found. Expected the output of `tfseg tfrecords`.")
    from tfseg.data import tfrecord_verify

    return tfrecord_verify.cli_verify(args)
