"""The sharded TFRecord writer: parallel, deterministic, all-or-nothing.

Shard ``k`` holds the samples of ``entries[k::shards]`` (entries sorted by id by the source), so
the same input gives byte-identical shards whatever the number of workers. Each shard is
written under a temporary folder inside the output folder and renamed to
``<prefix>-<k:03d>-<count>.tfrec`` once complete; the shards move into the output folder only
when every worker succeeded, then ``manifest.json`` is written, atomically, last. A failure
(a :class:`DataError` in any worker) removes the temporary folder and re-raises the one-line
error: no new shard is left behind. Empty shards produce no file.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import shutil
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

import tensorflow as tf
from tqdm import tqdm

from tfseg.config import DataConfig
from tfseg.data import tfrecord as schema
from tfseg.data.sample import Sample
from tfseg.errors import DataError
from tfseg.files import atomic_write_text

_WORKER: dict = {}  # per worker process: the progress queue and the abort event


class _Aborted(Exception):
    """Raised in a worker when another worker failed: stop early, the run is discarded."""


def _read(cfg: DataConfig, entry) -> Sample:
    """Samples of one entry: the entry itself when it is a Sample, else ``sources.read_entry``."""
    if isinstance(entry, Sample):
        yield entry
        return
    from tfseg.data import sources

    yield from sources.read_entry(cfg, entry)


def write_shard(cfg: DataConfig, entries: Sequence, shard: int, folder: str | Path, prefix: str,
                on_entry: Callable[[], None] | None = None) -> dict | None:
    """Write the samples of ``entries`` as shard number ``shard`` in ``folder``.

    Args:
        cfg: data section (channels, classes, image_format, jpeg_quality, and the source to read).
        entries: source entries (or :class:`Sample` objects), in the order they are written.
        shard: shard number, in the file name.
        folder: where the shard goes; written as ``.<name>.part`` first, renamed when complete.
        prefix: shard name prefix.
        on_entry: called after each entry (progress).

    Returns:
        ``{"file", "count", "bytes", "records": [{"id", "group", "label"}]}``, or None (and no file)
        when the entries yield no sample.

    Raises:
        DataError: from the source, or a sample breaking the record contract (names its id).
    """
    folder = Path(folder)
    part = folder / f".{prefix}-{shard:03d}.part"
    records = []
    try:
        with tf.io.TFRecordWriter(str(part)) as writer:
            for entry in entries:
                if _WORKER.get("abort") is not None and _WORKER["abort"].is_set():
                    raise _Aborted()
                for sample in _read(cfg, entry):
                    schema.check_sample(sample, cfg.channels, cfg.classes)
                    writer.write(schema.encode_example(sample, cfg.image_format, cfg.jpeg_quality))
                    records.append({"id": sample.id, "group": str(sample.group), "label": int(sample.label)})
                if on_entry is not None:
                    on_entry()
        if not records:
            part.unlink()
            return None
        final = folder / schema.shard_name(prefix, shard, len(records))
        os.replace(part, final)
        return {"file": final.name, "count": len(records), "bytes": final.stat().st_size, "records": records}
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            part.unlink()
        raise


def _init_worker(queue, abort) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    _WORKER["queue"], _WORKER["abort"] = queue, abort


def _worker_task(cfg: DataConfig, entries: list, shard: int, folder: str, prefix: str) -> dict | None:
    queue = _WORKER["queue"]
    return write_shard(cfg, entries, shard, folder, prefix, on_entry=lambda: queue.put(1))


def _run_serial(cfg, tasks, folder, prefix, bar) -> list[dict | None]:
    return [write_shard(cfg, entries, k, folder, prefix, on_entry=lambda: bar.update(1))
            for k, entries in tasks]


def _run_parallel(cfg, tasks, folder, prefix, bar, workers: int) -> list[dict | None]:
    """Each task in a "spawn" process (TF is not fork-safe); the first failure aborts them all."""
    ctx = mp.get_context("spawn")
    queue, abort = ctx.Queue(), ctx.Event()
    results: dict[int, dict | None] = {}
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                             initargs=(queue, abort)) as pool:
        futures = {pool.submit(_worker_task, cfg, entries, k, str(folder), prefix): k for k, entries in tasks}
        pending = set(futures)
        try:
            while pending:
                done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                _drain(queue, bar)
                for fut in done:
                    results[futures[fut]] = fut.result()  # re-raises the worker's error here
        except BaseException:
            abort.set()
            for fut in pending:
                fut.cancel()
            raise
        finally:
            _drain(queue, bar)
    return [results[k] for k, _ in tasks]


def _drain(queue, bar) -> None:
    with contextlib.suppress(Exception):
        while not queue.empty():
            bar.update(queue.get_nowait())


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
    out = Path(output_dir if output_dir is not None else cfg.tfrecord_dir)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder. Expected a folder for the TFRecord shards.")
    existing = schema.shard_files(out) if out.is_dir() else []
    if existing and not overwrite:
        raise DataError(f"{out}: already holds {len(existing)} shards. Expected an empty folder; "
                        "pass --overwrite to replace them.")
    if entries is None:
        from tfseg.data import sources

        entries = sources.list_entries(cfg)
    entries = list(entries)
    if not entries:
        raise DataError(f"{out}: nothing to write (no entries). Expected at least one image.")
    prefix = schema.shard_prefix(out)
    tasks = [(k, entries[k::cfg.shards]) for k in range(min(cfg.shards, len(entries)))]
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tfrecords-", suffix=".tmp", dir=out))
    try:
        with tqdm(total=len(entries), unit="entry", desc=f"tfrecords {prefix}", disable=not progress,
                  file=sys.stderr) as bar:
            workers = min(cfg.workers, len(tasks))
            try:
                if workers > 1:
                    results = _run_parallel(cfg, tasks, tmp, prefix, bar, workers)
                else:
                    results = _run_serial(cfg, tasks, tmp, prefix, bar)
            except BaseException:
                bar.leave = False  # erase the bar: the error is the one line left on the terminal
                raise
        shards = [r for r in results if r is not None]
        records = [{"shard": s["file"], **rec} for s in shards for rec in s["records"]]
        if not records:
            raise DataError(f"{out}: the {len(entries)} entries gave no sample (data.source={cfg.source!r}). "
                            "Expected at least one image.")
        _check_unique_ids(records, out)
        manifest = {"format": "tfseg.tfrecord", "version": schema.SCHEMA_VERSION, "prefix": prefix,
                    "source": cfg.source, "image_format": cfg.image_format,
                    "jpeg_quality": cfg.jpeg_quality if cfg.image_format == "jpeg" else None,
                    "channels": cfg.channels, "classes": cfg.classes,
                    "shards": [{k: s[k] for k in ("file", "count", "bytes")} for s in shards],
                    "records": records}
        _install(out, tmp, shards, manifest)
    except BaseException:
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


def cli_tfrecords(args) -> int:
    """``tfseg tfrecords``: write the shards, dump the resolved config beside them, print a summary."""
    from tfseg.config import dump_config, load_config

    cfg = load_config(args.config, args.overrides)
    out = Path(args.output or cfg.data.tfrecord_dir)
    summary = write_tfrecords(cfg.data, out, overwrite=args.overwrite)
    dump_config(cfg, out / "config.yaml")
    _same_mode_as_shards(out / "config.yaml", Path(summary["files"][0]) if summary["files"] else None)
    print(f"wrote {summary['records']} records in {summary['shards']} shards "
          f"({summary['bytes'] / 2**20:.1f} MiB) to {out} in {summary['seconds']:.1f} s")
    return 0
