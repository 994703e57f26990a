"""A fixed-size valid-convolution model (``unet_original`` trained at 188: 188 -> 4) predicted with its own
windows against large windows through its checked copy for any size (tfseg/large_windows.py).

    python3 bench/large_windows.py                          # ISBI slice 0 cropped to 256 x 256, 3 rounds
    python3 bench/large_windows.py --crop 512 --rounds 1    # the whole 512 x 512 slice (the 188 path: minutes)

Variants, in one process, interleaved rounds (the order rotates each round), the same model and image:

* ``own-188``: ``infer.tile_size: 188``, the fixed model's own 188 x 188 windows, 4 x 4 pixels each;
* ``large-<t>``: ``infer.tile_size: t`` (252, 508 by default): square windows of the largest 188 + 16 k <= t,
  each predicted at 4 x 4 shifts (a 188 model trained 4 of every 16 output offsets per axis).

Reported: the median seconds of ``Predictor.predict`` over the rounds, the ratio to ``own-188``, and how far
each large-window map is from ``own-188``'s (the tiles start at other offsets: an untrained model's maps are
not comparable pixel for pixel; the masks' agreement is printed for the record, not as a quality figure).
The model is the paper's architecture with small filters (``--filters``), random weights.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from benchlib import machine

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--crop", type=int, default=256, help="side of the ISBI crop predicted (up to 512)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tiles", default="252,508", help="infer.tile_size of the large-window variants")
    parser.add_argument("--filters", default="4,4,8,8,16", help="unet_original's five filter counts")
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--tta", type=int, default=1)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    args = parser.parse_args(argv)
    print("python3 bench/large_windows.py " + " ".join(sys.argv[1:] if argv is None else argv))
    print("machine: " + machine())

    from PIL import Image

    from tfseg.config import InferConfig, ModelConfig
    from tfseg.inference import Predictor
    from tfseg.models import build_model

    path = Path(args.data) / "isbi2012_em_membrane" / "images" / "0.png"
    image = np.asarray(Image.open(path), np.float32)[: args.crop, : args.crop, None]
    filters = [int(f) for f in args.filters.split(",")]
    model = build_model(ModelConfig(arch="unet_original", input_shape=[188, 188, 1], classes=1,
                                    encoder_weights=None, options={"filters": filters}))
    rng = np.random.default_rng(0)  # weights with some contrast, so the maps differ where the windows do
    model.set_weights([rng.normal(0, 0.2, w.shape).astype(np.float32) for w in model.get_weights()])
    variants = {"own-188": 188, **{f"large-{t}": int(t) for t in args.tiles.split(",")}}
    predictors, setup = {}, {}
    for name, tile in variants.items():
        start = time.perf_counter()
        predictors[name] = Predictor([model], InferConfig(tile_size=tile, overlap=args.overlap, tta=args.tta,
                                                          batch_size=8, accumulator="float32"))
        setup[name] = time.perf_counter() - start
    print(f"image: {path.name} cropped to {image.shape[0]}x{image.shape[1]}; unet_original filters {args.filters}, "
          f"fixed 188 -> 4; overlap {args.overlap}, TTA {args.tta}, batch 8")
    times: dict[str, list[float]] = {name: [] for name in variants}
    maps = {}
    names = list(variants)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            start = time.perf_counter()
            maps[name] = predictors[name].predict(image)
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["own-188"])
    print(f"{'variant':<12} {'reads':<58} {'setup s':>8} {'median s':>9} {'min':>7} {'max':>7} {'vs own-188':>11} "
          f"{'max |dp|':>9} {'masks agree':>12}")
    for name in names:
        t = times[name]
        diff = float(np.abs(maps[name] - maps["own-188"]).max())
        agree = float(((maps[name] > 0.5) == (maps["own-188"] > 0.5)).mean()) * 100
        print(f"{name:<12} {predictors[name].how:<58} {setup[name]:8.1f} {statistics.median(t):9.2f} "
              f"{min(t):7.2f} {max(t):7.2f} {base / statistics.median(t):10.1f}x {diff:9.4f} {agree:11.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
