"""Raster inference (aether.infer.pipeline, infer_aether_raster.py) against brute force.

A small random-init checkpoint (latent 16, hidden 32) is built once per module, no
training. Every output value is checked against `Projector.project` applied to a
masked window mean computed here with plain numpy from the input file's own values,
at pixels located through the map coordinates (so georeferencing is checked too).
Rasters are tiny (40 x 50 px at 10 m, one 120 x 130 px geographic raster and one
320 x 320 px raster for overviews). Run with `-s` to see the measured dtype and
precision errors.
"""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from aether.core.errors import AetherError
from aether.geo.alphaearth import NODATA_INT8, dequantize
from aether.geo.raster import metres_per_degree
from aether.infer.pipeline import embed_raster
from aether.infer.spec import EmbedOptions
from aether.model.embed import embed_array, embed_points
from aether.model.projector import Projector
from tests.helpers.fixtures import (
    ORIGIN,
    brute_force,
    run_script_in_process,
    stored_values,
    unit_field,
    write_raster,
    write_untrained_checkpoint,
)

ROOT = Path(__file__).resolve().parents[2]
HEIGHT_PX, WIDTH_PX = 40, 50
PIXEL_M = 10.0
BASE_RADIUS_M = 45.0  # Config default, stored in the checkpoint
BASE_HALF_PX = 4  # 45 m at 10 m pixels: a 9 x 9 window
LATENT_DIM, HIDDEN_DIM, TEXT_DIM = 16, 32, 384
INT8_BOUND = 1 / 127.5 + 1e-5  # AlphaEarth int8 round trip, per component, near |x| = 1
FLOAT_ATOL = 1e-5
RUN_TIMEOUT_S = 4.0  # a 40 x 50 px run takes ~0.2 s (~1.2 s with the slowed reader); longer is a hang


# ---- a checkpoint without training ---------------------------------------------------------


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return write_untrained_checkpoint(tmp_path_factory.mktemp("ckpt") / "best.pt", LATENT_DIM, HIDDEN_DIM, TEXT_DIM)


@pytest.fixture(scope="module")
def projector(ckpt) -> Projector:
    return Projector(ckpt, precision="fp32")


# ---- independent reference computations ----------------------------------------------------


def brute_force_all(values: np.ndarray, invalid: np.ndarray, half_px: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force window means at every pixel: (h, w, C) and the (h, w) mask of non-empty windows."""
    _, h, w = values.shape
    means = np.zeros((h, w, values.shape[0]))
    ok = np.zeros((h, w), dtype=bool)
    for r in range(h):
        for c in range(w):
            m = brute_force(values, invalid, r, c, half_px, half_px)
            if m is not None:
                means[r, c], ok[r, c] = m, True
    return means, ok


def expected_output(projector: Projector, means: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """(h, w, D): the projector applied to the brute-force means, NaN where no window."""
    out = np.full(ok.shape + (LATENT_DIM,), np.nan)
    out[ok] = projector.project(means[ok])
    return out


def pixel_of(transform, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Array row and column holding map points, for either row orientation."""
    cols, rows = ~transform @ (np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64))
    return np.floor(rows).astype(int), np.floor(cols).astype(int)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


# ---- running inference ---------------------------------------------------------------------


def embed(ckpt: Path, ae: Path, out: Path, **kwargs) -> Path:
    """embed_raster on the CPU (the NumPy path these tests patch; the GPU path has
    tests/test_device_tiles.py) with float32 output and fp32 arithmetic unless told otherwise."""
    kwargs = {"dtype": "float32", "precision": "fp32", "progress": False, "device": "cpu"} | kwargs
    options = {k: kwargs.pop(k) for k in list(kwargs) if k in EmbedOptions.__dataclass_fields__}
    return embed_raster(str(ae), str(ckpt), str(out), EmbedOptions(**options), **kwargs)


def read_output(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(h, w, D) AETHER vectors (de-quantized; NaN at nodata) and the (h, w) valid mask."""
    with rasterio.open(path) as src:
        raw = src.read()
    if raw.dtype == np.int8:
        nodata = raw == NODATA_INT8
        values = dequantize(raw).astype(np.float64)
    elif raw.dtype == np.int16:  # AETHER int16: q / 32767, nodata -32768
        nodata = raw == -32768
        values = raw.astype(np.float64) / 32767
    else:
        nodata = np.isnan(raw)
        values = raw.astype(np.float64)
    assert (nodata.all(axis=0) == nodata.any(axis=0)).all(), "nodata must cover all bands of a pixel"
    valid = ~nodata[0]
    values[:, ~valid] = np.nan
    return values.transpose(1, 2, 0), valid


def field(height: int = HEIGHT_PX, width: int = WIDTH_PX, seed: int = 0, patch: bool = True) -> np.ndarray:
    """Unit vectors with a 15 x 17 px nodata patch (bigger than the 9 x 9 window) and one stray pixel."""
    v = unit_field(height, width, seed=seed)
    if patch:
        v[:, 10:25, 15:32] = np.nan
        v[:, 3, 44] = np.nan
    return v


def ae_raster(tmp: Path, kind: str, name: str = "ae.tif", values: np.ndarray | None = None, **kwargs) -> Path:
    """kind: int8 (AlphaEarth Cloud Storage), float32 (NaN nodata) or float32-declared (nodata -9999)."""
    values = field() if values is None else values
    if kind == "int8":
        return write_raster(tmp / name, values, **kwargs)
    nodata = -9999.0 if kind == "float32-declared" else None
    return write_raster(tmp / name, values, dtype="float32", nodata=nodata, **kwargs)


def partials(folder: Path) -> list[Path]:
    return sorted(folder.glob(".*.partial.*"))


# ---- 1. georeferencing round trip ------------------------------------------------------------


@pytest.mark.parametrize("out_dtype", ["float32", "int8"])
@pytest.mark.parametrize("in_kind", ["int8", "float32"])
@pytest.mark.parametrize("bottom_up", [False, True], ids=["north_up", "bottom_up"])
def test_points_match_brute_force(tmp_path, ckpt, projector, bottom_up, in_kind, out_dtype):
    ae = ae_raster(tmp_path, in_kind, bottom_up=bottom_up)
    out = embed(ckpt, ae, tmp_path / "out.tif", dtype=out_dtype)
    values, invalid = stored_values(ae)
    rng = np.random.default_rng(7)
    x = ORIGIN[0] + np.r_[rng.uniform(0, WIDTH_PX * PIXEL_M, 30), 5.0, WIDTH_PX * PIXEL_M - 5.0, 5.0]
    y = ORIGIN[1] - np.r_[rng.uniform(0, HEIGHT_PX * PIXEL_M, 30), 5.0, HEIGHT_PX * PIXEL_M - 5.0, 175.0]
    with rasterio.open(ae) as src:
        in_rows, in_cols = pixel_of(src.transform, x, y)
    with rasterio.open(out) as dst:
        out_rows, out_cols = pixel_of(dst.transform, x, y)
    z, valid = read_output(out)
    atol = INT8_BOUND if out_dtype == "int8" else FLOAT_ATOL
    checked = 0
    for i in range(len(x)):
        mean = brute_force(values, invalid, in_rows[i], in_cols[i], BASE_HALF_PX, BASE_HALF_PX)
        if mean is None:
            assert not valid[out_rows[i], out_cols[i]]
            continue
        expected = projector.project(mean[None])[0]
        np.testing.assert_allclose(z[out_rows[i], out_cols[i]], expected, atol=atol, err_msg=f"point {i}")
        checked += 1
    assert checked >= 25


def test_geographic_raster_uses_ground_window(tmp_path, ckpt, projector):
    """EPSG:4326 with 0.99 m pixels: the 45 m window spans 45 px each way (91 x 91) at the latitude."""
    lat0, pixel_m = 60.17, 0.99
    m_lat, m_lon = metres_per_degree(np.array(lat0))
    dx, dy = pixel_m / float(m_lon), pixel_m / float(m_lat)
    height, width = 120, 130
    transform = from_origin(24.93, lat0 + height * dy / 2, dx, dy)
    ae = write_raster(
        tmp_path / "geo.tif", unit_field(height, width, seed=5, smooth=8), crs="EPSG:4326", transform=transform
    )
    out = embed(ckpt, ae, tmp_path / "out.tif")
    values, invalid = stored_values(ae)
    z, valid = read_output(out)
    assert valid.all()
    points = [(60, 65), (0, 0), (119, 129), (10, 100), (100, 20), (45, 46)]
    for row, col in points:
        lat = transform.f + (row + 0.5) * transform.e
        m_lat_row, m_lon_row = metres_per_degree(np.array(lat))
        rx = int(np.floor(BASE_RADIUS_M / (dx * float(m_lon_row))))
        ry = int(np.floor(BASE_RADIUS_M / (dy * float(m_lat_row))))
        assert (rx, ry) == (45, 45)
        expected = projector.project(brute_force(values, invalid, row, col, ry, rx)[None])[0]
        np.testing.assert_allclose(z[row, col], expected, atol=FLOAT_ATOL, err_msg=f"pixel {(row, col)}")
    # a 9 x 9 (10 m-style) window would give something else: the check above has teeth
    wrong = projector.project(brute_force(values, invalid, 60, 65, 4, 4)[None])[0]
    assert np.abs(z[60, 65] - wrong).max() > 1e-3


# ---- 2. output grid and metadata -----------------------------------------------------------


@pytest.mark.parametrize("out_dtype", ["int8", "float32"])
@pytest.mark.parametrize("bottom_up", [False, True], ids=["north_up", "bottom_up"])
def test_output_grid_and_tags(tmp_path, ckpt, bottom_up, out_dtype):
    ae = ae_raster(tmp_path, "int8", bottom_up=bottom_up)
    out = embed(ckpt, ae, tmp_path / "out.tif", dtype=out_dtype)
    north_up = from_origin(ORIGIN[0], ORIGIN[1], PIXEL_M, PIXEL_M)
    with rasterio.open(ae) as src, rasterio.open(out) as dst:
        assert dst.crs == src.crs
        assert (dst.width, dst.height, dst.count) == (src.width, src.height, LATENT_DIM)
        assert dst.transform.almost_equals(north_up)
        for transform, width, height in (
            (src.transform, src.width, src.height),
            (dst.transform, dst.width, dst.height),
        ):
            xs, ys = transform @ (np.array([0.0, width]), np.array([0.0, height]))
            assert (xs.min(), ys.min(), xs.max(), ys.max()) == pytest.approx(
                (ORIGIN[0], ORIGIN[1] - HEIGHT_PX * PIXEL_M, ORIGIN[0] + WIDTH_PX * PIXEL_M, ORIGIN[1])
            )
        if not bottom_up:
            assert dst.transform == src.transform
        assert dst.dtypes == (out_dtype,) * LATENT_DIM
        assert dst.descriptions == tuple(f"E{i:03d}" for i in range(LATENT_DIM))
        if out_dtype == "int8":
            assert dst.nodata == NODATA_INT8
        else:
            assert np.isnan(dst.nodata)
        tags = dst.tags()
    assert tags["AETHER_CHECKPOINT_SHA256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert tags["AETHER_POOLING"].startswith("window") and "45" in tags["AETHER_POOLING"]
    assert tags["AETHER_DTYPE"] == out_dtype
    assert tags["AETHER_PRECISION"] == "fp32"


def test_band_descriptions_have_three_digits(tmp_path, ckpt):
    out = embed(ckpt, ae_raster(tmp_path, "int8"), tmp_path / "out.tif")
    with rasterio.open(out) as dst:
        assert dst.descriptions == tuple(f"E{i:03d}" for i in range(LATENT_DIM))


def test_bottom_up_output_is_flipped_north_up(tmp_path, ckpt):
    """The same geography stored south-first gives the same north-up output, pixel for pixel."""
    v = field()
    north = embed(ckpt, ae_raster(tmp_path, "int8", "n.tif", v), tmp_path / "n_out.tif")
    south = embed(ckpt, ae_raster(tmp_path, "int8", "s.tif", v, bottom_up=True), tmp_path / "s_out.tif")
    zn, vn = read_output(north)
    zs, vs = read_output(south)
    np.testing.assert_array_equal(vn, vs)
    np.testing.assert_allclose(zs[vs], zn[vn], atol=1e-6)
    with rasterio.open(south) as src:
        assert src.transform.e < 0


def test_output_file_has_ordinary_permissions(tmp_path, ckpt):
    """The output is readable like any other file written here (not the 0600 of a temp file)."""
    reference = tmp_path / "reference.txt"
    reference.write_text("x")
    out = embed(ckpt, ae_raster(tmp_path, "int8"), tmp_path / "out.tif")
    assert stat.S_IMODE(out.stat().st_mode) == stat.S_IMODE(reference.stat().st_mode)


# ---- 3. nodata -----------------------------------------------------------------------------


@pytest.mark.parametrize("out_dtype", ["int8", "float32"])
@pytest.mark.parametrize("in_kind", ["int8", "float32", "float32-declared"])
def test_nodata_follows_the_windows(tmp_path, ckpt, projector, in_kind, out_dtype):
    ae = ae_raster(tmp_path, in_kind)
    z, valid = read_output(embed(ckpt, ae, tmp_path / "out.tif", dtype=out_dtype))
    values, invalid = stored_values(ae)
    means, ok = brute_force_all(values, invalid, BASE_HALF_PX)
    np.testing.assert_array_equal(valid, ok)
    assert not valid[14:21, 19:28].any(), "windows wholly inside the patch are nodata"
    assert valid[10:25, 15:32].any() and valid[3, 44], "windows partly valid give values"
    atol = INT8_BOUND if out_dtype == "int8" else FLOAT_ATOL
    np.testing.assert_allclose(z[ok], expected_output(projector, means, ok)[ok], atol=atol)


@pytest.mark.parametrize("in_kind", ["int8", "float32", "float32-declared"])
def test_pixel_pooling_maps_nodata_pixel_to_pixel(tmp_path, ckpt, projector, in_kind):
    ae = ae_raster(tmp_path, in_kind)
    out = embed(ckpt, ae, tmp_path / "out.tif", pooling="pixel")
    z, valid = read_output(out)
    values, invalid = stored_values(ae)
    np.testing.assert_array_equal(valid, ~invalid)
    pixels = values.transpose(1, 2, 0)[valid]
    pixels /= np.linalg.norm(pixels, axis=1, keepdims=True)  # each pixel renormalised, as windows are
    np.testing.assert_allclose(z[valid], projector.project(pixels), atol=FLOAT_ATOL)
    with rasterio.open(out) as src:
        assert src.tags()["AETHER_POOLING"] == "pixel"


# ---- 4. output types -----------------------------------------------------------------------

FLOAT16_WRITABLE = bool(rasterio.dtypes.check_dtype("float16"))


@pytest.mark.parametrize(
    "dtype",
    [
        "int8",
        "int16",
        pytest.param(
            "float16", marks=pytest.mark.skipif(not FLOAT16_WRITABLE, reason="GDAL < 3.11 cannot write float16")
        ),
    ],
)
def test_output_dtypes_agree_with_float32(tmp_path, ckpt, dtype):
    ae = ae_raster(tmp_path, "int8")
    z32, v32 = read_output(embed(ckpt, ae, tmp_path / "f32.tif", dtype="float32"))
    z, v = read_output(embed(ckpt, ae, tmp_path / f"{dtype}.tif", dtype=dtype))
    np.testing.assert_array_equal(v, v32)
    error = float((1 - cosine(z[v], z32[v])).max())
    print(f"\nmax cosine error of {dtype} vs float32: {error:.2e}")
    if dtype == "int8":
        assert np.abs(z[v] - z32[v]).max() <= INT8_BOUND
    elif dtype == "int16":  # q = round(32767 x): half a code step off at most
        assert np.abs(z[v] - z32[v]).max() <= 0.5 / 32767 + 1e-7
        with rasterio.open(tmp_path / "int16.tif") as src:
            assert src.nodata == -32768 and "q / 32767" in src.tags()["AETHER_ENCODING"]
        assert (~v).any()  # the raster's nodata patch, -32768 in every band (read_output checks)
    else:
        assert error < 1e-3


# ---- 5. tile seams -------------------------------------------------------------------------


@pytest.mark.parametrize("bottom_up", [False, True], ids=["north_up", "bottom_up"])
@pytest.mark.parametrize("in_kind", ["int8", "float32"])
def test_tiles_leave_no_seams(tmp_path, ckpt, in_kind, bottom_up):
    ae = ae_raster(tmp_path, in_kind, bottom_up=bottom_up)
    small, vs = read_output(embed(ckpt, ae, tmp_path / "t16.tif", tile_px=16))
    whole, vw = read_output(embed(ckpt, ae, tmp_path / "t64.tif", tile_px=64))
    np.testing.assert_array_equal(vs, vw)
    np.testing.assert_allclose(small[vs], whole[vw], atol=1e-6)


def geographic_with_varying_windows(tmp: Path) -> Path:
    """EPSG:4326 at 60 N whose 45 m window is 9 px wide in the northern rows and 7 px in the southern
    (the pixel width in metres crosses 45 / 4 m at the middle row)."""
    height, width, lat_mid = 40, 50, 60.0
    m_lat, m_lon = metres_per_degree(np.array(lat_mid))
    dx, dy = BASE_RADIUS_M / (4 * float(m_lon)), 9.0 / float(m_lat)
    transform = from_origin(24.9, lat_mid + height / 2 * dy, dx, dy)
    return write_raster(tmp / "geo.tif", field(height, width), crs="EPSG:4326", transform=transform)


@pytest.mark.parametrize("in_kind", ["int8", "float32", "geographic"])
def test_strips_and_parallel_tiles_change_no_byte(tmp_path, ckpt, monkeypatch, in_kind):
    """Tiles pooled and projected in strips of odd sizes, computed, decoded and compressed one,
    two or three at a time, write the same pixels."""
    from aether.geo.raster import open_raster
    from aether.infer.pipeline import Threads
    from aether.infer.reader import PooledTileReader

    ae = geographic_with_varying_windows(tmp_path) if in_kind == "geographic" else ae_raster(tmp_path, in_kind)
    if in_kind == "geographic":
        reader = PooledTileReader(open_raster(str(ae), n_bands=None), Projector(ckpt), "window")
        assert set(np.unique(reader.rx)) == {3, 4}, "the windows should change width between rows"
    outputs = []
    for strip_px, workers in [(10**6, 1), (37, 2), (150, 2), (150, 3)]:
        threads = Threads(compute=workers, read=workers, compress=workers)
        out = embed(
            ckpt,
            ae,
            tmp_path / f"out_{strip_px}_{workers}.tif",
            tile_px=32,
            dtype="int8",
            threads=threads,
            strip_px=strip_px,
        )
        with rasterio.open(out) as src:
            outputs.append(src.read())
    for other in outputs[1:]:
        np.testing.assert_array_equal(other, outputs[0])


@pytest.mark.parametrize("arch", ["aether", "mlp"])
def test_fused_projector_matches_forward(arch, tmp_path):
    import torch

    projector = Projector(
        write_untrained_checkpoint(tmp_path / "c.pt", LATENT_DIM, HIDDEN_DIM, arch=arch), precision="fp32"
    )
    x = torch.from_numpy(unit_field(30, 40, seed=2).reshape(64, -1).T.copy())
    workspace, out = projector.ae.workspace(len(x), torch.device("cpu")), torch.empty(len(x), LATENT_DIM)
    with torch.no_grad():
        expected = projector.ae(x)
    got = projector.ae.forward_into(x, workspace, out).numpy()
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-6)
    np.testing.assert_allclose(projector.project(x.numpy()), expected.numpy(), atol=1e-6)  # in batches


def test_tile_workers_use_one_torch_thread_each_and_restore():
    """One PyTorch thread inside (in the caller and in threads it starts), and the count restored
    after overlapping runs in two threads end in either order."""
    import torch

    from aether.infer.pipeline import tile_workers

    before = torch.get_num_threads()
    inside = []
    with tile_workers(torch.device("cpu"), 512, "int8"):
        inside.append(torch.get_num_threads())
        worker = threading.Thread(target=lambda: inside.append(torch.get_num_threads()))
        worker.start()
        worker.join()
    assert inside == [1, 1]
    assert torch.get_num_threads() == before

    entered, release = [threading.Event(), threading.Event()], [threading.Event(), threading.Event()]

    def run(k):
        with tile_workers(torch.device("cpu"), 512, "int8"):
            entered[k].set()
            release[k].wait(5)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
    for k in range(2):
        threads[k].start()
        entered[k].wait(5)
    for k in range(2):  # the first to enter ends first
        release[k].set()
        threads[k].join()
    assert torch.get_num_threads() == before


# ---- 6. arithmetic precision -------------------------------------------------------------------


def test_bf16_agrees_with_fp32(tmp_path, ckpt):
    ae = ae_raster(tmp_path, "int8")
    z32, v32 = read_output(embed(ckpt, ae, tmp_path / "fp32.tif"))
    z16, v16 = read_output(embed(ckpt, ae, tmp_path / "bf16.tif", precision="bf16"))
    np.testing.assert_array_equal(v16, v32)
    min_cos = float(cosine(z16[v16], z32[v32]).min())
    print(f"\nbf16 vs fp32: minimum per-pixel cosine {min_cos:.6f}")
    assert min_cos >= 0.999


# ---- 7. refusals through the command line ------------------------------------------------------


def _good_args(
    tmp: Path, ckpt: Path, ae_tif: Path | None = None, ckpt_path: Path | None = None, out: Path | None = None
) -> list[str]:
    """Valid arguments (output in tmp/out/) unless replaced."""
    (tmp / "out").mkdir(exist_ok=True)
    return [
        "--ae_tif",
        str(ae_tif or ae_raster(tmp, "int8")),
        "--ckpt",
        str(ckpt_path or ckpt),
        "--out",
        str(out or tmp / "out" / "aether.tif"),
    ]


def three_bands(tmp, ckpt):
    return _good_args(tmp, ckpt, ae_tif=write_raster(tmp / "ae3.tif", unit_field(HEIGHT_PX, WIDTH_PX, bands=3)))


def no_crs(tmp, ckpt):
    return _good_args(tmp, ckpt, ae_tif=ae_raster(tmp, "int8", "nocrs.tif", crs=None))


def missing_checkpoint(tmp, ckpt):
    return _good_args(tmp, ckpt, ckpt_path=tmp / "nowhere.pt")


def truncated_checkpoint(tmp, ckpt):
    data = ckpt.read_bytes()
    (tmp / "half.pt").write_bytes(data[: len(data) // 2])
    return _good_args(tmp, ckpt, ckpt_path=tmp / "half.pt")


def output_folder_missing(tmp, ckpt):
    return _good_args(tmp, ckpt, out=tmp / "nowhere" / "aether.tif")


def output_is_input(tmp, ckpt):
    ae = ae_raster(tmp, "int8", "same.tif")
    return _good_args(tmp, ckpt, ae_tif=ae, out=ae)


def coarse_pixels(tmp, ckpt):
    grid = from_origin(ORIGIN[0], ORIGIN[1], 200.0, 200.0)
    return _good_args(tmp, ckpt, ae_tif=ae_raster(tmp, "int8", "coarse.tif", transform=grid))


SUBPROCESS, IN_PROCESS = "subprocess", "in-process"
REFUSALS = [
    (three_bands, "has 3 bands", IN_PROCESS),
    (no_crs, "has no CRS", IN_PROCESS),
    (missing_checkpoint, "nowhere.pt does not exist", IN_PROCESS),
    (truncated_checkpoint, "cannot be read", SUBPROCESS),
    (output_folder_missing, "does not exist", IN_PROCESS),
    (output_is_input, "is the input raster", IN_PROCESS),
    (coarse_pixels, "coarser than the checkpoint's base window", SUBPROCESS),
]


def _cli_in_process(args: list[str], monkeypatch, capsys) -> tuple[int, str]:
    """What `python infer_aether_raster.py ARGS` does, without a new interpreter."""
    code, _, err = run_script_in_process("infer_aether_raster.py", [*args, "--no-progress"], monkeypatch, capsys)
    return code, err


def _cli_subprocess(args: list[str]) -> tuple[int, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "infer_aether_raster.py", *args, "--no-progress"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return proc.returncode, proc.stderr


@pytest.mark.parametrize("build, expected, how", REFUSALS, ids=[c[0].__name__ for c in REFUSALS])
def test_cli_refuses_with_one_error_line(tmp_path, ckpt, monkeypatch, capsys, build, expected, how):
    args = build(tmp_path, ckpt)
    ae, out = Path(args[args.index("--ae_tif") + 1]), Path(args[args.index("--out") + 1])
    before = ae.read_bytes()
    code, stderr = _cli_subprocess(args) if how == SUBPROCESS else _cli_in_process(args, monkeypatch, capsys)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2, stderr
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert expected in lines[0], stderr
    assert ae.read_bytes() == before
    assert out == ae or not out.exists()
    assert not partials(tmp_path) and not partials(tmp_path / "out")


# ---- 8. atomic output --------------------------------------------------------------------------


def _run_guarded(fn) -> dict:
    """Call fn in a thread; report its result or exception, and whether it hung."""
    result: dict = {}

    def target():
        try:
            result["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            result["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(RUN_TIMEOUT_S)
    result["hung"] = thread.is_alive()
    return result


def _fail_on_projection(nth: int):
    def inject(monkeypatch):
        original = Projector.project_pixels
        calls = []

        def project(self, vectors, *args, **kwargs):
            calls.append(len(vectors))
            if len(calls) >= nth:
                raise RuntimeError("injected failure")
            return original(self, vectors, *args, **kwargs)

        monkeypatch.setattr("aether.model.projector.Projector.project_pixels", project)

    return inject


def _fail_in_writer(monkeypatch):
    monkeypatch.setattr(
        "aether.infer.reader.PooledTileReader.block", lambda self, data, dtype: None
    )  # dst.write(None) raises


def _fail_in_writer_while_reading(monkeypatch):
    """The writer fails while the reader is busy with a later tile (made slow so this always happens)."""
    import aether.infer.reader

    _fail_in_writer(monkeypatch)
    read = aether.infer.reader._read_with_halo

    def slow_read(src, info, tile, hx, hy):
        if (tile.row0, tile.col0) != (0, 0):
            time.sleep(0.1)
        return read(src, info, tile, hx, hy)

    monkeypatch.setattr("aether.infer.reader._read_with_halo", slow_read)


FAILURES = [
    pytest.param(_fail_in_writer, 64, id="writer_fails_one_tile"),
    pytest.param(_fail_in_writer_while_reading, 16, id="writer_fails_half_way"),
    pytest.param(_fail_on_projection(1), 64, id="compute_fails_one_tile"),
    pytest.param(_fail_on_projection(2), 16, id="compute_fails_half_way"),
]


@pytest.mark.parametrize("inject, tile_px", FAILURES)
def test_failed_run_leaves_nothing_behind(tmp_path, ckpt, monkeypatch, inject, tile_px):
    """Tile 64 is one tile of 40 x 50 px; tile 16 makes 12 tiles, so a failure comes half-way."""
    ae = ae_raster(tmp_path, "int8")
    out = tmp_path / "out.tif"
    out.write_bytes(b"an earlier output")
    inject(monkeypatch)
    result = _run_guarded(lambda: embed(ckpt, ae, out, tile_px=tile_px))
    assert not result["hung"], f"embed_raster did not return within {RUN_TIMEOUT_S} s"
    assert "error" in result, "the injected failure was swallowed"
    assert out.read_bytes() == b"an earlier output"
    assert not partials(tmp_path)


def test_failed_run_without_earlier_output(tmp_path, ckpt, monkeypatch):
    ae = ae_raster(tmp_path, "int8")
    _fail_in_writer(monkeypatch)
    result = _run_guarded(lambda: embed(ckpt, ae, tmp_path / "out.tif", tile_px=64))
    assert not result["hung"] and "error" in result
    assert not (tmp_path / "out.tif").exists()
    assert not partials(tmp_path)


# ---- 9. Cloud-Optimized GeoTIFF ----------------------------------------------------------------


def test_cog_has_overviews_and_same_values(tmp_path, ckpt, monkeypatch, capsys):
    size_px = 320  # over one 256 px block: the COG driver adds a 2x overview
    ae = write_raster(tmp_path / "big.tif", unit_field(size_px, size_px, seed=4, smooth=16), block=256)
    plain = embed(ckpt, ae, tmp_path / "plain.tif", dtype="int8")
    cog = tmp_path / "cog.tif"
    code, stderr = _cli_in_process(
        [
            "--ae_tif",
            str(ae),
            "--ckpt",
            str(ckpt),
            "--out",
            str(cog),
            "--cog",
            "--precision",
            "fp32",
            "--dtype",
            "int8",
        ],
        monkeypatch,
        capsys,
    )
    assert code == 0, stderr
    with rasterio.open(cog) as c, rasterio.open(plain) as p:
        assert c.overviews(1), "no overviews"
        assert c.profile["tiled"] and c.crs == p.crs and c.transform == p.transform
        assert c.descriptions == p.descriptions and c.nodata == p.nodata
        assert c.tags()["AETHER_CHECKPOINT_SHA256"] == p.tags()["AETHER_CHECKPOINT_SHA256"]
        np.testing.assert_array_equal(c.read(), p.read())
    assert not partials(tmp_path)


# ---- 10. Python API ----------------------------------------------------------------------------


@pytest.mark.parametrize("pooling", ["window", "pixel"])
def test_embed_array_matches_raster(tmp_path, ckpt, projector, pooling):
    ae = ae_raster(tmp_path, "int8")
    z, valid = read_output(embed(ckpt, ae, tmp_path / "out.tif", pooling=pooling))
    values, invalid = stored_values(ae)
    pixels = values.transpose(1, 2, 0).copy()
    pixels[invalid] = np.nan
    for kwargs in ({"valid": ~invalid}, {}):  # the mask given, or taken from the NaNs
        arr = embed_array(projector, pixels, pixel_size_m=PIXEL_M, pooling=pooling, **kwargs)
        np.testing.assert_array_equal(np.isfinite(arr).all(axis=-1), valid)
        np.testing.assert_allclose(arr[valid], z[valid], atol=FLOAT_ATOL)


def test_embed_points_matches_raster(tmp_path, ckpt, projector):
    ae = ae_raster(tmp_path, "int8", bottom_up=True)
    out = embed(ckpt, ae, tmp_path / "out.tif")
    z, valid = read_output(out)
    rng = np.random.default_rng(3)
    x = ORIGIN[0] + np.r_[rng.uniform(0, WIDTH_PX * PIXEL_M, 40), 235.0, -50.0]
    y = ORIGIN[1] - np.r_[rng.uniform(0, HEIGHT_PX * PIXEL_M, 40), 175.0, 100.0]  # patch centre; off the raster
    vectors, ok = embed_points(projector, str(ae), x, y)
    with rasterio.open(out) as dst:
        rows, cols = pixel_of(dst.transform, x, y)
    inside = (rows >= 0) & (rows < HEIGHT_PX) & (cols >= 0) & (cols < WIDTH_PX)
    assert not ok[-2] and not ok[-1] and not inside[-1]
    np.testing.assert_array_equal(ok[inside], valid[rows[inside], cols[inside]])
    np.testing.assert_allclose(vectors[ok], z[rows[ok], cols[ok]], atol=FLOAT_ATOL)
    assert np.isnan(vectors[~ok]).all()


@pytest.mark.skipif(FLOAT16_WRITABLE, reason="this GDAL writes float16")
def test_float16_refused_in_one_line_where_gdal_cannot_write_it(tmp_path, ckpt):
    with pytest.raises(AetherError, match="float16 needs GDAL 3.11"):
        embed(ckpt, ae_raster(tmp_path, "int8"), tmp_path / "f16.tif", dtype="float16")
    assert list(tmp_path.glob("*f16*")) == []


def test_cli_offers_float16_only_where_gdal_writes_it(monkeypatch, capsys):
    """`--dtype` lists what this GDAL can write; an unlisted type is argparse's one-line refusal."""
    code, out, _ = run_script_in_process("infer_aether_raster.py", ["--help"], monkeypatch, capsys)
    assert code == 0
    assert ("{int8,int16,float16,float32}" if FLOAT16_WRITABLE else "{int8,int16,float32}") in out
