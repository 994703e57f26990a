"""The sharded TFRecord writer: parallel, deterministic, all-or-nothing.

Entries come from ``sources.list_entries`` (sorted by id); entry ``i`` goes to shard
``i % shards``, so shard ``k`` holds ``entries[k::shards]``. With ``data.workers > 1`` the entries
are read, checked and encoded in "spawn" worker processes that never import TensorFlow
(``tfrecord_encode``); this process receives the encoded bytes in entry order and writes every
shard, so the shards are byte-identical whatever the number of workers.

All or nothing: shards are written under a hidden temporary folder inside the output folder
(``.part`` files, renamed ``<prefix>-<k:03d>-<count>.tfrec`` when complete); they move into the
output folder only when every entry succeeded, then ``manifest.json`` is written, atomically,
last. A failure (a :class:`DataError` from any worker) removes the temporary folder and
re-raises the one-line error: no new shard is left behind. Empty shards produce no file.
A run killed outright (SIGKILL) cannot remove its folder (``.tfrecords.tfseg-<pid>@<host>...tmp``);
the next run into the same output folder does, once that process is gone
(:func:`tfseg.files.remove_stale_temps`), and its workers end with it (``worker_pool``).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import sys
import time
from collections import deque
from collections.abc import Iterator, Sequence
from itertools import islice
from pathlib import Path

import tensorflow as tf
from tqdm import tqdm

from tfseg.config import DataConfig
from tfseg.data import tfrecord as schema
from tfseg.data.tfrecord_encode import EncodedSample, encode_entry, worker_pool
from tfseg.errors import DataError
from tfseg.files import atomic_write_text, make_temp, remove_stale_temps
from tfseg.registry import plural


def _encoded_entries(cfg: DataConfig, entries: Sequence, workers: int) -> Iterator[list[EncodedSample]]:
    """Encode every entry, in order: in this process, or in ``workers`` "spawn" processes.

    Workers run only :func:`tfrecord_encode.encode_entry` (no TensorFlow import). At most
    ``4 x workers`` entries are in flight, so memory stays bounded; the first error (a DataError
    from a worker) cancels what is pending and is re-raised here.
    """
    if workers <= 1:
        for entry in entries:
            yield encode_entry(cfg, entry)
        return
    pool = worker_pool(workers)
    try:
        todo = iter(entries)
        window = deque(pool.submit(encode_entry, cfg, e) for e in islice(todo, 4 * workers))
        while window:
            result = window.popleft().result()
            for entry in islice(todo, 1):
                window.append(pool.submit(encode_entry, cfg, entry))
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class _ShardSet:
    """Shard ``k`` gets the entries ``i`` with ``i % n == k``; written as ``.part`` files in ``folder``."""

    def __init__(self, folder: Path, prefix: str, n: int):
        self.folder, self.prefix, self.n = folder, prefix, n
        self.writers: dict[int, tf.io.TFRecordWriter] = {}
        self.records: dict[int, list[dict]] = {}

    def part(self, k: int) -> Path:
        return self.folder / f".{self.prefix}-{k:03d}.part"

    def add(self, index: int, encoded: list[EncodedSample]) -> None:
        k = index % self.n
        for rec in encoded:
            if k not in self.writers:
                self.writers[k] = tf.io.TFRecordWriter(str(self.part(k)))
                self.records[k] = []
            self.writers[k].write(schema.example_bytes(rec))
            self.records[k].append({"id": rec.id, "group": rec.group, "label": rec.label})

    def close(self) -> list[dict]:
        """Close every shard and rename it ``<prefix>-<k:03d>-<count>.tfrec``; shards in order."""
        shards = []
        for k in sorted(self.writers):
            self.writers[k].close()
            final = self.folder / schema.shard_name(self.prefix, k, len(self.records[k]))
            os.replace(self.part(k), final)
            shards.append({"file": final.name, "count": len(self.records[k]),
                           "bytes": final.stat().st_size, "records": self.records[k]})
        self.writers.clear()
        return shards

    def abandon(self) -> None:
        for writer in self.writers.values():
            with contextlib.suppress(Exception):
                writer.close()
        self.writers.clear()


def _install(out: Path, tmp: Path, shards: list[dict], manifest: dict) -> None:
    """Move the new shards from ``tmp`` into ``out``, drop stale shards, then write the manifest."""
    old = [Path(p) for p in schema.shard_files(out)]
    with contextlib.suppress(FileNotFoundError):
        (out / schema.MANIFEST).unlink()  # no manifest while the shard set changes
    new_names = {s["file"] for s in shards}
    for s in shards:
        os.replace(tmp / s["file"], out / s["file"])
    for path in old:
        if path.name not in new_names:
            path.unlink()
    atomic_write_text(out / schema.MANIFEST, json.dumps(manifest, indent=1) + "\n")
    _same_mode_as_shards(out / schema.MANIFEST, out / shards[0]["file"] if shards else None)


def _same_mode_as_shards(path: Path, shard: Path | None) -> None:
    """Give ``path`` (written 0600 by mkstemp) the umask-based mode the shards were written with."""
    if shard is not None and shard.exists():
        os.chmod(path, stat.S_IMODE(shard.stat().st_mode))


def write_tfrecords(cfg: DataConfig, output_dir: str | Path | None = None, overwrite: bool = False, *,
                    entries: Sequence | None = None, progress: bool = True) -> dict:
    """Write the data set of ``cfg`` as ``<dir>/<prefix>-<shard:03d>-<count>.tfrec`` + ``manifest.json``.

    Args:
        cfg: data section: source and its keys, ``shards``, ``workers``, ``image_format``,
            ``jpeg_quality``, ``channels``, ``classes``, ``tfrecord_dir``.
        output_dir: shard folder (local); default ``cfg.tfrecord_dir``. The prefix is its base name.
        overwrite: replace the shards already in the folder (otherwise a DataError).
        entries: what to write instead of ``sources.list_entries(cfg)``: source entries or
            :class:`Sample` objects (each its own entry), in order.
        progress: show a tqdm bar over entries (on stderr).

    Returns:
        ``{"dir", "prefix", "shards", "records", "bytes", "seconds", "files"}``.

    Raises:
        DataError: one line, from the source or naming the bad sample; nothing new is left behind.
    """
    start = time.perf_counter()
    target = str(output_dir if output_dir is not None else cfg.tfrecord_dir)
    if "://" in target:
        raise DataError(f"{target}: shards are written to a local folder. Expected a local path; copy the "
                        "folder to the bucket afterwards (gsutil -m cp -r), training reads gs:// paths.")
    out = Path(target)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder. Expected a folder for the TFRecord shards.")
    existing = schema.shard_files(out) if out.is_dir() else []
    if existing and not overwrite:
        raise DataError(f"{out}: already holds {plural(len(existing), 'shard')}. Expected an empty folder; "
                        "pass --overwrite to replace them.")
    if entries is None:
        from tfseg.data import sources

        entries = sources.list_entries(cfg)
    entries = list(entries)
    if not entries:
        raise DataError(f"{out}: nothing to write (no entries). Expected at least one image.")
    prefix = schema.shard_prefix(out)
    n_shards = min(cfg.shards, len(entries))
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)  # the temporary folder of a run that was killed (SIGKILL) before it could clean up
    tmp = make_temp(out, "tfrecords", directory=True)
    shard_set = _ShardSet(tmp, prefix, n_shards)
    try:
        with tqdm(total=len(entries), unit="entry", desc=f"tfrecords {prefix}", disable=not progress,
                  file=sys.stderr) as bar:
            try:
                workers = min(cfg.workers, len(entries))
                with contextlib.closing(_encoded_entries(cfg, entries, workers)) as stream:
                    for i, encoded in enumerate(stream):
                        shard_set.add(i, encoded)
                        bar.update(1)
            except BaseException:
                bar.leave = False  # erase the bar: the error is the one line left on the terminal
                raise
        shards = shard_set.close()
        records = [{"shard": s["file"], **rec} for s in shards for rec in s["records"]]
        if not records:
            raise DataError(f"{out}: the {plural(len(entries), 'entry', 'entries')} gave no sample "
                            f"(data.source={cfg.source!r}). Expected at least one image.")
        _check_unique_ids(records, out)
        manifest = {"format": "tfseg.tfrecord", "version": schema.SCHEMA_VERSION, "prefix": prefix,
                    "source": cfg.source, "image_format": cfg.image_format,
                    "jpeg_quality": cfg.jpeg_quality if cfg.image_format == "jpeg" else None,
                    "channels": cfg.channels, "classes": cfg.classes,
                    "shards": [{k: s[k] for k in ("file", "count", "bytes")} for s in shards],
                    "records": records}
        _install(out, tmp, shards, manifest)
    except BaseException:
        shard_set.abandon()
        shutil.rmtree(tmp, ignore_errors=True)
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()  # only when empty
        raise
    shutil.rmtree(tmp, ignore_errors=True)
    return {"dir": str(out), "prefix": prefix, "shards": len(shards), "records": len(records),
            "bytes": sum(s["bytes"] for s in shards), "seconds": round(time.perf_counter() - start, 3),
            "files": [str(out / s["file"]) for s in shards]}


def _check_unique_ids(records: list[dict], out: Path) -> None:
    seen: dict[str, str] = {}
    for rec in records:
        if rec["id"] in seen:
            raise DataError(f"{out}: id {rec['id']!r} appears twice (shards {seen[rec['id']]} and "
                            f"{rec['shard']}). Expected unique ids.")
        seen[rec["id"]] = rec["shard"]


def cli_write(cfg, args) -> int:
    """``tfseg tfrecords`` once its config is loaded: write, dump the config beside the shards, print."""
    from tfseg.config import dump_config

    out = Path(args.output or cfg.data.tfrecord_dir)
    summary = write_tfrecords(cfg.data, out, overwrite=args.overwrite)
    dump_config(cfg, out / "config.yaml")
    _same_mode_as_shards(out / "config.yaml", Path(summary["files"][0]) if summary["files"] else None)
    print(f"wrote {plural(summary['records'], 'record')} in {plural(summary['shards'], 'shard')} "
          f"({summary['bytes'] / 2**20:.1f} MiB) to {out} in {summary['seconds']:.1f} s")
    return 0
