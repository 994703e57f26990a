"""Windows over huge images: tile positions, TIFF windows (strip, tiled BigTIFF, channels-first,
gray), windowed RLE against rle.decode, tile reduction and the tissue rule, and the hubmap source
on generated TIFFs (tiles, masks, background dropping, memory held while reading)."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import tifffile

from tfseg import rle
from tfseg.config import DataConfig
from tfseg.data.sources import list_entries, read_entry
from tfseg.data.tiling import (
    RunLengthMask,
    TiffWindows,
    axis_starts,
    reduce_image,
    reduce_mask,
    tile_positions,
    tissue_fraction,
)
from tfseg.errors import DataError

# --- tile positions ----------------------------------------------------------------------------


@pytest.mark.parametrize("size,tile,overlap", [(1000, 256, 0), (1000, 256, 64), (256, 256, 32),
                                               (100, 256, 0), (1025, 256, 255), (5000, 1024, 128)])
def test_axis_starts_cover_with_overlap(size, tile, overlap):
    starts = axis_starts(size, tile, overlap)
    assert starts[0] == 0 and starts == sorted(set(starts))
    covered = np.zeros(size, bool)
    for s in starts:
        covered[s:s + tile] = True
    assert covered.all()
    if size >= tile:
        assert starts[-1] + tile == size  # last tile ends at the edge: no padding
        assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))
    else:
        assert starts == [0]


def test_tile_positions_row_by_row_and_bad_overlap():
    assert tile_positions(300, 500, 256, 0) == [(0, 0), (0, 244), (44, 0), (44, 244)]
    with pytest.raises(DataError, match="overlap=256 with tile=256"):
        tile_positions(300, 500, 256, 256)


# --- windowed RLE --------------------------------------------------------------------------------


@pytest.mark.parametrize("order", ["row", "column"])
def test_run_length_mask_windows_equal_full_decode(order):
    rng = np.random.default_rng(1)
    h, w = 37, 53
    mask = np.zeros((h, w), np.uint8)
    for _ in range(12):
        y, x = rng.integers(0, h), rng.integers(0, w)
        mask[y:y + rng.integers(1, 20), x:x + rng.integers(1, 30)] = 1
    mask[-3:, 10:12] = 1  # column-major runs that wrap from one column's bottom into the next
    mask[:4, 11:13] = 1
    mask[5, :] = 1  # row-major run across the whole width, joined with the next row
    mask[6, :7] = 1
    code = rle.encode(mask, order)
    windows = RunLengthMask(rle.parse(code), (h, w), order=order)
    full = rle.decode(code, (h, w), order)
    for _ in range(200):
        y, x = int(rng.integers(-5, h)), int(rng.integers(-5, w))
        y, x = max(y, 0), max(x, 0)
        th, tw = int(rng.integers(1, 40)), int(rng.integers(1, 40))
        expected = np.zeros((th, tw), np.uint8)
        part = full[y:y + th, x:x + tw]
        expected[:part.shape[0], :part.shape[1]] = part
        np.testing.assert_array_equal(windows.window(y, x, th, tw), expected)


def test_run_length_mask_rejects_runs_outside():
    with pytest.raises(DataError, match=r"train.csv\[a\]: a run ends at pixel 21 past the 4x5=20 pixels"):
        RunLengthMask(rle.parse("18 4"), (4, 5), where="train.csv[a]")
    with pytest.raises(DataError, match="below pixel 1"):
        RunLengthMask(rle.parse("0 4"), (4, 5))
    assert not RunLengthMask(rle.parse(""), (4, 5)).window(0, 0, 4, 5).any()


# --- TIFF windows, reduction, tissue ---------------------------------------------------------------


def test_tiff_windows_layouts(tmp_path):
    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 256, (300, 410, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "strip.tif", rgb)
    tifffile.imwrite(tmp_path / "tiled.tif", rgb.transpose(2, 0, 1)[None, None], bigtiff=True,
                     tile=(64, 64), compression="zlib", photometric="rgb", planarconfig="separate")
    tifffile.imwrite(tmp_path / "gray.tif", rgb[..., 0])
    for name, expect in (("strip.tif", rgb), ("tiled.tif", rgb), ("gray.tif", rgb[..., :1])):
        with TiffWindows(tmp_path / name) as tiff:
            assert (tiff.height, tiff.width, tiff.channels) == (300, 410, expect.shape[-1])
            np.testing.assert_array_equal(tiff.read(50, 100, 64, 128), expect[50:114, 100:228])
            edge = tiff.read(280, 400, 32, 32)  # zero-padded past the edges
            np.testing.assert_array_equal(edge[:20, :10], expect[280:, 400:])
            assert not edge[20:].any() and not edge[:, 10:].any()
    (tmp_path / "bad.tif").write_bytes(b"II*\x00garbage")
    with pytest.raises(DataError, match=r"bad.tif: cannot read TIFF"):
        TiffWindows(tmp_path / "bad.tif")


def test_reduce_and_tissue_rule():
    tile = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3)
    np.testing.assert_array_equal(reduce_image(tile, 2)[0, 0], np.round(tile[:2, :2].mean(axis=(0, 1))))
    mask = np.array([[1, 1, 0, 0], [0, 0, 0, 1], [1, 1, 1, 0], [1, 1, 0, 0]], np.uint8)
    assert reduce_mask(mask, 2).tolist() == [[1, 0], [1, 0]]  # at least half of the block
    with pytest.raises(DataError, match="cannot be reduced by 3"):
        reduce_image(tile, 3)
    pink, white, black = (200, 100, 150), (240, 240, 240), (0, 0, 0)
    t = np.zeros((10, 10, 3), np.uint8)
    t[:] = white
    t[:3] = pink
    t[9] = black
    assert tissue_fraction(t, 40) == pytest.approx(0.3)  # S(pink) = 127 > 40, white and black S = 0
    assert tissue_fraction(t, 130) == 0.0
    dark = np.full((4, 4, 3), (15, 2, 2), np.uint8)  # saturated but too dark to be tissue
    assert tissue_fraction(dark, 40) == 0.0


# --- hubmap source ------------------------------------------------------------------------------


def _hubmap(tmp_path, h=1100, w=1300, tiled=False):
    image = np.empty((h, w, 3), np.uint8)
    image[:] = (240, 240, 240)  # glass
    image[:, :600] = (200, 100, 150)  # tissue on the left
    mask = np.zeros((h, w), np.uint8)
    mask[100:300, 50:400] = 1
    mask[1000:, 240:260] = 1  # runs that wrap from a column's bottom into the next one
    mask[:40, 241:261] = 1
    mask[500:520, 550:700] = 1
    (tmp_path / "train").mkdir()
    tifffile.imwrite(tmp_path / "train" / "aaa.tiff", image)
    if tiled:
        tifffile.imwrite(tmp_path / "train" / "bbb.tiff", image.transpose(2, 0, 1)[None, None],
                         bigtiff=True, tile=(256, 256), compression="zlib", photometric="rgb",
                         planarconfig="separate")
    rows = ["id,encoding", f"aaa,{rle.encode(mask, 'column')}"]
    if tiled:
        rows.append(f"bbb,{rle.encode(mask, 'column')}")
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    return image, mask


def test_hubmap_tiles_masks_and_background(tmp_path):
    image, mask = _hubmap(tmp_path, tiled=True)
    cfg = DataConfig(source="hubmap", root=str(tmp_path), classes=1, tile_size=256, tile_overlap=32)
    entries = list_entries(cfg)
    assert [(e.id, e.group) for e in entries] == [("aaa", "aaa"), ("bbb", "bbb")]
    tiles = list(read_entry(cfg, entries[0]))
    positions = tile_positions(1100, 1300, 256, 32)
    tissue = {(y, x): max(0, min(x + 256, 600) - x) / 256 for y, x in positions}
    assert [t.id for t in tiles] == [f"aaa_{y}_{x}" for (y, x) in positions if tissue[y, x] >= 0.05]
    assert 0 < len(tiles) < len(positions)
    for t in tiles:
        y, x = map(int, t.id.split("_")[1:])
        assert t.group == "aaa" and t.image.shape == (256, 256, 3) and t.mask.shape == (256, 256)
        np.testing.assert_array_equal(t.image, image[y:y + 256, x:x + 256])
        np.testing.assert_array_equal(t.mask, mask[y:y + 256, x:x + 256])
        assert t.label == int(mask[y:y + 256, x:x + 256].any())
    assert any(t.label == 1 for t in tiles) and any(t.label == 0 for t in tiles)
    # the tiled, channels-first BigTIFF gives the same tiles
    other = list(read_entry(cfg, entries[1]))
    assert [t.id.replace("bbb", "aaa") for t in other] == [t.id for t in tiles]
    for a, b in zip(tiles, other):
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.mask, b.mask)
    keep_all = DataConfig(source="hubmap", root=str(tmp_path), classes=1, tile_size=256, tile_overlap=32,
                          tile_min_tissue=0.0)
    assert len(list(read_entry(keep_all, entries[0]))) == len(positions)


def test_hubmap_reduce_and_gray(tmp_path):
    image, mask = _hubmap(tmp_path)
    cfg = DataConfig(source="hubmap", root=str(tmp_path), classes=1, channels=1, tile_size=512,
                     tile_reduce=4)
    tiles = list(read_entry(cfg, list_entries(cfg)[0]))
    assert tiles and all(t.image.shape == (128, 128, 1) and t.mask.shape == (128, 128) for t in tiles)
    first = tiles[0]
    assert first.id == "aaa_0_0"
    np.testing.assert_array_equal(first.mask, reduce_mask(mask[:512, :512], 4))
    pink_luma = round(0.299 * 200 + 0.587 * 100 + 0.114 * 150)
    assert first.image[0, 0, 0] == pink_luma
    bad = DataConfig(source="hubmap", root=str(tmp_path), classes=1, tile_size=500, tile_reduce=3)
    with pytest.raises(DataError, match="tile_size=500 is not divisible by data.tile_reduce=3"):
        list(read_entry(bad, list_entries(bad)[0]))


def test_hubmap_errors(tmp_path):
    _hubmap(tmp_path)
    tifffile.imwrite(tmp_path / "train" / "ccc.tiff", np.zeros((64, 64, 3), np.uint8))
    cfg = DataConfig(source="hubmap", root=str(tmp_path), classes=1, tile_size=256)
    with pytest.raises(DataError, match=r"train.csv: no row for image ccc.tiff"):
        list_entries(cfg)
    (tmp_path / "train" / "ccc.tiff").unlink()
    (tmp_path / "train.csv").write_text("id,encoding\naaa,1 2000000\n")
    with pytest.raises(DataError, match=r"train.csv\[aaa\]: a run ends at pixel 2000000 past the 1100x1300"):
        list(read_entry(cfg, list_entries(cfg)[0]))
    (tmp_path / "train.csv").write_text("name,mask\naaa,1 2\n")
    with pytest.raises(DataError, match=r"train.csv: columns \['name', 'mask'\]. Expected an id column"):
        list_entries(cfg)


def test_hubmap_reads_windows_not_the_whole_image(tmp_path):
    h = w = 3000
    image = np.empty((h, w, 3), np.uint8)
    image[:] = (200, 100, 150)
    mask = np.zeros((h, w), np.uint8)
    yy, xx = np.mgrid[-80:80, -80:80]
    disk = (yy ** 2 + xx ** 2 < 80 ** 2).astype(np.uint8)
    for cy, cx in np.random.default_rng(3).integers(80, 2920, (40, 2)):  # glomerulus-like disks
        mask[cy - 80:cy + 80, cx - 80:cx + 80] |= disk
    (tmp_path / "train").mkdir()
    tifffile.imwrite(tmp_path / "train" / "big.tiff", image, bigtiff=True, tile=(256, 256))
    (tmp_path / "train.csv").write_text(f"id,encoding\nbig,{rle.encode(mask, 'column')}\n")
    whole = image.nbytes  # 27 MB as uint8 (108 MB as float32)
    del image
    cfg = DataConfig(source="hubmap", root=str(tmp_path), classes=1, tile_size=512, tile_min_tissue=0.0)
    entry = list_entries(cfg)[0]
    tracemalloc.start()
    try:
        count, fg = 0, 0
        for tile in read_entry(cfg, entry):
            count += 1
            fg += int(tile.mask.sum())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 36
    assert fg > 0
    assert peak < whole / 2, f"peak {peak / 1e6:.1f} MB while reading tiles of a {whole / 1e6:.0f} MB image"
