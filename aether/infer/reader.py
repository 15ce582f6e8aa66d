"""Reading an AlphaEarth raster tile by tile for inference: tiles with the halo window pooling
needs, decoded by several threads, pooled and projected (on a CPU with NumPy and the projector,
on a GPU by `aether.infer.device_tiles`)."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import numpy as np
import rasterio
import torch
from rasterio.windows import Window

from aether.core.pipeline import read_ahead
from aether.core.stages import stage
from aether.geo.alphaearth import MAX_ABS_VALUE, NODATA_INT8, NODATA_INT16
from aether.geo.pooling import window_means
from aether.geo.raster import RasterInfo, decode_pixels, implausible_pixels, invalid_pixels, read_bands
from aether.infer.device_tiles import DeviceTileComputer
from aether.infer.spec import NODATA, STRIP_PX, check_pooling
from aether.model.projector import Projector, unit_rows

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tile:
    index: int
    row0: int  # input array row of the tile's first row
    col0: int
    height: int
    width: int


def tile_grid(info: RasterInfo, tile_px: int, rows: tuple[int, int] | None = None) -> list[Tile]:
    """The raster (or its rows rows[0]:rows[1], a multiple of `tile_px` apart from the raster's end)
    cut into tiles of `tile_px`, smaller at the right and bottom edges, row by row. The tiles of a
    band of rows are the raster's own tiles there, so a band computes exactly what a whole run does.
    A bottom-up raster is cut from its northern end (its last rows), so that every tile starts on a
    block of the north-up output."""
    r_start, r_stop = rows if rows is not None else (0, info.height)
    if info.bottom_up:
        bands = [(max(r_start, r - tile_px), r) for r in range(r_stop, r_start, -tile_px)]
    else:
        bands = [(r, min(r + tile_px, r_stop)) for r in range(r_start, r_stop, tile_px)]
    origins = [(r0, r1, c) for r0, r1 in bands for c in range(0, info.width, tile_px)]
    return [Tile(i, r0, c, r1 - r0, min(tile_px, info.width - c)) for i, (r0, r1, c) in enumerate(origins)]


class PooledTileReader:
    """Reads tiles with the halo that window pooling needs, and pools and projects them."""

    def __init__(self, info: RasterInfo, projector: Projector, pooling: str, strip_px: int = STRIP_PX):
        """`strip_px`: the pixels of a tile pooled and projected at a time on the CPU path."""
        check_pooling(pooling)
        self.info, self.projector, self.pooling, self.strip_px = info, projector, pooling, strip_px
        if pooling == "window":
            info.check_window(projector.base_radius_m, info.row_latitudes(), fix="use --pooling pixel")
            self.rx, self.ry = info.radius_px_rows(projector.base_radius_m)
        else:
            self.rx = self.ry = np.zeros(info.height, dtype=np.int64)
        self.implausible = 0  # pixels of the tiles read holding values no embedding has (`implausible_pixels`)

    def produce(self, tiles: list[Tile], readers: int = 1):
        """(tile, data) for each tile, in order; `readers` threads decode tiles at once, each
        with its own dataset handle (GDAL releases the GIL while it decodes)."""
        local, handles = threading.local(), []

        def read(tile: Tile):
            src = getattr(local, "src", None)
            if src is None:  # a GDAL dataset is used by one thread at a time
                src = local.src = rasterio.open(self.info.path)
                handles.append(src)
            rows = slice(tile.row0, tile.row0 + tile.height)
            hx, hy = int(self.rx[rows].max()), int(self.ry[rows].max())
            with stage("decode"):
                bands = _read_with_halo(src, self.info, tile, hx, hy)
            odd = implausible_pixels(bands[:, hy : hy + tile.height, hx : hx + tile.width], self.info, axis=0)
            return (bands, self.rx[rows], self.ry[rows], hx, hy), odd  # odd: the tile's own, each pixel once

        try:
            for tile, (data, odd) in read_ahead(tiles, read, readers):
                self.implausible += odd
                yield tile, data
        finally:
            for src in handles:
                src.close()

    def report_implausible(self) -> None:
        """One line saying how many pixels read held values no embedding has, if any did."""
        if self.implausible:
            logger.info(
                f"raster {self.info.path}: {self.implausible:,} pixels hold values no AlphaEarth vector has "
                f"(beyond +-{MAX_ABS_VALUE:g}, or infinite); they count as nodata"
            )

    def pooled(self, data, strip_px: int | None = None):
        """(start, stop, means, valid) for the rows start:stop of one tile, `strip_px` pixels at a
        time (all rows when None): (rows, w, bands) unit vectors (zeros where invalid) and the
        (rows, w) valid mask."""
        bands, rx_rows, ry_rows, hx, hy = data
        height, width = bands.shape[1] - 2 * hy, bands.shape[2] - 2 * hx
        step = height if strip_px is None else max(1, strip_px // width)
        for start in range(0, height, step):
            stop = min(height, start + step)
            with stage("pool"):
                if self.pooling == "window":  # the strip's own summed-area tables: a few MiB, not the tile's ~70
                    means, valid = window_means(
                        bands[:, start : stop + 2 * hy], self.info, rx_rows[start:stop], ry_rows[start:stop], hx, hy
                    )
                else:
                    pixels = bands[:, start:stop].transpose(1, 2, 0)
                    valid = ~invalid_pixels(pixels, self.info)
                    means = unit_rows(decode_pixels(pixels, ~valid, self.info))
            yield start, stop, means, valid

    def latent(self, data) -> tuple[torch.Tensor, np.ndarray]:
        """(latent, h * w) AETHER vectors (zeros where invalid) and the flat valid mask of one tile."""
        _, _, means, valid = next(self.pooled(data))
        return _latent_tile(self.projector, means, valid), valid.reshape(-1)

    def block(self, data, dtype: str) -> np.ndarray:
        """The (h, w, latent) output block of one tile in `dtype`, nodata where invalid: pixel-major,
        as a pixel-interleaved GeoTIFF stores it. A strip of rows is pooled and projected at a
        time, so the tile's float32 means are never all held."""
        bands, _, _, hx, hy = data
        height, width = bands.shape[1] - 2 * hy, bands.shape[2] - 2 * hx
        block = torch.empty((height * width, self.projector.latent_dim), dtype=getattr(torch, dtype))
        for start, stop, means, valid in self.pooled(data, self.strip_px):
            rows = block[start * width : stop * width]
            _latent_tile(self.projector, means, valid, dtype, out=rows, band_major=False)
            invalid = torch.from_numpy(~valid.reshape(-1))
            if invalid.any():
                rows[invalid] = NODATA[dtype]
        return block.numpy().reshape(height, width, -1)


def tile_computer(reader: PooledTileReader):
    """What computes a tile's output block (`block(data, dtype)`): on a GPU the torch path
    (`aether.infer.device_tiles`: pooling, projection and quantization on the device), on a CPU the
    NumPy pooling with the projector (as fast or faster there: measured, docs/inference.md)."""
    if reader.projector.device.type == "cpu":
        return reader.block
    return DeviceTileComputer(reader.projector, reader.info, reader.pooling).block


def _read_with_halo(src, info: RasterInfo, tile: Tile, hx: int, hy: int) -> np.ndarray:
    """The tile plus a halo, band-major (C, h, w) in the file's type; where the halo leaves the
    raster, nodata."""
    r0, r1 = tile.row0 - hy, tile.row0 + tile.height + hy
    c0, c1 = tile.col0 - hx, tile.col0 + tile.width + hx
    rr0, rr1, cc0, cc1 = max(r0, 0), min(r1, info.height), max(c0, 0), min(c1, info.width)
    inner = read_bands(src, Window(cc0, rr0, cc1 - cc0, rr1 - rr0), info)
    if (rr0, rr1, cc0, cc1) == (r0, r1, c0, c1):
        return inner
    fill = NODATA_INT8 if info.is_int8 else NODATA_INT16 if info.is_int16 else np.nan
    bands = np.full((info.count, r1 - r0, c1 - c0), fill, dtype=info.dtype)
    bands[:, rr0 - r0 : rr1 - r0, cc0 - c0 : cc1 - c0] = inner
    return bands


def _latent_tile(
    projector: Projector,
    means: np.ndarray,
    valid: np.ndarray,
    dtype: str = "float32",
    out: torch.Tensor | None = None,
    band_major: bool = True,
) -> torch.Tensor:
    """(h, w, bands) pooled vectors -> (latent, h * w) AETHER vectors in `dtype` (int8: quantized),
    or (h * w, latent) when not `band_major`; zeros where not valid; into `out` if given."""
    h, w, bands = means.shape
    flat_valid = valid.reshape(-1)
    project = projector.project_bands if band_major else projector.project_pixels
    if flat_valid.all():
        return project(means.reshape(-1, bands), dtype, out=out)
    if out is None:
        shape = (projector.latent_dim, h * w) if band_major else (h * w, projector.latent_dim)
        out = torch.empty(shape, dtype=getattr(torch, dtype))
    out.zero_()
    if flat_valid.any():
        z = project(means.reshape(-1, bands)[flat_valid], dtype)
        if band_major:
            out[:, torch.from_numpy(flat_valid)] = z
        else:
            out[torch.from_numpy(flat_valid)] = z
    return out
