"""The TFRecord writer on real data: serial against parallel workers, PNG against JPEG images.

Writes ISBI 2012 (30 gray 512x512 slices) and the first N Kvasir-SEG train images (RGB, about
622x529) with ``tfseg.data.tfrecord.write_tfrecords`` into a temporary folder, several rounds per
variant, and prints the command, the machine, the median seconds per variant, images per second,
the size of the shards and the speed-up of each variant over the first of its data set.
Parallel workers are "spawn" processes (TensorFlow-free), their start-up included.

    python3 bench/tfrecord_write.py [--rounds 3] [--kvasir 120]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchlib import machine

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Only TensorFlow-free imports at the top: "spawn" workers re-import this script.
from tfseg.config import load_config  # noqa: E402
from tfseg.data import sources  # noqa: E402


def variants(kvasir_n: int):
    isbi = load_config(ROOT / "configs" / "isbi2012.yaml").data
    kvasir = load_config(ROOT / "configs" / "kvasir.yaml").data
    return [
        ("isbi2012 30 png", isbi, {"workers": 1, "image_format": "png", "shards": 6}, None),
        ("isbi2012 30 png", isbi, {"workers": 2, "image_format": "png", "shards": 6}, None),
        ("isbi2012 30 jpeg", isbi, {"workers": 1, "image_format": "jpeg", "shards": 6}, None),
        (f"kvasir {kvasir_n} jpeg", kvasir, {"workers": 1, "image_format": "jpeg", "shards": 8}, kvasir_n),
        (f"kvasir {kvasir_n} jpeg", kvasir, {"workers": 2, "image_format": "jpeg", "shards": 8}, kvasir_n),
        (f"kvasir {kvasir_n} png", kvasir, {"workers": 1, "image_format": "png", "shards": 8}, kvasir_n),
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--kvasir", type=int, default=120, help="Kvasir-SEG train images to write")
    args = ap.parse_args()
    from tfseg.data.tfrecord import write_tfrecords

    os.chdir(ROOT)  # the recipes' data paths are relative to the project root
    print("command:", "python3 " + " ".join(sys.argv))
    print(f"machine: {machine()}")
    print(f"rounds {args.rounds}, median seconds per variant, spawn start-up included\n")
    print("| data | workers | image | seconds | images/s | MiB | speed-up |")
    print("|---|---|---|---|---|---|---|")
    first: dict[str, float] = {}
    for label, base, changes, limit in variants(args.kvasir):
        cfg = dataclasses.replace(base, **changes)
        entries = sources.list_entries(cfg)[:limit]
        times, size = [], 0
        for _ in range(args.rounds):
            with tempfile.TemporaryDirectory() as tmp:
                t = time.perf_counter()
                s = write_tfrecords(cfg, Path(tmp) / "bench", entries=None if limit is None else entries,
                                    progress=False)
                times.append(time.perf_counter() - t)
                size = s["bytes"]
        med = statistics.median(times)
        data = label.split()[0]
        first.setdefault(data, med)
        print(f"| {label} | {changes['workers']} | {changes['image_format']} | {med:.2f} | "
              f"{len(entries) / med:.1f} | {size / 2**20:.1f} | {first[data] / med:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
