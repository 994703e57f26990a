"""TFRecord schema, sharded writer and verify on small samples made here (real data: integration tests)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from tests.conftest import ROOT
from tfseg import cli
from tfseg.config import DataConfig
from tfseg.data import tfrecord as T
from tfseg.data.sample import Sample
from tfseg.data.tfrecord_writer import _ShardSet
from tfseg.errors import DataError


def make_samples(n: int, channels: int = 3, classes: int = 1, size=(20, 30), seed: int = 0) -> list[Sample]:
    """n samples with smooth images (so JPEG is close), masks in [0, max(classes, 2)), 2 per group."""
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    out = []
    for i in range(n):
        base = (yy * 4 + xx * 3 + 17 * i) % 256
        image = np.stack([(base + 40 * c) % 256 for c in range(channels)], -1).astype(np.uint8)
        mask = rng.integers(0, max(classes, 2), (h, w)).astype(np.uint8)
        out.append(Sample(f"s{i:02d}", f"g{i // 2}", image, mask, label=i % 2))
    return out


def data_cfg(**kw) -> DataConfig:
    base = dict(source="folder", classes=1, channels=3, shards=3, workers=1, image_format="png")
    return DataConfig(**{**base, **kw})


def write(out: Path, samples, **kw) -> dict:
    return T.write_tfrecords(data_cfg(**kw), out, entries=samples, progress=False)


def shards_of(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.tfrec"))


# ---------------------------------------------------------------------------------------------
# Schema
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt, channels", [("png", 1), ("png", 3), ("jpeg", 3), ("jpeg", 1)])
def test_encode_decode_round_trip_eager_and_in_dataset_map(fmt, channels):
    sample = make_samples(1, channels=channels, classes=4)[0]
    blob = T.encode_example(sample, image_format=fmt, jpeg_quality=95)
    eager = T.decode_example(tf.constant(blob), channels=channels)
    mapped = next(iter(tf.data.Dataset.from_tensors(blob).map(lambda s: T.decode_example(s, channels))))
    for ex in (eager, mapped):
        assert ex["image"].dtype == tf.uint8 and ex["image"].shape == (20, 30, channels)
        assert ex["mask"].dtype == tf.uint8 and ex["mask"].shape == (20, 30, 1)
        np.testing.assert_array_equal(ex["mask"].numpy()[..., 0], sample.mask)
        err = np.abs(ex["image"].numpy().astype(int) - sample.image.astype(int))
        if fmt == "png":
            assert err.max() == 0
        else:
            assert err.mean() < 4.0
        assert ex["id"].numpy() == b"s00" and ex["group"].numpy() == b"g0"
        assert int(ex["label"]) == 0 and (int(ex["height"]), int(ex["width"])) == (20, 30)
        assert int(ex["channels"]) == channels
    # the graph-mode version keeps the static rank and channels
    assert mapped["image"].shape.rank == 3


def test_decode_converts_channels_and_defaults_label():
    sample = Sample("only", "grp", make_samples(1, channels=1)[0].image, np.zeros((20, 30), np.uint8))
    ex = T.decode_example(tf.constant(T.encode_example(sample, "png")), channels=3)
    assert ex["image"].shape == (20, 30, 3)
    assert int(ex["label"]) == -1


def test_encode_is_deterministic_and_parse_index_skips_images():
    sample = make_samples(1)[0]
    for fmt in ("png", "jpeg"):
        assert T.encode_example(sample, fmt) == T.encode_example(sample, fmt)
    index = T.parse_index(tf.constant(T.encode_example(sample, "jpeg")))
    assert set(index) == {"id", "group", "label"} and index["group"].numpy() == b"g0"


@pytest.mark.parametrize("change, message", [
    (dict(mask=np.zeros((20, 31), np.uint8)), r"s00: mask is uint8 \[20, 31\]\. Expected uint8 \[20, 30\]"),
    (dict(image=np.zeros((20, 30, 3), np.float32)), r"s00: image is float32"),
    (dict(image=np.zeros((20, 30), np.uint8)), r"s00: image is uint8 \[20, 30\]"),
    (dict(id=""), r"empty id"),
])
def test_encode_rejects_a_sample_breaking_the_contract(change, message):
    s = make_samples(1)[0]
    bad = Sample(**{**dict(id=s.id, group=s.group, image=s.image, mask=s.mask, label=s.label), **change})
    with pytest.raises(DataError, match=message) as err:
        T.encode_example(bad, "png")
    assert "\n" not in str(err.value)


def test_shard_names_prefix_and_counts(tmp_path):
    assert T.shard_name("isbi", 3, 12) == "isbi-003-12.tfrec"
    assert T.shard_prefix("tfrecords/isbi2012/") == "isbi2012"
    assert T.shard_prefix("data/my set-v2") == "my_set_v2"
    assert T.count_records(["a/x-000-5.tfrec", "a/x-001-7.tfrec", "my-set-002-1.tfrec"]) == 13
    with pytest.raises(DataError, match=r"b/x\.tfrec: shard name has no record count"):
        T.count_records(["b/x.tfrec"])
    with pytest.raises(DataError, match="TFRecord folder not found"):
        T.shard_files(tmp_path / "absent")
    with pytest.raises(DataError, match=r"gs://b/set: shards are written to a local folder"):
        T.write_tfrecords(data_cfg(), "gs://b/set", entries=make_samples(1), progress=False)


# ---------------------------------------------------------------------------------------------
# Writer
# ---------------------------------------------------------------------------------------------


def test_write_names_shards_by_count_and_lists_every_record(tmp_path):
    samples = make_samples(7)
    out = tmp_path / "toy"
    summary = write(out, samples, shards=3)
    assert shards_of(out) == ["toy-000-3.tfrec", "toy-001-2.tfrec", "toy-002-2.tfrec"]
    assert summary["records"] == 7 and summary["shards"] == 3
    assert summary["bytes"] == sum((out / n).stat().st_size for n in shards_of(out))
    assert T.count_records(T.shard_files(out)) == 7
    manifest = json.loads((out / "manifest.json").read_text())
    # shard k holds entries[k::3], in order
    assert [(r["shard"], r["id"]) for r in manifest["records"][:3]] == [
        ("toy-000-3.tfrec", "s00"), ("toy-000-3.tfrec", "s03"), ("toy-000-3.tfrec", "s06")]
    assert {r["id"]: (r["group"], r["label"]) for r in manifest["records"]}["s05"] == ("g2", 1)
    assert manifest["channels"] == 3 and manifest["classes"] == 1 and manifest["image_format"] == "png"
    # what the shards hold equals the samples, bit for bit (PNG)
    got = {}
    for ex in tf.data.TFRecordDataset(T.shard_files(out)).map(lambda s: T.decode_example(s, 3)):
        got[ex["id"].numpy().decode()] = (ex["image"].numpy(), ex["mask"].numpy()[..., 0])
    for s in samples:
        np.testing.assert_array_equal(got[s.id][0], s.image)
        np.testing.assert_array_equal(got[s.id][1], s.mask)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary left


def test_more_shards_than_samples_and_empty_shards_make_no_file(tmp_path):
    write(tmp_path / "few", make_samples(2), shards=5)
    assert shards_of(tmp_path / "few") == ["few-000-1.tfrec", "few-001-1.tfrec"]
    shard_set = _ShardSet(tmp_path / "few", "few", 3)  # an entry that yields no sample (hubmap)
    shard_set.add(1, [])
    assert shard_set.close() == [] and not list((tmp_path / "few").glob(".*"))


def test_same_input_gives_byte_identical_shards(tmp_path):
    samples = make_samples(6)
    write(tmp_path / "a" / "set", samples, shards=2, image_format="jpeg")
    write(tmp_path / "b" / "set", samples, shards=2, image_format="jpeg")
    names = shards_of(tmp_path / "a" / "set")
    assert names == shards_of(tmp_path / "b" / "set") and len(names) == 2
    for name in [*names, "manifest.json"]:
        assert (tmp_path / "a" / "set" / name).read_bytes() == (tmp_path / "b" / "set" / name).read_bytes()


def test_refuses_a_folder_with_shards_unless_overwrite(tmp_path):
    out = tmp_path / "set"
    write(out, make_samples(7), shards=3)
    with pytest.raises(DataError, match=r"set: already holds 3 shards.*--overwrite"):
        write(out, make_samples(4), shards=2)
    assert len(shards_of(out)) == 3
    T.write_tfrecords(data_cfg(shards=2), out, overwrite=True, entries=make_samples(4), progress=False)
    assert shards_of(out) == ["set-000-2.tfrec", "set-001-2.tfrec"]  # stale shards removed
    assert T.verify_dir(out)["records"] == 4


@pytest.mark.parametrize("bad, message", [
    (Sample("s04", "g", np.zeros((20, 30, 3), np.uint8), np.full((20, 30), 3, np.uint8)),
     r"s04: mask value 3 is outside data.classes=1"),
    (Sample("s04", "g", np.zeros((20, 30, 1), np.uint8), np.zeros((20, 30), np.uint8)),
     r"s04: image has 1 channels. Expected data.channels=3"),
    (Sample("s01", "g", np.zeros((20, 30, 3), np.uint8), np.zeros((20, 30), np.uint8)),
     r"id 's01' appears twice"),
])
def test_a_bad_sample_aborts_and_leaves_nothing_behind(tmp_path, bad, message):
    samples = make_samples(6)
    samples.insert(4, bad)
    with pytest.raises(DataError, match=message) as err:
        write(tmp_path / "new", samples, shards=3)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "new").exists()
    # an existing folder keeps its old shards, untouched, even with overwrite
    old = tmp_path / "old"
    write(old, make_samples(3), shards=3)
    before = {n: (old / n).read_bytes() for n in shards_of(old)}
    with pytest.raises(DataError):
        T.write_tfrecords(data_cfg(), old, overwrite=True, entries=samples, progress=False)
    assert {n: (old / n).read_bytes() for n in shards_of(old)} == before
    assert sorted(p.name for p in old.iterdir()) == sorted([*before, "manifest.json"])


def test_workers_never_import_tensorflow():
    """Spawned writer workers run tfrecord_encode and the sources only: they start fast."""
    code = ("import sys; import tfseg.data.tfrecord_encode, tfseg.data.sources; "
            "sys.exit('tensorflow' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=120).returncode == 0


def test_parallel_workers_write_the_same_bytes_and_fail_cleanly(tmp_path):
    samples = make_samples(9)
    write(tmp_path / "serial" / "set", samples, shards=3, workers=1)
    write(tmp_path / "parallel" / "set", samples, shards=3, workers=2)
    for name in [*shards_of(tmp_path / "serial" / "set"), "manifest.json"]:
        assert (tmp_path / "serial" / "set" / name).read_bytes() == \
            (tmp_path / "parallel" / "set" / name).read_bytes()
    samples[5] = Sample("s05", "g", samples[0].image, np.full((20, 30), 9, np.uint8))
    with pytest.raises(DataError, match="s05: mask value 9"):
        write(tmp_path / "bad", samples, shards=3, workers=2)
    assert not (tmp_path / "bad").exists()


# A parent that starts the writer's worker pool, prints the pids of its workers and of
# multiprocessing's resource tracker, and waits to be killed.
POOL_PARENT = """
import json, os, time
from multiprocessing import resource_tracker
from tfseg.data.tfrecord_encode import worker_pool
pool = worker_pool(2)
for f in [pool.submit(os.getpid) for _ in range(4)]:
    f.result()
print(json.dumps([*pool._processes, resource_tracker._resource_tracker._pid]), flush=True)
time.sleep(600)
"""


def _running(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie (an exited child its new parent has not reaped yet)."""
    try:
        return " Z " not in Path(f"/proc/{pid}/stat").read_text().split(")", 1)[1][:4]
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_end_when_the_writer_is_killed():
    """SIGKILL of `tfseg tfrecords` used to leave its spawn workers and the resource tracker running for ever."""
    parent = subprocess.Popen([sys.executable, "-c", POOL_PARENT], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        pids = json.loads(parent.stdout.readline())
        assert len(pids) == 3 and all(_running(p) for p in pids)
    finally:
        parent.kill()
        parent.wait(timeout=30)
        parent.stdout.close()
    deadline = time.monotonic() + 20
    while any(_running(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [p for p in pids if _running(p)]
    for pid in left:  # do not leak them into the rest of the test run
        os.kill(pid, signal.SIGKILL)
    assert not left, "workers or resource tracker still running after their parent was killed"


def test_the_next_run_removes_a_killed_runs_temporary_folder_not_a_live_ones(tmp_path):
    """A SIGKILLed run leaves `.tfrecords.tfseg-<pid>@<host>.*.tmp/`; the next run into the folder removes it,
    but not the folder of a run still writing there."""
    out = tmp_path / "set"
    make = ("import sys, time; from tfseg.files import make_temp; "
            "d = make_temp(sys.argv[1], 'tfrecords', directory=True); (d / '.set-000.part').write_bytes(b'x' * 100); "
            "print(d, flush=True); time.sleep(float(sys.argv[2]))")
    dead = Path(subprocess.run([sys.executable, "-c", make, str(out), "0"], cwd=ROOT, capture_output=True, text=True,
                               timeout=60, check=True).stdout.strip())
    live_run = subprocess.Popen([sys.executable, "-c", make, str(out), "600"], cwd=ROOT, stdout=subprocess.PIPE,
                                text=True)
    try:
        live = Path(live_run.stdout.readline().strip())
        assert dead.is_dir() and live.is_dir() and dead.parent == live.parent == out
        write(out, make_samples(4), shards=2)
        assert not dead.exists() and (live / ".set-000.part").exists()
        assert sorted(p.name for p in out.iterdir()) == sorted([live.name, "manifest.json", *shards_of(out)])
    finally:
        live_run.kill()
        live_run.wait(timeout=30)
        live_run.stdout.close()


# ---------------------------------------------------------------------------------------------
# Verify
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def shard_dir(tmp_path) -> Path:
    out = tmp_path / "set"
    write(out, make_samples(7, classes=3), shards=3, classes=3)
    return out


def test_verify_reports_a_good_folder(shard_dir):
    s = T.verify_dir(shard_dir)
    assert (s["shards"], s["records"], s["manifest"], s["channels"]) == (3, 7, True, [3])
    assert s["mask_values"] == [0, 1, 2] and s["min_size"] == s["max_size"] == [20, 30]
    (shard_dir / "manifest.json").unlink()
    assert T.verify_dir(shard_dir)["manifest"] is False
    assert [r["id"] for r in T.record_index(shard_dir)] == ["s00", "s03", "s06", "s01", "s04", "s02", "s05"]


def _chop(path: Path, n: int) -> None:
    path.write_bytes(path.read_bytes()[:-n])


def _flip_middle_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, message", [
    (lambda d: _chop(d / "set-001-2.tfrec", 50), r"set-001-2\.tfrec: unreadable after 1 good record \("),
    (lambda d: _flip_middle_byte(d / "set-001-2.tfrec"), r"set-001-2\.tfrec: unreadable after"),
    (lambda d: (d / "set-002-2.tfrec").rename(d / "set-002-3.tfrec"),
     r"set-002-2\.tfrec: listed in .*but missing"),
    (lambda d: ((d / "manifest.json").unlink(), (d / "set-002-2.tfrec").rename(d / "set-002-3.tfrec")),
     r"set-002-3\.tfrec: holds 2 records, its name says 3"),
    (lambda d: (d / "set-000-3.tfrec").unlink(), r"set-000-3\.tfrec: listed in .*manifest.json but missing"),
    (lambda d: [p.unlink() for p in d.iterdir()], r"set: no \.tfrec shards"),
])
def test_verify_names_the_first_bad_shard(shard_dir, damage, message):
    damage(shard_dir)
    with pytest.raises(DataError, match=message) as err:
        T.verify_dir(shard_dir)
    assert "\n" not in str(err.value)


def test_verify_checks_manifest_ids_and_classes(shard_dir):
    manifest = json.loads((shard_dir / "manifest.json").read_text())
    manifest["records"][0]["id"] = "other"
    (shard_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"set-000-3\.tfrec: its ids differ"):
        T.verify_dir(shard_dir)
    manifest["records"][0]["id"] = "s00"
    manifest["classes"] = 2
    (shard_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"mask value 2 outside classes=2"):
        T.verify_dir(shard_dir)
    (shard_dir / "manifest.json").write_text('{"shards": [')
    with pytest.raises(DataError, match=r"manifest.json: unreadable manifest \(JSONDecodeError\)"):
        T.verify_dir(shard_dir)
    (shard_dir / "manifest.json").write_text('{"records": []}')
    with pytest.raises(DataError, match=r"manifest lacks 'shards' or 'records'"):
        T.record_index(shard_dir)


def test_cli_verify_exit_codes(shard_dir, capsys):
    assert cli.main(["verify", str(shard_dir)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"set: OK, 7 records in 3 shards .*sizes 20x30, mask values \[0, 1, 2\]", out)
    _chop(shard_dir / "set-000-3.tfrec", 10)
    assert cli.main(["verify", str(shard_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tfseg verify: error: ") and "set-000-3.tfrec" in err and "\n" not in err


def test_counts_of_one_are_singular(tmp_path, capsys):
    """`1 records in 1 shards`, `already holds 1 shards`: the counts of a one-image data set (DSB2018's)."""
    out = tmp_path / "one"
    write(out, make_samples(1), shards=3)
    assert cli.main(["verify", str(out)]) == 0
    assert re.search(r"one: OK, 1 record in 1 shard \(", capsys.readouterr().out)
    with pytest.raises(DataError, match=r"one: already holds 1 shard\. Expected an empty folder"):
        write(out, make_samples(1))
    T.write_tfrecords(data_cfg(), out, overwrite=True, entries=make_samples(2), progress=False)
    assert cli.main(["verify", str(out)]) == 0
    assert re.search(r"one: OK, 2 records in 2 shards \(", capsys.readouterr().out)
