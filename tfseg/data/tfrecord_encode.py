"""The TensorFlow-free half of the TFRecord schema: check a sample and encode its image and mask.

The writer's worker processes run only this module (and the sources), so they start without
importing TensorFlow: a "spawn" worker is ready in about a second instead of the tens of seconds
a TensorFlow import takes on a busy 2-core machine. The parent process assembles the
``tf.train.Example`` and writes the shards (``tfrecord.example_bytes``). The workers
(:func:`worker_pool`) end when the parent dies, even when it is killed outright.

Encoding uses PIL with fixed settings, so the same array always gives the same bytes:
PNG at zlib level 6 without optimisation; JPEG baseline, 4:2:0 chroma, no optimisation, no EXIF.
(PIL and ``tf.io.encode_png``/``encode_jpeg`` wrap the same libpng/zlib and libjpeg; measured in
``bench/tfrecord_encode.py``: the same sizes and, within the noise, the same speed.)
"""

from __future__ import annotations

import ctypes
import io
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from typing import NamedTuple

import numpy as np
from PIL import Image

from tfseg.data.sample import Sample
from tfseg.errors import DataError

IMAGE_FORMATS = ("png", "jpeg")


class EncodedSample(NamedTuple):
    """A checked sample with its image and mask encoded: what a worker sends to the writer."""

    id: str
    group: str
    label: int
    height: int
    width: int
    channels: int
    image_format: str
    image: bytes
    mask: bytes


def check_sample(sample: Sample, channels: int | None = None, classes: int | None = None) -> None:
    """Raise a one-line :class:`DataError` naming ``sample.id`` if it breaks the record contract.

    Args:
        sample: image uint8 [H, W, C] with C in (1, 3), mask uint8 [H, W] of the same H, W.
        channels: expected C, or None to accept 1 or 3.
        classes: mask values must be < max(classes, 2) (binary data: 0/1), or None to skip.
    """
    image, mask = np.asarray(sample.image), np.asarray(sample.mask)
    if not sample.id:
        raise DataError(f"sample of group {sample.group!r}: empty id. Expected a unique non-empty id.")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (1, 3):
        raise DataError(f"{sample.id}: image is {image.dtype} {list(image.shape)}. "
                        "Expected uint8 [H, W, C] with C = 1 or 3.")
    if channels is not None and image.shape[2] != channels:
        raise DataError(f"{sample.id}: image has {image.shape[2]} channels. "
                        f"Expected data.channels={channels}.")
    if mask.dtype != np.uint8 or mask.shape != image.shape[:2]:
        raise DataError(f"{sample.id}: mask is {mask.dtype} {list(mask.shape)}. "
                        f"Expected uint8 {list(image.shape[:2])}, the image's height and width.")
    if classes is not None and mask.size and int(mask.max()) >= max(classes, 2):
        raise DataError(f"{sample.id}: mask value {int(mask.max())} is outside data.classes={classes}. "
                        f"Expected values in [0, {max(classes, 2)}).")


def encode_image(array: np.ndarray, image_format: str = "png", jpeg_quality: int = 95) -> bytes:
    """Encode uint8 [H, W] or [H, W, C] (C = 1 or 3) as PNG or JPEG, deterministically."""
    array = np.ascontiguousarray(array)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    image = Image.fromarray(array)
    buf = io.BytesIO()
    if image_format == "png":
        image.save(buf, format="PNG", compress_level=6, optimize=False)
    elif image_format == "jpeg":
        image.save(buf, format="JPEG", quality=int(jpeg_quality), subsampling=2, optimize=False,
                   progressive=False)
    else:
        raise DataError(f"image_format={image_format!r}. Expected one of {list(IMAGE_FORMATS)}.")
    return buf.getvalue()


def encode_sample(sample: Sample, image_format: str = "jpeg", jpeg_quality: int = 95,
                  channels: int | None = None, classes: int | None = None) -> EncodedSample:
    """Check ``sample`` (see :func:`check_sample`) and encode its image and its mask (always PNG)."""
    check_sample(sample, channels, classes)
    image = np.asarray(sample.image)
    return EncodedSample(str(sample.id), str(sample.group), int(sample.label), int(image.shape[0]),
                         int(image.shape[1]), int(image.shape[2]), image_format,
                         encode_image(image, image_format, jpeg_quality),
                         encode_image(np.asarray(sample.mask), "png"))


def encode_entry(cfg, entry) -> list[EncodedSample]:
    """Read one entry (``sources.read_entry``, or the entry itself when it is a Sample) and encode it.

    Args:
        cfg: the data section (DataConfig): source keys, channels, classes, image_format, jpeg_quality.
        entry: a source entry, or a :class:`Sample`.

    Returns:
        One :class:`EncodedSample` per sample of the entry (many for hubmap tiles, maybe none).

    Raises:
        DataError: from the source (names the file) or a sample breaking the contract (names its id).
    """
    if isinstance(entry, Sample):
        samples = [entry]
    else:
        from tfseg.data import sources

        samples = sources.read_entry(cfg, entry)
    return [encode_sample(s, cfg.image_format, cfg.jpeg_quality, cfg.channels, cfg.classes) for s in samples]


# ------------------------------------------------------------------------------------------------
# The worker processes
# ------------------------------------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def worker_pool(workers: int) -> ProcessPoolExecutor:
    """``workers`` "spawn" processes for :func:`encode_entry` that end when this process ends.

    A pool's workers wait on a queue that they hold open themselves, so when their parent is
    killed (SIGKILL, out of memory: no chance to shut the pool down) they would wait for ever,
    and multiprocessing's resource tracker with them. Each worker therefore asks to be sent
    SIGTERM when its parent dies (Linux ``prctl(PR_SET_PDEATHSIG)``; elsewhere a thread that
    watches the parent's id): see :func:`exit_with_parent`. Linux sends it when the *thread* that
    started the worker ends, and workers are started by ``submit``: use the pool from one thread.
    """
    return ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                               initializer=exit_with_parent, initargs=(os.getpid(),))


def exit_with_parent(parent_pid: int) -> None:
    """Pool initializer: end this process when process ``parent_pid``, which started it, dies."""
    armed = False
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            armed = libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) == 0
        except (OSError, AttributeError):
            armed = False
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(1)
    if not armed:
        threading.Thread(target=_watch_parent, args=(parent_pid,), name="tfseg-watch-parent", daemon=True).start()


def _watch_parent(parent_pid: int, interval: float = 0.5) -> None:
    """End this process (exit status 1) once its parent is no longer ``parent_pid``."""
    while os.getppid() == parent_pid:
        time.sleep(interval)
    os._exit(1)
