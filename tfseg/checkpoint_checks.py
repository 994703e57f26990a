"""A run's checkpoint checked against the config it is used with, before any image meets it.

``tfseg predict`` and ``tfseg evaluate`` load ``RUN/fold<k>/best.keras`` and feed it images decoded,
sized and scored by the config (the run's ``config.yaml``, or ``--config`` / ``--set``). A checkpoint
from another run, or a config from another data set, used to end in a Keras traceback on the first
batch, or worse, in masks of the wrong kind written without a word (a 12-class CamVid model under a
binary Kvasir config wrote class indices). :func:`check_checkpoint` refuses, in one line naming the
checkpoint, the key, where the key was set and the value that would work:

1. channels: ``data.channels`` (how images are decoded) against the model's input channels;
2. classes: ``data.classes`` / ``model.classes`` (binary 0/1 masks and a threshold, or class indices
   and the argmax) against the model's output channels;
3. size: a model built for one input size against the size it will be fed (``data.image_size`` for
   whole images, ``data.val_size`` or ``data.image_size`` for pipeline records); quarter turns
   (``infer.tta: 8``) of a non-square fixed-size model, unless its tiles are read through square
   windows of a copy for any size (:mod:`tfseg.large_windows`: valid convolutions).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from tfseg.config import Config, key_origin
from tfseg.errors import ConfigError
from tfseg.registry import plural


def fixed_input_size(model) -> tuple[int, int] | None:
    """[height, width] of a model built for one input size, or None when it takes any size."""
    shape = getattr(model, "input_shape", None)
    if shape is None or isinstance(shape, list) or len(shape) != 4 or None in tuple(shape)[1:3]:
        return None
    return int(shape[1]), int(shape[2])


def _origin(cfg: Config | None, key: str) -> str:
    where = key_origin(cfg, key) if cfg is not None else None
    return f" ({where})" if where else ""


def _classes_key(cfg: Config) -> str:
    """The key that set the number of classes (after loading, model.classes equals data.classes):
    data.classes when typed on the command line; else model.classes when it was given a number by
    ``--set``, or set in a file that does not set data.classes; else data.classes (which
    ``model.classes: null`` follows)."""
    model, data = key_origin(cfg, "model.classes"), key_origin(cfg, "data.classes")
    if data and data.startswith("--set "):
        return "data.classes"
    to_null = model is not None and model.startswith("--set ") and model.split("=", 1)[1].strip() in ("null", "~", "")
    if model and not to_null and (model.startswith("--set ") or not data):
        return "model.classes"
    return "data.classes"


def check_checkpoint(model, path: str | os.PathLike, cfg: Config, feed: Sequence[int] | None = None,
                     feed_key: str = "data.image_size", alternative: str = "") -> None:
    """Refuse a loaded model that cannot take or produce what ``cfg`` says, in one line.

    Args:
        model: the Keras model loaded from ``path`` (one image input [B, H, W, C], output [B, H', W', K]).
        path: its file, named in the message.
        cfg: the config the model is used with (``data.channels``, ``data.classes`` / ``model.classes``,
            ``infer.tta``; where each key was set is named).
        feed: [height, width] the model will be fed, when the config fixes it (whole images resized to
            ``data.image_size``, pipeline records); None: tiles, whose size a fixed-size model imposes.
        feed_key: the key that sets ``feed``.
        alternative: another way out when ``feed`` does not fit (e.g. ``"infer.fit=tile"``).

    Raises:
        ConfigError: channels, classes or input size differ; quarter turns of a non-square fixed size.
    """
    in_shape, out_shape = model.input_shape, model.output_shape
    channels, classes = int(in_shape[-1]), int(out_shape[-1])
    if cfg.data.channels != channels:  # images are decoded with data.channels
        raise ConfigError(f"data.channels is {cfg.data.channels}{_origin(cfg, 'data.channels')}, but the run's "
                          f"model {path} takes {channels}-channel images. Expected data.channels: {channels}, "
                          f"or a checkpoint trained on {cfg.data.channels}-channel images")
    want = cfg.model.classes or cfg.data.classes
    if want != classes:  # 1: a binary mask (threshold, 0/255 PNGs); K > 1: class indices (argmax)
        key = _classes_key(cfg)
        what = "a binary mask" if classes == 1 else f"{classes} classes"
        wanted = "a binary mask" if want == 1 else f"{want} classes"
        raise ConfigError(f"{key} is {want}{_origin(cfg, key)}, but the run's model {path} outputs "
                          f"{plural(classes, 'channel')} ({what}). Expected {key}: {classes}, or a "
                          f"checkpoint trained for {wanted}")
    fixed = fixed_input_size(model)
    if feed is None and fixed is not None and fixed[0] != fixed[1] and cfg.infer.tta == 8:
        from tfseg.large_windows import large_windows

        wide = large_windows(model)  # tiles through a copy for any size: square windows, quarter turns fit
        fixed = None if wide is not None and wide.tile(cfg.infer.tile_size) else fixed
    check_fixed_size(fixed, feed, cfg.infer.tta, str(path), feed_key, _origin(cfg, feed_key), alternative)


def check_fixed_size(model_hw: tuple[int, int] | None, feed: Sequence[int] | None, tta: int,
                     model: str = "", feed_key: str = "data.image_size", origin: str = "",
                     alternative: str = "") -> None:
    """A model that takes only ``model_hw`` inputs must be fed that size, and quarter turns of a
    non-square size (``infer.tta: 8``) would feed it ``w x h``.

    Args:
        model_hw: the model's fixed [height, width], or None (any size: nothing to check).
        feed: [height, width] it will be fed, or None (tiles of its own size).
        tta: ``infer.tta``.
        model: the checkpoint's file, for the message ("" when unknown).
        feed_key, origin: the key that sets ``feed`` and where it was set (`` (file)`` or "").
        alternative: another way out, added to the expected values.

    Raises:
        ConfigError: one line naming the sizes and the key.
    """
    if model_hw is None:
        return
    h, w = model_hw
    where = f" {model}" if model else ""
    if feed is not None and tuple(int(v) for v in feed) != (h, w):
        fh, fw = (int(v) for v in feed)
        other = f", or {alternative}" if alternative else ", or a checkpoint trained at that size"
        raise ConfigError(f"{feed_key} is {fh}x{fw}{origin}, but the run's model{where} takes only "
                          f"{h}x{w} inputs. Expected {feed_key}: [{h}, {w}]{other}")
    if tta == 8 and h != w:
        raise ConfigError(f"infer.tta: 8 includes quarter turns, which make the model's {h}x{w} inputs {w}x{h}, "
                          f"and the model{where} takes only its own size. Expected 1, 2 or 4")
