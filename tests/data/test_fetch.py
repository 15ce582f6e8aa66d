"""fetch_ae.py against a miniature of the published AlphaEarth layout served on 127.0.0.1 (the real
hosts cannot be reached from the tests): an index Parquet with the real columns and two tiles in
adjacent UTM zones, one stored bottom-up, under the real folder layout. Values are checked against
a brute-force reading of the tiles (pyproj and numpy), bytes against the range server's count."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
from pyproj import Transformer

from aether.core.journal import partial_paths
from aether.geo.alphaearth import ATTRIBUTION, LICENSE, NODATA_INT8, band_names
from tests.helpers.aef_miniature import BUCKET, TILE_PX, build_miniature, index_url
from tests.helpers.fixtures import run_script_in_process, write_config, write_geojson
from tests.helpers.range_server import RangeServer

ROOT = Path(__file__).resolve().parents[2]
INSIDE_35 = (24.0159, 60.1652, 24.0310, 60.1736)  # within one 128 px block of the zone 35 tile
ACROSS = (23.985, 60.163, 24.025, 60.180)  # both tiles; 62.5% of it in zone 35


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    root = tmp_path_factory.mktemp("bucket")
    return root, build_miniature(root)


@pytest.fixture
def served(mini, tmp_path, monkeypatch):
    """A range server of its own (GDAL caches by URL, so byte counts start from zero) and a fresh cache."""
    monkeypatch.setenv("AETHER_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("GS_USER_PROJECT", raising=False)
    root, tiles = mini
    with RangeServer(root) as server:
        yield server, tiles


def fetch(server, args, monkeypatch, capsys):
    return run_script_in_process(
        "fetch_ae.py", [*args, "--source", index_url(server.url), "--no-progress"], monkeypatch, capsys
    )


def bbox_args(bbox) -> list[str]:
    return ["--bbox", *(str(v) for v in bbox)]


def expected_pixels(path: Path, tiles) -> np.ndarray:
    """Each output pixel brute force: the pixel under its centre of the first tile (in priority
    order) that has one there, else -128."""
    with rasterio.open(path) as dst:
        t, crs, height, width = dst.transform, dst.crs, dst.height, dst.width
    rows, cols = np.mgrid[0:height, 0:width]
    x, y = t @ (cols + 0.5, rows + 0.5)
    out = np.full((64, height, width), NODATA_INT8, dtype=np.int8)
    empty = np.ones((height, width), dtype=bool)
    for tile in tiles:
        tx, ty = Transformer.from_crs(crs, f"EPSG:{tile.epsg}", always_xy=True).transform(x, y)
        c, r = ~tile.transform @ (tx, ty)
        c, r = np.floor(c).astype(int), np.floor(r).astype(int)
        inside = (c >= 0) & (c < TILE_PX) & (r >= 0) & (r < TILE_PX)
        values = np.full_like(out, NODATA_INT8)
        values[:, inside] = tile.north_up[:, r[inside], c[inside]]
        take = empty & inside & ~(values == NODATA_INT8).any(axis=0)
        out[:, take] = values[:, take]
        empty &= ~take
    return out


def check_grid(path: Path, bbox, tile) -> None:
    """On `tile`'s 10 m pixel grid, covering the box and no more than one pixel beyond it."""
    with rasterio.open(path) as dst:
        t, bounds, crs = dst.transform, dst.bounds, dst.crs
    assert (t.a, t.b, t.d, t.e) == (10.0, 0.0, 0.0, -10.0)
    assert crs.to_epsg() == tile.epsg
    assert (t.c - tile.transform.c) % 10 == 0 and (t.f - tile.transform.f) % 10 == 0
    minx, miny, maxx, maxy = Transformer.from_crs("EPSG:4326", crs, always_xy=True).transform_bounds(
        *bbox, densify_pts=21
    )
    assert bounds.left <= minx < bounds.left + 10 and bounds.right - 10 < maxx <= bounds.right
    assert bounds.bottom <= miny < bounds.bottom + 10 and bounds.top - 10 < maxy <= bounds.top


def test_a_fetched_raster_trains_embeds_and_answers_queries(served, tmp_path, monkeypatch, capsys):
    server, tiles = served
    ae = tmp_path / "fetched.tif"
    code, _, stderr = fetch(
        server,
        [*bbox_args((24.0100, 60.1640, 24.0300, 60.1750)), "--year", "2024", "--out", str(ae)],
        monkeypatch,
        capsys,
    )
    assert code == 0, stderr
    with rasterio.open(ae) as dst:
        valid = ~(dst.read(1) == NODATA_INT8)
        transform, crs = dst.transform, dst.crs
    rng = np.random.default_rng(0)
    rows, cols = np.nonzero(valid[10:-10, 10:-10])
    pick = rng.choice(len(rows), 60, replace=False)
    x, y = transform @ (cols[pick] + 10.5, rows[pick] + 10.5)
    lon, lat = Transformer.from_crs(crs, "EPSG:4326", always_xy=True).transform(x, y)
    kinds = [("amenity", "cafe"), ("shop", "books"), ("leisure", "park")]
    records = [
        {
            "osm_id": f"node/{i}",
            "name": f"Place {i}",
            "key": kinds[i % 3][0],
            "value": kinds[i % 3][1],
            "description": f"A place of {kinds[i % 3][1]}, a type of {kinds[i % 3][0]}, named Place {i}.",
            "lon": a,
            "lat": b,
        }
        for i, (a, b) in enumerate(zip(lon, lat))
    ]
    pois = write_geojson(tmp_path / "pois.geojson", records)
    cfg = write_config(
        tmp_path / "cfg.yaml", ae, pois, train={"epochs": 2, "batch_size": 16, "run_dir": str(tmp_path / "run")}
    )
    code, stdout, stderr = run_script_in_process("train.py", ["--cfg", str(cfg), "--no-progress"], monkeypatch, capsys)
    assert code == 0, stderr
    ckpt = tmp_path / "run" / "best.pt"
    emb = tmp_path / "aether.tif"
    code, _, stderr = run_script_in_process(
        "infer_aether_raster.py",
        ["--ae_tif", str(ae), "--ckpt", str(ckpt), "--out", str(emb), "--no-progress"],
        monkeypatch,
        capsys,
    )
    assert code == 0, stderr
    with rasterio.open(emb) as e, rasterio.open(ae) as a:
        assert e.transform == a.transform and e.crs == a.crs and e.count == 16
    code, stdout, stderr = run_script_in_process(
        "retrieve.py",
        [
            "--ckpt",
            str(ckpt),
            "--emb",
            str(emb),
            "--query",
            "a quiet cafe",
            "--out",
            str(tmp_path / "found"),
            "--no-progress",
        ],
        monkeypatch,
        capsys,
    )
    assert code == 0, stderr
    assert (tmp_path / "found" / "queries.json").is_file() and "best" in stdout


def test_a_bbox_inside_one_bottom_up_tile_reads_only_its_blocks(served, tmp_path, monkeypatch, capsys):
    server, tiles = served
    tile34, tile35 = tiles[0], tiles[1]
    out = tmp_path / "inside.tif"
    code, stdout, stderr = fetch(
        server, [*bbox_args(INSIDE_35), "--year", "2024", "--out", str(out), "--tile", "64"], monkeypatch, capsys
    )
    assert code == 0, stderr
    assert ATTRIBUTION in stdout
    check_grid(out, INSIDE_35, tile35)
    with rasterio.open(out) as dst:
        data, tags = dst.read(), dst.tags()
        assert dst.dtypes[0] == "int8" and dst.nodata == NODATA_INT8 and dst.count == 64
        assert list(dst.descriptions) == band_names()
        assert dst.profile["tiled"] and dst.compression.name == "zstd"
        # the tile's own pixels: its rows flipped to north-up, its columns as they are
        c0 = round((dst.transform.c - tile35.transform.c) / 10)
        r0 = round((tile35.transform.f - dst.transform.f) / 10)
    np.testing.assert_array_equal(data, tile35.north_up[:, r0 : r0 + data.shape[1], c0 : c0 + data.shape[2]])
    np.testing.assert_array_equal(data, expected_pixels(out, [tile35]))
    assert tags["AEF_YEAR"] == "2024" and tags["AEF_SOURCE_TILES"] == f"{BUCKET}/{tile35.key}"
    assert tags["AEF_ATTRIBUTION"] == ATTRIBUTION and tags["AEF_LICENSE"] == LICENSE
    assert tags["AEF_SOURCE_INDEX"] == index_url(server.url)

    # bytes: the blocks under the output (all 64 bands), the directory, and no more
    assert server.bytes_by_path.get(tile34.key, 0) == 0
    with rasterio.open(tile35.local) as src:
        rows = TILE_PX - 1 - np.arange(r0, r0 + data.shape[1])  # file rows (bottom-up)
        blocks = {(int(i), int(j)) for i in set(rows // 128) for j in set(np.arange(c0, c0 + data.shape[2]) // 128)}
        sizes = [src.block_size(b, i, j) for b in range(1, 65) for (i, j) in blocks]
    needed = sum(sizes)
    chunk = 16384  # GDAL's /vsicurl/ reads whole chunks: a block costs the chunks it touches
    in_chunks = sum((math.ceil(size / chunk) + 1) * chunk for size in sizes)
    sent, size = server.bytes_by_path[tile35.key], tile35.local.stat().st_size
    with capsys.disabled():
        print(
            f"\nfetch inside one block read {sent:,} of {size:,} bytes ({sent / size:.1%}); its blocks are "
            f"{needed:,} bytes"
        )
    assert len(blocks) == 1
    assert needed <= sent <= in_chunks + 4 * chunk  # and the directory
    assert sent < 0.25 * size


@pytest.mark.parametrize("crs", [None, "EPSG:32634"])
def test_a_bbox_across_two_zones_warps_the_other_by_nearest_neighbour(served, tmp_path, monkeypatch, capsys, crs):
    server, tiles = served
    tile34, tile35 = tiles[0], tiles[1]
    out = tmp_path / "across.tif"
    extra = ["--crs", crs] if crs else []
    code, stdout, stderr = fetch(
        server, [*bbox_args(ACROSS), "--year", "2024", "--out", str(out), "--tile", "64", *extra], monkeypatch, capsys
    )
    assert code == 0, stderr
    home, other = (tile35, tile34) if crs is None else (tile34, tile35)
    assert f"warped into EPSG:{home.epsg} by nearest neighbour" in stdout
    if crs is None:
        assert "UTM 35N holds 62% of the box" in stdout
    check_grid(out, ACROSS, home)
    with rasterio.open(out) as dst:
        data, tags = dst.read(), dst.tags()
    expected = expected_pixels(out, [home, other])
    np.testing.assert_array_equal(data, expected)
    invalid = (data == NODATA_INT8).any(axis=0)
    assert ((data == NODATA_INT8).all(axis=0) == invalid).all()  # nodata in all bands at once
    assert 0 < invalid.sum() < 0.2 * invalid.size  # where neither tile has pixels
    own = expected_pixels(out, [home])
    assert ((own == NODATA_INT8).any(axis=0) & ~invalid).any()  # the other zone filled some
    assert tags["AEF_SOURCE_TILES"].split() == [f"{BUCKET}/{home.key}", f"{BUCKET}/{other.key}"]
    assert tags["AEF_WARPED"].startswith(f"tiles in EPSG:{other.epsg} warped")


def test_per_zone_writes_one_file_per_zone_and_a_set_of_tiles(served, tmp_path, monkeypatch, capsys):
    from aether.geo.tiles import expand_tiles

    server, tiles = served
    out = tmp_path / "zones"
    code, _, stderr = fetch(
        server, [*bbox_args(ACROSS), "--year", "2024", "--out", str(out), "--per-zone"], monkeypatch, capsys
    )
    assert code == 0, stderr
    paths = expand_tiles(str(out / "tiles.txt"))
    assert [Path(p).name for p in paths] == ["alphaearth_2024_34N.tif", "alphaearth_2024_35N.tif"]
    for path, tile in zip(paths, tiles[:2]):
        check_grid(Path(path), ACROSS, tile)
        with rasterio.open(path) as dst:
            np.testing.assert_array_equal(dst.read(), expected_pixels(Path(path), [tile]))
            assert dst.tags()["AEF_WARPED"].startswith("none")
    with rasterio.open(out / "mosaic.vrt") as vrt:
        assert vrt.count == 64


@pytest.mark.parametrize("margin", [None, 300.0])
def test_like_a_poi_file_fetches_its_extent_and_the_augmented_window(served, tmp_path, monkeypatch, capsys, margin):
    """The extent plus 95 m (data.aug_radius_m) by default, or plus --margin-m."""
    server, tiles = served
    lon, lat = np.array([24.015, 24.02, 24.03]), np.array([60.166, 60.172, 60.169])
    pois = write_geojson(
        tmp_path / "pois.geojson", [{"name": f"p{i}", "lon": a, "lat": b} for i, (a, b) in enumerate(zip(lon, lat))]
    )
    out = tmp_path / "like.tif"
    extra = [] if margin is None else ["--margin-m", str(margin)]
    code, _, stderr = fetch(
        server, ["--like", str(pois), "--year", "2024", "--out", str(out), *extra], monkeypatch, capsys
    )
    assert code == 0, stderr
    with rasterio.open(out) as dst:
        bounds, crs = dst.bounds, dst.crs
    x, y = Transformer.from_crs("EPSG:4326", crs, always_xy=True).transform(lon, lat)
    margin = 95.0 if margin is None else margin
    assert bounds.left <= x.min() - margin and x.max() + margin <= bounds.right
    assert bounds.bottom <= y.min() - margin and y.max() + margin <= bounds.top
    assert bounds.right - bounds.left < x.max() - x.min() + 2 * margin + 60


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "case, args, message",
    [
        ("outside both tiles", [*bbox_args((30.0, 10.0, 30.1, 10.1)), "--year", "2024"], "no AlphaEarth tile of 2024"),
        ("inverted", [*bbox_args((24.02, 60.16, 23.98, 60.18)), "--year", "2024"], "is not west of east"),
        ("not a latitude", [*bbox_args((24.0, 60.1, 24.1, 95.0)), "--year", "2024"], "is not a latitude"),
        ("too large", [*bbox_args((0.0, 0.0, 60.0, 70.0)), "--year", "2024"], "GiB AETHER fetches at once"),
        ("year not in the index", [*bbox_args(INSIDE_35), "--year", "2030"], "(it has 2023-2024)"),
        ("no tile of that year there", [*bbox_args(INSIDE_35), "--year", "2023"], "no AlphaEarth tile of 2023"),
        ("unreachable host", [*bbox_args(INSIDE_35), "--year", "2024", "--source", "UNREACHABLE"], "cannot reach"),
        (
            "gcs without a billing project",
            [*bbox_args(INSIDE_35), "--year", "2024", "--source", "gcs"],
            "give your Google Cloud billing project",
        ),
    ],
)
def test_refusals_are_one_line_and_leave_nothing(served, tmp_path, monkeypatch, capsys, case, args, message):
    server, _ = served
    folder = tmp_path / "out"
    folder.mkdir()
    args = [a.replace("UNREACHABLE", f"http://127.0.0.1:{closed_port()}/aef_index.parquet") for a in args]
    if "--source" not in args:
        args += ["--source", index_url(server.url)]
    code, _, stderr = run_script_in_process(
        "fetch_ae.py", [*args, "--out", str(folder / "ae.tif"), "--no-progress"], monkeypatch, capsys
    )
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], stderr
    assert list(folder.iterdir()) == []


def test_the_index_is_cached_and_revalidated(served, tmp_path, monkeypatch, capsys):
    server, tiles = served
    key = "tge-labs/aef/v1/annual/aef_index.parquet"
    size = (tiles[0].local.parents[2] / "aef_index.parquet").stat().st_size
    for name in ("a", "b"):
        code, _, stderr = fetch(
            server,
            [*bbox_args(INSIDE_35), "--year", "2024", "--out", str(tmp_path / f"{name}.tif")],
            monkeypatch,
            capsys,
        )
        assert code == 0, stderr
    assert server.bytes_by_path[key] == size  # the second run asked, and was told it had not changed
    assert "not modified" in server.requests
    cached = list((tmp_path / "cache" / "aef_index").glob("*.json"))
    assert len(cached) == 1 and json.loads(cached[0].read_text())["etag"]


def test_an_interrupted_fetch_continues_where_it_stopped(served, mini, tmp_path, monkeypatch, capsys):
    server, tiles = served
    out = tmp_path / "resumed.tif"
    partial, journal = partial_paths(out)
    args = [*bbox_args(ACROSS), "--year", "2024", "--out", str(out), "--tile", "32", "--checkpoint-every", "0"]
    server.delay_s = 0.01
    proc = subprocess.Popen(
        [sys.executable, "fetch_ae.py", *args, "--source", index_url(server.url), "--no-progress"],
        cwd=ROOT,
        env={**os.environ},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if len(json.loads(journal.read_text())["done"]) >= 2:
                    break
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert partial.exists() and not out.exists()
    server.delay_s = 0.0
    before = server.bytes_sent
    code, stdout, stderr = fetch(server, args, monkeypatch, capsys)
    assert code == 0, stderr
    assert "resuming:" in stdout
    resumed = server.bytes_sent - before
    np.testing.assert_array_equal(rasterio.open(out).read(), expected_pixels(out, [tiles[1], tiles[0]]))
    assert not partial.exists() and not journal.exists()

    with RangeServer(mini[0]) as fresh:  # the same fetch from the start, under another URL (no GDAL cache)
        whole = tmp_path / "whole.tif"
        code, _, stderr = fetch(
            fresh, [*bbox_args(ACROSS), "--year", "2024", "--out", str(whole), "--tile", "32"], monkeypatch, capsys
        )
        assert code == 0, stderr
        assert resumed < fresh.bytes_sent
    code, stdout, _ = fetch(server, args, monkeypatch, capsys)  # the same command once more: nothing to do
    assert code == 0 and "already fetched" in stdout
