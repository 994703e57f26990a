"""Pictures: training curves from a CSVLogger file, contours, overlays and prediction panels."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tests.conftest import shared_path
from tfseg import viz
from tfseg.errors import DataError, RunError

HISTORY = """epoch,dice,loss,val_dice,val_loss
0,0.40,0.90,0.35,0.95
1,0.60,0.60,0.58,0.70
2,0.75,0.40,0.71,0.52
3,0.80,0.30,0.69,0.55
"""


def test_plot_curves_writes_png_and_marks_best(tmp_path):
    csv = tmp_path / "history.csv"
    csv.write_text(HISTORY)
    out = viz.plot_curves(csv, tmp_path / "sub" / "curves.png", monitor="val_dice", mode="max")
    img = np.asarray(Image.open(out))
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 400
    assert viz.best_epoch(viz.read_history(csv)["val_dice"], "max") == 2
    assert viz.best_epoch(viz.read_history(csv)["val_loss"], "min") == 2
    # the loss as monitor: still draws the first metric beside it
    viz.plot_curves(csv, tmp_path / "loss.png", monitor="val_loss", mode="min")
    assert not list(tmp_path.glob(".*.tmp*")), "no temporary file left behind"


def test_plot_curves_errors(tmp_path):
    with pytest.raises(RunError, match="history file not found"):
        viz.plot_curves(tmp_path / "nope.csv", tmp_path / "c.png")
    csv = tmp_path / "history.csv"
    csv.write_text(HISTORY)
    with pytest.raises(RunError, match="no column 'val_iou'.*val_dice"):
        viz.plot_curves(csv, tmp_path / "c.png", monitor="val_iou")
    bad = tmp_path / "bad.csv"
    bad.write_text("epoch,loss\n0,abc\n")
    with pytest.raises(RunError, match=r"bad.csv:2: column 'loss'"):
        viz.read_history(bad)
    assert not (tmp_path / "c.png").exists()


def test_contour_is_the_boundary_of_a_square():
    mask = np.zeros((10, 10), np.uint8)
    mask[2:8, 3:9] = 1
    edge = viz.contour(mask)
    assert edge.sum() == 2 * 6 + 2 * 4  # perimeter of a 6x6 square, corners once
    assert not edge[4:6, 5:7].any() and edge[2, 3] and edge[7, 8]
    assert not viz.contour(np.zeros((5, 5), np.uint8)).any()


def test_overlay_colours_prediction_and_truth():
    image = np.full((12, 12), 100, np.uint8)
    pred = np.zeros((12, 12), np.uint8)
    pred[2:6, 2:6] = 1
    truth = np.zeros((12, 12), np.uint8)
    truth[7:11, 7:11] = 1
    out = viz.overlay(image, pred, truth)
    assert out.shape == (12, 12, 3) and out.dtype == np.uint8
    assert tuple(out[2, 2]) == viz.PREDICTION_COLOR
    assert tuple(out[7, 7]) == viz.TRUTH_COLOR
    assert tuple(out[0, 0]) == (100, 100, 100)
    assert out[3, 3, 1] > out[3, 3, 0]  # tinted green inside


def test_panel_on_real_image(tmp_path):
    img = np.asarray(Image.open(shared_path("isbi2012_em_membrane", "images", "0.png")))[:128, :160]
    mask = (np.asarray(Image.open(shared_path("isbi2012_em_membrane", "masks", "0.png")))[:128, :160] > 127)
    pred = np.roll(mask, 3, axis=1).astype(np.uint8)
    with_truth = viz.panel(img, pred, mask, title="0.png dice=0.9")
    without = viz.panel(img, pred)
    assert with_truth.dtype == np.uint8 and with_truth.shape[-1] == 3
    assert with_truth.shape[1] > without.shape[1]  # four pictures against three
    out = viz.save_panel(tmp_path / "p.png", img, pred, mask, probability=pred * 0.8)
    assert np.asarray(Image.open(out)).shape[-1] in (3, 4)


def test_panel_rejects_mismatched_mask():
    with pytest.raises(DataError, match=r"prediction mask of shape \(4, 4\)"):
        viz.panel(np.zeros((8, 8, 3), np.uint8), np.zeros((4, 4), np.uint8))
    with pytest.raises(DataError, match="Expected"):
        viz.to_rgb(np.zeros((8, 8, 2)))


def test_grid():
    a = np.zeros((4, 5, 3), np.uint8)
    b = np.zeros((6, 3, 3), np.uint8)
    assert viz.grid([a, b, a], columns=2).shape == (12, 10, 3)
