"""`aether zonal` end to end: GeoParquet out, zones in another CRS, H3 cells, AETHER on the fly equal
to the zonal statistics of the raster inference writes, and bad input refused in one line."""

from __future__ import annotations

import os
import subprocess
import sys

import geopandas
import numpy as np
import pytest
import shapely

from tests.helpers.fixtures import ORIGIN, UTM, unit_field, write_raster, write_untrained_checkpoint

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
H, W = 60, 80


def aether(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "aether.cli.main", *args], env=ENV, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("zonal")
    values = unit_field(H, W, seed=5)
    values[:, 10:14, 30:50] = np.nan
    raster = write_raster(tmp / "ae.tif", values)
    left, top = ORIGIN
    boxes = [
        shapely.box(left + x, top - y - 170, left + x + 230, top - y) for x in (13, 260, 510) for y in (7, 210, 400)
    ]
    boxes.append(shapely.box(left - 500, top + 100, left - 200, top + 300))  # off the raster
    zones = geopandas.GeoDataFrame({"name": [f"z{i}" for i in range(len(boxes))]}, geometry=boxes, crs=UTM)
    zones.to_crs("EPSG:4326").to_file(tmp / "zones.gpkg", driver="GPKG")
    zones.to_parquet(tmp / "zones.parquet")
    ckpt = write_untrained_checkpoint(tmp / "ckpt.pt")
    return tmp, raster, tmp / "zones.gpkg", ckpt


def test_zones_in_another_crs_give_geoparquet_with_ids_and_statistics(inputs):
    tmp, raster, zones, _ = inputs
    out = tmp / "features.parquet"
    done = aether(
        "zonal", "--emb", str(raster), "--zones", str(zones), "--id", "name", "--out", str(out), "--no-progress"
    )
    assert done.returncode == 0, done.stderr
    frame = geopandas.read_parquet(out)
    assert frame.crs.to_epsg() == 4326  # the zones' own CRS
    assert sorted(frame["name"]) == sorted(f"z{i}" for i in range(10))
    assert list(frame.columns[:4]) == ["name", "geometry", "A00_mean", "A01_mean"]
    assert "A63_std" in frame.columns and list(frame.columns[-2:]) == ["count", "coverage"]
    row = frame.set_index("name")
    assert row.loc["z9", "count"] == 0 and np.isnan(row.loc["z9", "A00_mean"]) and row.loc["z9", "coverage"] == 0
    full = row.drop(index="z9")
    assert (full["coverage"] > 0.5).all() and (full["count"] > 100).all()
    # the means are means of unit vectors: their length is at most 1, and the std is not zero
    means = full[[f"A{i:02d}_mean" for i in range(64)]].to_numpy()
    assert (np.linalg.norm(means, axis=1) <= 1 + 1e-6).all()
    assert (full[[f"A{i:02d}_std" for i in range(64)]].to_numpy() > 0).any(axis=1).all()
    assert not list(tmp.glob(".features.parquet*"))  # no partial file left


def test_aether_on_the_fly_equals_the_zonal_statistics_of_the_inferred_raster(inputs):
    tmp, raster, zones, ckpt = inputs
    inferred = tmp / "aether.tif"
    done = aether(
        "infer", "--ae_tif", str(raster), "--ckpt", str(ckpt), "--out", str(inferred), "--dtype", "float32",
        "--precision", "fp32", "--no-progress",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    stored, fly = tmp / "stored.parquet", tmp / "fly.parquet"
    assert (
        aether("zonal", "--emb", str(inferred), "--zones", str(zones), "--out", str(stored), "--no-progress").returncode
        == 0
    )
    done = aether(
        "zonal", "--ae_tif", str(raster), "--ckpt", str(ckpt), "--zones", str(zones), "--out", str(fly), "--no-progress"
    )
    assert done.returncode == 0, done.stderr
    a = geopandas.read_parquet(stored).sort_values("zone_id").reset_index(drop=True)
    b = geopandas.read_parquet(fly).sort_values("zone_id").reset_index(drop=True)
    assert list(a.columns) == list(b.columns) and "E015_mean" in a.columns
    np.testing.assert_allclose(
        a.drop(columns="geometry").to_numpy(float), b.drop(columns="geometry").to_numpy(float), atol=2e-6
    )


def test_h3_cells(inputs):
    tmp, raster, _, _ = inputs
    out = tmp / "h3.parquet"
    done = aether(
        "zonal", "--emb", str(raster), "--h3", "11", "--stats", "mean,count", "--out", str(out), "--no-progress"
    )
    assert done.returncode == 0, done.stderr
    frame = geopandas.read_parquet(out)
    assert list(frame.columns[:2]) == ["h3", "geometry"] and "A00_std" not in frame.columns
    assert frame["h3"].is_unique and len(frame) > 20 and (frame["count"] > 0).all()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--zones", "ZONES", "--stats", "mean,median"], "--stats takes a comma-separated list"),
        (["--zones", "missing.gpkg"], "zones file missing.gpkg does not exist"),
        (["--zones", "ZONES", "--id", "nope"], "has no column 'nope'"),
        (["--h3", "16"], "--h3 must be an H3 resolution"),
        (["--zones", "ZONES", "--ckpt", "CKPT"], "--ckpt goes with --ae_tif"),
        (["--zones", "RASTER"], "cannot read zones file"),
        (["--zones", "ZPARQ", "--out", "ZPARQ"], "the zones file"),
        (["--zones", "ZONES", "--out", "OUTDIR/x.csv"], "should end in .parquet"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(inputs, tmp_path, args, message):
    tmp, raster, zones, ckpt = inputs
    before = raster.read_bytes()
    out = tmp_path / "out.parquet"
    zparq = tmp / "zones.parquet"
    zones_before = zparq.read_bytes()
    names = {
        "ZONES": str(zones),
        "ZPARQ": str(zparq),
        "RASTER": str(raster),
        "CKPT": str(ckpt),
        "OUTDIR": str(tmp_path),
    }
    args = [names.get(a, a) for a in args]
    for key, value in names.items():
        args = [a.replace(key + "/", value + "/") for a in args]
    if "--out" not in args:
        args += ["--out", str(out)]
    done = aether("zonal", "--emb", str(raster), *args, "--no-progress")
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], done.stderr
    assert not out.exists() and raster.read_bytes() == before and zparq.read_bytes() == zones_before
    assert not list(tmp_path.glob(".*partial*"))


def test_ae_tif_needs_a_checkpoint(inputs, tmp_path):
    _, raster, zones, _ = inputs
    done = aether("zonal", "--ae_tif", str(raster), "--zones", str(zones), "--out", str(tmp_path / "o.parquet"))
    assert done.returncode == 2 and "--ae_tif needs --ckpt" in done.stderr
