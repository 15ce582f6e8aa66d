"""Map tiles from rasters of every kind: a bottom-up copy draws the same tiles as the north-up one,
in UTM and EPSG:4326, int8 and float32; off the raster a tile is transparent; the score tiles follow
the dot product of the stored vectors with the query."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image
from rasterio.transform import from_origin

from aether.geo.raster import open_raster
from aether.serve.layers import EmbeddingLayer
from tests.helpers.fixtures import unit_field, write_raster


def tile_at(lon: float, lat: float, z: int) -> tuple[int, int, int]:
    n = 2**z
    return z, int((lon + 180) / 360 * n), int((1 - math.asinh(math.tan(math.radians(lat))) / math.pi) / 2 * n)


def rgba(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


@pytest.mark.parametrize("crs", ["EPSG:32635", "EPSG:4326"])
@pytest.mark.parametrize("dtype", ["int8", "float32"])
def test_bottom_up_and_north_up_draw_the_same_tiles(tmp_path, crs, dtype):
    values = unit_field(60, 80, bands=8, seed=4)
    values[:, 5:15, 10:30] = np.nan
    kwargs = {"dtype": dtype, "crs": crs, "nodata": np.nan if dtype == "float32" else None}
    if crs == "EPSG:4326":
        kwargs["transform"] = from_origin(24.93, 60.17, 1e-4, 5e-5)
    north = EmbeddingLayer(open_raster(str(write_raster(tmp_path / "n.tif", values, **kwargs)), 8))
    south = EmbeddingLayer(open_raster(str(write_raster(tmp_path / "s.tif", values, bottom_up=True, **kwargs)), 8))
    (west, south_lat, east, north_lat) = north.bounds
    z, x, y = tile_at((west + east) / 2, (south_lat + north_lat) / 2, 15)  # the whole raster and beyond
    # the same colours for both (each layer fits its PCA on its own sample, read in file order)
    south.pca = north.pca
    a, b = rgba(north.pca_tile(z, x, y)), rgba(south.pca_tile(z, x, y))
    assert (a[..., 3] == 255).any() and (a[..., 3] == 0).any()  # raster pixels, and nodata or outside
    np.testing.assert_array_equal(a, b)
    vector = np.zeros(8, np.float32)
    vector[0] = 1
    low, high = north.score_range(vector)
    assert low < high
    np.testing.assert_array_equal(
        rgba(north.score_tile("q", vector, low, high, z, x, y)), rgba(south.score_tile("q", vector, low, high, z, x, y))
    )
    assert (rgba(north.pca_tile(3, 0, 0))[..., 3] == 0).all()  # far off the raster: transparent


def test_score_tile_colours_follow_the_scores(tmp_path):
    values = np.zeros((4, 40, 40), np.float32)
    values[0, :, :20] = 1.0  # west: along the query
    values[1, :, 20:] = 1.0  # east: across it
    layer = EmbeddingLayer(open_raster(str(write_raster(tmp_path / "r.tif", values, dtype="float32")), 4))
    west, south, east, north = layer.bounds
    query = np.array([1, 0, 0, 0], np.float32)
    z, x, y = tile_at((west + east) / 2, (south + north) / 2, 18)
    tile = rgba(layer.score_tile("q", query, 0.0, 1.0, z, x, y))
    shown = tile[tile[..., 3] > 0]
    # viridis: high scores are yellow (much red and green), low ones dark purple
    bright = shown[:, 0].astype(int) + shown[:, 1]
    assert bright.max() > 400 and bright.min() < 150


def test_the_opening_view_is_drawn_at_start(tmp_path):
    """The tiles of the view the page opens on (the raster fitted in it) are drawn before any request."""
    from aether.serve.layers import VIEW_PX, fitted_tiles

    layer = EmbeddingLayer(open_raster(str(write_raster(tmp_path / "r.tif", unit_field(60, 80, bands=8))), 8))
    tiles = fitted_tiles(layer.bounds, VIEW_PX)
    z = tiles[0][0]
    assert {t[0] for t in tiles} == {z} and 1 <= len(tiles) <= 20
    bigger = fitted_tiles(layer.bounds, (VIEW_PX[0] * 2, VIEW_PX[1] * 2))
    assert bigger[0][0] == z + 1  # twice the room: one zoom level closer
    assert layer.warm_up() == len(tiles)
    assert all(layer.cache.get(("pca", *t)) is not None for t in tiles)
