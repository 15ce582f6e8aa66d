"""Running at scale: sets of tiles in several UTM zones, routing points to tiles, mosaics, and
Dask tasks on a real local cluster of 2 worker processes giving the single-process result bit
for bit (inference, retrieval and POI pooling)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
from pyproj import Transformer

from aether.core.cluster import Cluster
from aether.core.errors import AetherError
from aether.geo.pooling import pool_at_scale, pool_points
from aether.geo.raster import open_raster
from aether.geo.tiles import expand_tiles, route_points, write_mosaic_vrt
from aether.infer.at_scale import embed_at_scale
from aether.infer.pipeline import embed_raster
from aether.infer.spec import EmbedOptions
from aether.model.checkpoint import Checkpoint
from aether.retrieval.at_scale import retrieve_at_scale
from aether.retrieval.scoring import edge_band, on_edge
from aether.retrieval.search import SearchOptions
from aether.retrieval.topk import non_max_suppression
from tests.helpers.fixtures import (
    brute_force,
    stored_values,
    unit_field,
    write_raster,
    write_untrained_checkpoint,
    write_zone_tiles,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def scheduler():
    """The address of one local Dask cluster with 2 worker processes, shared by this module's tests
    (through --scheduler, the path a user with a running cluster takes)."""
    from aether.core.cluster import dask_client

    with dask_client(Cluster(workers=2)) as client:
        yield client.scheduler.address


@pytest.fixture(scope="module")
def zone_tiles(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("tiles")
    tiles = write_zone_tiles(folder)
    values = unit_field(96, 96, seed=7)
    values[:, 40:50, 10:30] = np.nan  # nodata in the second tile
    with rasterio.open(tiles[1]) as src:
        transform = src.transform
    write_raster(tiles[1], values, transform=transform, crs="EPSG:32635")
    return tiles


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return write_untrained_checkpoint(tmp_path_factory.mktemp("ckpt") / "best.pt")


def _lonlat(path: Path, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with rasterio.open(path) as src:
        x, y = src.transform @ (cols + 0.5, rows + 0.5)
        lon, lat = Transformer.from_crs(src.crs, "EPSG:4326", always_xy=True).transform(x, y)
    return np.asarray(lon), np.asarray(lat)


# ---- naming a set of tiles ------------------------------------------------------------------


def test_a_set_of_tiles_is_a_glob_or_a_list_file(tmp_path, zone_tiles):
    folder = zone_tiles[0].parent
    assert expand_tiles(str(folder / "tile_*.tif")) == [str(p) for p in sorted(zone_tiles)]
    listing = tmp_path / "tiles.txt"
    rel = os.path.relpath(zone_tiles[1], tmp_path)
    listing.write_text(f"# two zones\n\n{rel}\n  {zone_tiles[0]}  \nhttps://example.org/tile.tif\n")
    assert expand_tiles(str(listing)) == [str(tmp_path / rel), str(zone_tiles[0]), "https://example.org/tile.tif"]
    assert expand_tiles(str(zone_tiles[0])) == [str(zone_tiles[0])]  # one raster is itself
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(AetherError, match="names no rasters"):
        expand_tiles(str(tmp_path / "empty.txt"))
    with pytest.raises(AetherError, match="matches no files"):
        expand_tiles(str(tmp_path / "none_*.tif"))
    (tmp_path / "twice.txt").write_text(f"{zone_tiles[0]}\n{zone_tiles[0]}\n")
    with pytest.raises(AetherError, match="more than once"):
        expand_tiles(str(tmp_path / "twice.txt"))


def test_points_go_to_the_tile_where_they_lie_farthest_from_the_edge(zone_tiles):
    infos = [open_raster(str(p)) for p in zone_tiles]
    # a line of points across both tiles and their overlap, and one far away
    lon = np.r_[np.linspace(23.986, 24.014, 41), 30.0]
    lat = np.r_[np.full(41, 60.17), 60.17]
    owner = route_points(infos, lon, lat)
    # independently: each tile's ground distance to its nearest edge, from pixel coordinates
    distances = []
    for _path, info in zip(zone_tiles, infos):
        x, y = Transformer.from_crs("EPSG:4326", info.crs, always_xy=True).transform(lon, lat)
        col, row = ~info.transform @ (np.asarray(x), np.asarray(y))
        d = 10.0 * np.minimum.reduce([col, info.width - col, row, info.height - row])
        distances.append(np.where((col >= 0) & (col < info.width) & (row >= 0) & (row < info.height), d, -np.inf))
    distances = np.stack(distances)
    expected = np.where(np.isinf(distances).all(axis=0), -1, np.argmax(distances, axis=0))
    np.testing.assert_array_equal(owner, expected)
    both = np.isfinite(distances).all(axis=0)
    assert both.sum() >= 1 and set(owner[:41]) == {0, 1} and owner[-1] == -1  # the overlap was exercised
    # a tie goes to the tile listed first: a tile listed twice always ties with itself
    twice = route_points([infos[1], infos[1]], lon, lat)
    assert set(twice[owner >= 0]) <= {0, -1} and (twice == 0).sum() == np.isfinite(distances[1]).sum()


def test_the_mosaic_of_tiles_in_two_zones_reads_each_tile(tmp_path, zone_tiles, monkeypatch):
    monkeypatch.chdir(zone_tiles[0].parent)  # tiles and mosaic named relative to the working folder
    rel = os.path.relpath(tmp_path, zone_tiles[0].parent)
    mosaic = write_mosaic_vrt([p.name for p in zone_tiles], Path(rel) / "mosaic.vrt")
    with rasterio.open(mosaic) as src:
        assert src.crs.to_epsg() == 4326 and src.count == 64
        for path, cols in zip(zone_tiles, (np.array([20, 50, 45]), np.array([50, 70, 45]))):  # off the overlap
            rows = np.array([20, 70, 48])
            lon, lat = _lonlat(path, rows, cols)
            sampled = np.array(list(src.sample(zip(lon, lat))))
            # nearest neighbour: the tile pixel under the centre of the mosaic pixel that holds the point
            m_rows, m_cols = rasterio.transform.rowcol(src.transform, lon, lat)
            c_lon, c_lat = src.transform @ (np.asarray(m_cols) + 0.5, np.asarray(m_rows) + 0.5)
            with rasterio.open(path) as tile:
                x, y = Transformer.from_crs("EPSG:4326", tile.crs, always_xy=True).transform(c_lon, c_lat)
                t_rows, t_cols = rasterio.transform.rowcol(tile.transform, x, y)
                raw = tile.read()[:, t_rows, t_cols].T
            np.testing.assert_array_equal(sampled, raw)


# ---- Dask equals one process, bit for bit -----------------------------------------------------


def test_inference_over_tiles_on_two_workers_equals_one_process(tmp_path, zone_tiles, ckpt, scheduler):
    spec = str(zone_tiles[0].parent / "tile_*.tif")
    serial = embed_at_scale(spec, str(ckpt), str(tmp_path / "serial"), progress=False, options=EmbedOptions(tile_px=32))
    dask = embed_at_scale(
        spec,
        str(ckpt),
        str(tmp_path / "dask"),
        progress=False,
        options=EmbedOptions(tile_px=32),
        cluster=Cluster(scheduler=scheduler),
    )
    for path in zone_tiles:
        with rasterio.open(serial / path.name) as a, rasterio.open(dask / path.name) as b:
            assert a.crs == b.crs == rasterio.open(path).crs and a.transform == rasterio.open(path).transform
            np.testing.assert_array_equal(a.read(), b.read())
            assert a.tags() == b.tags() and a.descriptions == b.descriptions
    os.replace(serial, tmp_path / "moved")  # the mosaic names its sources relative to itself
    with rasterio.open(tmp_path / "moved" / "mosaic.vrt") as a, rasterio.open(dask / "mosaic.vrt") as b:
        np.testing.assert_array_equal(a.read(), b.read())
    # a rerun skips the finished tiles: nothing is rewritten, and a lost tile is the only one redone
    stamps = {p: p.stat().st_mtime_ns for p in dask.glob("*.tif")}
    embed_at_scale(
        spec,
        str(ckpt),
        str(dask),
        progress=False,
        options=EmbedOptions(tile_px=32),
        cluster=Cluster(scheduler=scheduler),
    )
    assert {p: p.stat().st_mtime_ns for p in dask.glob("*.tif")} == stamps
    lost = dask / zone_tiles[1].name
    lost.unlink()
    embed_at_scale(
        spec,
        str(ckpt),
        str(dask),
        progress=False,
        options=EmbedOptions(tile_px=32),
        cluster=Cluster(scheduler=scheduler),
    )
    assert (dask / zone_tiles[0].name).stat().st_mtime_ns == stamps[dask / zone_tiles[0].name]
    with rasterio.open(lost) as a, rasterio.open(tmp_path / "moved" / lost.name) as b:
        np.testing.assert_array_equal(a.read(), b.read())


def test_one_raster_in_bands_on_two_workers_equals_one_process(tmp_path, ckpt, scheduler):
    values = unit_field(150, 110, seed=5)
    values[:, 60:70, :30] = np.nan
    src = write_raster(tmp_path / "big.tif", values, bottom_up=True)
    single = embed_raster(
        str(src), str(ckpt), str(tmp_path / "single.tif"), progress=False, options=EmbedOptions(tile_px=32)
    )
    split = embed_at_scale(
        str(src),
        str(ckpt),
        str(tmp_path / "split.tif"),
        band_px=64,
        progress=False,
        options=EmbedOptions(tile_px=32),
        cluster=Cluster(scheduler=scheduler),
    )
    with rasterio.open(single) as a, rasterio.open(split) as b:
        np.testing.assert_array_equal(a.read(), b.read())
        assert a.profile == b.profile and a.tags() == b.tags() and a.descriptions == b.descriptions
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.tif", "single.tif", "split.tif"]  # parts removed


def test_pooling_on_two_workers_equals_one_process_and_brute_force(zone_tiles, scheduler):
    from distributed import Client

    infos = [open_raster(str(p)) for p in zone_tiles]
    rng = np.random.default_rng(3)
    lon, lat = rng.uniform(23.985, 24.015, 300), rng.uniform(60.1665, 60.1735, 300)
    radii = [45.0, 95.0]
    with Client(scheduler) as client:
        one = pool_at_scale(infos, lon, lat, radii)
        two = pool_at_scale(infos, lon, lat, radii, client, points_per_task=40, chunk_px=32)
        again = pool_at_scale(infos, lon, lat, radii, None, points_per_task=40, chunk_px=32)
    for k in range(2):
        np.testing.assert_array_equal(two.views[k], again.views[k])  # same chunks: same bits
        np.testing.assert_allclose(one.views[k], two.views[k], atol=1e-6)
    np.testing.assert_array_equal(one.valid, two.valid)
    assert one.valid.sum() > 250
    # each point's views are those of the tile it was routed to, by brute force
    owner = route_points(infos, lon, lat)
    for i in np.flatnonzero(one.valid)[::15]:
        path = zone_tiles[owner[i]]
        values, invalid = stored_values(path)
        with rasterio.open(path) as src:
            x, y = Transformer.from_crs("EPSG:4326", src.crs, always_xy=True).transform(lon[i], lat[i])
            row, col = src.index(x, y)
        for k, r in enumerate((4, 9)):
            np.testing.assert_allclose(one.views[k][i], brute_force(values, invalid, row, col, r, r), atol=1e-5)


def test_pooling_one_raster_in_tasks_equals_pool_points(tmp_path, scheduler):
    from distributed import Client

    values = unit_field(120, 120, seed=9)
    path = write_raster(tmp_path / "float.tif", values, dtype="float32")  # float: sums depend on chunking
    info = open_raster(str(path))
    rng = np.random.default_rng(4)
    x = info.transform.c + 10 * rng.uniform(0, 120, 200)
    y = info.transform.f - 10 * rng.uniform(0, 120, 200)
    lon, lat = Transformer.from_crs(info.crs, "EPSG:4326", always_xy=True).transform(x, y)
    expected = pool_points(info, x, y, [45.0], chunk_px=32)
    with Client(scheduler) as client:
        got = pool_at_scale([info], lon, lat, [45.0], client, xy=(x, y), chunk_px=32, points_per_task=30)
    np.testing.assert_array_equal(got.views[0], expected.views[0])
    np.testing.assert_array_equal(got.valid, expected.valid)


def test_retrieval_over_tiles_on_two_workers_is_the_exact_global_top_k(tmp_path, zone_tiles, ckpt, scheduler):
    spec = str(zone_tiles[0].parent / "tile_*.tif")
    queries = ["a quiet cafe", "a park"]
    serial = retrieve_at_scale(
        queries,
        str(ckpt),
        str(tmp_path / "serial"),
        ae_tif=spec,
        progress=False,
        options=SearchOptions(top_k=5, nms_m=60, tile_px=32),
    )
    dask = retrieve_at_scale(
        queries,
        str(ckpt),
        str(tmp_path / "dask"),
        ae_tif=spec,
        progress=False,
        options=SearchOptions(top_k=5, nms_m=60, tile_px=32),
        cluster=Cluster(scheduler=scheduler),
    )
    for a, b in zip(serial, dask):
        assert a.hits == b.hits and len(a.hits) == 5
        assert a.tif.suffix == ".vrt" and a.png.is_file() and a.geojson.is_file()
    # the merged top-k is the greedy suppression over every pixel of both tiles
    for _i, result in enumerate(serial):
        scores, lon, lat, tile = [], [], [], []
        for t, path in enumerate(sorted(zone_tiles)):
            with rasterio.open(tmp_path / "serial" / "tiles" / path.stem / result.tif.with_suffix(".tif").name) as src:
                s = src.read(1)
            rows, cols = np.indices(s.shape)
            lo, la = _lonlat(path, rows.ravel(), cols.ravel())
            info = open_raster(str(path))  # pixels whose base window the tile's edge cuts are not ranked
            rx, ry = edge_band(info, Checkpoint.load(ckpt).base_radius_m)
            ok = np.isfinite(s.ravel()) & ~on_edge(rows.ravel(), cols.ravel(), info, rx, ry)
            scores.append(s.ravel()[ok]), lon.append(lo[ok]), lat.append(la[ok]), tile.append(np.full(ok.sum(), t))
        scores, lon, lat, tile = map(np.concatenate, (scores, lon, lat, tile))
        chosen = non_max_suppression(scores, lon, lat, 5, 60, geographic=True)
        assert [round(float(v), 6) for v in scores[chosen]] == [h["score"] for h in result.hits]
        np.testing.assert_allclose(lon[chosen], [h["lon"] for h in result.hits])
    index = json.loads((tmp_path / "serial" / "queries.json").read_text())
    assert [q["query"] for q in index["queries"]] == queries


# ---- the real commands ------------------------------------------------------------------------


def test_infer_command_on_a_scheduler_embeds_a_list_of_tiles(tmp_path, zone_tiles, ckpt, scheduler):
    listing = tmp_path / "tiles.txt"
    listing.write_text("".join(f"{p}\n" for p in zone_tiles))
    out = tmp_path / "aether"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [
            sys.executable,
            "infer_aether_raster.py",
            "--ae_tif",
            str(listing),
            "--ckpt",
            str(ckpt),
            "--out",
            str(out),
            "--scheduler",
            scheduler,
            "--tile",
            "32",
            "--no-progress",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.glob("*.tif")) == sorted(p.name for p in zone_tiles)
    assert (out / "mosaic.vrt").is_file() and f"scheduler {scheduler} with 2 workers" in proc.stdout
    for path in zone_tiles:
        reference = embed_raster(
            str(path), str(ckpt), str(tmp_path / f"ref_{path.name}"), progress=False, options=EmbedOptions(tile_px=32)
        )
        with rasterio.open(out / path.name) as a, rasterio.open(reference) as b:
            np.testing.assert_array_equal(a.read(), b.read())


def test_text_encoding_on_two_workers_fills_one_cache(tmp_path, scheduler):
    from distributed import Client

    from aether.text.cache import EmbeddingCache, encode_texts, encode_texts_on_cluster
    from aether.text.encoders import build_text_encoder

    texts = [f"A place of {v}, a type of amenity, named Place {i}." for i, v in enumerate(["cafe", "bar"] * 6)]
    texts += texts[:3]  # repeats are encoded once
    encoder = build_text_encoder("sentence-transformers", "all-MiniLM-L6-v2")
    expected, _ = encode_texts(encoder, texts, None, progress=False)  # this process, no cache
    cache = EmbeddingCache(tmp_path / "cache")
    try:
        with Client(scheduler) as client:  # 5 texts a task: 3 tasks for 12 unique texts
            vectors, n_encoded = encode_texts_on_cluster(
                client, encoder, texts, cache, progress=False, texts_per_task=5
            )
            again, n_again = encode_texts_on_cluster(client, encoder, texts, cache, progress=False, texts_per_task=5)
        assert n_encoded == 12 and n_again == 0
        assert len(cache.get([EmbeddingCache.key(encoder.identity, t) for t in set(texts)])) == 12
    finally:
        cache.close()
    np.testing.assert_allclose(vectors, expected, atol=1e-5)
    np.testing.assert_array_equal(again, vectors)


def test_retrieval_of_one_raster_in_bands_on_two_workers_equals_one_process(tmp_path, ckpt, scheduler):
    from aether.retrieval.search import retrieve

    values = unit_field(140, 100, seed=11)
    values[:, 30:45, 20:60] = np.nan
    src = write_raster(tmp_path / "ae.tif", values, bottom_up=True)
    queries = ["a quiet cafe", "a park"]
    one = retrieve(
        queries,
        str(ckpt),
        str(tmp_path / "one"),
        ae_tif=str(src),
        progress=False,
        options=SearchOptions(top_k=4, nms_m=50, tile_px=32),
    )
    two = retrieve_at_scale(
        queries,
        str(ckpt),
        str(tmp_path / "two"),
        ae_tif=str(src),
        progress=False,
        options=SearchOptions(top_k=4, nms_m=50, tile_px=32),
        cluster=Cluster(scheduler=scheduler),
        band_px=64,
    )  # 3 bands of 64, 64 and 12 rows
    for a, b in zip(one, two):
        assert a.hits == b.hits and len(a.hits) == 4
        with rasterio.open(a.tif) as x, rasterio.open(b.tif) as y:
            np.testing.assert_array_equal(x.read(), y.read())
            assert (
                {**x.profile, "nodata": 0} == {**y.profile, "nodata": 0} and np.isnan(x.nodata) and np.isnan(y.nodata)
            )
            assert x.tags() == y.tags() and x.descriptions == y.descriptions
        assert json.loads(a.geojson.read_text()) == json.loads(b.geojson.read_text())
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
