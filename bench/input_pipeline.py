"""Images/s of the tf.data pipeline against a plain Python loader, on the same 512x512 JPEG files.

Writes N real Kvasir-SEG images (center-cropped/resized to 512x512, JPEG q95, masks PNG) to
TFRecord shards in a temporary folder with the real schema (tfseg.data.tfrecord.encode_example),
and the very same JPEG/PNG bytes as loose files. Then, in interleaved rounds, each variant delivers
the same number of training images as float32 batches [B, 512, 512, 3] + masks [B, 512, 512, 1]
from a fresh iterator, timed in steady state after its first 2 batches (the start-up, which
training pays once per epoch, is printed in its own column):

    plain         PIL decode + numpy random flips/rot90, one Python process (the usual notebook loader)
    tf_decode     tfseg make_dataset(training=True), no augmentation (interleave, decode, shuffle, batch)
    tf_default    the same + tfseg's default augmentations, exactly params.yaml's augment.ops
                  (the TensorFlow tutorial's random horizontal flip)
    tf_flips      the same + flips and rot90 (p 0.5 each)
    tf_augment    the same + the HuBMAP notebooks' set (flips, rot90, brightness, contrast,
                  saturation, hue; p 0.5 each)
    tf_affine     the same + shift_scale_rotate (p 0.5), for reference

Prints the command, the machine (CPU model, cores, load average), per variant the median images/s,
the median CPU time per image (all threads of this process: robust when other programs share the
cores) and every round, and the ratios the targets are about (tf_default / plain, tf_default /
tf_decode), with the same ratios for the richer HuBMAP set (tf_augment).

    python3 bench/input_pipeline.py [--images 128] [--rounds 5] [--batch 16] [--epochs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from benchlib import machine  # noqa: E402
from PIL import Image  # noqa: E402

from tfseg.config import load_config  # noqa: E402
from tfseg.data.pipeline import make_dataset  # noqa: E402
from tfseg.data.sample import Sample  # noqa: E402
from tfseg.data.tfrecord import encode_example, shard_name  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "kvasir_seg"
SIZE = 512
PARAMS_DEFAULT = [dict(op) for op in load_config(None).augment.ops]  # params.yaml's augment.ops
HUBMAP = [{"name": "flip_left_right", "p": 0.5}, {"name": "flip_up_down", "p": 0.5},
          {"name": "rot90", "p": 0.5}, {"name": "brightness", "p": 0.5, "delta": 0.2},
          {"name": "contrast", "p": 0.5, "range": [0.8, 1.2]},
          {"name": "saturation", "p": 0.5, "range": [0.7, 1.3]}, {"name": "hue", "p": 0.5, "delta": 0.05}]
FLIPS = HUBMAP[:3]
AFFINE = [*HUBMAP, {"name": "shift_scale_rotate", "p": 0.5}]


def square(image: Image.Image, resample) -> np.ndarray:
    """Center square crop resized to SIZE x SIZE."""
    w, h = image.size
    side = min(w, h)
    box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
    return np.asarray(image.crop(box).resize((SIZE, SIZE), resample))


def write_data(folder: Path, n: int, shards: int) -> tuple[list[str], list[tuple[Path, Path]]]:
    """Shards and loose files holding the same encoded bytes."""
    ids = json.loads((DATA / "split.json").read_text())["train"][:n]
    if len(ids) < n:
        sys.exit(f"only {len(ids)} Kvasir-SEG train images found in {DATA}")
    records, pairs = [], []
    for i in ids:
        image = square(Image.open(DATA / "images" / f"{i}.jpg").convert("RGB"), Image.BILINEAR)
        mask = (square(Image.open(DATA / "masks" / f"{i}.jpg").convert("L"), Image.NEAREST) > 127)
        record = encode_example(Sample(i, i, image, mask.astype(np.uint8)), "jpeg", 95)
        feature = tf.train.Example.FromString(record).features.feature
        image_path, mask_path = folder / f"{i}.jpg", folder / f"{i}_mask.png"
        image_path.write_bytes(feature["image"].bytes_list.value[0])
        mask_path.write_bytes(feature["mask"].bytes_list.value[0])
        records.append(record)
        pairs.append((image_path, mask_path))
    files = []
    per = -(-n // shards)
    for s in range(shards):
        chunk = records[s * per:(s + 1) * per]
        path = folder / shard_name("kvasir512", s, len(chunk))
        with tf.io.TFRecordWriter(str(path)) as writer:
            for r in chunk:
                writer.write(r)
        files.append(str(path))
    return files, pairs


def plain_loader(pairs, batch: int, seed: int):
    """The usual one-process loader: PIL decode, numpy flips/rot90, float32 batches, forever."""
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(len(pairs))
        for start in range(0, len(order) - batch + 1, batch):
            images, masks = [], []
            for j in order[start:start + batch]:
                image = np.asarray(Image.open(pairs[j][0]).convert("RGB"))
                mask = np.asarray(Image.open(pairs[j][1]))[..., None]
                if rng.random() < 0.5:
                    image, mask = image[:, ::-1], mask[:, ::-1]
                if rng.random() < 0.5:
                    image, mask = image[::-1], mask[::-1]
                if rng.random() < 0.5:
                    k = int(rng.integers(1, 4))
                    image, mask = np.rot90(image, k), np.rot90(mask, k)
                images.append(image.astype(np.float32))
                masks.append(mask.astype(np.float32))
            yield np.stack(images), np.stack(masks)


def time_variant(make_iter, n_batches: int) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds of this process, all threads) to take ``n_batches`` from an
    iterator in steady state, and the wall seconds its start-up took (a fresh iterator to its first
    2 batches: tracing and instantiating the map functions, filling the buffers), which training
    pays once per epoch, not per image. CPU time barely depends on what else the machine runs."""
    start = time.perf_counter()
    it = make_iter()
    for _ in range(2):
        np.asarray(next(it)[0][0, 0, 0])
    startup = time.perf_counter() - start
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(n_batches):
        image, mask = next(it)
        np.asarray(image[0, 0, 0])  # make sure the batch is really there
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    del it
    return seconds, cpu, startup


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=128, help="distinct 512x512 images written")
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--epochs", type=float, default=2.0, help="images delivered per round / --images")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)

    print("command:", "python3 bench/input_pipeline.py", " ".join(sys.argv[1:] if argv is None else argv))
    print("machine:", machine(), f"TF {tf.__version__}")
    print("tfseg default augment.ops:", PARAMS_DEFAULT)
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    with tempfile.TemporaryDirectory(prefix="tfseg-bench-") as tmp:
        files, pairs = write_data(Path(tmp), args.images, args.shards)
        n_batches = max(1, int(args.images * args.epochs) // args.batch)
        n_images = n_batches * args.batch
        print(f"data: {args.images} Kvasir-SEG images, {SIZE}x{SIZE} RGB JPEG q95 + PNG masks, "
              f"{len(files)} shards; {n_images} images per round in batches of {args.batch}")

        def tf_variant(ops):
            ds = None

            def make():
                nonlocal ds
                ds = make_dataset(files, batch_size=args.batch, training=True, image_size=(SIZE, SIZE),
                                  fit="none", augment_ops=ops, channels=3, classes=1, seed=0,
                                  shuffle_buffer=64)
                return iter(ds)

            return make

        variants = {"plain": lambda: plain_loader(pairs, args.batch, 0), "tf_decode": tf_variant([]),
                    "tf_default": tf_variant(PARAMS_DEFAULT), "tf_flips": tf_variant(FLIPS),
                    "tf_augment": tf_variant(HUBMAP), "tf_affine": tf_variant(AFFINE)}
        for make in variants.values():  # warm-up: fill the OS file cache
            time_variant(make, 2)
        rates = {name: [] for name in variants}
        cpu_ms = {name: [] for name in variants}
        startups = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, make in variants.items():
                wall, cpu, startup = time_variant(make, n_batches)
                rates[name].append(n_images / wall)
                cpu_ms[name].append(1000.0 * cpu / n_images)
                startups[name].append(startup)
    med = {name: statistics.median(r) for name, r in rates.items()}
    print(f"load average at end:   {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"\n{'variant':<12} {'median img/s':>12} {'CPU ms/img':>11} {'start-up s':>10}   img/s of each round")
    for name, r in rates.items():
        print(f"{name:<12} {med[name]:>12.1f} {statistics.median(cpu_ms[name]):>11.2f} "
              f"{statistics.median(startups[name]):>10.2f}   {' '.join(f'{x:.1f}' for x in r)}")
    print()
    print(f"tf_decode  / plain     = {med['tf_decode'] / med['plain']:.2f}x")
    for name in ("tf_default", "tf_augment"):
        print(f"{name:<10} / plain     = {med[name] / med['plain']:.2f}x   (target >= 2x)")
        print(f"{name:<10} / tf_decode = {med[name] / med['tf_decode']:.2f}   "
              f"(augmentation cost {100 * (1 - med[name] / med['tf_decode']):.0f}%, target <= 30%)")
    print(f"tf_affine  / tf_decode = {med['tf_affine'] / med['tf_decode']:.2f}")
    cpu = {name: statistics.median(v) for name, v in cpu_ms.items()}
    print(f"CPU time per image: tf_decode / plain = {cpu['tf_decode'] / cpu['plain']:.2f}, "
          f"tf_augment / tf_decode = {cpu['tf_augment'] / cpu['tf_decode']:.2f}")
    print("augmentation CPU ms per image over tf_decode: "
          f"default {cpu['tf_default'] - cpu['tf_decode']:.2f}, "
          f"flips+rot90 {cpu['tf_flips'] - cpu['tf_decode']:.2f}, "
          f"HuBMAP set {cpu['tf_augment'] - cpu['tf_decode']:.2f}, "
          f"+ shift_scale_rotate {cpu['tf_affine'] - cpu['tf_decode']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
