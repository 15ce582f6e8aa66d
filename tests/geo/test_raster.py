import numpy as np
import pytest

from aether.core.errors import AetherError
from aether.geo.alphaearth import DECODE_CHUNK, band_names, dequantize, quantize
from aether.geo.raster import metres_per_degree, open_raster, read_vectors
from tests.helpers.fixtures import ORIGIN, unit_field, write_raster


def test_band_names():
    assert band_names()[:2] == ["A00", "A01"] and band_names()[-1] == "A63"
    assert band_names(128, "E")[-1] == "E127"


def test_quantization_round_trip_error_bound():
    x = np.linspace(-1, 1, 20001, dtype=np.float32)
    err = np.abs(dequantize(quantize(x)) - x)
    # step of sqrt-companded codes: |d(q/127.5)^2/dq| <= 2/127.5 per code, half a code of rounding
    assert err.max() <= 1.0 / 127.5 + 1e-6
    assert quantize(np.array([0.0, 1.0, -1.0])).tolist() == [0, 127, -127]
    assert np.all(quantize(x, valid=np.zeros_like(x, dtype=bool)) == -128)


def test_dequantize_equals_the_formula_for_every_code():
    codes = np.arange(-128, 128, dtype=np.int8)
    grid = np.stack([codes, codes[::-1]], axis=-1).reshape(16, 16, 2)  # any shape, strided input
    many = np.resize(codes, DECODE_CHUNK * 2 + 77)  # several chunks and a short last one
    for q in (codes, grid, grid[:, ::3, :], many):
        f = q.astype(np.float32) / np.float32(127.5)
        formula = np.sign(f) * f * f
        values = dequantize(q)
        assert values.dtype == np.float32 and values.shape == q.shape
        assert np.array_equal(values, formula)
        out = np.full(q.shape, np.nan, np.float32)
        assert dequantize(q, out=out) is out and np.array_equal(out, formula)
    assert dequantize(np.array([127], np.int8))[0] == np.float32((127 / 127.5) ** 2)
    assert dequantize(codes, np.float64).dtype == np.float64  # other types by the same formula
    with pytest.raises(ValueError, match="contiguous"):
        dequantize(grid[:, ::3, :], out=np.empty((16, 18, 2), np.float32)[:, ::3, :])


def test_metres_per_degree_known_values():
    m_lat, m_lon = metres_per_degree(np.array([0.0, 60.0]))
    np.testing.assert_allclose(m_lat, [110574, 111412], rtol=2e-4)
    np.testing.assert_allclose(m_lon, [111320, 55800], rtol=2e-3)


def test_open_checks(tmp_path):
    v = unit_field(10, 10)
    info = open_raster(str(write_raster(tmp_path / "ok.tif", v)))
    assert info.is_int8 and info.count == 64 and not info.is_geographic
    rx, ry = info.radius_px(45.0)
    assert int(rx) == 4 and int(ry) == 4
    assert int(info.radius_px(95.0)[0]) == 9
    with pytest.raises(AetherError, match="no CRS"):
        open_raster(str(write_raster(tmp_path / "nocrs.tif", v, crs=None)))
    with pytest.raises(AetherError, match="3 bands, expected 64"):
        open_raster(str(write_raster(tmp_path / "three.tif", v[:3])))
    assert open_raster(str(write_raster(tmp_path / "three2.tif", v[:3])), n_bands=3).count == 3
    with pytest.raises(AetherError, match="cannot open raster"):
        (tmp_path / "bad.tif").write_bytes(b"not a tiff at all")
        open_raster(str(tmp_path / "bad.tif"))


def test_read_vectors_masks_nodata_and_nan(tmp_path):
    v = unit_field(12, 12)
    v[:, 3, 4] = np.nan
    for dtype, nodata in (("int8", None), ("float32", None), ("float64", -9999.0)):
        path = write_raster(tmp_path / f"{dtype}.tif", v, dtype=dtype, nodata=nodata)
        info = open_raster(str(path))
        import rasterio
        from rasterio.windows import Window

        with rasterio.open(path) as src:
            values, valid = read_vectors(src, Window(0, 0, 12, 12), info)
        assert values.shape == (12, 12, 64)
        assert not valid[3, 4] and valid.sum() == 143
        assert np.all(values[3, 4] == 0)
        norms = np.linalg.norm(values[valid], axis=1)
        np.testing.assert_allclose(norms, 1.0, atol=0.02)


def test_rowcol_for_both_orientations(tmp_path):
    v = unit_field(10, 10)
    north = open_raster(str(write_raster(tmp_path / "n.tif", v)))
    south = open_raster(str(write_raster(tmp_path / "s.tif", v, bottom_up=True)))
    x, y = np.array([ORIGIN[0] + 15.0]), np.array([ORIGIN[1] - 25.0])  # pixel row 2, col 1 from the top
    assert [int(a[0]) for a in north.rowcol(x, y)] == [2, 1]
    assert [int(a[0]) for a in south.rowcol(x, y)] == [7, 1]
