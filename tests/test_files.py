"""Atomic writes (tfseg/files.py): what a killed writer leaves is removed by the next write, and only that."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT
from tfseg.files import atomic_path, atomic_write_text, make_temp, remove_stale_temps

# A writer that gets as far as the middle of an atomic write, says where, and waits (to be killed).
WRITER = """
import sys, time
from tfseg.files import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    tmp.write_text("half a submission")
    print(tmp, flush=True)
    time.sleep(600)
"""


def start_writer(target: Path) -> tuple[subprocess.Popen, Path]:
    """Start an atomic write of ``target`` in another process; return it, mid-write, and its temporary file."""
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    tmp = Path(proc.stdout.readline().strip())
    assert tmp.is_file() and tmp.read_text() == "half a submission"
    return proc, tmp


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdout.close()


def killed_writer(target: Path) -> Path:
    """The temporary file of an atomic write of ``target`` whose process was SIGKILLed mid-write."""
    proc, tmp = start_writer(target)
    kill(proc)
    return tmp


def test_the_next_write_removes_what_a_killed_writer_left(tmp_path):
    target = tmp_path / "out" / "sub.csv"
    stale = killed_writer(target)
    assert stale.name.startswith(".sub.csv.tfseg-") and stale.name.endswith(".tmp.csv")
    assert not target.exists()
    atomic_write_text(target, "id,rle\n")
    assert target.read_text() == "id,rle\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["sub.csv"]


def test_the_temporary_files_of_live_writers_and_other_hosts_stay(tmp_path):
    target = tmp_path / "sub.csv"
    dead = killed_writer(target)
    dead_pid = re.search(r"tfseg-(\d+)@", dead.name)[1]
    mine = make_temp(tmp_path, "sub.csv", ".csv")  # this process: alive
    proc, live = start_writer(target)  # a concurrent run, mid-write
    try:
        other_host = tmp_path / f".sub.csv.tfseg-{dead_pid}@another-host.abcd1234.tmp.csv"
        other_host.write_text("written on another machine sharing the folder")
        unrelated = [tmp_path / ".sub.csv.abcd1234.tmp.csv",  # an older tfseg's name: its writer is unknown
                     tmp_path / ".notes.tmp", tmp_path / f"sub.csv.tfseg-{dead_pid}@x.abcd1234.tmp"]
        for path in unrelated:
            path.write_text("not ours to remove")
        with atomic_path(target) as tmp:
            tmp.write_text("done")
        assert not dead.exists()
        assert target.read_text() == "done"
        for path in [mine, live, other_host, *unrelated]:
            assert path.exists(), path.name
        assert remove_stale_temps(tmp_path) == []
    finally:
        kill(proc)
    assert remove_stale_temps(tmp_path) == [live]  # once that run is gone, its file is stale too


def test_a_stale_temporary_folder_is_removed_with_its_contents(tmp_path):
    code = ("import sys; from tfseg.files import make_temp; "
            "d = make_temp(sys.argv[1], 'tfrecords', directory=True); (d / '.x-000.part').write_bytes(b'1'); print(d)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, check=True).stdout.strip()
    stale = Path(out)
    assert stale.is_dir() and stale.parent == tmp_path and stale.name.startswith(".tfrecords.tfseg-")
    assert remove_stale_temps(tmp_path) == [stale] and not stale.exists()
    assert remove_stale_temps(tmp_path / "missing") == []


def test_temporary_names_keep_the_targets_extension(tmp_path):
    tmp = make_temp(tmp_path, "model.keras", ".keras")
    assert tmp.suffix == ".keras" and tmp.name.startswith(f".model.keras.tfseg-{os.getpid()}@")
    assert oct(tmp.stat().st_mode & 0o777) == oct(0o600)
