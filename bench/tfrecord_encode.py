"""Encoders for TFRecord images: tf.io.encode_png/encode_jpeg against PIL, on real images.

For each data set in ../shared/data, encode the images (PNG and JPEG q95) and the masks (PNG)
with both libraries, and decode them back with tf.io.decode_image (what the pipeline does).
Prints the command, the machine, and per variant the median time per image over several
rounds, the encoded size, and the TF/PIL time ratio.

    python3 bench/tfrecord_encode.py [--rounds 5] [--images 6]
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import time
from pathlib import Path

from benchlib import machine

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from PIL import Image  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SETS = {  # name -> (image folder, mask folder, channels)
    "isbi2012 512x512 gray": ("isbi2012_em_membrane/images", "isbi2012_em_membrane/masks", 1),
    "carvana 720x480 RGB": ("carvana_sample/images", "carvana_sample/masks", 3),
    "camvid 960x720 RGB": ("camvid_sample/train/images", "camvid_sample/train/masks", 3),
}


def tf_png(a: np.ndarray) -> bytes:
    return tf.io.encode_png(a if a.ndim == 3 else a[..., None]).numpy()


def tf_jpeg(a: np.ndarray) -> bytes:
    return tf.io.encode_jpeg(a if a.ndim == 3 else a[..., None], quality=95).numpy()


def pil_png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a.squeeze()).save(buf, format="PNG")
    return buf.getvalue()


def pil_jpeg(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a.squeeze()).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def timed(fn, arrays, rounds):
    """Median seconds per array over rounds, and the mean encoded size in KiB."""
    times, out = [], []
    fn(arrays[0])  # warm-up
    for _ in range(rounds):
        t = time.perf_counter()
        out = [fn(a) for a in arrays]
        times.append((time.perf_counter() - t) / len(arrays))
    return statistics.median(times), float(np.mean([len(b) for b in out])) / 1024, out


def decode_time(blobs, channels, rounds):
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        for b in blobs:
            tf.io.decode_image(b, channels=channels, expand_animations=False)
        times.append((time.perf_counter() - t) / len(blobs))
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--images", type=int, default=6)
    args = ap.parse_args()
    print("command:", "python3 " + " ".join(sys.argv))
    print(f"machine: {machine()}; tensorflow {tf.__version__}, "
          f"pillow {Image.__version__}")
    print(f"rounds {args.rounds}, median ms per image; decode = tf.io.decode_image\n")
    print("| data | what | TF ms | PIL ms | TF/PIL | TF KiB | PIL KiB | decode ms (TF bytes) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (img_dir, mask_dir, channels) in SETS.items():
        files = sorted((DATA / img_dir).glob("*.png"))[: args.images]
        if not files:
            print(f"| {name} | missing at {DATA / img_dir} | | | | | | |")
            continue
        images = [np.asarray(Image.open(f).convert("L" if channels == 1 else "RGB")) for f in files]
        masks = [np.asarray(Image.open(p).convert("L")) for p in sorted((DATA / mask_dir).glob("*.png"))
                 [: args.images]]
        for what, arrays, tf_fn, pil_fn, ch in [("image PNG", images, tf_png, pil_png, channels),
                                                ("image JPEG q95", images, tf_jpeg, pil_jpeg, channels),
                                                ("mask PNG", masks, tf_png, pil_png, 1)]:
            t_tf, kib_tf, blobs = timed(tf_fn, arrays, args.rounds)
            t_pil, kib_pil, _ = timed(pil_fn, arrays, args.rounds)
            dec = decode_time(blobs, ch, args.rounds)
            print(f"| {name} | {what} | {t_tf * 1e3:.2f} | {t_pil * 1e3:.2f} | {t_tf / t_pil:.2f} | "
                  f"{kib_tf:.0f} | {kib_pil:.0f} | {dec * 1e3:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
