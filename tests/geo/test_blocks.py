"""The GeoTIFF block writer: what it writes reads back through GDAL exactly, at the ZSTD level the
output was created with (GDAL's update mode would compress at its default, 9), and blocks made
durable by `sync` survive a SIGKILL."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from aether.core.errors import AetherError
from aether.geo.blocks import BlockFile, create_sparse
from aether.geo.layout import ZSTD_LEVEL, geotiff_layout
from aether.infer.spec import EmbedOptions
from tests.helpers.fixtures import unit_field, write_raster, write_untrained_checkpoint

NODATA = {"int8": -128, "int16": -32768, "float32": float("nan")}


def sparse_file(
    path: Path,
    dtype: str,
    width: int = 100,
    height: int = 70,
    count: int = 8,
    block: int = 32,
    bigtiff: str = "if_safer",
) -> Path:
    profile = dict(
        driver="GTiff",
        width=width,
        height=height,
        count=count,
        dtype=dtype,
        crs="EPSG:32635",
        transform=from_origin(385000, 6673000, 10, 10),
        nodata=NODATA[dtype],
        **geotiff_layout(dtype, block),
    )
    profile["bigtiff"] = bigtiff
    create_sparse(path, profile, [f"E{i:03d}" for i in range(count)], {"AETHER_TEST": "yes"})
    return path


def values(dtype: str, height: int, width: int, count: int, seed: int = 0) -> np.ndarray:
    """(h, w, count) smooth values in `dtype`."""
    field = unit_field(height, width, bands=count, seed=seed).transpose(1, 2, 0)
    if dtype == "float32":
        return field
    scale = 127 if dtype == "int8" else 32767
    return np.round(field * scale).astype(dtype)


@pytest.mark.parametrize("bigtiff", ["no", "yes"])
@pytest.mark.parametrize("dtype", ["int8", "int16", "float32"])
def test_blocks_read_back_exactly_with_edges_and_unwritten_blocks_as_nodata(tmp_path, dtype, bigtiff):
    """Whole windows, windows reaching the right and bottom edges (70 x 100 in blocks of 32), each
    dtype's predictor (none, horizontal, floating point), classic and BigTIFF; one window left
    unwritten reads as nodata; georeferencing, band names and tags are GDAL's."""
    path = sparse_file(tmp_path / "out.tif", dtype, bigtiff=bigtiff)
    data = values(dtype, 70, 100, 8)
    written = np.zeros((70, 100), dtype=bool)
    out = BlockFile(path, ZSTD_LEVEL, threads=2)
    for r0, c0, h, w in [(0, 0, 64, 64), (0, 64, 64, 36), (64, 0, 6, 64)]:  # (64, 64) is left out
        out.write(data[r0 : r0 + h, c0 : c0 + w], r0, c0)
        written[r0 : r0 + h, c0 : c0 + w] = True
    out.close()
    with rasterio.open(path) as src:
        back = src.read().transpose(1, 2, 0)
        assert src.descriptions[:2] == ("E000", "E001") and src.tags()["AETHER_TEST"] == "yes"
        assert src.crs == "EPSG:32635" and src.transform == from_origin(385000, 6673000, 10, 10)
    np.testing.assert_array_equal(back[written], data[written])
    if dtype == "float32":
        assert np.isnan(back[~written]).all()
    else:
        assert (back[~written] == NODATA[dtype]).all()


def test_a_window_off_the_block_grid_is_refused(tmp_path):
    out = BlockFile(sparse_file(tmp_path / "out.tif", "int8"), ZSTD_LEVEL)
    with pytest.raises(ValueError, match="not whole blocks"):
        out.write(values("int8", 32, 32, 8), 16, 0)
    out.close()


def test_a_file_gdal_compressed_otherwise_is_refused(tmp_path):
    path = write_raster(tmp_path / "deflate.tif", unit_field(32, 32), block=16)
    with pytest.raises(AetherError, match="tiled ZSTD GeoTIFF"):
        BlockFile(path, ZSTD_LEVEL)


def stored_block_sizes(path: Path) -> list[int]:
    with rasterio.open(path) as src:
        rows, cols = -(-src.height // src.block_shapes[0][0]), -(-src.width // src.block_shapes[0][1])
        return [src.block_size(1, i, j) for i in range(rows) for j in range(cols)]


def test_embedded_output_is_compressed_at_its_own_level_not_gdals_update_default(tmp_path):
    """Every block of an AETHER raster is as large as ZSTD at the output's level makes it, and the
    same pixels rewritten by GDAL in update mode (level 9) give other sizes: a run that
    compressed at GDAL's default would fail here."""
    import zstandard

    from aether.infer.pipeline import embed_raster

    ae = write_raster(tmp_path / "ae.tif", unit_field(96, 96, smooth=8))
    ckpt = write_untrained_checkpoint(tmp_path / "ckpt.pt")
    out = embed_raster(
        str(ae), str(ckpt), str(tmp_path / "aether.tif"), progress=False, options=EmbedOptions(tile_px=32, dtype="int8")
    )
    with rasterio.open(out) as src:
        profile, pixels = src.profile, src.read()
        block_h, block_w = src.block_shapes[0]
    expected = []
    for r in range(0, 96, block_h):
        for c in range(0, 96, block_w):
            block = np.ascontiguousarray(pixels[:, r : r + block_h, c : c + block_w].transpose(1, 2, 0))
            expected.append(len(zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(block.tobytes())))
    assert stored_block_sizes(out) == expected
    rewritten = tmp_path / "rewritten.tif"
    with rasterio.open(rewritten, "w", **profile):
        pass
    with rasterio.open(rewritten, "r+") as dst:  # GDAL forgets ZSTD_LEVEL in update mode
        dst.write(pixels)
    level_9 = stored_block_sizes(rewritten)
    assert all(a != b for a, b in zip(level_9, expected)), "level 9 should compress every block differently"


def test_synced_blocks_survive_a_kill_and_the_rest_read_as_nodata(tmp_path):
    """A process writes two windows, syncs after the first only, and is killed: the file opens,
    the first window is there and the second reads as nodata."""
    path = sparse_file(tmp_path / "out.tif", "int8")
    child = textwrap.dedent(f"""
        import os, signal, sys
        from tests.geo.test_blocks import values
        from aether.geo.blocks import BlockFile
        out = BlockFile({str(path)!r}, 1)
        data = values("int8", 70, 100, 8)
        out.write(data[:32, :32], 0, 0)
        out.sync()
        out.write(data[:32, 32:64], 0, 32)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    done = subprocess.run([sys.executable, "-c", child], cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == -9
    with rasterio.open(path) as src:
        back = src.read().transpose(1, 2, 0)
    np.testing.assert_array_equal(back[:32, :32], values("int8", 70, 100, 8)[:32, :32])
    assert (back[:32, 32:64] == -128).all()
