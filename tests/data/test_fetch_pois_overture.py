"""`aether fetch-pois --source overture` against a miniature Overture Places release with the real
GeoParquet schema, served by a real S3-compatible server on 127.0.0.1 (moto): the POIs are checked
against a brute-force reading of every file whole, the row groups read against the footers'
statistics, the cache against a stopped server and an interrupted run."""

from __future__ import annotations

import io
import json
import re
import time
from collections import Counter
from pathlib import Path

import geopandas as gpd
import pyarrow.parquet as pq
import pyogrio
import pytest
import shapely

from aether.cli.main import main
from aether.data.places import overture
from aether.data.poi import read_poi_frame
from tests.helpers.overture_miniature import (
    BUCKET,
    PREFIX,
    RELEASE,
    TAXONOMY_RELEASE,
    free_port,
    make_places,
    release_files,
    s3_server,
)

ROOT = f"s3://{BUCKET}/{PREFIX}"
MIN_CONFIDENCE = 0.5


@pytest.fixture(scope="module")
def miniature():
    files, box = make_places()
    return {RELEASE: release_files(files), TAXONOMY_RELEASE: release_files(files, taxonomy=True)}, box


@pytest.fixture(scope="module")
def server(miniature):
    releases, _ = miniature
    with s3_server(releases) as url:
        yield url


@pytest.fixture
def env(server, tmp_path, monkeypatch):
    """The server as AWS_ENDPOINT_URL and a fresh cache; returns the cache folder."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", server)
    monkeypatch.setenv("AETHER_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def fetch(args: list[str], capsys) -> tuple[int, str, str]:
    """`aether fetch-pois ARGS` in this process: exit code, stdout, stderr."""
    capsys.readouterr()
    try:
        main(["fetch-pois", "--source", "overture", "--overture-root", ROOT, "--no-progress", *args])
    except SystemExit as exc:
        captured = capsys.readouterr()
        return exc.code, captured.out, captured.err
    captured = capsys.readouterr()
    return 0, captured.out, captured.err


def bbox_args(box) -> list[str]:
    return ["--bbox", *(repr(v) for v in box)]  # repr: the edges exactly


def fetched(box, out: Path, capsys, release: str = RELEASE) -> str:
    code, stdout, stderr = fetch([*bbox_args(box), "--release", release, "--out", str(out)], capsys)
    assert code == 0, stderr
    return stdout


def expected_pois(parts: dict[str, bytes], box, dropped: Counter | None = None) -> list[dict]:
    """Every file read whole and filtered in plain Python: named places with a category and a
    confidence of at least MIN_CONFIDENCE whose point is in the box (edges included), once per id;
    `dropped` counts the others in the box by why."""
    west, south, east, north = box
    out, dropped = {}, Counter() if dropped is None else dropped
    for body in parts.values():
        for row in pq.read_table(io.BytesIO(body)).to_pylist():
            point = shapely.from_wkb(row["geometry"])
            name = ((row["names"] or {}).get("primary") or "").strip()
            kind = row.get("categories") or row.get("taxonomy") or {}
            category = kind.get("primary")
            alternates = kind.get("alternate", kind.get("alternates")) or []
            confidence = row["confidence"]
            if not (west <= point.x <= east and south <= point.y <= north):
                continue
            why = ("no name" if not name else "no category" if not category else
                   "low confidence" if confidence is None or confidence < MIN_CONFIDENCE else None)  # fmt: skip
            if why:
                dropped[why] += 1
                continue
            datasets = []
            for source in row["sources"]:
                if source["dataset"] not in datasets:
                    datasets.append(source["dataset"])
            out[row["id"]] = {
                "id": row["id"],
                "name": name,
                "category": category,
                "alternates": ";".join(alternates),
                "confidence": confidence,
                "sources": ";".join(datasets),
                "description": f"A place of {category.replace('_', ' ')}, named {name}.",
                "lon": point.x,
                "lat": point.y,
            }
    return [out[k] for k in sorted(out)]


def written_pois(path: Path) -> list[dict]:
    frame = gpd.read_parquet(path) if path.suffix == ".parquet" else gpd.read_file(path)
    columns = ["id", "name", "category", "alternates", "confidence", "sources", "description"]
    rows = frame[columns].to_dict("records")
    for rec, point in zip(rows, frame.geometry):
        rec.update(alternates=rec["alternates"] or "", lon=point.x, lat=point.y)
    return rows


def recorded(path: Path) -> dict:
    """What the file records of its source: GeoJSON members, GeoPackage layer metadata, GeoParquet 'aether'."""
    if path.suffix == ".geojson":
        return json.loads(path.read_text())
    if path.suffix == ".gpkg":
        return pyogrio.read_info(path)["layer_metadata"]
    return json.loads(pq.read_schema(path).metadata[b"aether"])


def group_stats(parts: dict[str, bytes], box) -> dict[tuple[str, int], tuple[bool, bool]]:
    """For every (file stem, row group): whether its footer's bbox statistics meet the box, and
    whether it holds a point inside the box (read brute force)."""
    west, south, east, north = box
    out = {}
    for name, body in parts.items():
        parquet = pq.ParquetFile(io.BytesIO(body))
        paths = [parquet.metadata.schema.column(i).path for i in range(parquet.metadata.num_columns)]
        for g in range(parquet.metadata.num_row_groups):
            stats = {p: parquet.metadata.row_group(g).column(paths.index(p)).statistics for p in overture.BOX_STATS}
            meets = (
                stats["bbox.xmin"].min <= east
                and stats["bbox.xmax"].max >= west
                and stats["bbox.ymin"].min <= north
                and stats["bbox.ymax"].max >= south
            )
            points = shapely.from_wkb(parquet.read_row_group(g, columns=["geometry"]).column(0).to_pylist())
            holds = any(west <= p.x <= east and south <= p.y <= north for p in points)
            out[(Path(name).name.removesuffix(".parquet"), g)] = (meets, holds)
    return out


def cache_folder(cache: Path, release: str = RELEASE) -> Path:
    (root,) = (cache / "overture").iterdir()
    return root / release


@pytest.mark.parametrize("suffix", [".gpkg", ".geojson", ".parquet"])
def test_pois_are_the_brute_force_selection_with_their_source_recorded(miniature, env, tmp_path, capsys, suffix):
    releases, box = miniature
    out = tmp_path / f"pois{suffix}"
    fetched(box, out, capsys)
    dropped = Counter()
    expected = expected_pois(releases[RELEASE], box, dropped)
    assert written_pois(out) == expected
    assert min(dropped.values()) > 0 and len(dropped) == 3, "places without a name, category or confidence are there"
    assert any(p["confidence"] == MIN_CONFIDENCE for p in expected), "the least confidence kept is there"
    edges = {p["id"] for p in expected if p["lon"] in (box[0], box[2]) or p["lat"] in (box[1], box[3])}
    assert len(edges) == 4, "the places on the box's edges are kept"
    assert "08f0000000000fffe" in {p["id"] for p in expected}, "the place in two files is there once"
    meta = recorded(out)
    assert meta["release"] == RELEASE
    assert "Overture Maps Foundation" in meta["attribution"]
    assert "CDLA-Permissive-2.0" in meta["license"]
    bbox = json.loads(meta["bbox"]) if suffix == ".gpkg" else meta["bbox"]  # GeoPackage metadata is text
    assert bbox == list(box)
    frame = read_poi_frame(str(out))
    assert frame["description"].tolist() == [p["description"] for p in expected]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["cache", out.name]), "no partial file is left"


def test_only_the_row_groups_meeting_the_box_are_read_and_cached(miniature, env, tmp_path, capsys):
    releases, box = miniature
    stdout = fetched(box, tmp_path / "pois.parquet", capsys)
    stats = group_stats(releases[RELEASE], box)
    needed = {key for key, (meets, holds) in stats.items() if meets or holds}
    assert {key for key, (meets, holds) in stats.items() if holds and not meets}, "the edge groups are in the test"
    read = int(re.search(r"row groups read (\d+)", stdout)[1])
    assert read == len(needed) < len(stats)
    assert int(re.search(r"row groups (\d+)", stdout)[1]) == len(stats)
    parts = {p.name for p in cache_folder(env).glob("*.rg*.parquet")}
    assert parts == {f"{stem}.rg{g}.parquet" for stem, g in needed}


def test_a_rerun_needs_no_server_and_an_interrupted_one_fetches_only_what_is_missing(
    miniature, tmp_path, monkeypatch, capsys
):
    releases, box = miniature
    monkeypatch.setenv("AETHER_CACHE", str(tmp_path / "cache"))
    with s3_server({RELEASE: releases[RELEASE]}) as url:
        monkeypatch.setenv("AWS_ENDPOINT_URL", url)
        fetched(box, tmp_path / "first.geojson", capsys)
    first = (tmp_path / "first.geojson").read_bytes()

    fetched(box, tmp_path / "offline.geojson", capsys)  # the server is gone: all from the cache
    assert (tmp_path / "offline.geojson").read_bytes() == first

    parts = sorted(cache_folder(tmp_path / "cache").glob("*.rg*.parquet"))
    lost, kept = parts[::3], [p for p in parts if p not in parts[::3]]
    for p in lost:  # what an interrupted run leaves: some row groups not yet there
        p.unlink()
    before = {p: p.stat().st_mtime_ns for p in kept}
    with s3_server({RELEASE: releases[RELEASE]}, port=int(url.rsplit(":", 1)[1])) as again:
        monkeypatch.setenv("AWS_ENDPOINT_URL", again)
        fetched(box, tmp_path / "again.geojson", capsys)
    assert all(p.exists() for p in lost)
    assert {p: p.stat().st_mtime_ns for p in kept} == before
    assert (tmp_path / "again.geojson").read_bytes() == first


def test_the_taxonomy_schema_gives_the_same_pois(miniature, env, tmp_path, capsys):
    releases, box = miniature
    fetched(box, tmp_path / "categories.parquet", capsys)
    fetched(box, tmp_path / "taxonomy.parquet", capsys, release=TAXONOMY_RELEASE)
    pois = written_pois(tmp_path / "taxonomy.parquet")
    assert pois == expected_pois(releases[TAXONOMY_RELEASE], box)
    assert pois == written_pois(tmp_path / "categories.parquet")
    assert any(p["alternates"] for p in pois)


def test_a_release_not_in_the_bucket_is_one_line(env, tmp_path, capsys):
    code, _, err = fetch(["--bbox", "24.95", "60.16", "25.0", "60.18", "--release", "2020-01-01.0", "--out",
                          str(tmp_path / "pois.gpkg")], capsys)  # fmt: skip
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ")
    assert "2020-01-01.0" in err and "--release" in err
    assert not (tmp_path / "pois.gpkg").exists()


def test_an_unreachable_endpoint_is_one_line_soon(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("AETHER_CACHE", str(tmp_path / "cache"))
    start = time.monotonic()
    code, _, err = fetch(["--bbox", "24.95", "60.16", "25.0", "60.18", "--out", str(tmp_path / "pois.gpkg")], capsys)
    assert time.monotonic() - start < 30
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: cannot list Overture places")
    assert not (tmp_path / "pois.gpkg").exists()


def poi_file(path: Path) -> Path:
    points = gpd.GeoDataFrame({"description": ["a park"]}, geometry=gpd.points_from_xy([24.96], [60.17]), crs=4326)
    points.to_file(path, driver="GeoJSON")
    return path


@pytest.mark.parametrize(
    "args, words",
    [
        (["--bbox", "10.0", "50.0", "10.01", "50.01"], "no POIs in the box"),
        (["--bbox", "24", "60", "26", "61"], "split it into"),
        (["--bbox", "24.95", "60.16", "25.0", "60.18", "--template", "A {kind} near {name}."], "'kind'"),
        (["--bbox", "24.95", "60.16", "25.0", "60.18", "--min-confidence", "2"], "--min-confidence 2"),
    ],
    ids=["empty box", "box too large", "unknown template field", "confidence over 1"],
)
def test_refusals_are_one_line_and_write_nothing(env, tmp_path, capsys, args, words):
    out = tmp_path / "pois.gpkg"
    code, _, err = fetch([*args, "--out", str(out)], capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and words in err, err
    assert [p.name for p in tmp_path.iterdir() if p.name != "cache"] == []


def test_out_naming_the_like_file_is_refused_and_it_is_kept(env, tmp_path, capsys):
    like = poi_file(tmp_path / "pois.geojson")
    before = like.read_bytes()
    code, _, err = fetch(["--like", str(like), "--out", str(like)], capsys)
    assert code == 2 and err.count("\n") == 1 and "--like" in err, err
    assert like.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "cache") == ["pois.geojson"]
