"""What fetch_ae.py does with inputs a careless or hostile index, host or user gives it (on a
miniature of the published layout served on 127.0.0.1): it never writes over what it reads, never
resumes into a damaged or mixed file, never hangs, keeps memory bounded, and refuses what it
cannot use in one line."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import rasterio
from pyproj import Transformer
from rasterio.transform import from_origin

from aether.core.journal import partial_paths
from aether.geo.alphaearth import NODATA_INT8, quantize
from tests.data.test_fetch import ACROSS, INSIDE_35, bbox_args, expected_pixels
from tests.helpers.aef_miniature import PREFIX, TILE_PX, _write_tile, build_miniature, embedding_field, index_url
from tests.helpers.fixtures import run_script_in_process
from tests.helpers.range_server import RangeServer

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    """A private copy of the miniature (its tiles may be changed) and a fresh cache."""
    monkeypatch.setenv("AETHER_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "bucket"
    return root, build_miniature(root)


def run_fetch(args: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    return run_script_in_process("fetch_ae.py", [*args, "--no-progress"], monkeypatch, capsys)


def one_line(code: int, err: str, *parts: str) -> str:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for part in parts:
        assert part in lines[0], lines[0]
    return lines[0]


def index_rows(root: Path) -> list[dict]:
    return pq.read_table(root / PREFIX / "aef_index.parquet").to_pylist()


def write_index(path: Path, rows: list[dict], **types) -> Path:
    """An index with the real columns (the footprint left out), from `rows`; `types` overrides a
    column's type (to write text where numbers belong)."""
    columns = [
        "fid",
        "path",
        "year",
        "utm_zone",
        "crs",
        "utm_west",
        "utm_south",
        "utm_east",
        "utm_north",
        "wgs84_west",
        "wgs84_south",
        "wgs84_east",
        "wgs84_north",
    ]
    schema = pa.schema(
        [
            (
                c,
                types.get(
                    c,
                    pa.string()
                    if c in ("path", "utm_zone", "crs")
                    else pa.int32()
                    if c in ("fid", "year")
                    else pa.float64(),
                ),
            )
            for c in columns
        ]
    )
    pq.write_table(pa.Table.from_pylist([{c: r.get(c) for c in columns} for r in rows], schema=schema), path)
    return path


def local_index(root: Path) -> Path:
    """The miniature's index as a local mirror has it: tiles named relative to the index."""
    rows = index_rows(root)
    for row in rows:
        row["path"] = row["path"].split(f"{PREFIX}/", 1)[1]
    return write_index(root / PREFIX / "local_index.parquet", rows)


# ---- 1. never over an input ---------------------------------------------------------------------


def test_out_naming_a_tile_of_a_local_mirror_or_its_index_is_refused(mirror, monkeypatch, capsys):
    """A local mirror's index named like a GeoTIFF (only such a name passes the output's own check)."""
    root, tiles = mirror
    index = local_index(root)
    index = index.rename(index.with_suffix(".tiff"))
    for target, what in [(tiles[1].local, "the source tile"), (index, "the tile index")]:
        before = target.read_bytes()
        code, _, err = run_fetch(
            [*bbox_args(INSIDE_35), "--year", "2024", "--source", str(index), "--out", str(target)], monkeypatch, capsys
        )
        one_line(code, err, f"output {target} is {what}", "choose another --out")
        assert target.read_bytes() == before
    code, _, err = run_fetch(
        [*bbox_args(INSIDE_35), "--year", "2024", "--source", str(index), "--out", str(root / "fetched.tif")],
        monkeypatch,
        capsys,
    )
    assert code == 0, err  # the local mirror itself works
    np.testing.assert_array_equal(
        rasterio.open(root / "fetched.tif").read(), expected_pixels(root / "fetched.tif", [tiles[1]])
    )


# ---- 2, 3. resumes that would publish a damaged or mixed file -------------------------------------


def interrupt_fetch(server: RangeServer, args: list[str], journal: Path, windows: int = 3) -> None:
    server.delay_s = 0.02
    proc = subprocess.Popen(
        [sys.executable, "fetch_ae.py", *args, "--no-progress"],
        cwd=ROOT,
        env={**os.environ},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if len(json.loads(journal.read_text())["done"]) >= windows:
                    break
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.02)
        assert proc.poll() is None, "the fetch ended before it could be interrupted"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
        server.delay_s = 0.0


def test_a_fetch_partial_cut_short_is_redone_not_published(mirror, tmp_path, monkeypatch, capsys):
    root, tiles = mirror
    out = tmp_path / "resumed.tif"
    partial, journal = partial_paths(out)
    with RangeServer(root) as server:
        args = [
            *bbox_args(ACROSS),
            "--year",
            "2024",
            "--out",
            str(out),
            "--tile",
            "32",
            "--checkpoint-every",
            "0",
            "--source",
            index_url(server.url),
        ]
        interrupt_fetch(server, args, journal, windows=6)
        with rasterio.open(partial) as src:
            first = int(src.get_tag_item("BLOCK_OFFSET_0_0", "TIFF", bidx=1))
        os.truncate(partial, first + (partial.stat().st_size - first) // 2)
        code, stdout, err = run_fetch(args, monkeypatch, capsys)
    assert code == 0, err
    assert "failed their check" in stdout
    with rasterio.open(out) as dst:
        data = dst.read()  # every block decodes
    np.testing.assert_array_equal(data, expected_pixels(out, [tiles[1], tiles[0]]))


def test_a_tile_republished_between_an_interrupted_fetch_and_its_continuation_is_not_mixed(
    mirror, tmp_path, monkeypatch, capsys
):
    root, tiles = mirror
    out = tmp_path / "fetched.tif"
    partial, journal = partial_paths(out)
    with RangeServer(root) as server:
        args = [
            *bbox_args(INSIDE_35),
            "--year",
            "2024",
            "--out",
            str(out),
            "--tile",
            "16",
            "--checkpoint-every",
            "0",
            "--source",
            index_url(server.url),
        ]
        interrupt_fetch(server, args, journal)
        tile = tiles[1]
        new = quantize(embedding_field(TILE_PX, seed=42))
        time.sleep(0.01)  # another modification time: another ETag
        _write_tile(tile.local, new, tile.transform, tile.epsg, bottom_up=True)
        code, stdout, err = run_fetch(args, monkeypatch, capsys)
    assert code == 0, err
    assert "had other tile versions: starting over" in stdout
    with rasterio.open(out) as dst:
        data, t = dst.read(), dst.transform
    c0, r0 = round((t.c - tile.transform.c) / 10), round((tile.transform.f - t.f) / 10)
    np.testing.assert_array_equal(data, new[:, r0 : r0 + data.shape[1], c0 : c0 + data.shape[2]])


# ---- 5. hangs -----------------------------------------------------------------------------------


class Trickler:
    """A host that answers a few bytes at a time (a "slowloris"): the headers, or the body after
    headers sent at once."""

    def __init__(self, body_only: bool):
        self.body_only = body_only
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/aef_index.parquet"
        self.stop = threading.Event()
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self.trickle, args=(conn,), daemon=True).start()

    def trickle(self, conn):
        head = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\nContent-Type: application/octet-stream\r\n\r\n"
        try:
            conn.recv(65536)
            if self.body_only:
                conn.sendall(head)
                head = b""
            for byte in head + b"PAR1" * 25000:
                if self.stop.is_set():
                    break
                conn.sendall(bytes([byte]))
                time.sleep(0.2)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self):
        self.stop.set()
        self.sock.close()


@pytest.mark.parametrize("body_only", [False, True], ids=["headers", "body"])
def test_an_index_host_that_trickles_its_answer_is_given_up(tmp_path, monkeypatch, capsys, body_only):
    monkeypatch.setenv("AETHER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("GDAL_HTTP_TIMEOUT", "2")
    host = Trickler(body_only)
    try:
        start = time.monotonic()
        code, _, err = run_fetch(
            [*bbox_args(INSIDE_35), "--year", "2024", "--source", host.url, "--out", str(tmp_path / "ae.tif")],
            monkeypatch,
            capsys,
        )
        took = time.monotonic() - start
    finally:
        host.close()
    one_line(code, err, "answered too slowly", "GDAL_HTTP_TIMEOUT")
    assert took < 15, took
    assert not (tmp_path / "ae.tif").exists() and not list((tmp_path / "cache").rglob("*.parquet"))


@pytest.mark.parametrize(
    "path, why",
    [
        ("/vsistdin/", "which AETHER does not read"),
        ("/vsisubfile/0_1000,{local}", "which AETHER does not read"),
        ("/vsicurl/http://other.example/tile.tiff", "which AETHER does not read"),
        ("http://other.example/tile.tiff", "on another host than the index"),
        ("//other.example/tile.tiff", "on another host than the index"),
        ("file:///etc/hostname", "which AETHER does not read"),
    ],
)
def test_tile_paths_are_limited_to_what_the_index_format_uses(mirror, tmp_path, monkeypatch, capsys, path, why):
    root, tiles = mirror
    rows = index_rows(root)
    rows[1]["path"] = path.format(local=tiles[0].local)
    write_index(root / PREFIX / "aef_index.parquet", rows)
    with RangeServer(root) as server:
        start = time.monotonic()
        code, _, err = run_fetch(
            [
                *bbox_args(INSIDE_35),
                "--year",
                "2024",
                "--source",
                index_url(server.url),
                "--out",
                str(tmp_path / "ae.tif"),
            ],
            monkeypatch,
            capsys,
        )
    one_line(code, err, "names the tile", why)
    assert time.monotonic() - start < 20 and not (tmp_path / "ae.tif").exists()


def test_a_relative_tile_path_leaving_a_local_index_folder_is_refused(mirror, tmp_path, monkeypatch, capsys):
    root, _ = mirror
    rows = index_rows(root)
    rows[1]["path"] = "../../../../../elsewhere/tile.tiff"
    index = write_index(root / PREFIX / "local_index.parquet", rows)
    code, _, err = run_fetch(
        [*bbox_args(INSIDE_35), "--year", "2024", "--source", str(index), "--out", str(tmp_path / "ae.tif")],
        monkeypatch,
        capsys,
    )
    one_line(code, err, "outside the index's folder")


# ---- 6. bounded memory --------------------------------------------------------------------------


def test_an_index_with_thousands_of_duplicate_rows_reads_each_tile_once(mirror, tmp_path, monkeypatch, capsys):
    root, tiles = mirror
    rows = index_rows(root)
    index = write_index(
        root / PREFIX / "local_index.parquet",
        [dict(rows[1], path=rows[1]["path"].split(f"{PREFIX}/", 1)[1]) for _ in range(20_000)],
    )
    argv = [
        "fetch_ae.py",
        *bbox_args(INSIDE_35),
        "--year",
        "2024",
        "--source",
        str(index),
        "--out",
        str(tmp_path / "ae.tif"),
        "--no-progress",
    ]
    child = (
        "import runpy, sys\n"
        f"sys.argv = {argv!r}\n"
        "try:\n"
        "    runpy.run_path('fetch_ae.py', run_name='__main__')\n"
        "finally:  # VmHWM: this process's own peak (ru_maxrss would carry the forking pytest worker's)\n"
        "    hwm = [line for line in open('/proc/self/status') if line.startswith('VmHWM')][0]\n"
        "    print('peak MiB', int(hwm.split()[1]) // 1024, file=sys.stderr)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", child],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ},
    )
    assert proc.returncode == 0, proc.stderr
    assert "1 tile of 2024" in proc.stdout
    peak = int(proc.stderr.split("peak MiB")[1])
    assert peak < 1024, proc.stderr
    np.testing.assert_array_equal(
        rasterio.open(tmp_path / "ae.tif").read(), expected_pixels(tmp_path / "ae.tif", [tiles[1]])
    )


def test_a_box_meeting_more_tiles_than_the_bound_is_refused(mirror, tmp_path, monkeypatch, capsys):
    from aether.data.fetch import MAX_TILES

    root, _ = mirror
    base = index_rows(root)[1]
    rows = [
        dict(base, path=f"2024/35N/t{i}.tiff", utm_west=base["utm_west"] + i, utm_east=base["utm_east"] + i)
        for i in range(MAX_TILES + 5)
    ]
    index = write_index(root / PREFIX / "local_index.parquet", rows)
    code, _, err = run_fetch(
        [*bbox_args(INSIDE_35), "--year", "2024", "--source", str(index), "--out", str(tmp_path / "ae.tif")],
        monkeypatch,
        capsys,
    )
    one_line(code, err, f"meets more than {MAX_TILES} tiles", "smaller box")


# ---- one line instead of a traceback --------------------------------------------------------------


@pytest.mark.parametrize(
    "column, value, kind, message",
    [
        ("year", "twenty", pa.string(), "column year, row 1 (from 0) is 'twenty', not a whole year"),
        ("wgs84_west", "17.83E", pa.string(), "column wgs84_west, row 1 (from 0) is '17.83E', not a number"),
        ("crs", "EPSG:999999", None, "column crs, row 1 (from 0) is 'EPSG:999999', not a CRS PROJ knows"),
        ("crs", None, None, "column crs, row 1 (from 0) is None, not a CRS PROJ knows"),
    ],
)
def test_an_index_with_bad_values_names_the_column_and_row(
    mirror, tmp_path, monkeypatch, capsys, column, value, kind, message
):
    root, _ = mirror
    rows = index_rows(root)
    for row in rows:
        row["path"] = row["path"].split(f"{PREFIX}/", 1)[1]
        if kind is not None:
            row[column] = str(row[column])
    rows[1][column] = value
    index = write_index(root / PREFIX / "local_index.parquet", rows, **({column: kind} if kind else {}))
    code, _, err = run_fetch(
        [*bbox_args(INSIDE_35), "--year", "2024", "--source", str(index), "--out", str(tmp_path / "ae.tif")],
        monkeypatch,
        capsys,
    )
    one_line(code, err, message)


def test_a_timeout_that_is_not_a_number_is_one_line(mirror, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GDAL_HTTP_TIMEOUT", "30s")
    code, _, err = run_fetch(
        [
            *bbox_args(INSIDE_35),
            "--year",
            "2024",
            "--source",
            "http://127.0.0.1:9/x.parquet",
            "--out",
            str(tmp_path / "ae.tif"),
        ],
        monkeypatch,
        capsys,
    )
    one_line(code, err, "GDAL_HTTP_TIMEOUT='30s' is not a positive number")


def test_a_cache_setting_that_names_a_file_is_one_line(mirror, tmp_path, monkeypatch, capsys):
    root, _ = mirror
    (tmp_path / "not_a_folder").write_text("x")
    monkeypatch.setenv("AETHER_CACHE", str(tmp_path / "not_a_folder"))
    with RangeServer(root) as server:
        code, _, err = run_fetch(
            [
                *bbox_args(INSIDE_35),
                "--year",
                "2024",
                "--source",
                index_url(server.url),
                "--out",
                str(tmp_path / "ae.tif"),
            ],
            monkeypatch,
            capsys,
        )
    one_line(code, err, "is a file, not a folder", "AETHER_CACHE")


# ---- friction -----------------------------------------------------------------------------------


def test_a_cached_index_cut_short_is_fetched_again(mirror, tmp_path, monkeypatch, capsys):
    from aether.data.fetch import cached_index_paths

    root, _ = mirror
    with RangeServer(root) as server:
        url = index_url(server.url)
        args = [*bbox_args(INSIDE_35), "--year", "2024", "--source", url]
        code, _, err = run_fetch([*args, "--out", str(tmp_path / "a.tif")], monkeypatch, capsys)
        assert code == 0, err
        cached = cached_index_paths(url)[0]
        os.truncate(cached, cached.stat().st_size // 2)
        code, stdout, err = run_fetch([*args, "--out", str(tmp_path / "b.tif")], monkeypatch, capsys)
    assert code == 0, err
    assert "cannot be read (cut short?); fetching it again" in stdout
    assert cached.read_bytes() == (root / PREFIX / "aef_index.parquet").read_bytes()


def test_a_tile_across_the_antimeridian_is_found_from_either_side(tmp_path, monkeypatch, capsys):
    """A 384 px tile of UTM zone 60N whose WGS84 bounds wrap (west 179.9..., east -179.9...)."""
    from rasterio.warp import transform_bounds

    monkeypatch.setenv("AETHER_CACHE", str(tmp_path / "cache"))
    x, y = Transformer.from_crs("EPSG:4326", "EPSG:32660", always_xy=True).transform(180.0, 65.0)
    left, top = round(x / 10) * 10 - TILE_PX * 5, round(y / 10) * 10 + TILE_PX * 5
    transform = from_origin(left, top, 10.0, 10.0)
    data = quantize(embedding_field(TILE_PX, seed=3))
    path = tmp_path / "2024" / "60N" / "wrap.tiff"
    path.parent.mkdir(parents=True)
    _write_tile(path, data, transform, 32660, bottom_up=False)
    bounds = (left, top - TILE_PX * 10, left + TILE_PX * 10, top)
    w, s, e, n = transform_bounds("EPSG:32660", "EPSG:4326", *bounds, densify_pts=21)
    assert w > e  # GDAL gives the wrapped bounds, as the index does
    index = write_index(
        tmp_path / "aef_index.parquet",
        [
            {
                "fid": 1,
                "path": "2024/60N/wrap.tiff",
                "year": 2024,
                "utm_zone": "60N",
                "crs": "EPSG:32660",
                "utm_west": bounds[0],
                "utm_south": bounds[1],
                "utm_east": bounds[2],
                "utm_north": bounds[3],
                "wgs84_west": w,
                "wgs84_south": s,
                "wgs84_east": e,
                "wgs84_north": n,
            }
        ],
    )
    for name, box in [("west", (179.97, 64.99, 179.99, 65.01)), ("east", (-179.99, 64.99, -179.97, 65.01))]:
        out = tmp_path / f"{name}.tif"
        code, _, err = run_fetch(
            [*bbox_args(box), "--year", "2024", "--source", str(index), "--out", str(out)], monkeypatch, capsys
        )
        assert code == 0, err
        with rasterio.open(out) as dst:
            got, t = dst.read(), dst.transform
        c0, r0 = round((t.c - left) / 10), round((top - t.f) / 10)
        np.testing.assert_array_equal(got, data[:, r0 : r0 + got.shape[1], c0 : c0 + got.shape[2]])


def test_per_zone_with_crs_is_refused(mirror, tmp_path, monkeypatch, capsys):
    code, _, err = run_fetch(
        [
            *bbox_args(ACROSS),
            "--year",
            "2024",
            "--per-zone",
            "--crs",
            "EPSG:32634",
            "--out",
            str(tmp_path / "zones"),
            "--source",
            "http://127.0.0.1:9/x.parquet",
        ],
        monkeypatch,
        capsys,
    )
    one_line(code, err, "--crs and --per-zone do not go together")
    assert not (tmp_path / "zones").exists()


def test_a_per_zone_rerun_names_zone_files_left_from_an_earlier_box(mirror, tmp_path, monkeypatch, capsys):
    root, _ = mirror
    out = tmp_path / "zones"
    with RangeServer(root) as server:
        base = ["--year", "2024", "--per-zone", "--out", str(out), "--source", index_url(server.url)]
        code, stdout, err = run_fetch([*bbox_args(ACROSS), *base], monkeypatch, capsys)
        assert code == 0, err
        assert "GDAL 3.7 or newer" in stdout  # what mosaic.vrt needs (Int8), said where it is written
        code, stdout, err = run_fetch([*bbox_args(INSIDE_35), *base], monkeypatch, capsys)
    assert code == 0, err
    assert (out / "tiles.txt").read_text() == "alphaearth_2024_35N.tif\n"
    assert "also holds alphaearth_2024_34N.tif, from an earlier fetch" in stdout


def test_windows_that_no_tile_meets_are_neither_fetched_nor_stored(mirror, tmp_path, monkeypatch, capsys):
    """A box of about 1 x 0.4 degrees holding the two small tiles: most of its windows are empty."""
    root, tiles = mirror
    out = tmp_path / "big.tif"
    with RangeServer(root) as server:
        start = time.monotonic()
        code, stdout, err = run_fetch(
            [
                *bbox_args((23.5, 60.0, 24.5, 60.4)),
                "--year",
                "2024",
                "--out",
                str(out),
                "--source",
                index_url(server.url),
            ],
            monkeypatch,
            capsys,
        )
        took = time.monotonic() - start
    assert code == 0, err
    assert "windows meet no tile: they stay nodata" in stdout
    assert out.stat().st_size < 40 * 2**20
    with rasterio.open(out) as dst:
        assert dst.width * dst.height > 20 * TILE_PX**2
        window = (
            rasterio.windows.from_bounds(
                *rasterio.warp.transform_bounds("EPSG:4326", dst.crs, *INSIDE_35), transform=dst.transform
            )
            .round_offsets()
            .round_lengths()
        )
        part = dst.read(window=window)
        corner = dst.read(1, window=rasterio.windows.Window(0, 0, 64, 64))
    assert (corner == NODATA_INT8).all()
    assert (part != NODATA_INT8).any()
    print(f"\nfetched a box of {took:.1f} s")
