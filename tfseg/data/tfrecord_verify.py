"""``tfseg verify DIR``: decode every record of every shard and check it against its name and manifest.

Checks, shard by shard in order, stopping at the first bad one with a one-line
:class:`DataError` that names it:

* the file reads to the end (TFRecord length and CRC checks catch truncation and corruption);
* the record count equals the count in the name ``<prefix>-<shard>-<count>.tfrec``;
* every image and mask decodes, their height and width equal the ``height``/``width``
  features, the image has ``channels`` channels and the mask one;
* with ``manifest.json``: the same shard files, the same ids in the same order, the manifest's
  channels, and mask values below ``max(classes, 2)``; ids unique across shards.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import tensorflow as tf

from tfseg.data.tfrecord import SHARD_RE, features, read_manifest, shard_files
from tfseg.errors import DataError, first_line
from tfseg.registry import plural


def _inspect(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
    """Decode one record at its stored channels; return its features, decoded shapes, mask histogram."""
    ex = tf.io.parse_single_example(serialized, features())
    image = tf.io.decode_image(ex["image"], channels=0, expand_animations=False)
    mask = tf.io.decode_image(ex["mask"], channels=0, expand_animations=False)
    hist = tf.math.bincount(tf.reshape(tf.cast(mask, tf.int32), [-1]), minlength=256, maxlength=256)
    return {"id": ex["id"], "height": ex["height"], "width": ex["width"], "channels": ex["channels"],
            "image_shape": tf.shape(image), "mask_shape": tf.shape(mask), "hist": hist}


def _check_record(path: str, n: int, r: dict, channels: int | None) -> tuple[str, int]:
    rid = r["id"].decode("utf-8", "replace")
    where = f"{path}: record {n} (id {rid!r})"
    h, w, c = int(r["height"]), int(r["width"]), int(r["channels"])
    ih, iw, ic = (int(v) for v in r["image_shape"])
    mh, mw, mc = (int(v) for v in r["mask_shape"])
    if not rid:
        raise DataError(f"{where}: empty id. Expected a unique id per record.")
    if (ih, iw) != (h, w) or ic != c:
        raise DataError(f"{where}: image decodes to {[ih, iw, ic]}, features say {[h, w, c]}.")
    if (mh, mw, mc) != (h, w, 1):
        raise DataError(f"{where}: mask decodes to {[mh, mw, mc]}. Expected {[h, w, 1]}.")
    if channels is not None and c != channels:
        raise DataError(f"{where}: {c} channels. Expected {channels} (manifest).")
    return rid, c


def _verify_shard(path: str, channels: int | None) -> tuple[list[str], np.ndarray, tuple, tuple, set]:
    """Decode every record of one shard; return its ids, mask histogram, min and max (h, w), channels."""
    ids: list[str] = []
    chans: set[int] = set()
    hist = np.zeros(256, np.int64)
    lo, hi = (2**62, 2**62), (0, 0)
    ds = tf.data.TFRecordDataset(path).map(_inspect, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    try:
        for r in ds.as_numpy_iterator():
            rid, c = _check_record(path, len(ids), r, channels)
            ids.append(rid)
            chans.add(c)
            hist += r["hist"]
            hw = (int(r["height"]), int(r["width"]))
            lo, hi = min(lo, hw), max(hi, hw)
    except tf.errors.OpError as err:
        raise DataError(f"{path}: unreadable after {plural(len(ids), 'good record')} ({first_line(err)}). "
                        "Expected a complete shard; rewrite it with `tfseg tfrecords --overwrite`.") from None
    return ids, hist, lo, hi, chans


def _check_against_manifest(directory: str, manifest: dict, files: list[str]) -> dict[str, list[str]]:
    listed = [s.get("file") for s in manifest["shards"]]
    names = [Path(f).name for f in files]
    missing = sorted(set(listed) - set(names))
    extra = sorted(set(names) - set(listed))
    if missing:
        raise DataError(f"{directory}/{missing[0]}: listed in {directory}/manifest.json but missing.")
    if extra:
        raise DataError(f"{directory}/{extra[0]}: shard not listed in {directory}/manifest.json.")
    by_shard: dict[str, list[str]] = {n: [] for n in names}
    for rec in manifest["records"]:
        by_shard.setdefault(rec.get("shard"), []).append(rec.get("id"))
    return by_shard


def verify_dir(directory: str | Path) -> dict:
    """Decode every record of every shard of ``directory`` and check names, shapes and manifest.

    Args:
        directory: a folder of ``<prefix>-<shard>-<count>.tfrec`` shards (local or ``gs://``).

    Returns:
        ``{"dir", "shards", "records", "bytes", "manifest" (bool), "channels", "mask_values",
        "min_size" [h, w], "max_size" [h, w], "seconds"}``.

    Raises:
        DataError: one line naming the first bad shard (or the folder when it holds none).
    """
    start = time.perf_counter()
    directory = str(directory).rstrip("/")
    files = shard_files(directory)
    if not files:
        raise DataError(f"{directory}: no .tfrec shards. Expected the output of `tfseg tfrecords`.")
    manifest = read_manifest(directory)
    channels = classes = None
    by_shard: dict[str, list[str]] = {}
    if manifest is not None:
        channels, classes = manifest.get("channels"), manifest.get("classes")
        by_shard = _check_against_manifest(directory, manifest, files)
    seen: dict[str, str] = {}
    hist = np.zeros(256, np.int64)
    lo, hi, total, size, chans = (2**62, 2**62), (0, 0), 0, 0, set()
    for path in files:
        name = Path(path).name
        m = SHARD_RE.match(name)
        if not m:
            raise DataError(f"{path}: shard name has no record count. "
                            "Expected <prefix>-<shard>-<count>.tfrec.")
        ids, shard_hist, s_lo, s_hi, s_chans = _verify_shard(path, channels)
        if len(ids) != int(m["count"]):
            raise DataError(f"{path}: holds {plural(len(ids), 'record')}, its name says {int(m['count'])}.")
        if manifest is not None and ids != by_shard.get(name):
            raise DataError(f"{path}: its ids differ from those listed for it in {directory}/manifest.json.")
        for rid in ids:
            if rid in seen:
                raise DataError(f"{path}: id {rid!r} also in {seen[rid]}. Expected unique ids.")
            seen[rid] = name
        values = np.flatnonzero(shard_hist)
        if classes is not None and values.size and values.max() >= max(int(classes), 2):
            raise DataError(f"{path}: mask value {int(values.max())} outside classes={classes} (manifest). "
                            f"Expected values in [0, {max(int(classes), 2)}).")
        hist += shard_hist
        lo, hi = min(lo, s_lo), max(hi, s_hi)
        total += len(ids)
        size += tf.io.gfile.stat(path).length
        chans |= s_chans
    if manifest is not None and total != len(manifest["records"]):
        raise DataError(f"{directory}/manifest.json: lists {plural(len(manifest['records']), 'record')}, "
                        f"the shards hold {total}.")
    return {"dir": directory, "shards": len(files), "records": total, "bytes": size,
            "manifest": manifest is not None, "channels": sorted(chans),
            "mask_values": [int(v) for v in np.flatnonzero(hist)],
            "min_size": list(lo) if total else None, "max_size": list(hi) if total else None,
            "seconds": round(time.perf_counter() - start, 3)}


def cli_verify(args) -> int:
    """``tfseg verify DIR``: print a one-line summary and return 0 (a bad shard raises DataError)."""
    s = verify_dir(args.dir)
    sizes = (f"{s['min_size'][0]}x{s['min_size'][1]}" if s["min_size"] == s["max_size"]
             else f"{s['min_size'][0]}x{s['min_size'][1]}..{s['max_size'][0]}x{s['max_size'][1]}")
    print(f"{s['dir']}: OK, {plural(s['records'], 'record')} in {plural(s['shards'], 'shard')} "
          f"({s['bytes'] / 2**20:.1f} MiB), "
          f"sizes {sizes}, mask values {s['mask_values']}, "
          f"manifest {'matches' if s['manifest'] else 'absent'} ({s['seconds']:.1f} s)")
    return 0
