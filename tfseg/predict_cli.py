"""``tfseg predict``: inputs (images, folders, TFRecord shards, huge TIFFs) -> masks or a submission.

    tfseg predict --run runs/kvasir --folds all --input test/ --output preds/
    tfseg predict --run runs/hubmap --input big.tiff --output submission.csv.gz \\
        --set infer.downscale=4 --set submit.pixel_order=column

Inputs are streamed one at a time; TIFFs larger than :data:`WINDOWED_PIXELS` are read window by
window and never loaded whole. A folder output receives ``<stem>.png`` (binary: 0/255, multiclass:
class indices) and, with ``infer.save_probabilities``, ``<stem>_prob.npy`` (float16 [H, W, K],
written straight to disk through a memory map).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tfseg.config import Config
from tfseg.errors import DataError, first_line
from tfseg.files import atomic_path
from tfseg.registry import plural

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif")
TFRECORD_EXTENSIONS = (".tfrec", ".tfrecord", ".tfrecords")
WINDOWED_PIXELS = 4096 * 4096
OVERLAY_MAX_SIDE = 1024
MASK_TILE = 256


@dataclass
class Item:
    """One image to predict: its file name (for ids), the pixels and the truth when known."""

    name: str
    image: object  # np.ndarray [H, W, C] or a windowed reader with .shape and 2-D slicing
    truth: np.ndarray | None = None
    source: str | None = None  # where it came from, for messages (file, or shard and record id)


class _Windows:
    """Adapter giving :class:`tfseg.data.tiling.TiffWindows` a ``shape`` and 2-D slicing."""

    def __init__(self, tiff):
        self.tiff = tiff
        self.shape = (tiff.height, tiff.width, tiff.channels)
        self.dtype = tiff.dtype

    def __getitem__(self, key):
        ys, xs = key
        return self.tiff.read(ys.start, xs.start, ys.stop - ys.start, xs.stop - xs.start)


def expand_inputs(paths: list[str]) -> list[Path]:
    """Files named on the command line, folders expanded to their images and shards (sorted)."""
    files: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            inside = sorted(f for f in p.iterdir() if f.is_file()
                            and f.suffix.lower() in IMAGE_EXTENSIONS + TFRECORD_EXTENSIONS)
            if not inside:
                raise DataError(f"{p}: no image or TFRecord file in this folder. "
                                f"Expected {IMAGE_EXTENSIONS}.")
            files.extend(inside)
        elif p.is_file():
            if p.suffix.lower() not in IMAGE_EXTENSIONS + TFRECORD_EXTENSIONS:
                raise DataError(f"{p}: unknown input type. "
                                f"Expected an image {IMAGE_EXTENSIONS} or a .tfrec shard.")
            files.append(p)
        else:
            raise DataError(f"{p}: input not found.")
    return list(dict.fromkeys(files))  # a file named twice (a folder and a file in it) is predicted once


def check_inputs(files: list[Path], output: Path, to_csv: bool, overlays: str | None,
                 id_format: str = "{name}") -> None:
    """Refuse, before anything is written, what would fail or lose masks half-way.

    * the output: a folder output that is an existing file, a submission file that is a folder, an
      overlay folder that is a file;
    * two image files that would write the same ``<stem>.png`` (or, for a submission, the same id),
      e.g. ``A/0.png`` and ``B/0.png``: one would silently replace the other;
    * an image file whose header does not decode (PNGs are checked chunk by chunk, without
      decompressing them): the error names it instead of stopping after earlier masks were written.

    Raises:
        DataError: one line naming the file(s) and what was expected.
    """
    from tfseg.submission import image_id

    if to_csv and output.is_dir():
        raise DataError(f"{output}: is a folder. Expected the path of a submission file *.csv / *.csv.gz")
    for where, folder in (("--output", None if to_csv else output), ("--overlays", overlays)):
        if folder is not None and Path(folder).exists() and not Path(folder).is_dir():
            what = ("a folder (one mask PNG per image is written into it) or a submission file *.csv / *.csv.gz"
                    if where == "--output" else "a folder (the overlay PNGs are written into it)")
            raise DataError(f"{folder}: exists and is not a folder. Expected {where} to be {what}")
    images = [f for f in files if f.suffix.lower() in IMAGE_EXTENSIONS]
    names = [(lambda f: image_id(f.name, id_format), lambda key: f"id {key!r} in {output}")] if to_csv else \
        [(lambda f: f.stem, lambda key: f"{output / key}.png")]
    if overlays:
        names.append((lambda f: f.stem, lambda key: f"{Path(overlays) / key}.png"))
    for key_of, written_as in names:
        seen: dict[str, Path] = {}
        for path in images:
            key = key_of(path)
            if key in seen:
                raise DataError(f"{seen[key]} and {path}: both would be written as {written_as(key)}. Expected "
                                "inputs with distinct names (predict them into separate outputs)")
            seen[key] = path
    for path in images:
        _check_header(path)


def _check_header(path: Path) -> None:
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(path) as tif:
                tif.pages[0].shape  # noqa: B018 - reads the first page's header
            return
        from PIL import Image

        with Image.open(path) as img:
            img.verify()
    except Exception as err:  # noqa: BLE001 - any decoder failure is a bad file
        reason = first_line(err)[:160]
        raise DataError(f"{path}: cannot read image ({reason}); nothing was written") from None


def open_image(path: Path, channels: int):
    """An image as uint8 [H, W, C]; big uint8 TIFFs as a windowed reader (nothing loaded)."""
    if path.suffix.lower() in (".tif", ".tiff"):
        from tfseg.data.tiling import TiffWindows

        tiff = TiffWindows(path)  # DataError for an unreadable TIFF
        if tiff.height * tiff.width > WINDOWED_PIXELS:
            if tiff.dtype != np.uint8 or tiff.channels != channels:
                tiff.close()
                raise DataError(f"{path}: huge TIFF of {tiff.channels} channels, dtype {tiff.dtype}. "
                                f"Expected uint8 with {channels} channels to read it by windows.")
            return _Windows(tiff)
        tiff.close()
    from tfseg.data.sources import read_image

    return read_image(path, channels)


def iter_items(files: list[Path], cfg: Config) -> Iterator[Item]:
    """Images and TFRecord examples of the inputs, one at a time."""
    for path in files:
        if path.suffix.lower() in TFRECORD_EXTENSIONS:
            yield from _iter_tfrecord(path, cfg)
        else:
            yield Item(path.name, open_image(path, cfg.data.channels), source=str(path))


def _iter_tfrecord(path: Path, cfg: Config) -> Iterator[Item]:
    import tensorflow as tf

    from tfseg.data.tfrecord import decode_example

    ds = tf.data.TFRecordDataset(str(path)).map(lambda s: decode_example(s, cfg.data.channels))
    try:
        for ex in ds.as_numpy_iterator():
            name = ex["id"].decode() if isinstance(ex["id"], bytes) else str(ex["id"])
            yield Item(name, ex["image"], ex["mask"][..., 0], source=f"{path} (record {name!r})")
    except tf.errors.OpError as err:
        raise DataError(f"{path}: unreadable TFRecord shard ({first_line(err)[:160]}).") from None


def _overlay_image(item: Item, step: int) -> np.ndarray:
    img = item.image
    if isinstance(img, np.ndarray):
        return img[::step, ::step]
    h, w, _ = img.shape
    band = step * max(1, 512 // step)  # read whole bands (one TIFF tile row each), keep every step-th row
    parts = [np.asarray(img[y:min(y + band, h), 0:w])[::step, ::step] for y in range(0, h, band)]
    return np.concatenate(parts)


def run_predict(args) -> int:
    """Entry point of ``tfseg predict`` (arguments from :mod:`tfseg.cli`). Returns the exit code."""
    from tfseg.inference import Predictor, load_run_config
    from tfseg.submission import SubmissionWriter, image_id, is_submission_path
    from tfseg.viz import save_panel

    cfg = load_run_config(args.run, args.config, args.overrides)
    files = expand_inputs(args.input)
    output = Path(args.output)
    to_csv = is_submission_path(output)
    check_inputs(files, output, to_csv, args.overlays, cfg.submit.id_format)
    # each checkpoint against the config (channels, classes, fixed size), before an image is read
    predictor = Predictor.from_run(args.run, args.folds or cfg.infer.folds, cfg.infer, config=cfg)
    binary = predictor.spec.classes == 1
    n = 0
    written: dict[str, str] = {}  # stem -> the input it came from (TFRecord ids are known only here)
    with (SubmissionWriter.from_config(output, cfg.submit, predictor.spec.classes) if to_csv
          else contextlib.nullcontext()) as sub:
        for item in iter_items(files, cfg):
            H, W, _ = item.image.shape
            huge = H * W > WINDOWED_PIXELS
            stem = Path(item.name).stem
            if (not to_csv or args.overlays) and stem in written:
                where = Path(args.overlays) if to_csv else output
                raise DataError(f"{written[stem]} and {item.source or item.name}: both would be written as "
                                f"{where / stem}.png. Expected inputs with distinct names")
            written[stem] = item.source or item.name
            step = max(1, -(-max(H, W) // OVERLAY_MAX_SIDE))
            scale = 255 if binary else 1
            with contextlib.ExitStack() as stack:
                probs = None
                if not to_csv and cfg.infer.save_probabilities:
                    tmp = stack.enter_context(atomic_path(output / f"{stem}_prob.npy"))
                    probs = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16,
                                                      shape=(H, W, predictor.spec.classes))
                progress = huge and sys.stderr.isatty()
                if huge:  # never held whole: streamed into a tiled TIFF or straight into the RLE
                    thumbs: list[np.ndarray] = []
                    bands = thumbnail_rows(predictor.mask_bands(item.image, probabilities=probs,
                                                                progress=progress), step, thumbs)
                    if to_csv:
                        sub.write_bands(image_id(item.name, cfg.submit.id_format), bands, H, W)
                    else:
                        write_mask_tiff(output / f"{stem}.tif", bands, H, W, scale)
                    thumb = np.concatenate(thumbs)
                else:
                    mask = predictor.predict_mask(item.image, probabilities=probs, progress=progress)
                    thumb = mask[::step, ::step]
                if probs is not None:
                    probs.flush()
                    del probs
            if not huge:  # (huge images were streamed above)
                if to_csv:
                    sub.write(image_id(item.name, cfg.submit.id_format), mask)
                else:
                    _write_png(output / f"{stem}.png", mask * scale)
            if args.overlays:
                truth = None if item.truth is None else item.truth[::step, ::step]
                save_panel(Path(args.overlays) / f"{stem}.png", _overlay_image(item, step),
                           (thumb > 0).astype(np.uint8) if binary else thumb, truth, title=item.name)
            n += 1
    where = f"{output} ({plural(sub.count, 'row')})" if to_csv else f"{output}/ ({plural(n, 'mask')})"
    cut = ""
    if binary:
        source = " (out-of-fold sweep)" if cfg.infer.threshold_from == "oof" else ""
        cut = f", threshold {predictor.infer.threshold:g}{source}"
    print(f"tfseg predict: {plural(n, 'image')} ({predictor.how}), folds {predictor.folds}, tta {cfg.infer.tta}{cut} "
          f"-> {where}")
    return 0


def thumbnail_rows(bands: Iterator[tuple[int, np.ndarray]], step: int,
                   into: list[np.ndarray]) -> Iterator[tuple[int, np.ndarray]]:
    """Pass ``bands`` through, appending every ``step``-th row and column of the image to ``into``
    (the overlay of a mask that is never held whole: ``np.concatenate(into)`` once consumed)."""
    for y0, band in bands:
        into.append(np.asarray(band)[(-y0) % step::step, ::step])
        yield y0, band


def write_mask_tiff(path: Path, bands: Iterator[tuple[int, np.ndarray]], height: int, width: int,
                    scale: int = 1, tile: int = MASK_TILE) -> None:
    """Write a mask that arrives as row bands into a tiled, zlib-compressed uint8 TIFF, streaming.

    Only one strip of ``tile`` rows is held at a time (a 20000 x 20000 mask never is); the file
    appears under its name only when complete.

    Args:
        path: the ``.tif`` to write.
        bands: ``(y0, uint8 [h, width])`` in order, covering ``height`` rows (``Predictor.mask_bands``).
        height, width: size of the mask.
        scale: multiplier of the stored values (255 turns a 0/1 mask into a viewable one).
        tile: TIFF tile side.
    """
    import tifffile

    wpad = -(-width // tile) * tile

    def tiles():
        strip = np.zeros((tile, wpad), np.uint8)
        filled = 0
        for _y0, band in bands:
            band = band.astype(np.uint8) * np.uint8(scale)
            i = 0
            while i < band.shape[0]:
                k = min(tile - filled, band.shape[0] - i)
                strip[filled:filled + k, :width] = band[i:i + k]
                filled, i = filled + k, i + k
                if filled == tile:
                    yield from (strip[:, x:x + tile].copy() for x in range(0, width, tile))
                    strip[:] = 0
                    filled = 0
        if filled:
            yield from (strip[:, x:x + tile].copy() for x in range(0, width, tile))

    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, tiles(), shape=(height, width), dtype=np.uint8, tile=(tile, tile),
                         compression="zlib")


def _write_png(path: Path, mask: np.ndarray) -> None:
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(mask.astype(np.uint8)).save(tmp, format="PNG")

