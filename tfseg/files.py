"""Small file helpers: atomic writes so that nothing half-written is ever left behind.

A write goes to a temporary name beside its target and is renamed onto it only when complete.
An error or Ctrl-C removes the temporary file; a process killed outright (SIGKILL, a crash, the
machine out of memory) cannot, so every temporary name carries its writer:
``.<target>.tfseg-<pid>@<host>.<random>.tmp<suffix>``. The next write into the same folder, by any
tfseg process, removes the temporary files and folders whose writer ran on this host and has died
(:func:`remove_stale_temps`). One whose writer still runs, or ran on another host sharing the
folder, is never touched.
"""

from __future__ import annotations

import contextlib
import csv
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

TAG = "tfseg"
# .<name>.tfseg-<pid>@<host>.<random>.tmp<suffix>; mkstemp's random part is [a-z0-9_].
_TEMP_RE = re.compile(rf"^\..+\.{TAG}-(?P<pid>\d+)@(?P<host>[A-Za-z0-9-]+)\.[A-Za-z0-9_]+\.tmp(\..*)?$")
_CLEANED: set[str] = set()  # folders whose stale temporaries this process has removed already


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:32] or "localhost"


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (a process of another user counts)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, ValueError):  # not a pid this system can have
        return False
    return True


def make_temp(folder: str | os.PathLike, name: str, suffix: str = "", directory: bool = False) -> Path:
    """Create an empty temporary file (or folder) named after its owner in ``folder``.

    Args:
        folder: where (created if missing); the final target's folder, so that a rename is atomic.
        name: what it becomes (the target's file name, or a word such as ``tfrecords``).
        suffix: the end of its name after ``.tmp`` (a writer that picks its format by the
            extension sees the target's).
        directory: make a folder (``mkdtemp``, mode 0700) instead of a file (mode 0600).

    Returns:
        ``<folder>/.<name>.tfseg-<pid>@<host>.<random>.tmp<suffix>``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    prefix, end = f".{name}.{TAG}-{os.getpid()}@{_host()}.", f".tmp{suffix}"
    if directory:
        return Path(tempfile.mkdtemp(prefix=prefix, suffix=end, dir=folder))
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=end, dir=folder)
    os.close(fd)
    return Path(tmp)


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files and folders of :func:`make_temp` in ``folder`` whose writer has died.

    Only names of that form are considered, and only those written on this host by a process that
    no longer exists; the temporaries of a live process (this one included) and of other hosts
    stay. What cannot be removed (another user's file) is left without a word: cleaning up never
    fails a write. Returns what was removed (nothing when the folder does not exist).
    """
    removed = []
    host = _host()
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        m = _TEMP_RE.match(entry.name)
        if not m or m["host"] != host or _alive(int(m["pid"])):
            continue
        path = Path(entry.path)
        with contextlib.suppress(OSError):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
    return removed


def _remove_stale_once(folder: Path) -> None:
    """:func:`remove_stale_temps` the first time this process writes into ``folder``: a folder of
    many outputs (one mask per image) is listed once, not once per file."""
    key = os.path.abspath(folder)
    if key not in _CLEANED:
        remove_stale_temps(folder)
        _CLEANED.add(key)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success.

    The temporary file lives in the same folder (so the rename is atomic on POSIX) and is
    removed if the body raises; its name carries this process's id, so that if the process is
    killed, a later write into the folder removes it (:func:`remove_stale_temps`). Use it for
    any writer that takes a file name (TFRecord writers, ``model.save``, image encoders).

    Example:
        >>> with atomic_path("out/summary.json") as tmp:  # doctest: +SKIP
        ...     tmp.write_text("{}")
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_once(path.parent)
    tmp_path = make_temp(path.parent, path.name, path.suffix)
    try:
        # mkstemp makes the file private (0600); give it the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (temporary name, then rename). Returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temporary name, then rename). Returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def read_csv_rows(path: str | os.PathLike) -> list[dict]:
    """The rows of a CSV file with a header (a fold's ``history.csv``), as dicts of strings; ``[]`` when
    the file does not exist. An unreadable or undecodable file raises (OSError, csv.Error,
    UnicodeDecodeError): a caller that only asks whether there is history catches them."""
    path = Path(path)
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))
