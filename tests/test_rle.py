"""Run-length encoding: round trips in both pixel orders and agreement with the competitions'
published reference functions (re-typed here from the Carvana and HuBMAP kernels)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from tests.conftest import shared_path
from tfseg import rle
from tfseg.errors import DataError


# --- reference implementations, re-typed from the competitions' published kernels -------------
def carvana_rle_encode(img):
    """Carvana forum reference: row-major pixels.flatten(), 1-based, 'start length' pairs."""
    pixels = img.flatten()
    pixels = np.concatenate([[0], pixels, [0]])
    runs = np.where(pixels[1:] != pixels[:-1])[0] + 1
    runs[1::2] -= runs[::2]
    return " ".join(str(x) for x in runs)


def hubmap_rle_encode_less_memory(img):
    """HuBMAP reference: column-major (img.T.flatten()), 1-based."""
    pixels = img.T.flatten()
    pixels[0] = 0
    pixels[-1] = 0
    runs = np.where(pixels[1:] != pixels[:-1])[0] + 2
    runs[1::2] -= runs[::2]
    return " ".join(str(x) for x in runs)


def hubmap_rle_decode(mask_rle, shape):
    """HuBMAP reference decoder (the Kaggle kernels' rle2mask): column-major."""
    s = mask_rle.split()
    starts, lengths = [np.asarray(x, dtype=int) for x in (s[0:][::2], s[1:][::2])]
    starts -= 1
    ends = starts + lengths
    img = np.zeros(shape[0] * shape[1], dtype=np.uint8)
    for lo, hi in zip(starts, ends):
        img[lo:hi] = 1
    return img.reshape(shape[::-1]).T


masks = st.tuples(st.integers(1, 12), st.integers(1, 12)).flatmap(
    lambda hw: arrays(np.uint8, hw, elements=st.integers(0, 1)))


@settings(max_examples=150, deadline=None)
@given(mask=masks, order=st.sampled_from(rle.ORDERS))
def test_round_trip_random_masks(mask, order):
    text = rle.encode(mask, order)
    np.testing.assert_array_equal(rle.decode(text, mask.shape, order), mask)
    if not mask.any():
        assert text == ""


@settings(max_examples=100, deadline=None)
@given(mask=masks)
def test_row_order_matches_carvana_reference(mask):
    assert rle.encode(mask, "row") == carvana_rle_encode(mask)


@settings(max_examples=100, deadline=None)
@given(mask=masks)
def test_column_order_matches_hubmap_reference(mask):
    text = rle.encode(mask, "column")
    # The less-memory reference zeroes the first and last pixel; compare on masks where they are 0.
    inner = mask.copy()
    inner.T.flat[0] = 0
    inner.T.flat[-1] = 0
    assert rle.encode(inner, "column") == hubmap_rle_encode_less_memory(inner.copy())
    if text:
        np.testing.assert_array_equal(hubmap_rle_decode(text, mask.shape), mask)


def test_orders_differ_and_are_1_based():
    mask = np.array([[1, 1, 0], [0, 0, 0]], dtype=np.uint8)
    assert rle.encode(mask, "row") == "1 2"
    assert rle.encode(mask, "column") == "1 1 3 1"
    np.testing.assert_array_equal(rle.decode("1 1 3 1", (2, 3), "column"), mask)
    assert rle.decode("", (2, 3)).sum() == 0
    assert rle.decode(float("nan"), (2, 3)).sum() == 0
    assert rle.decode("2 2", (2, 3), value=255).max() == 255


@pytest.mark.parametrize("view", ["01", "09"])
def test_real_carvana_masks_round_trip(view):
    path = shared_path("carvana_sample", "masks", f"0cdf5b5d0ce1_{view}_mask.png")
    mask = (np.asarray(Image.open(path).convert("L")) > 127).astype(np.uint8)
    assert 0 < mask.mean() < 1
    for order in rle.ORDERS:
        text = rle.encode(mask, order)
        np.testing.assert_array_equal(rle.decode(text, mask.shape, order), mask)
    assert rle.encode(mask, "row") == carvana_rle_encode(mask)
    np.testing.assert_array_equal(hubmap_rle_decode(rle.encode(mask, "column"), mask.shape), mask)


def test_real_isbi_mask_round_trip():
    path = shared_path("isbi2012_em_membrane", "masks", "0.png")
    mask = (np.asarray(Image.open(path).convert("L")) > 127).astype(np.uint8)
    for order in rle.ORDERS:
        np.testing.assert_array_equal(rle.decode(rle.encode(mask, order), mask.shape, order), mask)


@pytest.mark.parametrize(("text", "shape", "order", "match"), [
    ("1 2 3", (2, 2), "row", "pairs"),
    ("1 x", (2, 2), "row", "non-integer"),
    ("3 5", (2, 2), "row", "past the"),
    ("0 1", (2, 2), "row", "start below 1"),
    ("1 1", (2, 2), "diagonal", "Expected one of"),
    ("1 1", (0, 2), "row", "positive"),
])
def test_bad_rle_raises_one_line(text, shape, order, match):
    with pytest.raises(DataError, match=match) as info:
        rle.decode(text, shape, order)
    assert "\n" not in str(info.value)


def test_encode_rejects_3d():
    with pytest.raises(DataError, match="2-D"):
        rle.encode(np.zeros((2, 2, 1)), "row")


@settings(max_examples=60, deadline=None)
@given(mask=masks, order=st.sampled_from(rle.ORDERS), chunk=st.integers(1, 40))
def test_chunked_scan_equals_one_pass(mask, order, chunk):
    np.testing.assert_array_equal(rle.runs(mask, order, chunk_pixels=chunk), rle.runs(mask, order))
    assert rle.runs(mask, order).dtype == np.int64


@settings(max_examples=150, deadline=None)
@given(mask=masks, order=st.sampled_from(rle.ORDERS), cuts=st.lists(st.integers(0, 12), max_size=4))
def test_bands_of_rows_encode_as_the_references(mask, order, cuts):
    """A mask streamed as row bands (any split, empty bands too) encodes as the references do."""
    edges = sorted({0, mask.shape[0], *(c for c in cuts if c <= mask.shape[0])})
    bands = [(a, mask[a:b]) for a, b in zip(edges[:-1], edges[1:])]
    text = rle.format_runs(rle.runs_from_bands(iter(bands), *mask.shape, order))
    # column-major is row-major of the transpose (the HuBMAP kernel zeroes the corner pixels)
    assert text == carvana_rle_encode(mask if order == "row" else mask.T)


def test_real_mask_bands_encode_column_major_as_the_whole_mask():
    mask = np.asarray(Image.open(shared_path("isbi2012_em_membrane", "masks", "0.png")))
    bands = ((y, mask[y:y + 37]) for y in range(0, mask.shape[0], 37))
    assert rle.format_runs(rle.runs_from_bands(bands, *mask.shape, "column")) == rle.encode(mask, "column") \
        == carvana_rle_encode((mask.T > 0).astype(np.uint8))


def test_bands_out_of_order_or_short_raise_one_line():
    mask = np.ones((4, 3), np.uint8)
    with pytest.raises(DataError, match="starting at row 2"):
        rle.runs_from_bands([(0, mask[:2]), (3, mask[3:])], 4, 3, "column")
    with pytest.raises(DataError, match=r"Expected \[h, 3\]"):
        rle.runs_from_bands([(0, mask[:, :2])], 4, 3)
    with pytest.raises(DataError, match="cover 2 rows. Expected 4"):
        rle.runs_from_bands([(0, mask[:2])], 4, 3, "column")


def test_parse_of_a_million_runs_allocates_little_beyond_the_result():
    """HuBMAP masks carry millions of numbers: parsing must not build a Python list of tokens."""
    import tracemalloc

    text = " ".join(f"{i * 4 + 1} 2" for i in range(1_000_000))
    tracemalloc.start()
    try:
        pairs = rle.parse(text)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert pairs.shape == (1_000_000, 2) and pairs[-1, 0] == 3_999_997
    assert peak < 2.5 * pairs.nbytes  # the old list-of-str parse peaked at about 8x
