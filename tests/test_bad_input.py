"""Bad input to train.py: one line 'error: ...' on stderr, exit code 2, no traceback, no checkpoint.

Every case builds its own tiny inputs (20 x 20 pixels, 20 POIs). A few cases run the
real `python train.py` in a subprocess (each costs ~5 s of imports); the rest call the
same entry point in-process through `aether.cli.run`, which is what the script runs.
All of these errors must be raised before the text model is loaded.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fixtures import poi_records, unit_field, write_config, write_csv, write_geojson, write_raster

ROOT = Path(__file__).resolve().parents[1]
SIZE_PX = 20
N_POIS = 20


# ---- tiny inputs ---------------------------------------------------------------------------

def _raster(tmp: Path, name: str = "ae.tif", bands: int = 64, **kwargs) -> Path:
    return write_raster(tmp / name, unit_field(SIZE_PX, SIZE_PX, bands=bands), **kwargs)


def _records(n: int = N_POIS) -> list[dict]:
    return poi_records(n, SIZE_PX, SIZE_PX)


def _geojson(tmp: Path, records: list[dict] | None = None) -> Path:
    return write_geojson(tmp / "pois.geojson", _records() if records is None else records)


def _args(tmp: Path, ae_tif: Path | None = None, poi: Path | None = None, **sections) -> list[str]:
    """Valid inputs unless replaced: `--cfg` for a config naming `ae_tif` and `poi`."""
    ae_tif = _raster(tmp) if ae_tif is None else ae_tif
    poi = _geojson(tmp) if poi is None else poi
    return ["--cfg", str(write_config(tmp / "config.yaml", ae_tif, poi, **sections))]


# ---- one builder per case: tmp folder -> train.py arguments ----------------------------------

def missing_raster(tmp):
    return _args(tmp, ae_tif=tmp / "nowhere.tif")


def corrupt_raster(tmp):
    path = tmp / "corrupt.tif"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    return _args(tmp, ae_tif=path)


def three_bands(tmp):
    return _args(tmp, ae_tif=_raster(tmp, bands=3))


def raster_without_crs(tmp):
    return _args(tmp, ae_tif=_raster(tmp, crs=None))


def uint16_raster(tmp):
    return _args(tmp, ae_tif=_raster(tmp, dtype="uint16"))


def int8_nodata_not_minus128(tmp):
    import rasterio

    path = _raster(tmp)
    with rasterio.open(path, "r+") as dst:
        dst.nodata = 0
    return _args(tmp, ae_tif=path)


def all_nodata_raster(tmp):
    values = np.full((64, SIZE_PX, SIZE_PX), np.nan, dtype=np.float32)
    return _args(tmp, ae_tif=write_raster(tmp / "ae.tif", values))


def pois_far_away(tmp):
    records = [{**r, "lon": r["lon"] + 2.0} for r in _records()]  # ~110 km east of the raster
    return _args(tmp, poi=_geojson(tmp, records))


def missing_poi_file(tmp):
    return _args(tmp, poi=tmp / "nowhere.geojson")


def corrupt_poi_file(tmp):
    path = tmp / "pois.geojson"
    path.write_text('{"type": "FeatureCollection", "features": [', encoding="utf-8")
    return _args(tmp, poi=path)


def empty_geojson(tmp):
    return _args(tmp, poi=_geojson(tmp, []))


def csv_without_lonlat(tmp):
    records = [{k: v for k, v in r.items() if k not in ("lon", "lat")} | {"x": r["lon"], "y": r["lat"]}
               for r in _records()]
    return _args(tmp, poi=write_csv(tmp / "pois.csv", records))


def no_text_columns(tmp):
    records = [{"foo": i, "lon": r["lon"], "lat": r["lat"]} for i, r in enumerate(_records())]
    return _args(tmp, poi=write_csv(tmp / "pois.csv", records))


def all_nan_coordinates(tmp):
    records = [{**r, "lon": float("nan"), "lat": float("nan")} for r in _records()]
    return _args(tmp, poi=write_csv(tmp / "pois.csv", records))


def duplicate_ids(tmp):
    records = _records()
    records[5]["osm_id"] = records[2]["osm_id"]
    return _args(tmp, poi=_geojson(tmp, records))


def latin1_csv(tmp):
    path = tmp / "pois.csv"
    lines = ["osm_id,description,lon,lat"] + [f"node/{i},Caf\xe9 {i},{r['lon']},{r['lat']}"
                                              for i, r in enumerate(_records())]
    path.write_bytes("\n".join(lines).encode("latin-1"))
    return _args(tmp, poi=path)


def unknown_key(tmp):
    return _args(tmp, train={"epoch": 3})


def wrong_type(tmp):
    return _args(tmp, train={"epochs": "three"})


def negative_radius(tmp):
    return _args(tmp, data={"base_radius_m": -5})


def lambda_out_of_range(tmp):
    return _args(tmp, loss={"lam": 1.5})


def run_dir_is_a_file(tmp):
    (tmp / "run").write_text("not a folder")
    return _args(tmp)


def missing_config_file(tmp):
    return ["--cfg", str(tmp / "nowhere.yaml")]


def config_not_yaml(tmp):
    path = tmp / "config.yaml"
    path.write_text("data: [unclosed\n  poi: {", encoding="utf-8")
    return ["--cfg", str(path)]


def bad_set_override(tmp):
    return _args(tmp) + ["--set", "train.epochs"]


def set_unknown_key(tmp):
    return _args(tmp) + ["--set", "loss.lamda=0.5"]


def openai_without_key(tmp):
    return _args(tmp, text={"backend": "openai"})


def dimensions_with_sentence_transformers(tmp):
    return _args(tmp, text={"dimensions": 256})


SUBPROCESS, IN_PROCESS = "subprocess", "in-process"

CASES = [
    # builder, a distinctive part of the error line, how it runs
    (missing_raster, "config data.ae_tif: file", IN_PROCESS),
    (corrupt_raster, "cannot open raster", SUBPROCESS),
    (three_bands, "has 3 bands, expected 64", IN_PROCESS),
    (raster_without_crs, "has no CRS", IN_PROCESS),
    (uint16_raster, "has type uint16", IN_PROCESS),
    (int8_nodata_not_minus128, "is int8 with nodata 0.0", IN_PROCESS),
    (all_nodata_raster, "no usable POIs", IN_PROCESS),
    (pois_far_away, "no usable POIs", IN_PROCESS),
    (missing_poi_file, "config data.poi: file", IN_PROCESS),
    (corrupt_poi_file, "cannot read POI file", IN_PROCESS),
    (empty_geojson, "has no rows", IN_PROCESS),
    (csv_without_lonlat, "has no column 'lon'", IN_PROCESS),
    (no_text_columns, "has neither a 'description' column", IN_PROCESS),
    (all_nan_coordinates, "no usable POIs", IN_PROCESS),
    (duplicate_ids, "duplicate ids in column 'osm_id'", IN_PROCESS),
    (latin1_csv, "is not UTF-8", SUBPROCESS),
    (unknown_key, "unknown key train.epoch (did you mean train.epochs?)", IN_PROCESS),
    (wrong_type, "config train.epochs: expected int, got 'three'", IN_PROCESS),
    (negative_radius, "config data.base_radius_m: must be >= 0", IN_PROCESS),
    (lambda_out_of_range, "config loss.lam: lambda must be in [0, 1]", IN_PROCESS),
    (run_dir_is_a_file, "is a file, not a folder", SUBPROCESS),
    (missing_config_file, "nowhere.yaml does not exist", SUBPROCESS),
    (config_not_yaml, "is not valid YAML", IN_PROCESS),
    (bad_set_override, "must look like section.key=value", SUBPROCESS),
    (set_unknown_key, "unknown key loss.lamda (did you mean loss.lam?)", IN_PROCESS),
    (openai_without_key, "OPENAI_API_KEY", SUBPROCESS),
    (dimensions_with_sentence_transformers, "config text.dimensions: applies to the openai backend only", IN_PROCESS),
]


# ---- running train.py ----------------------------------------------------------------------

def _run_subprocess(args: list[str]) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "train.py", *args, "--no-progress"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stderr


def _run_in_process(args: list[str], monkeypatch, capsys) -> tuple[int, str]:
    """What `python train.py ARGS` does, without a new interpreter."""
    from aether.cli import run

    spec = importlib.util.spec_from_file_location("train_script", ROOT / "train.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["train.py", *args, "--no-progress"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run(script.main)
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("build, expected, how", CASES, ids=[c[0].__name__ for c in CASES])
def test_bad_input_is_one_error_line(build, expected, how, tmp_path, monkeypatch, capsys):
    args = build(tmp_path)
    if how == SUBPROCESS:
        code, stderr = _run_subprocess(args)
    else:
        code, stderr = _run_in_process(args, monkeypatch, capsys)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2, stderr
    assert "Traceback" not in stderr, stderr
    assert lines and lines[-1].startswith("error: "), stderr
    assert expected in lines[-1], stderr
    assert not [p for p in tmp_path.rglob("*.pt")], "a checkpoint was written"
