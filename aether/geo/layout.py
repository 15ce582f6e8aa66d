"""How AETHER lays out the GeoTIFFs it writes, declared once: tiled blocks, ZSTD at one level, a
predictor where it pays; and the tags it reads back from them."""

from __future__ import annotations

import os
from pathlib import Path

import rasterio
from rasterio.shutil import copy as rio_copy

from aether.core.files import raise_if_disk_full, temp_file_beside

ZSTD_LEVEL = 1  # of the GeoTIFFs AETHER writes


OUTPUT_BLOCK_PX = 256


def geotiff_layout(dtype: str, block_px: int) -> dict:
    """How AETHER lays out the GeoTIFFs it writes (rasterio creation options): square tiled blocks,
    ZSTD level 1 (several times faster than DEFLATE for the same size on embedding data, which
    barely compresses), pixel-interleaved, BigTIFF when needed, and a predictor where it pays:
    the floating-point one for float32, horizontal differencing for int16 (whose low bits follow
    the smooth window means)."""
    layout = dict(
        tiled=True,
        blockxsize=block_px,
        blockysize=block_px,
        compress="zstd",
        zstd_level=ZSTD_LEVEL,
        interleave="pixel",
        bigtiff="if_safer",
        num_threads="ALL_CPUS",
    )
    if dtype != "int8":
        layout["predictor"] = {"float32": 3, "int16": 2}.get(dtype, 1)
    return layout


def output_block_px(tile_px: int) -> int:
    """The largest GeoTIFF block side (a multiple of 16, at most 512) that divides the tile side."""
    if tile_px % OUTPUT_BLOCK_PX == 0:
        return OUTPUT_BLOCK_PX
    return next(b for b in range(min(tile_px, 512), 15, -16) if tile_px % b == 0)


def raster_tag(path: Path, name: str) -> str | None:
    """The tag `name` of the raster file at `path`, or None (no such tag, file or raster)."""
    if not Path(path).is_file():
        return None
    try:
        with rasterio.open(path) as src:
            return src.tags().get(name)
    except rasterio.errors.RasterioIOError:
        return None


def cog_options(dtype: str) -> dict:
    """rasterio creation options of the Cloud-Optimized GeoTIFFs AETHER writes (`--cog`): the same
    compression as its GeoTIFFs, 256 px blocks, averaged overviews, a predictor where it pays."""
    options = dict(
        compress="ZSTD", level=ZSTD_LEVEL, blocksize=OUTPUT_BLOCK_PX, overview_resampling="average", bigtiff="if_safer"
    )
    if dtype != "int8":
        options["predictor"] = "YES"
    return options


def to_cog(path: Path) -> None:
    """Rewrite `path` in place as a Cloud-Optimized GeoTIFF with overviews."""
    fd, cog_path = temp_file_beside(path, ".cog.partial.tif")
    os.close(fd)
    cog_name = str(cog_path)
    try:
        with rasterio.open(path) as src:
            options = cog_options(src.dtypes[0])
        rio_copy(str(path), cog_name, driver="COG", **options)
        os.replace(cog_name, path)
    except BaseException as exc:
        Path(cog_name).unlink(missing_ok=True)
        raise_if_disk_full(exc, path)
        raise
