"""Property tests (hypothesis): pooling against brute force on random rasters, masks and points;
the int8 quantization round trip and its error bound; ranking and suppression invariants."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aether.geo.alphaearth import NODATA_INT8, dequantize, quantize
from aether.geo.pooling import pool_points
from aether.geo.raster import open_raster
from aether.retrieval.search import TopCandidates
from aether.retrieval.topk import non_max_suppression
from tests.helpers.fixtures import ORIGIN, brute_force, stored_values, unit_field, write_raster

PIXEL_M = 10.0
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---- pooling --------------------------------------------------------------------------------


@FAST
@given(
    height=st.integers(3, 24),
    width=st.integers(3, 24),
    bands=st.integers(1, 8),
    radius_px=st.integers(0, 6),
    dtype=st.sampled_from(["int8", "float32"]),
    hole_fraction=st.floats(0.0, 0.9),
    bottom_up=st.booleans(),
    chunk_px=st.sampled_from([4, 8, 1024]),
    seed=st.integers(0, 2**16),
)
def test_pooling_equals_brute_force(height, width, bands, radius_px, dtype, hole_fraction, bottom_up, chunk_px, seed):
    rng = np.random.default_rng(seed)
    values = unit_field(height, width, bands=bands, seed=seed, smooth=2)
    values[:, rng.random((height, width)) < hole_fraction] = np.nan
    n = 30
    # points anywhere on the raster and a margin around it (some fall off)
    x = ORIGIN[0] + rng.uniform(-2, width + 2, n) * PIXEL_M
    y = ORIGIN[1] - rng.uniform(-2, height + 2, n) * PIXEL_M
    with tempfile.TemporaryDirectory() as tmp:
        path = write_raster(
            Path(tmp) / "ae.tif",
            values,
            dtype=dtype,
            nodata=None if dtype == "int8" else -9999.0,
            bottom_up=bottom_up,
            block=16 if height >= 16 and width >= 16 else None,
        )
        info = open_raster(str(path), n_bands=bands)
        stored, invalid = stored_values(path)  # file row order, as info.rowcol gives
        pooled = pool_points(info, x, y, [radius_px * PIXEL_M + 0.5], chunk_px=chunk_px)
    rows, cols = info.rowcol(x, y)
    inside = (rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)
    np.testing.assert_array_equal(pooled.inside, inside)
    for i in np.flatnonzero(inside):
        with np.errstate(invalid="ignore"):
            expected = brute_force(stored, invalid, rows[i], cols[i], radius_px, radius_px)
        usable = expected is not None and np.isfinite(expected).all()  # a window may also sum to zero
        assert pooled.valid[i] == usable
        if usable:
            np.testing.assert_allclose(pooled.views[0][i], expected, atol=3e-6)
            assert abs(np.linalg.norm(pooled.views[0][i]) - 1) < 1e-5
    assert not pooled.valid[~inside].any()


# ---- int8 quantization ------------------------------------------------------------------------


@given(st.lists(st.floats(-1.0, 1.0, allow_nan=False), min_size=1, max_size=200))
def test_quantization_round_trip_error_bound(xs):
    """|decode(encode(x)) - x| <= (2 sqrt|x| + 1/255) / 255: codes are rounded in sqrt space,
    so the error is largest near |x| = 1 (1/127.5) and vanishes near 0."""
    x = np.asarray(xs, dtype=np.float32)
    q = quantize(x)
    assert q.dtype == np.int8 and (q != NODATA_INT8).all()
    back = dequantize(q).astype(np.float64)
    bound = (2 * np.sqrt(np.abs(x.astype(np.float64))) + 1 / 255) / 255 + 1e-7
    assert (np.abs(back - x) <= bound).all()
    assert (np.sign(back) * np.sign(x) >= 0).all()  # the sign survives (or becomes 0)


def test_every_code_is_a_fixed_point():
    codes = np.arange(-127, 128, dtype=np.int8)
    np.testing.assert_array_equal(quantize(dequantize(codes)), codes)


@given(st.integers(0, 2**16), st.integers(2, 128))
def test_quantized_unit_vectors_stay_near_unit_length(seed, dim):
    v = np.random.default_rng(seed).standard_normal(dim)
    v /= np.linalg.norm(v)
    back = dequantize(quantize(v)).astype(np.float64)
    # per component the error is at most (2 sqrt|v_i| + 1/255) / 255; summed in quadrature
    bound = np.sqrt((((2 * np.sqrt(np.abs(v)) + 1 / 255) / 255) ** 2).sum())
    assert abs(np.linalg.norm(back) - 1) <= bound + 1e-7


# ---- ranking and suppression --------------------------------------------------------------------

points = st.integers(1, 60).flatmap(
    lambda n: st.tuples(
        st.lists(st.floats(-1, 1, allow_nan=False, width=32), min_size=n, max_size=n, unique=True),
        st.lists(st.integers(0, 40), min_size=n, max_size=n),
        st.lists(st.integers(0, 40), min_size=n, max_size=n),
    )
)


@settings(max_examples=50, deadline=None)
@given(points, st.integers(1, 12), st.sampled_from([0.0, 1.0, 2.5, 7.0]))
def test_suppression_invariants(pts, k, radius):
    scores, xs, ys = (np.asarray(a, dtype=np.float64) for a in pts)
    chosen = non_max_suppression(scores, xs, ys, k, radius)
    assert len(chosen) <= k and len(set(chosen.tolist())) == len(chosen)
    assert (np.diff(scores[chosen]) <= 0).all()  # best first
    for a in range(len(chosen)):
        for b in range(a):
            assert np.hypot(*(np.array([xs, ys])[:, chosen[a]] - np.array([xs, ys])[:, chosen[b]])) >= radius
    if len(chosen) < k:  # maximal: every other point lies within the radius of a better chosen one
        for i in set(range(len(scores))) - set(chosen.tolist()):
            d = np.hypot(xs[chosen] - xs[i], ys[chosen] - ys[i])
            assert ((d < radius) & (scores[chosen] >= scores[i])).any()
    # order of the input and any increasing map of the scores do not matter
    perm = np.random.default_rng(len(scores)).permutation(len(scores))
    again = non_max_suppression(scores[perm], xs[perm], ys[perm], k, radius)
    np.testing.assert_array_equal(perm[again], chosen)
    np.testing.assert_array_equal(non_max_suppression(3 * scores, xs, ys, k, radius), chosen)


@given(st.integers(0, 2**16), st.integers(1, 6), st.integers(0, 3), st.integers(1, 5))
def test_streamed_top_candidates_give_the_global_answer(seed, k, radius_px, n_tiles):
    """What retrieve keeps tile by tile (the best k * (D + 1) pixels) always holds the exact hits."""
    rng = np.random.default_rng(seed)
    h, w = 20, 24
    scores = rng.standard_normal((h, w)).astype(np.float32)
    scores[rng.random((h, w)) < 0.1] = np.nan
    rows, cols = np.mgrid[:h, :w]
    keep = k * ((2 * radius_px + 1) ** 2 + 1)
    cands = TopCandidates(keep)
    for part in np.array_split(np.arange(h * w), n_tiles):
        cands.add(scores.reshape(-1)[part], rows.reshape(-1)[part], cols.reshape(-1)[part])
    s, r, c = cands.final()
    streamed = non_max_suppression(s.astype(np.float64), c.astype(float), r.astype(float), k, float(radius_px))
    ok = np.isfinite(scores.reshape(-1))
    full = non_max_suppression(
        scores.reshape(-1)[ok].astype(np.float64),
        cols.reshape(-1)[ok].astype(float),
        rows.reshape(-1)[ok].astype(float),
        k,
        float(radius_px),
    )
    got = sorted(zip(r[streamed].tolist(), c[streamed].tolist()))
    want = sorted(zip(rows.reshape(-1)[ok][full].tolist(), cols.reshape(-1)[ok][full].tolist()))
    assert got == want
