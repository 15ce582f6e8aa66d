"""The bad-input matrix: train.py, infer_aether_raster.py and retrieve.py each answer bad input with
one line 'error: ...' on stderr and exit code 2, no traceback, and leave no output behind.

Every case builds its own tiny inputs (20 x 20 pixels, 20 POIs) and returns the script and its
arguments. A few cases run the real script in a subprocess (each costs ~5 s of imports); the
rest call the same entry point in-process through `aether.cli.run.run`, which is what the script runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.fixtures import (
    poi_records,
    run_script_in_process,
    unit_field,
    write_config,
    write_csv,
    write_geojson,
    write_raster,
    write_untrained_checkpoint,
)

ROOT = Path(__file__).resolve().parents[2]
SIZE_PX = 20
N_POIS = 20


# ---- tiny inputs ---------------------------------------------------------------------------


def _raster(tmp: Path, name: str = "ae.tif", bands: int = 64, **kwargs) -> Path:
    return write_raster(tmp / name, unit_field(SIZE_PX, SIZE_PX, bands=bands), **kwargs)


def _records(n: int = N_POIS) -> list[dict]:
    return poi_records(n, SIZE_PX, SIZE_PX)


def _geojson(tmp: Path, records: list[dict] | None = None) -> Path:
    return write_geojson(tmp / "pois.geojson", _records() if records is None else records)


TRAIN, INFER, RETRIEVE = "train.py", "infer_aether_raster.py", "retrieve.py"


def _args(tmp: Path, ae_tif: Path | None = None, poi: Path | None = None, **sections) -> list[str]:
    """Valid inputs unless replaced: `--cfg` for a config naming `ae_tif` and `poi`."""
    ae_tif = _raster(tmp) if ae_tif is None else ae_tif
    poi = _geojson(tmp) if poi is None else poi
    return [TRAIN, "--cfg", str(write_config(tmp / "config.yaml", ae_tif, poi, **sections))]


def _infer(
    tmp: Path, ae_tif: Path | None = None, ckpt: Path | None = None, out: Path | None = None, *extra: str
) -> list[str]:
    """Valid infer_aether_raster.py arguments unless replaced."""
    ae_tif = _raster(tmp) if ae_tif is None else ae_tif
    ckpt = write_untrained_checkpoint(tmp / "best.pt") if ckpt is None else ckpt
    out = tmp / "out.tif" if out is None else out
    return [INFER, "--ae_tif", str(ae_tif), "--ckpt", str(ckpt), "--out", str(out), *extra]


def _retrieve(
    tmp: Path, *extra: str, emb: Path | None = None, ckpt: Path | None = None, query: list[str] | None = None
) -> list[str]:
    """Valid retrieve.py arguments unless replaced; the AETHER raster is made by the checkpoint."""
    ckpt = write_untrained_checkpoint(tmp / "best.pt") if ckpt is None else ckpt
    if emb is None:
        from aether.infer.pipeline import embed_raster

        emb = embed_raster(str(_raster(tmp, "ae.tif")), str(ckpt), str(tmp / "aether.tif"), progress=False)
    query = ["--query", "a cafe"] if query is None else query
    return [RETRIEVE, "--ckpt", str(ckpt), "--emb", str(emb), *query, "--out", str(tmp / "out"), *extra]


# ---- one builder per case: tmp folder -> [script, arguments...] -------------------------------


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
    records = [
        {k: v for k, v in r.items() if k not in ("lon", "lat")} | {"x": r["lon"], "y": r["lat"]} for r in _records()
    ]
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
    lines = ["osm_id,description,lon,lat"] + [
        f"node/{i},Caf\xe9 {i},{r['lon']},{r['lat']}" for i, r in enumerate(_records())
    ]
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
    return [TRAIN, "--cfg", str(tmp / "nowhere.yaml")]


def config_not_yaml(tmp):
    path = tmp / "config.yaml"
    path.write_text("data: [unclosed\n  poi: {", encoding="utf-8")
    return [TRAIN, "--cfg", str(path)]


def bad_set_override(tmp):
    return _args(tmp) + ["--set", "train.epochs"]


def set_unknown_key(tmp):
    return _args(tmp) + ["--set", "loss.lamda=0.5"]


def openai_without_key(tmp):
    return _args(tmp, text={"backend": "openai"})


def dimensions_with_sentence_transformers(tmp):
    return _args(tmp, text={"dimensions": 256})


# infer_aether_raster.py


def infer_missing_raster(tmp):
    return _infer(tmp, ae_tif=tmp / "nowhere.tif")


def infer_checkpoint_for_other_band_count(tmp):
    return _infer(tmp, ckpt=write_untrained_checkpoint(tmp / "best.pt", n_bands=32))


def infer_truncated_checkpoint(tmp):
    good = write_untrained_checkpoint(tmp / "good.pt").read_bytes()
    (tmp / "best.pt").write_bytes(good[: len(good) // 2])
    (tmp / "good.pt").unlink()
    return _infer(tmp, ckpt=tmp / "best.pt")


def infer_raster_given_as_checkpoint(tmp):
    return _infer(tmp, ckpt=_raster(tmp, "not_a_checkpoint.pt"))


def infer_output_folder_missing(tmp):
    return _infer(tmp, out=tmp / "no" / "out.tif")


def infer_output_name_too_long(tmp):
    return _infer(tmp, out=tmp / ("a" * 250 + ".tif"))


def retrieve_output_folder_name_too_long(tmp):
    args = _retrieve(tmp)
    args[args.index("--out") + 1] = str(tmp / ("r" * 300))
    return args


def infer_output_is_input(tmp):
    ae_tif = _raster(tmp)
    return _infer(tmp, ae_tif=ae_tif, out=ae_tif)


def infer_tile_too_small(tmp):
    return _infer(tmp, None, None, None, "--tile", "8")


def infer_resume_without_interrupted_run(tmp):
    return _infer(tmp, None, None, None, "--resume")


def infer_bottom_up_float_raster_without_crs(tmp):
    return _infer(tmp, ae_tif=_raster(tmp, dtype="float32", crs=None, bottom_up=True))


# retrieve.py


def retrieve_raster_from_other_checkpoint(tmp):
    args = _retrieve(tmp)
    other = write_untrained_checkpoint(tmp / "other.pt", seed=1)
    args[args.index("--ckpt") + 1] = str(other)
    return args


def retrieve_other_text_encoder(tmp):
    return _retrieve(tmp, "--text-model", "all-mpnet-base-v2")


def retrieve_empty_query(tmp):
    return _retrieve(tmp, query=["--query", "   "])


def retrieve_query_file_without_queries(tmp):
    path = tmp / "queries.txt"
    path.write_text("# nothing here\n\n", encoding="utf-8")
    return _retrieve(tmp, query=["--queries", str(path)])


def retrieve_query_file_not_utf8(tmp):
    path = tmp / "queries.txt"
    path.write_bytes("caf\xe9 by the sea\n".encode("latin-1"))
    return _retrieve(tmp, query=["--queries", str(path)])


def retrieve_alphaearth_raster_as_emb(tmp):
    return _retrieve(tmp, emb=_raster(tmp, "ae64.tif"))


def retrieve_checkpoint_with_other_latent_size(tmp):
    args = _retrieve(tmp)
    args[args.index("--ckpt") + 1] = str(write_untrained_checkpoint(tmp / "wide.pt", latent_dim=32))
    return args


def retrieve_top_k_zero(tmp):
    return _retrieve(tmp, "--top-k", "0")


def retrieve_negative_nms_radius(tmp):
    return _retrieve(tmp, "--nms-m", "-5")


def retrieve_output_parent_missing(tmp):
    args = _retrieve(tmp)
    args[args.index("--out") + 1] = str(tmp / "no" / "out")
    return args


def infer_workers_zero(tmp):
    return _infer(tmp, None, None, None, "--workers", "0")


def infer_scheduler_not_an_address(tmp):
    return _infer(tmp, None, None, None, "--scheduler", "localhost")


def infer_tile_set_into_a_file(tmp):
    _raster(tmp, "tile_a.tif"), _raster(tmp, "tile_b.tif")
    return _infer(tmp, tmp / "tile_*.tif", None, tmp / "out.tif")


def infer_glob_matching_nothing(tmp):
    return _infer(tmp, tmp / "tiles_*.tif", None, tmp / "out")


def train_tile_list_with_a_three_band_tile(tmp):
    listing = tmp / "tiles.txt"
    listing.write_text(f"{_raster(tmp, 'tile_a.tif')}\n{_raster(tmp, 'tile_b.tif', bands=3)}\n")
    return _args(tmp, ae_tif=listing)


def retrieve_empty_tile_list(tmp):
    (tmp / "tiles.txt").write_text("# no tiles yet\n")
    args = _retrieve(tmp)
    args[args.index("--emb") + 1] = str(tmp / "tiles.txt")
    return args


SUBPROCESS, IN_PROCESS = "subprocess", "in-process"


def infer_lock_file_is_a_folder(tmp):
    (tmp / ".out.tif.lock").mkdir()
    return _infer(tmp)


def train_lock_file_is_a_folder(tmp):
    (tmp / "run" / ".train.lock").mkdir(parents=True)
    return _args(tmp)


def retrieve_lock_file_is_a_folder(tmp):
    args = _retrieve(tmp)
    (tmp / "out" / ".retrieve.lock").mkdir(parents=True)
    return args


def train_run_folder_that_cannot_be_made(tmp):
    return _args(tmp, train={"run_dir": "/proc/aether-cannot-be-here/run"})


def infer_checkpoint_is_a_folder(tmp):
    folder = tmp / "ckpts"
    write_untrained_checkpoint((folder.mkdir() or folder) / "best.pt")
    return _infer(tmp, ckpt=folder)


def retrieve_checkpoint_is_a_folder(tmp):
    args = _retrieve(tmp)
    return [a if a != str(tmp / "best.pt") else str(tmp) for a in args]


CASES = [
    # builder, a distinctive part of the error line, how it runs
    (missing_raster, "config data.ae_tif: file", IN_PROCESS),
    (corrupt_raster, "cannot open raster", IN_PROCESS),
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
    (latin1_csv, "is not UTF-8", IN_PROCESS),
    (unknown_key, "unknown key train.epoch (did you mean train.epochs?)", IN_PROCESS),
    (wrong_type, "config train.epochs: expected int, got 'three'", IN_PROCESS),
    (negative_radius, "config data.base_radius_m: must be >= 0", IN_PROCESS),
    (lambda_out_of_range, "config loss.lam: lambda must be in [0, 1]", IN_PROCESS),
    (run_dir_is_a_file, "is a file, not a folder", IN_PROCESS),
    (missing_config_file, "nowhere.yaml does not exist", IN_PROCESS),
    (config_not_yaml, "is not valid YAML", IN_PROCESS),
    (bad_set_override, "must look like section.key=value", IN_PROCESS),
    (set_unknown_key, "unknown key loss.lamda (did you mean loss.lam?)", IN_PROCESS),
    (openai_without_key, "OPENAI_API_KEY", SUBPROCESS),
    (dimensions_with_sentence_transformers, "config text.dimensions: applies to the openai backend only", IN_PROCESS),
    (infer_missing_raster, "cannot open raster", IN_PROCESS),
    (infer_checkpoint_for_other_band_count, "has 64 bands but checkpoint", IN_PROCESS),
    (infer_truncated_checkpoint, "cannot be read (truncated or not a checkpoint)", SUBPROCESS),
    (infer_raster_given_as_checkpoint, "cannot be read (truncated or not a checkpoint)", IN_PROCESS),
    (infer_output_folder_missing, "does not exist", IN_PROCESS),
    (infer_output_is_input, "is the input raster", IN_PROCESS),
    (infer_output_name_too_long, "bytes long; this file system allows", IN_PROCESS),
    (retrieve_output_folder_name_too_long, "file name too long", IN_PROCESS),
    (infer_tile_too_small, "tile size must be a multiple of 16 pixels", IN_PROCESS),
    (infer_resume_without_interrupted_run, "nothing to resume", IN_PROCESS),
    (infer_bottom_up_float_raster_without_crs, "has no CRS", IN_PROCESS),
    (retrieve_raster_from_other_checkpoint, "was made with another model than checkpoint", IN_PROCESS),
    (retrieve_other_text_encoder, "differs from the checkpoint's", IN_PROCESS),
    (retrieve_empty_query, "a query is empty", IN_PROCESS),
    (retrieve_query_file_without_queries, "has no queries", IN_PROCESS),
    (retrieve_query_file_not_utf8, "is not UTF-8 text", SUBPROCESS),
    (retrieve_alphaearth_raster_as_emb, "has 64 bands but checkpoint", IN_PROCESS),
    (retrieve_checkpoint_with_other_latent_size, "has 16 bands but checkpoint", IN_PROCESS),
    (retrieve_top_k_zero, "top-k must be at least 1", IN_PROCESS),
    (retrieve_negative_nms_radius, "suppression radius must be 0 or more metres", IN_PROCESS),
    (retrieve_output_parent_missing, "does not exist", IN_PROCESS),
    (infer_workers_zero, "--workers must be 1 or more", IN_PROCESS),
    (infer_scheduler_not_an_address, "must be a Dask scheduler address", IN_PROCESS),
    (infer_tile_set_into_a_file, "--out must be a folder", IN_PROCESS),
    (infer_glob_matching_nothing, "matches no files", IN_PROCESS),
    (train_tile_list_with_a_three_band_tile, "has 3 bands, expected 64", IN_PROCESS),
    (retrieve_empty_tile_list, "names no rasters", IN_PROCESS),
    (infer_lock_file_is_a_folder, "the lock file", IN_PROCESS),
    (train_lock_file_is_a_folder, ".train.lock of run folder", IN_PROCESS),
    (retrieve_lock_file_is_a_folder, ".retrieve.lock of output folder", IN_PROCESS),
    (train_run_folder_that_cannot_be_made, "cannot make the run folder /proc/aether-cannot-be-here/run", IN_PROCESS),
    (infer_checkpoint_is_a_folder, "is a folder; give a checkpoint file such as", IN_PROCESS),
    (retrieve_checkpoint_is_a_folder, "is a folder; give a checkpoint file such as", IN_PROCESS),
]


# ---- running the scripts ---------------------------------------------------------------------


def _run_subprocess(script: str, args: list[str]) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, script, *args, "--no-progress"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    return proc.returncode, proc.stderr


def _files(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*")}


@pytest.mark.parametrize("build, expected, how", CASES, ids=[c[0].__name__ for c in CASES])
def test_bad_input_is_one_error_line(build, expected, how, tmp_path, monkeypatch, capsys):
    script, *args = build(tmp_path)
    before = _files(tmp_path)
    if how == SUBPROCESS:
        code, stderr = _run_subprocess(script, args)
    else:
        monkeypatch.delenv("OPENAI_API_KEY", raising=False)
        monkeypatch.chdir(ROOT)
        code, _, stderr = run_script_in_process(script, [*args, "--no-progress"], monkeypatch, capsys)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2, stderr
    assert "Traceback" not in stderr, stderr
    assert lines and lines[-1].startswith("error: "), stderr
    assert expected in lines[-1], stderr
    assert _files(tmp_path) == before, "output was left behind"


def test_the_matrix_covers_every_command():
    scripts = {build.__name__.split("_")[0] for build, _, _ in CASES}
    assert len(CASES) >= 25 and {"infer", "retrieve"} <= scripts
