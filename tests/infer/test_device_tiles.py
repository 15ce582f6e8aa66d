"""The torch tile computer (aether.infer.device_tiles) against the NumPy path it replaces on a device
(which test_inference and test_pooling check against brute force).

`DeviceTileComputer.block` must give what `PooledTileReader.block` gives for the same tile data:
the same shape, type and nodata pixels, float32 values within 1e-6, int8 and int16 codes at most
one apart (a value on a rounding boundary may fall either way). The rasters are tiny and made
here: AlphaEarth int8 with a nodata patch, AETHER int16, floats holding NaN, declared nodata and
values no embedding has, and a geographic raster whose windows change width between rows. Tiles
of 16 or 32 px leave edge tiles whose halos lie partly off the raster. The CUDA tests run only
where PyTorch sees a GPU.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from rasterio.transform import from_origin

from aether.geo.alphaearth import INT16_SCALE, NODATA_INT16
from aether.geo.raster import RasterInfo, metres_per_degree, open_raster
from aether.infer.device_tiles import DeviceTileComputer, table_dtype_for
from aether.infer.reader import PooledTileReader, tile_grid
from aether.infer.spec import EmbedOptions
from aether.model.projector import Projector
from tests.helpers.fixtures import unit_field, write_raster, write_untrained_checkpoint

LATENT_DIM, HIDDEN_DIM = 16, 32
BASE_RADIUS_M = 45.0  # the checkpoint's base radius: 4 px each way at 10 m
FLOAT_ATOL = 1e-6
FLOAT16_ATOL = 1e-3  # one float16 step near 1 is 2**-10
OUTPUT_DTYPES = ("float32", "float16", "int8", "int16")
CUDA = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One PyTorch thread, as inference computes each tile on a CPU (aether.infer.pipeline.tile_workers)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=["aether", "mlp"])
def ckpt(request, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp(f"ckpt_{request.param}")
    return write_untrained_checkpoint(folder / "best.pt", LATENT_DIM, HIDDEN_DIM, arch=request.param)


@pytest.fixture(scope="module")
def projector(ckpt) -> Projector:
    return Projector(ckpt, device="cpu", precision="fp32")


def field(height: int = 40, width: int = 50, seed: int = 0) -> np.ndarray:
    """Unit vectors with a 15 x 17 px nodata patch (wider than a window), one stray nodata pixel,
    and nodata along the left edge."""
    v = unit_field(height, width, seed=seed)
    v[:, 10:25, 15:32] = np.nan
    v[:, 3, 44] = np.nan
    v[:, :, 0] = np.nan
    return v


def int8_raster(tmp: Path) -> Path:
    return write_raster(tmp / "int8.tif", field())


def int16_raster(tmp: Path) -> Path:
    """AETHER int16 codes (q = round(32767 x), nodata -32768)."""
    v = field()
    codes = np.where(np.isnan(v), NODATA_INT16, np.round(np.nan_to_num(v) * INT16_SCALE))
    return write_raster(tmp / "int16.tif", codes, dtype="int16", nodata=NODATA_INT16)


def float_raster(tmp: Path, dtype: str = "float32", nodata: float | None = None) -> Path:
    """Floats with nodata pixels (NaN, or `nodata` where declared), NaN in one band of a pixel,
    values no embedding has (5e3, -inf) and, where `nodata` lies within [-1, 1], that value in one
    band of a pixel."""
    v = field()
    path = write_raster(tmp / f"{dtype}.tif", v, dtype=dtype, nodata=nodata)
    with rasterio.open(path, "r+") as dst:
        data = dst.read()
        data[5, 30, 5] = np.nan
        data[7, 2, 40] = 5e3
        data[0, 35, 45] = -np.inf
        data[3, 8, 8] = 5e3
        if nodata is not None and abs(nodata) <= 1:
            data[11, 33, 20] = nodata
        dst.write(data)
    return path


def geographic_raster(tmp: Path) -> Path:
    """EPSG:4326 at 60 N whose 45 m window is 9 px wide in the northern rows and 7 px in the
    southern (the pixel width in metres crosses 45 / 4 m at the middle row)."""
    height, width, lat_mid = 40, 50, 60.0
    m_lat, m_lon = metres_per_degree(np.array(lat_mid))
    dx, dy = BASE_RADIUS_M / (4 * float(m_lon)), 9.0 / float(m_lat)
    transform = from_origin(24.9, lat_mid + height / 2 * dy, dx, dy)
    return write_raster(tmp / "geo.tif", field(height, width), crs="EPSG:4326", transform=transform)


RASTERS = {
    "int8": int8_raster,
    "int16": int16_raster,
    "float32-nan": lambda tmp: float_raster(tmp),
    "float32-declared": lambda tmp: float_raster(tmp, nodata=-9999.0),
    "float64-in-range-nodata": lambda tmp: float_raster(tmp, "float64", nodata=0.25),
    "geographic": geographic_raster,
}


def in_threads(n_threads: int, n_items: int, work) -> None:
    """work(i) for every item, item i in thread i % n_threads, all threads at once."""
    threads = [
        threading.Thread(target=lambda k=k: [work(i) for i in range(k, n_items, n_threads)]) for k in range(n_threads)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def assert_same_block(got: np.ndarray, want: np.ndarray, what: str) -> None:
    """The contract: shape, type and nodata pixels exactly; values within the dtype's tolerance."""
    assert (got.shape, got.dtype) == (want.shape, want.dtype), f"{what}: {got.shape} {got.dtype}, want {want.shape}"
    if want.dtype.kind == "f":
        nodata_got, nodata_want = np.isnan(got), np.isnan(want)
        np.testing.assert_array_equal(nodata_got, nodata_want, err_msg=f"{what}: nodata")
        atol = FLOAT16_ATOL if want.dtype == np.float16 else FLOAT_ATOL
        diff = np.abs(got.astype(np.float64) - want)[~nodata_want]
        assert diff.max(initial=0) <= atol, f"{what}: values {diff.max():.3g} apart"
    else:
        nodata = np.iinfo(want.dtype).min
        np.testing.assert_array_equal(got == nodata, want == nodata, err_msg=f"{what}: nodata")
        diff = np.abs(got.astype(np.int64) - want)
        assert diff.max(initial=0) <= 1, f"{what}: codes {diff.max()} apart"


def compare_tiles(
    info: RasterInfo,
    projector: Projector,
    pooling: str,
    tile_px: int,
    strip_px: int | None = None,
    dtypes=OUTPUT_DTYPES,
    device_embedder: Projector | None = None,
) -> int:
    """Every tile's block from both paths, for each output dtype; returns the pixels compared."""
    reader = PooledTileReader(info, projector, pooling)
    computer = DeviceTileComputer(device_embedder or projector, info, pooling, strip_px)
    pixels = 0
    for tile, data in reader.produce(tile_grid(info, tile_px)):
        for dtype in dtypes:
            assert_same_block(computer.block(data, dtype), reader.block(data, dtype), f"tile {tile.index} {dtype}")
        pixels += tile.height * tile.width
    assert pixels == info.height * info.width
    return pixels


@pytest.mark.parametrize("kind", list(RASTERS))
@pytest.mark.parametrize("pooling", ["window", "pixel"])
def test_block_matches_numpy_path(tmp_path, projector, kind, pooling):
    """Tiles of 32 px (edge tiles 18 and 8 px, with halos off the raster), pooled in strips of a few rows."""
    info = open_raster(str(RASTERS[kind](tmp_path)), n_bands=None)
    if kind == "geographic" and pooling == "window":
        reader = PooledTileReader(info, projector, "window")
        assert set(np.unique(reader.rx)) == {3, 4}, "the windows should change width between rows"
    compare_tiles(info, projector, pooling, tile_px=32, strip_px=100)


@pytest.mark.parametrize("kind", ["int8", "geographic"])
def test_strips_of_any_size_give_the_same_block(tmp_path, projector, kind):
    """One strip per tile, one row per strip, and the default strips: the same bytes (int8 sums are exact)."""
    info = open_raster(str(RASTERS[kind](tmp_path)), n_bands=None)
    reader = PooledTileReader(info, projector, "window")
    computers = [DeviceTileComputer(projector, info, "window", strip_px) for strip_px in (None, 1, 10**6)]
    for _, data in reader.produce(tile_grid(info, 16)):
        blocks = [c.block(data, "int8") for c in computers]
        for other in blocks[1:]:
            np.testing.assert_array_equal(other, blocks[0])


def test_tables_are_int64_where_int32_could_overflow(projector):
    """int8 sums are int32 only while no partial sum can reach 2**31: a 9-row window over 520
    columns is far from it; a 201-row window over 700 columns of code 127 passes it, and is summed
    exactly in int64 (against the NumPy path's own tables, exact for int8 too)."""
    from aether.geo.pooling import window_means

    small = RasterInfo("<test>", 520, 520, 2, None, None, "int8", None, (16, 16))
    assert table_dtype_for(small, 520, 520, 4) == torch.int32
    rows, cols, hy, hx = 205, 700, 100, 3
    big = RasterInfo("<test>", cols, rows, 2, None, None, "int8", None, (16, 16))
    assert table_dtype_for(big, rows, cols, hy) == torch.int64
    bands = np.full((2, rows, cols), 127, dtype=np.int8)
    bands[1, :, ::3] = -127
    bands[:, 50, 50] = -128
    computer = DeviceTileComputer(projector, big, "window")
    half_x, half_y = np.full(rows - 2 * hy, hx), np.full(rows - 2 * hy, hy)
    means, valid = computer._window_means(torch.from_numpy(bands), half_x, half_y, hx, hy)
    want, want_valid = window_means(bands, big, half_x, half_y, hx, hy)
    np.testing.assert_array_equal(valid.numpy(), want_valid.reshape(-1))
    np.testing.assert_allclose(means.numpy(), want.reshape(-1, 2), atol=1e-7)


def test_blocks_computed_in_several_threads_at_once(tmp_path, projector):
    """Four threads calling `block` on different tiles at once get what one thread gets."""
    info = open_raster(str(int8_raster(tmp_path)), n_bands=None)
    reader = PooledTileReader(info, projector, "window")
    computer = DeviceTileComputer(projector, info, "window", strip_px=64)
    tiles = list(reader.produce(tile_grid(info, 16)))
    alone = [computer.block(data, "int16") for _, data in tiles]
    together = [None] * len(tiles)
    in_threads(4, len(tiles), lambda i: together.__setitem__(i, computer.block(tiles[i][1], "int16")))
    for a, b in zip(alone, together):
        np.testing.assert_array_equal(a, b)


def test_project_on_device_is_the_projector(projector):
    """`project_on_device` (the projector's one projection path, in batches of `batch_px`) gives the
    projector module's own forward."""
    x = torch.from_numpy(unit_field(80, 80, seed=2).reshape(64, -1).T.copy())
    assert len(x) > projector.batch_px
    with torch.no_grad():
        want = projector.ae(x).numpy()
    np.testing.assert_allclose(projector.project_on_device(x).numpy(), want, atol=1e-6)


def test_refuses_an_unknown_pooling(tmp_path, projector):
    from aether.core.errors import AetherError

    info = open_raster(str(int8_raster(tmp_path)), n_bands=None)
    with pytest.raises(AetherError, match="pooling must be one of"):
        DeviceTileComputer(projector, info, "average")


def read_output(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read().transpose(1, 2, 0)


@pytest.mark.parametrize("dtype", ["int8", "float32"])
@pytest.mark.parametrize("kind", ["int8", "geographic"])
def test_whole_runs_through_the_device_path_equal_todays_output(tmp_path, ckpt, monkeypatch, kind, dtype):
    """embed_raster with the torch tile path (forced on the CPU) writes what the NumPy path writes,
    over tiles of 32 (seams, edge tiles with halos off the raster) and several threads: int8
    within one code step, float32 within 1e-6, nodata the same pixels."""
    import aether.infer.pipeline
    from aether.infer.pipeline import embed_raster

    ae = RASTERS[kind](tmp_path)
    numpy_out = embed_raster(
        str(ae),
        str(ckpt),
        str(tmp_path / "numpy.tif"),
        progress=False,
        options=EmbedOptions(tile_px=32, dtype=dtype, device="cpu"),
    )
    monkeypatch.setattr(
        aether.infer.pipeline,
        "tile_computer",
        lambda reader: DeviceTileComputer(reader.projector, reader.info, reader.pooling).block,
    )
    torch_out = embed_raster(
        str(ae),
        str(ckpt),
        str(tmp_path / "torch.tif"),
        progress=False,
        options=EmbedOptions(tile_px=32, dtype=dtype, device="cpu"),
    )
    assert_same_block(read_output(torch_out), read_output(numpy_out), f"{kind} {dtype}")


# ---- on a GPU ------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not CUDA, reason="PyTorch sees no CUDA GPU here; the GPU path is checked where one is")


@needs_cuda
@pytest.mark.parametrize("kind", ["int8", "float32-declared", "geographic"])
@pytest.mark.parametrize("pooling", ["window", "pixel"])
def test_cuda_block_matches_numpy_path(tmp_path, ckpt, projector, kind, pooling):
    """fp32 on the GPU, in small strips and in one: the CPU NumPy path's blocks, within the same tolerances."""
    info = open_raster(str(RASTERS[kind](tmp_path)), n_bands=None)
    on_gpu = Projector(ckpt, device="cuda", precision="fp32")
    for strip_px in (100, None):
        compare_tiles(info, projector, pooling, tile_px=32, strip_px=strip_px, device_embedder=on_gpu)


@needs_cuda
def test_cuda_bf16_gives_unit_vectors_and_the_same_nodata(tmp_path, ckpt, projector):
    info = open_raster(str(int8_raster(tmp_path)), n_bands=None)
    reader = PooledTileReader(info, projector, "window")
    computer = DeviceTileComputer(Projector(ckpt, device="cuda", precision="bf16"), info, "window")
    for _, data in reader.produce(tile_grid(info, 32)):
        got, want = computer.block(data, "float32"), reader.block(data, "float32")
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        valid = ~np.isnan(got[..., 0])
        np.testing.assert_allclose(np.linalg.norm(got[valid], axis=-1), 1.0, atol=1e-5)
        cos = (got[valid] * want[valid]).sum(-1)
        assert cos.min() >= 0.999, f"bf16 vs fp32: minimum cosine {cos.min():.4f}"


@needs_cuda
def test_cuda_blocks_in_several_threads_at_once(tmp_path, ckpt):
    """Tiles in flight on several streams at once (one per thread) give what one thread gets."""
    info = open_raster(str(int8_raster(tmp_path)), n_bands=None)
    on_gpu = Projector(ckpt, device="cuda", precision="fp32")
    computer = DeviceTileComputer(on_gpu, info, "window")
    tiles = [data for _, data in PooledTileReader(info, on_gpu, "window").produce(tile_grid(info, 16))]
    alone = [computer.block(data, "float32") for data in tiles]
    together = [None] * len(tiles)
    in_threads(3, len(tiles), lambda i: together.__setitem__(i, computer.block(tiles[i], "float32")))
    for a, b in zip(alone, together):
        np.testing.assert_array_equal(a, b)


@needs_cuda
@pytest.mark.parametrize("dtype", ["int8", "float32"])
def test_cuda_run_equals_the_cpu_run(tmp_path, ckpt, dtype):
    """A whole run on the GPU at fp32 writes the CPU's output: int8 within one code step, float32
    within 1e-6, nodata the same pixels."""
    from aether.infer.pipeline import embed_raster

    ae = int8_raster(tmp_path)
    runs = [
        embed_raster(
            str(ae),
            str(ckpt),
            str(tmp_path / f"{device}.tif"),
            progress=False,
            options=EmbedOptions(tile_px=32, dtype=dtype, device=device, precision="fp32"),
        )
        for device in ("cpu", "cuda")
    ]
    assert_same_block(read_output(runs[1]), read_output(runs[0]), f"cuda {dtype}")
