"""Bounded memory and processes, no hangs, no garbage with exit code 0.

Each case asks for something that would take tens of GiB, hundreds of processes, a hang or a
silent all-NaN output, on inputs of a few KB: the refusals are one line 'error: ...' and exit
code 2 before any heavy work, with nothing left behind; the bounds that are not refusals are
measured (open files of a search with many queries, the count of impossible pixels, finite
outputs without NumPy warnings).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from aether.core.errors import AetherError
from aether.core.runtime import usable_cores
from aether.data.poi import render_description
from aether.geo.gdal import DEFAULTS as HTTP_DEFAULTS
from aether.geo.pooling import pool_points
from aether.geo.raster import MAX_WINDOW_HALF_PX, open_raster
from aether.model.checkpoint import Checkpoint
from aether.retrieval.search import SearchOptions
from tests.helpers.fixtures import (
    ORIGIN,
    poi_records,
    run_script_in_process,
    unit_field,
    write_config,
    write_geojson,
    write_raster,
    write_untrained_checkpoint,
)

ROOT = Path(__file__).resolve().parents[2]
SIZE_PX = 20
NEAR_POLE = from_origin(24.0, 90.0, 1e-4, 1e-4)  # rows at latitudes 89.99995 .. 89.99805: 1e-5 m across
MILLIMETRE = from_origin(ORIGIN[0], ORIGIN[1], 0.001, 0.001)  # 1 mm pixels: a 95 m window is 190,001 across


def _files(folder: Path) -> set[Path]:
    return set(folder.rglob("*"))


def _refused(script: str, args: list[str], expected: str, tmp_path: Path, monkeypatch, capsys) -> str:
    """Run `script` in-process; assert one error line holding `expected`, exit code 2, nothing written."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = _files(tmp_path)
    started = time.monotonic()
    quiet = [] if script == "plot.py" else ["--no-progress"]
    code, _, stderr = run_script_in_process(script, [*args, *quiet], monkeypatch, capsys)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2, stderr
    assert "Traceback" not in stderr and "Warning" not in stderr, stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert expected in lines[0], stderr
    assert len(lines[0]) < 600, f"the error line is {len(lines[0])} characters"
    assert time.monotonic() - started < 20, "the refusal came after heavy work"
    assert _files(tmp_path) == before, "output was left behind"
    return lines[0]


def _raster(
    tmp: Path, name: str = "ae.tif", transform=None, crs: str = "EPSG:32635", size: int = SIZE_PX, **kwargs
) -> Path:
    return write_raster(tmp / name, unit_field(size, size), transform=transform, crs=crs, **kwargs)


def _train_args(tmp: Path, raster: Path, **sections) -> list[str]:
    poi = write_geojson(tmp / "pois.geojson", poi_records(20, SIZE_PX, SIZE_PX))
    return ["--cfg", str(write_config(tmp / "config.yaml", raster, poi, **sections))]


def _infer_args(tmp: Path, raster: Path, *extra: str) -> list[str]:
    ckpt = write_untrained_checkpoint(tmp / "best.pt")
    return ["--ae_tif", str(raster), "--ckpt", str(ckpt), "--out", str(tmp / "out.tif"), *extra]


# ---- 1. windows made from metres: at most MAX_WINDOW_HALF_PX pixels each way ------------------


def test_near_pole_raster_is_refused_by_inference(tmp_path, monkeypatch, capsys):
    args = _infer_args(tmp_path, _raster(tmp_path, transform=NEAR_POLE, crs="EPSG:4326", size=10))
    line = _refused("infer_aether_raster.py", args, "a window of radius 45 m would be", tmp_path, monkeypatch, capsys)
    assert "at latitude 89.99" in line and "resample the raster" in line and "--pooling pixel" in line


def test_millimetre_pixels_are_refused_by_training_before_text_encoding(tmp_path, monkeypatch, capsys):
    args = _train_args(tmp_path, _raster(tmp_path, transform=MILLIMETRE))
    line = _refused(
        "train.py",
        args,
        "has pixels of 0.001 x 0.001 m: a window of radius 95 m would be 190,001 pixels across",
        tmp_path,
        monkeypatch,
        capsys,
    )
    assert "data.aug_radius_m" in line  # refused when the raster is opened: no text cache was made (see _refused)


def test_near_pole_raster_is_refused_by_training(tmp_path, monkeypatch, capsys):
    args = _train_args(tmp_path, _raster(tmp_path, transform=NEAR_POLE, crs="EPSG:4326", size=10))
    _refused("train.py", args, "a window of radius 95 m would be", tmp_path, monkeypatch, capsys)


def test_retrieval_on_the_fly_refuses_millimetre_pixels(tmp_path, monkeypatch, capsys):
    ckpt = write_untrained_checkpoint(tmp_path / "best.pt")
    args = [
        "--ckpt",
        str(ckpt),
        "--ae_tif",
        str(_raster(tmp_path, transform=MILLIMETRE)),
        "--query",
        "a cafe",
        "--out",
        str(tmp_path / "out"),
    ]
    _refused(
        "retrieve.py", args, "a window of radius 45 m would be 90,001 pixels across", tmp_path, monkeypatch, capsys
    )


def test_evaluation_refuses_a_search_disc_too_many_pixels_across(tmp_path, monkeypatch, capsys):
    # 5 cm pixels: the base window (45 m, 900 pixels each way) fits, the 500 m search disc does not
    raster = _raster(tmp_path, transform=from_origin(ORIGIN[0], ORIGIN[1], 0.05, 0.05))
    poi = write_geojson(tmp_path / "pois.geojson", poi_records(20, SIZE_PX, SIZE_PX))
    ckpt = write_untrained_checkpoint(tmp_path / "best.pt")
    args = ["--ckpt", str(ckpt), "--ae_tif", str(raster), "--poi", str(poi)]
    _refused(
        "evaluate.py", args, "a window of radius 500 m would be 20,001 pixels across", tmp_path, monkeypatch, capsys
    )


def test_pooling_api_refuses_a_huge_window_and_takes_the_largest_allowed(tmp_path):
    info = open_raster(str(_raster(tmp_path, transform=MILLIMETRE)))
    x, y = info.xy(np.array([10]), np.array([10]))
    with pytest.raises(AetherError, match="would be 90,001 pixels across"):
        pool_points(info, x, y, [45.0])
    widest = MAX_WINDOW_HALF_PX * 0.001  # exactly MAX_WINDOW_HALF_PX pixels each way
    assert pool_points(info, x, y, [widest]).valid.all()


# ---- 2. tile side and picture size --------------------------------------------------------------


def test_inference_tile_over_the_largest_is_refused(tmp_path, monkeypatch, capsys):
    args = _infer_args(tmp_path, _raster(tmp_path), "--tile", "65536")
    _refused(
        "infer_aether_raster.py",
        args,
        "--tile 65536 is over the largest tile, 4,096 pixels",
        tmp_path,
        monkeypatch,
        capsys,
    )


def test_retrieval_tile_over_the_largest_is_refused(tmp_path, monkeypatch, capsys):
    ckpt = write_untrained_checkpoint(tmp_path / "best.pt")
    args = [
        "--ckpt",
        str(ckpt),
        "--ae_tif",
        str(_raster(tmp_path)),
        "--query",
        "a cafe",
        "--out",
        str(tmp_path / "out"),
        "--tile",
        "65536",
    ]
    _refused("retrieve.py", args, "--tile 65536 is over the largest tile", tmp_path, monkeypatch, capsys)


def test_picture_scale_over_the_largest_picture_is_refused(tmp_path, monkeypatch, capsys):
    args = ["pca", "--tif", str(_raster(tmp_path)), "--out", str(tmp_path / "pca.png"), "--scale", "100000"]
    line = _refused("plot.py", args, "the picture would be 2,000,000 x 2,000,000 pixels", tmp_path, monkeypatch, capsys)
    assert "lower --scale" in line


# ---- 3. a search with many queries: bounded open files, stale partial files removed ------------


def _open_files() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts open files through /proc")
def test_many_queries_keep_open_files_bounded_and_equal_single_runs(tmp_path):
    from aether.infer.pipeline import embed_raster
    from aether.retrieval.search import retrieve
    from aether.retrieval.topk import QUERIES_PER_PASS

    ckpt = write_untrained_checkpoint(tmp_path / "best.pt")
    emb = embed_raster(str(_raster(tmp_path)), str(ckpt), str(tmp_path / "aether.tif"), progress=False)
    n = 3 * QUERIES_PER_PASS + 5
    vectors = np.random.default_rng(0).standard_normal((n, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries = [f"query {i}" for i in range(n)]
    out = tmp_path / "many"
    out.mkdir()
    stale = [
        out / ".q001_query-0.tif.abcd1234.partial.tif",
        out / ".q017_x.png.zz_zz_zz.partial.png",
        out / ".queries.json.k3j4h5g6.tmp",
    ]
    for path in stale:
        path.write_bytes(b"left by a killed run")
    (out / "notes.txt").write_text("mine")

    baseline, peak, running = _open_files(), [0], [True]

    def sample():
        while running[0]:
            peak[0] = max(peak[0], _open_files())
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        results = retrieve(
            queries,
            str(ckpt),
            str(out),
            emb_tif=str(emb),
            progress=False,
            query_vectors=vectors,
            options=SearchOptions(top_k=3, nms_m=30, heatmaps=False),
        )
    finally:
        running[0] = False
        sampler.join()
    assert len(results) == n and all(r.tif.is_file() and r.geojson.is_file() for r in results)
    assert peak[0] - baseline <= QUERIES_PER_PASS + 16, f"{peak[0] - baseline} files open at once for {n} queries"
    assert not any(p.exists() for p in stale) and (out / "notes.txt").read_text() == "mine"
    assert not [p for p in out.iterdir() if "partial" in p.name or p.name.endswith(".tmp")]
    for i in (0, QUERIES_PER_PASS, n - 1):  # one query of each pass equals that query searched alone
        alone = retrieve(
            [queries[i]],
            str(ckpt),
            str(tmp_path / f"alone{i}"),
            emb_tif=str(emb),
            progress=False,
            query_vectors=vectors[i : i + 1],
            options=SearchOptions(top_k=3, nms_m=30, heatmaps=False),
        )[0]
        assert alone.hits == results[i].hits
        with rasterio.open(alone.tif) as a, rasterio.open(results[i].tif) as b:
            np.testing.assert_allclose(a.read(), b.read(), rtol=0, atol=1e-6)  # matmul rounding by batch size


# ---- 4. --workers bounded by the cores ------------------------------------------------------------


def test_workers_beyond_the_cores_are_refused(tmp_path, monkeypatch, capsys):
    workers = max(500, usable_cores() + 1)
    args = _infer_args(tmp_path, _raster(tmp_path), "--workers", str(workers))
    _refused(
        "infer_aether_raster.py",
        args,
        f"--workers {workers} is more worker processes than the {usable_cores()} cores",
        tmp_path,
        monkeypatch,
        capsys,
    )


# ---- 5. config values and templates: bounded messages, bounded widths -------------------------


def _laughs(levels: int = 9) -> str:
    """A YAML flow value that expands to 9 ** levels strings ('billion laughs') through aliases."""
    items = ["&l0 [" + ", ".join(["lol"] * 9) + "]"]
    items += [f"&l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "[" + ", ".join(items) + "]"


def test_billion_laughs_in_the_config_file_gives_a_short_line(tmp_path, monkeypatch, capsys):
    args = _train_args(tmp_path, _raster(tmp_path))
    cfg = Path(args[1])
    cfg.write_text(cfg.read_text().replace("epochs: 3", f"epochs: {_laughs()}"), encoding="utf-8")
    _refused("train.py", args, "config train.epochs: expected int, got [[", tmp_path, monkeypatch, capsys)


def test_billion_laughs_in_set_gives_a_short_line(tmp_path, monkeypatch, capsys):
    args = _train_args(tmp_path, _raster(tmp_path)) + ["--set", f"train.batch_size={_laughs()}"]
    _refused("train.py", args, "config train.batch_size: expected int, got [[", tmp_path, monkeypatch, capsys)


def test_template_width_over_the_bound_is_refused(tmp_path, monkeypatch, capsys):
    args = _train_args(tmp_path, _raster(tmp_path)) + ["--set", "data.template={name:>3000000000}"]
    _refused(
        "train.py",
        args,
        "config data.template: description template '{name:>3000000000}': field "
        "{name:>3000000000} asks for a width or precision over 1,000 characters",
        tmp_path,
        monkeypatch,
        capsys,
    )
    with pytest.raises(AetherError, match="over 1,000 characters"):
        render_description("{name:.2000000000}", {"name": "x"})
    with pytest.raises(AetherError, match="holds another field"):  # a width the data would choose
        render_description("{name:>{key}}", {"name": "x", "key": "3000000000"})
    assert render_description("{name:>8}|{key:.3}", {"name": "cafe", "key": "amenity"}) == "    cafe|ame"


# ---- 6. a remote raster whose server never answers ----------------------------------------------


def test_http_timeouts_come_from_the_command_line_not_from_an_import():
    """Importing the library changes no setting of the process; a command gives GDAL its defaults,
    where the environment sets none."""
    code = (
        "import json, os\n"
        "import aether.geo.raster, aether.infer.pipeline, aether.retrieval.search, aether.data.fetch\n"
        f"names = {sorted(HTTP_DEFAULTS)!r}\n"
        "before = {n: os.environ.get(n) for n in names}\n"
        "from aether.cli.run import setup_process\n"
        "setup_process()\n"
        "print(json.dumps([before, {n: os.environ.get(n) for n in names}]))"
    )
    env = {k: v for k, v in os.environ.items() if k not in HTTP_DEFAULTS}
    env["GDAL_HTTP_TIMEOUT"] = "7"
    before, after = json.loads(
        subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=True
        ).stdout
    )
    assert before == {name: ("7" if name == "GDAL_HTTP_TIMEOUT" else None) for name in HTTP_DEFAULTS}
    assert after == {**HTTP_DEFAULTS, "GDAL_HTTP_TIMEOUT": "7"}


def test_a_server_that_never_answers_gives_one_line_in_seconds(tmp_path):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held = []

    def accept_and_say_nothing():
        while True:
            try:
                held.append(server.accept()[0])
            except OSError:  # closed at the end of the test
                return

    threading.Thread(target=accept_and_say_nothing, daemon=True).start()
    url = f"http://127.0.0.1:{server.getsockname()[1]}/tile.tif"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "GDAL_HTTP_TIMEOUT": "1",
        "GDAL_HTTP_CONNECTTIMEOUT": "1",
        "GDAL_HTTP_MAX_RETRY": "1",
        "GDAL_HTTP_RETRY_DELAY": "0.1",
    }
    ckpt = write_untrained_checkpoint(tmp_path / "best.pt")
    before = _files(tmp_path)
    started = time.monotonic()
    try:
        proc = subprocess.run(
            [
                sys.executable,
                "infer_aether_raster.py",
                "--ae_tif",
                url,
                "--ckpt",
                str(ckpt),
                "--out",
                str(tmp_path / "out.tif"),
                "--no-progress",
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=90,
        )
    finally:
        server.close()
        for conn in held:
            conn.close()
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot open raster {url}: "), proc.stderr
    assert "timed out" in lines[0] and "GDAL_HTTP_TIMEOUT = 1 s" in lines[0], proc.stderr
    assert len(held) >= 2, "the request was not retried"
    assert time.monotonic() - started < 60
    assert _files(tmp_path) == before


# ---- 7. non-finite settings, and a diverging run -------------------------------------------------


@pytest.mark.parametrize(
    "setting",
    [
        "train.lr=.inf",
        "train.weight_decay=.inf",
        "text.request_timeout_s=inf",
        "data.val_block_m=.inf",
        "train.betas=[.nan, 0.9]",
        "loss.temperature=nan",
    ],
)
def test_non_finite_settings_are_refused(setting, tmp_path, monkeypatch, capsys):
    key = setting.split("=")[0] + ("[0]" if "betas" in setting else "")
    args = _train_args(tmp_path, _raster(tmp_path)) + ["--set", setting]
    _refused("train.py", args, f"config {key}: must be a finite number", tmp_path, monkeypatch, capsys)


def test_diverging_training_stops_in_one_line_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    # lr 1e30 (finite, so accepted): the one step of epoch 1 leaves weights near 1e30, still finite, and
    # epoch 2's first forward pass overflows float32: its loss is nan
    args = _train_args(
        tmp_path, _raster(tmp_path), train={"lr": 1e30, "warmup_epochs": 0, "batch_size": 64, "epochs": 3}
    )
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, stderr = run_script_in_process("train.py", [*args, "--no-progress"], monkeypatch, capsys)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2 and "Traceback" not in stderr, stderr
    assert lines[-1].startswith("error: training diverged at epoch 2, step 1 of 1: the loss is nan; "), stderr
    run = tmp_path / "run"
    assert f"{run / 'last.pt'} holds epoch 1, the last finished epoch" in lines[-1]
    assert Checkpoint.load(run / "last.pt").epoch == 1  # whole and finite (checkpoint.py checks the weights)
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1


# ---- 8. float values no embedding has ------------------------------------------------------------


def _impossible_raster(tmp: Path) -> tuple[Path, list[tuple[int, int]]]:
    values = unit_field(SIZE_PX, SIZE_PX, seed=3).astype(np.float64)
    odd = [(3, 4), (10, 10), (15, 2)]
    values[0, 3, 4] = 1e300
    values[5, 10, 10] = -np.inf
    values[:, 15, 2] = 1e5
    values[:, 0, 0] = np.nan  # nodata, which is not odd
    return write_raster(tmp / "odd.tif", values, dtype="float64"), odd


def test_pooling_treats_impossible_values_as_nodata_and_counts_them(tmp_path):
    raster, odd = _impossible_raster(tmp_path)
    info = open_raster(str(raster))
    rows, cols = np.meshgrid(np.arange(SIZE_PX), np.arange(SIZE_PX), indexing="ij")
    x, y = info.xy(rows.ravel(), cols.ravel())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pooled = pool_points(info, x, y, [45.0, 95.0])
    assert pooled.valid.all() and all(np.isfinite(v).all() for v in pooled.views)
    assert pooled.implausible == len(odd)


@pytest.mark.parametrize("pooling", ["window", "pixel"])
def test_inference_treats_impossible_values_as_nodata_in_one_line(pooling, tmp_path, monkeypatch, capsys):
    raster, odd = _impossible_raster(tmp_path)
    args = _infer_args(tmp_path, raster, "--dtype", "float32", "--pooling", pooling, "--precision", "fp32")
    monkeypatch.chdir(ROOT)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, stdout, stderr = run_script_in_process(
            "infer_aether_raster.py", [*args, "--no-progress"], monkeypatch, capsys
        )
    assert code == 0, stderr
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)], [str(w.message) for w in caught]
    said = [line for line in (stdout + stderr).splitlines() if "values no AlphaEarth vector has" in line]
    assert len(said) == 1 and f": {len(odd)} pixels hold" in said[0], stdout + stderr
    with rasterio.open(tmp_path / "out.tif") as src:
        out = src.read()
    finite = np.isfinite(out).all(axis=0)
    if pooling == "window":  # every 9 x 9 window holds valid pixels
        assert finite.all()
    else:  # exactly the odd pixels and the nodata one are nodata
        assert sorted(zip(*np.nonzero(~finite))) == sorted([(0, 0), *odd])
