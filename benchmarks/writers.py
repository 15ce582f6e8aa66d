"""Ways to write an AETHER raster tile by tile, for bench_writers.py and bench_inference.py: AETHER's
own block writer and GDAL's routes, each on the same tiles with the same creation options.

Each route is a function (out, tiles, block_of, profile, threads, on_tile) -> tiles written:
`tiles` the (row0, col0, height, width) of each tile, `block_of(i)` tile i's (h, w, bands) array,
`profile` rasterio's creation profile of the whole output (AETHER's layout), `threads` the
compression threads, `on_tile(i)` called once tile i is written. Run again after an interruption,
a route resumes as far as its files let it, and returns how many tiles it had to write.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import rasterio
from rasterio.shutil import copy as rio_copy
from rasterio.windows import Window
from rasterio.windows import transform as window_transform

from aether.geo.blocks import create_sparse
from aether.geo.gdal import streaming_cache
from aether.geo.layout import ZSTD_LEVEL, cog_options
from aether.geo.resumable import ResumableOutput
from aether.geo.tiles import write_mosaic_vrt
from aether.infer.at_scale import BAND_PX as PART_ROWS  # rows of a band, as a Dask run splits one raster

Tile = tuple[int, int, int, int]
# what a creation profile says about the raster rather than its layout
BASICS = ("driver", "width", "height", "count", "dtype", "nodata", "crs", "transform")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _names(profile: dict) -> list[str]:
    return [f"E{i:03d}" for i in range(profile["count"])]


def block_writer(out: Path, tiles: list[Tile], block_of, profile: dict, threads: int, on_tile=None) -> int:
    """AETHER's route (inference's): GDAL lays out a sparse GeoTIFF once; blocks are compressed by
    `threads` threads and appended; every 5 s what is written is fsynced and journaled with its
    blocks' places, sizes and CRC-32; a rerun continues from the journal."""
    output = ResumableOutput(
        out,
        {"benchmark": "writers", "size": [profile["height"], profile["width"]], "dtype": profile["dtype"]},
        lambda path: create_sparse(path, profile, _names(profile), {}),
        level=ZSTD_LEVEL,
        threads=threads,
    )
    written = 0
    with output:
        done = output.start(None)
        for i, (row0, col0, _, _) in enumerate(tiles):
            if i in done:
                continue
            output.write(i, block_of(i), row0, col0)
            written += 1
            if on_tile:
                on_tile(i)
        output.finish()
    return written


def gdal_once(out: Path, tiles: list[Tile], block_of, profile: dict, threads: int, on_tile=None) -> int:
    """One GTiff opened for writing once (rasterio "w", GDAL's NUM_THREADS and ZSTD_LEVEL), each tile
    written into its window, closed, fsynced and renamed. GDAL writes a GeoTIFF's block index when
    it closes the file, so a run that is killed leaves nothing to resume: a rerun writes every tile."""
    partial = out.with_name(out.name + ".partial.tif")
    with rasterio.open(partial, "w", **{**profile, "num_threads": threads}) as dst:
        for i, (row0, col0, height, width) in enumerate(tiles):
            dst.write(np.moveaxis(block_of(i), -1, 0), window=Window(col0, row0, width, height))
            if on_tile:
                on_tile(i)
        dst.descriptions = _names(profile)
    _fsync(partial)
    os.replace(partial, out)
    return len(tiles)


def gdal_parts(final: str) -> Callable[..., int]:
    """What a Dask run does with one raster: bands of PART_ROWS rows, each its own GeoTIFF (one GDAL
    "w" handle per band, its tiles written into it; closed, fsynced and renamed, so a finished band
    survives a kill), a VRT over the bands, and one copy of the VRT into `out` through GDAL's
    streaming cache (`aether.geo.tiles.join_bands`), by GDAL's `final` driver: "GTiff", or "COG"
    with averaged overviews (`--cog`). A rerun writes only the bands whose files are missing."""

    def route(out: Path, tiles: list[Tile], block_of, profile: dict, threads: int, on_tile=None) -> int:
        folder = out.with_name(out.name + ".parts")
        folder.mkdir(exist_ok=True)
        bands: dict[int, list[int]] = {}
        for i, (row0, *_) in enumerate(tiles):
            bands.setdefault(row0 // PART_ROWS, []).append(i)
        paths, written = [], 0
        for band, members in bands.items():
            path = folder / f"{band:05d}.tif"
            paths.append(str(path))
            if path.exists():
                continue
            row0 = band * PART_ROWS
            height = min(PART_ROWS, profile["height"] - row0)
            tmp = path.with_suffix(".tmp")
            part = dict(
                profile,
                height=height,
                transform=window_transform(Window(0, row0, profile["width"], height), profile["transform"]),
                num_threads=threads,
            )
            with rasterio.open(tmp, "w", **part) as dst:
                for i in members:
                    r, c, h, w = tiles[i]
                    dst.write(np.moveaxis(block_of(i), -1, 0), window=Window(c, r - row0, w, h))
                    if on_tile:
                        on_tile(i)
                dst.descriptions = _names(profile)
            _fsync(tmp)
            os.replace(tmp, path)
            written += len(members)
        vrt = write_mosaic_vrt(paths, folder / "mosaic.vrt")
        partial = out.with_name(out.name + ".partial.tif")
        if final == "COG":
            options = cog_options(profile["dtype"])
        else:
            options = {k: v for k, v in profile.items() if k not in BASICS}
        with streaming_cache():
            rio_copy(str(vrt), str(partial), driver=final, **{**options, "num_threads": threads})
        _fsync(partial)
        os.replace(partial, out)
        shutil.rmtree(folder)
        return written

    return route


ROUTES = {
    "block writer": block_writer,
    "GDAL once": gdal_once,
    "GDAL bands + VRT + GTiff copy": gdal_parts("GTiff"),
    "GDAL bands + VRT + COG copy": gdal_parts("COG"),
}
