"""Tiled inference on a generated huge RGB TIFF: megapixels/s and peak RSS, variants side by side.

    python3 bench/tiled_inference.py                 # 8192 x 8192 x 3
    python3 bench/tiled_inference.py --huge          # also 20000 x 20000 x 3 (slow, ~1.2 GB TIFF)

Variants, each in a fresh subprocess (so ``ru_maxrss`` is that variant's own peak):

* ``bare``: the model alone on pre-made tile batches held in memory (the ceiling);
* ``tiled-o0`` / ``tiled-o50``: ``Predictor.predict_mask`` reading windows of the TIFF through
  tifffile+zarr, blending (gaussian), writing a uint8 mask, overlap 0 and 0.5;
* ``tiled-skip``: overlap 0.5 with background tiles skipped (a third of the image is blank);
* ``tiled-o0-tiff``: overlap 0, the mask streamed band by band into a tiled TIFF (what
  ``tfseg predict`` does for huge images) instead of a uint8 array in memory;
* ``tiled-o0-csv``: overlap 0, the mask bands streamed into a column-major (HuBMAP) RLE
  submission ``.csv.gz`` (what ``tfseg predict --output sub.csv.gz`` does for huge images);
* ``whole``: ``tifffile.imread`` of the whole image and one untiled model call (8192 only).

Reported: median seconds over ``--rounds``, image megapixels/s, model tiles/s and peak RSS.
The model is a deliberately small fully convolutional net (two 3x3 convs, a pool, an upsample).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from benchlib import machine

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def small_model(filters: int = 8):
    import keras

    inp = keras.Input((None, None, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inp)
    x = keras.layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
    x = keras.layers.UpSampling2D()(x)
    out = keras.layers.Conv2D(1, 1, activation="sigmoid", name="output")(x)
    model = keras.Model(inp, out)
    rng = np.random.default_rng(0)
    model.set_weights([rng.normal(0, 0.3, w.shape).astype(np.float32) for w in model.get_weights()])
    return model


def build_bench_model(name: str, tile: int):
    """``tiny``: small_model() (per-tile overhead at its most visible); ``unet_small``: tfseg's
    smallest real architecture (the LGG post's U-Net), random weights."""
    if name == "tiny":
        return small_model()
    import keras

    from tfseg.config import ModelConfig
    from tfseg.models import build_model

    keras.utils.set_random_seed(0)
    return build_model(ModelConfig(arch=name, input_shape=(tile, tile, 3), classes=1, encoder_weights=None))


def make_tiff(path: Path, size: int, tile: int = 512) -> None:
    """Write a size x size x 3 tiled TIFF tile by tile (never held whole): tissue-like noise on
    the left two thirds, near-white unsaturated glass on the right third."""
    import tifffile

    def tiles():
        rng = np.random.default_rng(1)
        for _y in range(0, size, tile):
            for x in range(0, size, tile):
                if x >= 2 * size // 3:
                    t = rng.integers(235, 245, (tile, tile, 1), dtype=np.uint8).repeat(3, axis=2)
                else:
                    t = rng.integers(0, 255, (tile, tile, 3), dtype=np.uint8)
                    t[..., 1] //= 2  # pink-ish: saturated
                yield t

    tifffile.imwrite(path, tiles(), shape=(size, size, 3), dtype=np.uint8, tile=(tile, tile),
                     photometric="rgb", bigtiff=True)


def child(args) -> dict:
    """Run one variant in this process and return its figures."""
    from tfseg.config import InferConfig
    from tfseg.inference import Predictor
    from tfseg.predict_cli import open_image

    model = build_bench_model(args.model, args.tile)
    t = args.tile
    warm = np.zeros((args.batch, t, t, 3), np.float32)
    model.predict_on_batch(warm)  # trace once, outside the timing
    rss_ready = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    size = args.size
    tiles = None
    start = time.perf_counter()
    if args.child == "bare":
        n = (size // t) ** 2
        batch = np.random.default_rng(0).integers(0, 255, warm.shape).astype(np.float32)
        for _ in range(0, n, args.batch):
            model.predict_on_batch(batch)
        tiles = -(-n // args.batch) * args.batch
    elif args.child == "whole":
        import tifffile

        img = tifffile.imread(args.tiff)
        mask = (model.predict_on_batch(img[None].astype(np.float32))[0, ..., 0] > 0.5).astype(np.uint8)
        tiles = 0
    elif args.child in ("tiled-o0-tiff", "tiled-o0-csv"):  # the CLI's paths for huge images: streamed
        from tfseg.predict_cli import write_mask_tiff
        from tfseg.submission import SubmissionWriter

        pred = Predictor([model], InferConfig(tile_size=t, overlap=0.0, batch_size=args.batch))
        calls = []
        inner = pred.predict_batch
        pred.predict_batch = lambda x: (calls.append(len(x)), inner(x))[1]
        image = open_image(Path(args.tiff), 3)
        if args.child == "tiled-o0-tiff":
            write_mask_tiff(Path(args.tiff).with_suffix(".mask.tif"), pred.mask_bands(image), size, size, 255)
        else:
            with SubmissionWriter(Path(args.tiff).with_suffix(".csv.gz"), "id", "predicted", "column") as sub:
                sub.write_bands("huge", pred.mask_bands(image), size, size)
        tiles = sum(calls)
    else:
        overlap = 0.0 if args.child == "tiled-o0" else 0.5
        infer = InferConfig(tile_size=t, overlap=overlap, batch_size=args.batch, blend="gaussian",
                            skip_background=args.child == "tiled-skip")
        pred = Predictor([model], infer)
        calls = []
        inner = pred.predict_batch
        pred.predict_batch = lambda x: (calls.append(len(x)), inner(x))[1]
        image = open_image(Path(args.tiff), 3)
        mask = pred.predict_mask(image)
        tiles = sum(calls)
        assert mask.shape == (size, size)
    seconds = time.perf_counter() - start
    return {"variant": args.child, "seconds": seconds, "mpx_s": size * size / 1e6 / seconds,
            "tiles": tiles, "tiles_s": tiles / seconds if tiles else None,
            "rss_ready_mb": rss_ready,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_size(size: int, args, variants: list[str], tmp: Path) -> None:
    tiff = tmp / f"bench_{size}.tif"
    t0 = time.perf_counter()
    make_tiff(tiff, size, args.tile)
    print(f"\n{size}x{size}x3 TIFF ({tiff.stat().st_size / 1e6:.0f} MB, written in "
          f"{time.perf_counter() - t0:.0f} s); float32 size of the image {size * size * 12 / 1e9:.2f} GB")
    # Rounds are interleaved (bare, tiled, ..., bare, tiled, ...) so that a change in the
    # machine's load during the run hits every variant alike.
    results: dict[str, list[dict]] = {v: [] for v in variants}
    failed: set[str] = set()
    for _ in range(args.rounds):
        for variant in variants:
            if variant in failed:
                continue
            cmd = [sys.executable, __file__, "--child", variant, "--tiff", str(tiff), "--size", str(size),
                   "--tile", str(args.tile), "--batch", str(args.batch), "--model", args.model]
            env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if out.returncode != 0:
                why = out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode
                print(f"  {variant}: failed ({why})")
                failed.add(variant)
                continue
            results[variant].append(json.loads(out.stdout.strip().splitlines()[-1]))
    rows = {}
    for variant, res in results.items():
        if res:
            med = {k: statistics.median(r[k] for r in res) for k in ("seconds", "mpx_s", "peak_rss_mb",
                                                                      "rss_ready_mb")}
            tiles_s = [r["tiles_s"] for r in res if r["tiles_s"]]
            med["tiles_s"] = statistics.median(tiles_s) if tiles_s else None
            med["tiles"] = res[0]["tiles"]
            rows[variant] = med
    bare = rows.get("bare", {}).get("tiles_s")
    print("| variant | median s | image Mpx/s | model tiles | tiles/s | tiles/s vs bare | RSS ready MB | "
          "peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|")
    for v, r in rows.items():
        ratio = f"{r['tiles_s'] / bare:.2f}" if bare and r["tiles_s"] else "-"
        ts = f"{r['tiles_s']:.1f}" if r["tiles_s"] else "-"
        print(f"| {v} | {r['seconds']:.1f} | {r['mpx_s']:.2f} | {r['tiles']} | {ts} | {ratio} | "
              f"{r['rss_ready_mb']:.0f} | {r['peak_rss_mb']:.0f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=8192)
    p.add_argument("--huge", action="store_true", help="also the 20000 x 20000 case (no whole-image variant)")
    p.add_argument("--huge-only", action="store_true", help="only the 20000 x 20000 case")
    p.add_argument("--tile", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--model", default="tiny", choices=["tiny", "unet_small"],
                   help="tiny: 2 convs of 8 filters (overhead at its most visible); unet_small: tfseg's U-Net")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--variants", default="bare,tiled-o0,tiled-o0-tiff,tiled-o0-csv,tiled-o50,tiled-skip,whole")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--tiff", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    print("command: python3 " + " ".join([Path(__file__).relative_to(ROOT).as_posix(), *sys.argv[1:]]))
    print(f"machine: {machine()}")
    model = "small_model() (2 convs of 8 filters)" if args.model == "tiny" else f"tfseg {args.model}"
    print(f"tile {args.tile}, batch {args.batch}, rounds {args.rounds}, model: {model}, blend gaussian")
    variants = args.variants.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        if not args.huge_only:
            run_size(args.size, args, variants, Path(tmp))
        if args.huge or args.huge_only:
            run_size(20000, args, [v for v in variants if v != "whole"], Path(tmp))


if __name__ == "__main__":
    main()
