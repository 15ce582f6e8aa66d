"""Pixels whose base window the raster's edge cuts short are scored in the maps but not ranked:
their vectors are averaged over fewer pixels, so they would not compete fairly."""

from __future__ import annotations

import json

import numpy as np

from aether.geo.raster import open_raster
from aether.retrieval.scoring import edge_band, on_edge
from aether.retrieval.search import SearchOptions, retrieve
from tests.helpers.fixtures import unit_field, write_raster, write_untrained_checkpoint


def test_edge_band_is_the_base_window_radius(tmp_path):
    info = open_raster(
        str(write_raster(tmp_path / "emb.tif", unit_field(40, 50, bands=16, seed=1), dtype="float32")), 16
    )
    rx, ry = edge_band(info, 45.0)  # 10 m pixels: a 9 x 9 window, cut within 4 pixels of the edge
    assert set(rx.tolist()) == {4} and set(ry.tolist()) == {4}
    rows, cols = np.array([3, 4, 4, 35, 36]), np.array([10, 4, 3, 10, 10])
    assert on_edge(rows, cols, info, rx, ry).tolist() == [True, False, True, False, True]


def test_best_pixel_on_the_edge_is_not_ranked(tmp_path):
    values = unit_field(40, 50, bands=16, seed=1)
    target = np.zeros(16, np.float32)
    target[0] = 1.0
    values[:, 1, 1] = target  # the best pixel, whose window the edge cuts
    near = np.full(16, 0.05, np.float32)
    near[0] = 1.0
    values[:, 20, 25] = near / np.linalg.norm(near)  # nearly as good, inside
    emb = write_raster(tmp_path / "emb.tif", values, dtype="float32")
    ckpt = write_untrained_checkpoint(tmp_path / "ckpt.pt")
    out = tmp_path / "out"
    results = retrieve(
        ["target"], str(ckpt), str(out), emb_tif=str(emb), options=SearchOptions(top_k=3, nms_m=0, heatmaps=False),
        progress=False, query_vectors=target[None, :],
    )  # fmt: skip
    best = results[0].hits[0]
    assert (best["row"], best["col"]) == (20, 25)
    assert all((h["row"], h["col"]) != (1, 1) for h in results[0].hits)
    import rasterio

    with rasterio.open(results[0].tif) as src:  # the map still scores the edge pixel
        assert src.read(1)[1, 1] > src.read(1)[20, 25]
    places = json.loads(results[0].geojson.read_text())["features"]
    assert places[0]["properties"]["rank"] == 1
