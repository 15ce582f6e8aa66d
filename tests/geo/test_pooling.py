"""Window pooling against a brute-force masked mean, computed independently per point."""

import numpy as np
import pytest
from rasterio.transform import from_origin

from aether.geo.pooling import pool_points
from aether.geo.raster import BlockCache, metres_per_degree, open_raster
from tests.helpers.fixtures import ORIGIN, brute_force, stored_values, unit_field, write_raster, write_vrt_mosaic


def field_with_holes(height, width, seed=0):
    v = unit_field(height, width, seed=seed)
    v[:, 5:20, 20:35] = np.nan  # a nodata patch larger than the base window
    v[:, :, :2] = np.nan  # nodata along an edge
    return v


@pytest.mark.parametrize("dtype", ["int8", "float32", "float64"])
@pytest.mark.parametrize("bottom_up", [False, True])
@pytest.mark.parametrize("chunk_px", [8, 1024])
@pytest.mark.parametrize("unit_px", [16, 256])
def test_pooling_matches_brute_force(tmp_path, monkeypatch, dtype, bottom_up, chunk_px, unit_px):
    # unit_px 16: each chunk and its halo span several cached blocks, cut at odd rows and columns
    monkeypatch.setattr(BlockCache, "UNIT_PX", unit_px)
    height, width = 40, 50
    path = write_raster(
        tmp_path / "ae.tif",
        field_with_holes(height, width),
        dtype=dtype,
        nodata=None if dtype == "int8" else -9999.0,
        bottom_up=bottom_up,
        block=16,
    )
    info = open_raster(str(path))
    values, invalid = stored_values(path)
    rng = np.random.default_rng(1)
    # points everywhere, including on the edges and inside the nodata patch
    x = ORIGIN[0] + rng.uniform(0, width * 10, 200)
    y = ORIGIN[1] - rng.uniform(0, height * 10, 200)
    pooled = pool_points(info, x, y, [45, 95], chunk_px=chunk_px)
    rows, cols = info.rowcol(x, y)
    assert pooled.inside.all()
    for k, radius_px in enumerate([4, 9]):
        for i in range(len(x)):
            expected = brute_force(values, invalid, rows[i], cols[i], radius_px, radius_px)
            if expected is None:
                assert not pooled.valid[i]
                continue
            np.testing.assert_allclose(pooled.views[k][i], expected, atol=2e-6)
    assert (~pooled.valid).sum() > 0, "the nodata patch should leave some base windows empty"


def test_bottom_up_and_north_up_agree(tmp_path):
    v = unit_field(30, 30, seed=3)
    a = open_raster(str(write_raster(tmp_path / "n.tif", v)))
    b = open_raster(str(write_raster(tmp_path / "s.tif", v, bottom_up=True)))
    rng = np.random.default_rng(0)
    x = ORIGIN[0] + rng.uniform(0, 300, 50)
    y = ORIGIN[1] - rng.uniform(0, 300, 50)
    pa, pb = pool_points(a, x, y, [45]), pool_points(b, x, y, [45])
    np.testing.assert_array_equal(pa.views[0], pb.views[0])


def test_points_outside_are_flagged(tmp_path):
    info = open_raster(str(write_raster(tmp_path / "ae.tif", unit_field(20, 20))))
    x = np.array([ORIGIN[0] + 50, ORIGIN[0] - 5, ORIGIN[0] + 205, np.nan])
    y = np.array([ORIGIN[1] - 50, ORIGIN[1] - 50, ORIGIN[1] - 50, ORIGIN[1] - 50])
    pooled = pool_points(info, x, y, [45, 95])
    assert pooled.inside.tolist() == [True, False, False, False]
    assert pooled.valid.tolist() == [True, False, False, False]
    assert np.all(pooled.views[0][1:] == 0)


def test_geographic_raster_windows_have_ground_size(tmp_path):
    """An EPSG:4326 raster with ~1 m pixels: a 45 m radius must span ~45 pixels in each direction."""
    lat0 = 60.17
    m_lat, m_lon = metres_per_degree(np.array(lat0))
    dx, dy = 1.0 / float(m_lon), 1.0 / float(m_lat)  # one metre in degrees
    height, width = 120, 130
    transform = from_origin(24.93, lat0 + height * dy / 2, dx, dy)
    v = unit_field(height, width, seed=5, smooth=8)
    path = write_raster(tmp_path / "geo.tif", v, crs="EPSG:4326", transform=transform, dtype="float32")
    info = open_raster(str(path))
    values, invalid = stored_values(path)
    rx, ry = info.radius_px(45.0, np.array([lat0]))
    assert abs(int(rx[0]) - 45) <= 1 and abs(int(ry[0]) - 45) <= 1
    lon = np.array([24.93 + 60 * dx, 24.93 + 10 * dx])
    lat = np.array([lat0, lat0 + 40 * dy])
    pooled = pool_points(info, lon, lat, [45.0])
    rows, cols = info.rowcol(lon, lat)
    rx, ry = info.radius_px(45.0, lat)
    for i in range(2):
        expected = brute_force(values, invalid, rows[i], cols[i], int(ry[i]), int(rx[i]))
        np.testing.assert_allclose(pooled.views[0][i], expected, atol=2e-6)


def test_large_windows_fall_back_to_int64(tmp_path):
    """A window too big for wrapping int32 sums (over 2**31 / 127**2 pixels) is still exact."""
    height, width = 400, 400
    v = unit_field(height, width, seed=2, smooth=50)
    v[:] = np.abs(v)  # all positive: sums grow without cancelling
    v /= np.linalg.norm(v, axis=0, keepdims=True)
    path = write_raster(tmp_path / "big.tif", v, transform=from_origin(ORIGIN[0], ORIGIN[1], 1.0, 1.0), block=256)
    info = open_raster(str(path))
    values, invalid = stored_values(path)
    pooled = pool_points(info, np.array([ORIGIN[0] + 200.5]), np.array([ORIGIN[1] - 200.5]), [190.0])
    expected = brute_force(values, invalid, 200, 200, 190, 190)
    np.testing.assert_allclose(pooled.views[0][0], expected, atol=2e-6)


def test_vrt_mosaic_pools_like_one_file(tmp_path):
    """Two halves mosaicked by a VRT give exactly what the whole raster gives, across the seam."""
    v = unit_field(30, 40, seed=4)
    whole = open_raster(str(write_raster(tmp_path / "whole.tif", v)))
    west = write_raster(tmp_path / "west.tif", v[:, :, :20])
    east = write_raster(tmp_path / "east.tif", v[:, :, 20:], transform=from_origin(ORIGIN[0] + 200, ORIGIN[1], 10, 10))
    mosaic = open_raster(str(write_vrt_mosaic(tmp_path / "mosaic.vrt", [west, east])))
    assert (mosaic.width, mosaic.height) == (40, 30)
    rng = np.random.default_rng(2)
    x = ORIGIN[0] + rng.uniform(0, 400, 60)
    y = ORIGIN[1] - rng.uniform(0, 300, 60)
    a, b = pool_points(whole, x, y, [45, 95]), pool_points(mosaic, x, y, [45, 95])
    np.testing.assert_array_equal(a.valid, b.valid)
    for va, vb in zip(a.views, b.views):
        np.testing.assert_array_equal(va, vb)


@pytest.mark.parametrize("dtype", ["int8", "float32"])
def test_window_means_in_strips_match_brute_force(dtype):
    """Dense tile pooling with half-widths that change from row to row (as on a geographic raster),
    each strip from its own tables over the strip and its halo (as inference does it), equals a
    brute-force masked mean at every pixel, and equals the whole tile pooled at once."""
    from aether.geo.alphaearth import NODATA_INT8, dequantize, quantize
    from aether.geo.pooling import window_means
    from aether.geo.raster import RasterInfo

    th, tw, hx, hy = 33, 19, 4, 3
    values = unit_field(th + 2 * hy, tw + 2 * hx, bands=8, seed=3)
    values[:, 5:9, 6:10] = np.nan  # a hole bigger than the smallest windows
    invalid = ~np.isfinite(values).all(axis=0)
    if dtype == "int8":
        bands = np.where(invalid, NODATA_INT8, quantize(np.nan_to_num(values))).astype(np.int8)
        stored = dequantize(bands).astype(np.float64)
    else:
        bands = values.astype(np.float32)
        stored = np.nan_to_num(bands).astype(np.float64)
    info = RasterInfo("<test>", tw + 2 * hx, th + 2 * hy, 8, None, None, dtype, None, (16, 16))
    # a run of 12 equal rows (longer than ROWS_AT_ONCE), then widths changing every row or two
    rx_rows = np.array([4] * 12 + [3, 3, 2, 4, 4, 1, 3] * 3)[:th]
    ry_rows = np.array([3] * 12 + [3, 1, 2, 2, 3, 0] * 4)[:th]
    whole = window_means(bands, info, rx_rows, ry_rows, hx, hy)
    cuts = [(0, 1), (1, 14), (14, 15), (15, 33)]
    strips = [window_means(bands[:, a : b + 2 * hy], info, rx_rows[a:b], ry_rows[a:b], hx, hy) for a, b in cuts]
    means, valid = np.concatenate([m for m, _ in strips]), np.concatenate([v for _, v in strips])
    np.testing.assert_array_equal(valid, whole[1])
    np.testing.assert_allclose(means, whole[0], atol=1e-7)
    for r in range(th):
        for c in range(tw):
            expected = brute_force(stored, invalid, r + hy, c + hx, int(ry_rows[r]), int(rx_rows[r]))
            assert valid[r, c] == (expected is not None)
            if expected is not None:
                np.testing.assert_allclose(means[r, c], expected, atol=2e-6, err_msg=f"pixel {(r, c)}")


def test_int32_tables_that_wrap_around_give_exact_means():
    """A 401 x 401 tile of the largest code sums past 2**31 in the int32 table; box sums taken
    modulo 2**32 are still exact."""
    from aether.geo.pooling import _summed_area_tables, window_means
    from aether.geo.raster import RasterInfo

    bands = np.full((2, 401, 401), 127, dtype=np.int8)
    bands[1, 200:] = -127
    info = RasterInfo("<test>", 401, 401, 2, None, None, "int8", None, (16, 16))
    table, _ = _summed_area_tables([[bands]], info, 81)
    assert table.dtype == np.int32 and table[-1, -1, 0] < 0, "the table should wrap"
    half = np.full(393, 4)
    means, valid = window_means(bands, info, half, half, 4, 4)
    assert valid.all()
    top = means[:187]  # rows whose windows lie wholly above row 200 of the tile
    np.testing.assert_allclose(top, np.sqrt(0.5), atol=1e-7)
