"""Pictures: training curves and prediction panels (image, truth, prediction, contour overlay).

Everything renders on matplotlib Figures with their own Agg canvas (no display needed, and the
global pyplot backend is left alone, so notebooks keep showing plots inline); every file is written
atomically (:func:`tfseg.files.atomic_path`). :func:`panel` returns a numpy RGB array, so the
same picture goes to a PNG (:func:`save_panel`), to ``tfseg predict --overlays`` and to
TensorBoard image summaries during training.
"""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from tfseg.errors import DataError, RunError
from tfseg.files import atomic_path

TRUTH_COLOR = (255, 40, 40)       # red: the reference contour
PREDICTION_COLOR = (40, 255, 40)  # green: the predicted contour


# ---------------------------------------------------------------------------------------------
# Training curves
# ---------------------------------------------------------------------------------------------
def read_history(history_csv: str | os.PathLike) -> dict[str, list[float]]:
    """Read a Keras ``CSVLogger`` file into ``{column: [values per epoch]}`` (epoch included).

    Raises:
        RunError: the file is missing, empty or has a non-numeric cell.
    """
    path = Path(history_csv)
    if not path.is_file():
        raise RunError(f"{path}: history file not found. Expected the CSVLogger file of a trained fold.")
    with path.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        raise RunError(f"{path}: no epochs recorded. Expected a header and at least one row.")
    columns: dict[str, list[float]] = {name: [] for name in rows[0]}
    for line, row in enumerate(rows, start=2):
        for name in columns:
            try:
                columns[name].append(float(row[name]))
            except (TypeError, ValueError):
                raise RunError(f"{path}:{line}: column {name!r} has {row[name]!r}. "
                               "Expected a number.") from None
    if "epoch" not in columns:
        columns["epoch"] = [float(i) for i in range(len(rows))]
    return columns


def best_epoch(values: list[float], mode: str) -> int:
    """Index of the best value (``mode`` "max" or "min"); NaNs never win."""
    if mode not in ("max", "min"):
        raise RunError(f"Received: mode={mode!r}. Expected one of ['max', 'min'].")
    arr = np.asarray(values, dtype=np.float64)
    arr = np.where(np.isnan(arr), -np.inf if mode == "max" else np.inf, arr)
    return int(np.argmax(arr) if mode == "max" else np.argmin(arr))


def plot_curves(history_csv: str | os.PathLike, out_png: str | os.PathLike, monitor: str = "val_loss",
                mode: str = "min") -> Path:
    """Plot train/validation metric and loss per epoch, with the best epoch marked.

    The left panel shows the monitored metric (``monitor`` without its ``val_`` prefix, train and
    validation); when the monitor is the loss it shows the first other metric instead. The right
    panel shows the loss. A dashed line marks the epoch where ``monitor`` was best.

    Args:
        history_csv: CSVLogger file (``epoch,<metric>,loss,val_<metric>,val_loss,...``).
        out_png: where to write the PNG (written atomically).
        monitor: the column that picked the checkpoint, e.g. ``val_dice`` or ``val_loss``.
        mode: "max" or "min": which way ``monitor`` improves.

    Returns:
        The path of the PNG.

    Raises:
        RunError: missing/empty history, or ``monitor`` not among its columns (they are listed).
    """
    hist = read_history(history_csv)
    if monitor not in hist:
        raise RunError(f"{history_csv}: no column {monitor!r}. Expected one of {sorted(hist)}.")
    best = best_epoch(hist[monitor], mode)
    epochs = [int(e) + 1 for e in hist["epoch"]]  # CSVLogger counts from 0; people count from 1
    base = monitor[4:] if monitor.startswith("val_") else monitor
    metrics = [c for c in hist if c not in ("epoch", "lr", "learning_rate") and not c.startswith("val_")
               and "loss" not in c]
    metric = base if "loss" not in base else (metrics[0] if metrics else None)

    panels = [metric, "loss"] if metric else ["loss"]
    fig = _new_figure((5.5 * len(panels), 4))
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, name in zip(axes[0], panels):
        for col, style in ((name, "-"), (f"val_{name}", "--")):
            if col in hist:
                ax.plot(epochs, hist[col], style, marker="o", markersize=3, label=col)
        if monitor in (name, f"val_{name}"):
            ax.plot([epochs[best]], [hist[monitor][best]], "r*", markersize=12,
                    label=f"best {monitor}={hist[monitor][best]:.4f}")
        ax.axvline(epochs[best], color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"best epoch {epochs[best]} ({monitor}, {mode})")
    fig.tight_layout()
    return _save_figure(fig, out_png)


# ---------------------------------------------------------------------------------------------
# Prediction panels
# ---------------------------------------------------------------------------------------------
def to_rgb(image: np.ndarray) -> np.ndarray:
    """uint8 RGB [H, W, 3] from an image [H, W], [H, W, 1], [H, W, 3] or [H, W, 4].

    Float images are taken as 0..255 when their maximum exceeds 1, else as 0..1.
    """
    img = np.asarray(image)
    if img.ndim == 2:
        img = img[..., None]
    if img.ndim != 3 or img.shape[-1] not in (1, 3, 4):
        raise DataError(f"image of shape {img.shape}. Expected [H, W], [H, W, 1], [H, W, 3] or [H, W, 4].")
    if img.dtype != np.uint8:
        img = img.astype(np.float32)
        scale = 1.0 if img.size and float(np.nanmax(img)) > 1.0 else 255.0
        img = np.clip(np.nan_to_num(img) * scale, 0, 255).astype(np.uint8)
    if img.shape[-1] == 1:
        img = np.repeat(img, 3, axis=-1)
    return np.ascontiguousarray(img[..., :3])


def contour(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels of a label mask: bool [H, W], True where a 4-neighbour has another label
    and the pixel itself is foreground (label != 0)."""
    m = np.asarray(mask)
    if m.ndim == 3 and m.shape[-1] == 1:
        m = m[..., 0]
    edge = np.zeros(m.shape, dtype=bool)
    edge[1:, :] |= m[1:, :] != m[:-1, :]
    edge[:-1, :] |= m[:-1, :] != m[1:, :]
    edge[:, 1:] |= m[:, 1:] != m[:, :-1]
    edge[:, :-1] |= m[:, :-1] != m[:, 1:]
    return edge & (m != 0)


def overlay(image: np.ndarray, prediction: np.ndarray, truth: np.ndarray | None = None,
            alpha: float = 0.35) -> np.ndarray:
    """The image with the prediction tinted and contoured (green) and the truth contoured (red).

    Args:
        image: [H, W] / [H, W, C] image (uint8 0..255 or float).
        prediction: [H, W] class indices (0 = background) or a bool/0-1 mask.
        truth: optional [H, W] reference mask, same convention.
        alpha: opacity of the prediction tint.

    Returns:
        uint8 RGB [H, W, 3].
    """
    rgb = to_rgb(image).astype(np.float32)
    pred = _mask2d(prediction, rgb.shape[:2], "prediction")
    colour = np.asarray(PREDICTION_COLOR, dtype=np.float32)
    fg = pred != 0
    rgb[fg] = (1 - alpha) * rgb[fg] + alpha * colour
    out = rgb.astype(np.uint8)
    out[contour(pred)] = PREDICTION_COLOR
    if truth is not None:
        out[contour(_mask2d(truth, rgb.shape[:2], "truth"))] = TRUTH_COLOR
    return out


def panel(image: np.ndarray, prediction: np.ndarray, truth: np.ndarray | None = None,
          title: str | None = None, probability: np.ndarray | None = None, dpi: int = 80) -> np.ndarray:
    """A row of pictures: image | truth (if known) | prediction (or probability) | overlay.

    Args:
        image: [H, W] or [H, W, C] image.
        prediction: [H, W] class indices or 0/1 mask.
        truth: optional [H, W] reference mask.
        title: optional figure title (e.g. the image id and its Dice).
        probability: optional float [H, W] in 0..1, shown instead of the hard prediction.
        dpi: resolution of the rendering (each picture is about 4 inches wide).

    Returns:
        uint8 RGB [h, w, 3] of the rendered figure (ready for a PNG or ``tf.summary.image``).
    """
    rgb = to_rgb(image)
    pred = _mask2d(prediction, rgb.shape[:2], "prediction")
    gt = None if truth is None else _mask2d(truth, rgb.shape[:2], "truth")
    classes = int(max(pred.max(initial=0), 0 if gt is None else gt.max(initial=0), 1))
    cells = [("image", rgb, None)]
    if gt is not None:
        cells.append(("truth", gt, classes))
    if probability is not None:
        cells.append(("probability", np.asarray(probability, dtype=np.float32), 1.0))
    else:
        cells.append(("prediction", pred, classes))
    cells.append(("overlay (green: prediction, red: truth)" if gt is not None else "overlay",
                  overlay(rgb, pred, gt), None))
    aspect = rgb.shape[0] / max(rgb.shape[1], 1)
    width = 4.0
    fig = _new_figure((width * len(cells), width * aspect + 0.6))
    axes = fig.subplots(1, len(cells), squeeze=False)
    for ax, (name, data, vmax) in zip(axes[0], cells):
        if vmax is None:
            ax.imshow(data)
        else:
            ax.imshow(data, cmap="gray" if vmax == 1 else "tab20", vmin=0, vmax=vmax, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _figure_to_array(fig, dpi)


def save_panel(path: str | os.PathLike, image: np.ndarray, prediction: np.ndarray,
               truth: np.ndarray | None = None, title: str | None = None,
               probability: np.ndarray | None = None) -> Path:
    """Render :func:`panel` and write it as a PNG atomically. Returns the path."""
    return save_rgb(path, panel(image, prediction, truth, title=title, probability=probability))


def save_rgb(path: str | os.PathLike, rgb: np.ndarray) -> Path:
    """Write a uint8 RGB/gray array as a PNG atomically. Returns the path."""
    with atomic_path(path) as tmp:
        Image.fromarray(np.asarray(rgb)).save(tmp, format="PNG")
    return Path(path)


def grid(pictures: list[np.ndarray], columns: int = 1) -> np.ndarray:
    """Stack RGB pictures [h_i, w_i, 3] into one uint8 grid (padded with white)."""
    if not pictures:
        raise DataError("grid: no pictures. Expected at least one [H, W, 3] array.")
    rows = math.ceil(len(pictures) / columns)
    h = max(p.shape[0] for p in pictures)
    w = max(p.shape[1] for p in pictures)
    out = np.full((rows * h, columns * w, 3), 255, dtype=np.uint8)
    for i, pic in enumerate(pictures):
        r, c = divmod(i, columns)
        out[r * h:r * h + pic.shape[0], c * w:c * w + pic.shape[1]] = pic[..., :3]
    return out


def _mask2d(mask: np.ndarray, shape: tuple[int, int], name: str) -> np.ndarray:
    m = np.asarray(mask)
    if m.ndim == 3 and m.shape[-1] == 1:
        m = m[..., 0]
    if m.shape != tuple(shape):
        raise DataError(f"{name} mask of shape {m.shape}. Expected {tuple(shape)}, "
                        "the image's height and width.")
    if m.dtype == bool:
        return m.astype(np.uint8)
    if np.issubdtype(m.dtype, np.floating):
        return (m > 0.5).astype(np.uint8) if m.max(initial=0) <= 1.0 else m.astype(np.int32)
    return m


def _new_figure(figsize: tuple[float, float]) -> Figure:
    """A Figure drawn by its own Agg canvas: no pyplot state, nothing to close."""
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def _figure_to_array(fig: Figure, dpi: int) -> np.ndarray:
    fig.set_dpi(dpi)
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    return np.array(rgba[..., :3])


def _save_figure(fig: Figure, out_png: str | os.PathLike, dpi: int = 100) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    with atomic_path(out_png) as tmp:
        tmp.write_bytes(buf.getvalue())
    return Path(out_png)
