"""Per-zone statistics against a brute force over the pixels: each pixel's square intersected
with each polygon by shapely, on polygons that cut pixels, with holes, across tiles, on nodata,
on bottom-up and geographic rasters; H3 cells against h3's own boundaries."""

from __future__ import annotations

import h3
import numpy as np
import pytest
import shapely
from rasterio.transform import from_origin

from aether.geo.raster import open_raster, read_vectors
from aether.geo.zonal import ZonalSums
from aether.geo.zones import h3_zones
from aether.infer.reader import tile_grid
from tests.helpers.fixtures import ORIGIN, unit_field, write_raster

H, W, BANDS = 37, 29, 8


def zones_in_pixels(transform) -> list[shapely.Geometry]:
    """Polygons drawn in pixel units (column, row), mapped to the raster's CRS: a square cutting
    pixels, a triangle across tile edges, a ring with a hole, a sliver, one half off the raster,
    one wholly off it, and one on a single pixel's edge."""
    shapes = [
        shapely.box(2.3, 3.6, 9.7, 11.2),
        shapely.Polygon([(1.5, 30.2), (27.9, 20.1), (14.2, 1.3)]),
        shapely.Polygon(
            shapely.box(10.1, 10.1, 25.5, 33.4).exterior.coords, [shapely.box(14.6, 15.2, 20.3, 28.8).exterior.coords]
        ),
        shapely.box(5.0, 20.0, 25.0, 20.35),
        shapely.box(24.0, 30.0, 35.0, 40.0),
        shapely.box(40.0, 40.0, 45.0, 45.0),
        shapely.box(3.0, 3.0, 4.0, 4.0),
    ]
    a, b, c, d, e, f = transform.a, transform.b, transform.c, transform.d, transform.e, transform.f
    return [shapely.affinity.affine_transform(s, [a, b, d, e, c, f]) for s in shapes]


def brute_force(values: np.ndarray, valid: np.ndarray, transform, polygon) -> tuple[float, np.ndarray, np.ndarray]:
    """(weighted count, weighted mean, weighted std) over every pixel, by exact intersection areas."""
    weights = np.zeros(valid.shape)
    for r in range(valid.shape[0]):
        for c in range(valid.shape[1]):
            x0, y0 = transform.c + c * transform.a, transform.f + r * transform.e
            x1, y1 = x0 + transform.a, y0 + transform.e
            cell = shapely.box(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))
            weights[r, c] = shapely.intersection(cell, polygon).area / cell.area
    weights *= valid
    count = weights.sum()
    if count == 0:
        return 0.0, np.full(values.shape[-1], np.nan), np.full(values.shape[-1], np.nan)
    mean = np.einsum("rc,rcb->b", weights, values) / count
    var = np.einsum("rc,rcb->b", weights, (values - mean) ** 2) / count
    return count, mean, np.sqrt(var)


def zonal(info, polygons, tile_px: int):
    """Statistics of every zone by ZonalSums over tiles of `tile_px`, zone index -> ZoneSums."""
    import rasterio
    from rasterio.windows import Window

    tiles = tile_grid(info, tile_px)
    sums = ZonalSums(info, np.array(polygons), tiles, ["x"])
    done = {s["x"].index: s["x"] for s in sums.unmet({"x": info.count})}
    with rasterio.open(info.path) as src:
        for tile in tiles:
            vectors, valid = read_vectors(src, Window(tile.col0, tile.row0, tile.width, tile.height), info)
            for finished in sums.add(tile, {"x": (vectors.reshape(-1, info.count), valid.reshape(-1))}):
                assert finished["x"].index not in done  # each zone once
                done[finished["x"].index] = finished["x"]
    assert sorted(done) == list(range(len(polygons)))
    assert not sums.sums  # nothing left held
    return done


@pytest.mark.parametrize(
    "case",
    ["utm float32 nodata", "utm int8", "bottom-up int8", "geographic float32"],
)
@pytest.mark.parametrize("tile_px", [8, 64])
def test_zonal_statistics_match_a_brute_force_over_pixels(tmp_path, case, tile_px):
    values = unit_field(H, W, bands=BANDS, seed=3)
    values[:, 5:8, 4:12] = np.nan  # nodata inside the first and second zones
    values[:, 20, 10:22] = np.nan  # and under the sliver
    dtype = "int8" if "int8" in case else "float32"
    kwargs = {"dtype": dtype, "nodata": np.nan if dtype == "float32" else None}
    if "geographic" in case:
        kwargs.update(crs="EPSG:4326", transform=from_origin(24.9, 60.2, 0.0002, 0.0001))
    path = write_raster(tmp_path / "r.tif", values, bottom_up="bottom-up" in case, **kwargs)
    info = open_raster(str(path), BANDS)
    assert info.bottom_up == ("bottom-up" in case)

    import rasterio

    with rasterio.open(path) as src:  # the stored values, north-up, as the brute force sees them
        stored, valid = read_vectors(src, rasterio.windows.Window(0, 0, W, H), info)
    north_up = info.north_up_transform
    if info.bottom_up:
        stored, valid = stored[::-1], valid[::-1]
    polygons = zones_in_pixels(north_up)
    got = zonal(info, polygons, tile_px)
    area_px = abs(north_up.a * north_up.e)
    for z, polygon in enumerate(polygons):
        count, mean, std = brute_force(stored, valid, north_up, polygon)
        stats = got[z].statistics(("mean", "std", "count", "coverage"))
        # exactextract's coverage fractions are float32: 1e-7 of a pixel each
        assert stats[-2] == pytest.approx(count, rel=1e-6, abs=1e-6), z
        assert stats[-1] == pytest.approx(count / (polygon.area / area_px), rel=1e-6, abs=1e-6), z
        if count == 0:
            assert np.isnan(stats[: 2 * BANDS]).all(), z
        else:
            np.testing.assert_allclose(stats[:BANDS], mean, rtol=0, atol=1e-6, err_msg=str(z))
            np.testing.assert_allclose(stats[BANDS : 2 * BANDS], std, rtol=0, atol=1e-5, err_msg=str(z))
    assert got[5].count == 0 and got[5].statistics(("coverage",))[0] == 0  # wholly off the raster
    assert 0 < got[4].statistics(("coverage",))[0] < 0.5  # half off, and cut by nodata-free pixels


def test_h3_cells_are_h3s_own(tmp_path):
    """The cells cover the raster's centres, and each polygon is h3's cell_to_boundary."""
    path = write_raster(tmp_path / "r.tif", unit_field(120, 150, bands=4, seed=0), dtype="float32")
    info = open_raster(str(path), 4)
    zones = h3_zones(info, 10)
    assert len(zones) > 10 and zones.id_column == "h3" and zones.crs.to_epsg() == 4326
    for cell, polygon in zip(zones.ids[:25], zones.geometry[:25]):
        assert h3.get_resolution(cell) == 10
        expected = shapely.Polygon([(lng, lat) for lat, lng in h3.cell_to_boundary(cell)])
        assert shapely.equals_exact(polygon, expected, tolerance=0)
    # every cell's centre lies on the raster, and the cells tile it without overlap
    lats, lngs = np.array([h3.cell_to_latlng(c) for c in zones.ids]).T
    from pyproj import Transformer

    x, y = Transformer.from_crs("EPSG:4326", info.crs, always_xy=True).transform(lngs, lats)
    left, top = ORIGIN
    assert (x >= left).all() and (x <= left + 1500).all() and (y <= top).all() and (y >= top - 1200).all()
    union = shapely.union_all(zones.in_raster_crs)
    assert union.area == pytest.approx(sum(p.area for p in zones.in_raster_crs), rel=1e-9)
    with pytest.raises(Exception, match="resolution from 0 to 15"):
        h3_zones(info, 16)
