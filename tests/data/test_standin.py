"""The stand-in raster's pure parts on tiny hand-made arrays and layers (no pyrosm, no network)."""

import geopandas as gpd
import numpy as np
import rasterio
from shapely.geometry import LineString, Point, box

from aether.data.standin import (
    BUILDING_GROUPS,
    CRS,
    PIXEL_M,
    Grid,
    building_group,
    embed,
    feature_channels,
    write_standin,
)
from aether.geo.alphaearth import N_BANDS, NODATA_INT8, band_names, dequantize, quantize


def _blocks(n_feat: int = 3, side_px: int = 12) -> np.ndarray:
    """(F, H, W) stack of F side-by-side blocks, channel k covering only block k."""
    features = np.zeros((n_feat, side_px, n_feat * side_px), np.float32)
    for k in range(n_feat):
        features[k, :, k * side_px : (k + 1) * side_px] = 1.0
    return features


def test_embed_gives_unit_int8_vectors():
    x = dequantize(quantize(embed(_blocks())))
    assert x.shape == (N_BANDS, 12, 36)
    np.testing.assert_allclose(np.linalg.norm(x, axis=0), 1.0, atol=0.01)


def test_embed_is_deterministic_for_a_seed():
    features = _blocks()
    assert quantize(embed(features, seed=0)).tobytes() == quantize(embed(features, seed=0)).tobytes()
    assert not np.allclose(embed(features, seed=0), embed(features, seed=1))


def test_different_channels_map_to_different_directions():
    x = embed(_blocks(n_feat=3, side_px=12))
    centres = [x[:, 6, 6 + 12 * k] for k in range(3)]  # 6 px (6 sigma) from any block edge
    for a in range(3):
        for b in range(a + 1, 3):
            assert float(centres[a] @ centres[b]) < 0.8
    # inside one block all pixels share the same direction
    np.testing.assert_allclose(x[:, 6, 6] @ x[:, 3, 4], 1.0, atol=1e-4)


def test_grid_fraction_matches_covered_area():
    grid = Grid((0.0, 0.0, 1000.0, 1000.0))
    assert grid.left % PIXEL_M == 0 and grid.top % PIXEL_M == 0
    x0, y0 = grid.left + 100, grid.top - 100
    strip = box(x0, y0 - PIXEL_M, x0 + 0.6 * PIXEL_M, y0)  # 3 of one pixel's 5 subpixel columns
    f = grid.fraction([strip])
    assert f[10, 10] == np.float32(0.6) and f.sum() == np.float32(0.6)


def test_building_groups_use_the_building_value_only():
    assert building_group("apartments") == "residential"
    assert building_group("cathedral") == "religious"
    assert building_group("yes") == "other" and building_group("") == "other"
    assert sum(len(v) for v in BUILDING_GROUPS.values()) == len(set().union(*BUILDING_GROUPS.values()))


def _layers(amenity: str) -> dict:
    """Tiny OSM layers near Helsinki as pyrosm lays them out; buildings carry POI tags."""
    lon, lat = 24.94, 60.17

    def gdf(**cols):
        return gpd.GeoDataFrame(cols, crs="EPSG:4326")

    sq = lambda dx, dy, s=0.0005: box(lon + dx, lat + dy, lon + dx + s, lat + dy + s)  # noqa: E731
    return {
        "landuse": gdf(landuse=["residential", "grass"], geometry=[sq(0, 0, 0.002), sq(0.003, 0)]),
        "natural": gdf(natural=["tree", "water"], geometry=[Point(lon + 0.001, lat + 0.003), sq(0, 0.004)]),
        "buildings": gdf(
            building=["apartments", "church", "yes"],
            amenity=[amenity, "place_of_worship", None],
            shop=["bakery", None, amenity],
            geometry=[sq(0, 0), sq(0.001, 0), sq(0.002, 0.001)],
        ),
        "network": gdf(
            highway=["primary", "footway"],
            geometry=[
                LineString([(lon, lat - 0.001), (lon + 0.004, lat - 0.001)]),
                LineString([(lon, lat + 0.002), (lon + 0.003, lat + 0.003)]),
            ],
        ),
        "waterway": None,
    }


def test_feature_channels_ignore_poi_tags():
    layers = _layers("cafe")
    bounds = gpd.GeoSeries(layers["network"].geometry, crs="EPSG:4326").to_crs(CRS).total_bounds
    grid = Grid(tuple(bounds))
    names, a = feature_channels(layers, grid)
    _, b = feature_channels(_layers("bank"), grid)
    assert a.shape == (len(names), grid.height, grid.width) and np.array_equal(a, b)
    chan = dict(zip(names, a))
    assert chan["building=residential"].sum() > 0 and chan["building=religious"].sum() > 0
    assert chan["building=commercial"].sum() == 0  # the shop tag on the 'yes' building is not read
    assert chan["building=other"].sum() > 0 and chan["motor_road_density"].sum() > 0


def test_write_standin_is_alphaearth_shaped(tmp_path):
    grid = Grid((0.0, 0.0, 100.0, 100.0))
    q = quantize(embed(np.random.default_rng(0).random((2, grid.height, grid.width))))
    path = write_standin(tmp_path / "s.tif", q, grid, ["a", "b"])
    with rasterio.open(path) as src:
        assert src.count == N_BANDS and src.nodata == NODATA_INT8 and src.dtypes[0] == "int8"
        assert list(src.descriptions) == band_names() and src.tags()["STANDIN_FEATURES"] == "a,b"
        assert np.array_equal(src.read(), q)
    first = path.read_bytes()
    assert write_standin(tmp_path / "s.tif", q, grid, ["a", "b"]).read_bytes() == first
