"""Reading tiles into the output grid: a tile's own pixels where it shares the grid (either row
order), else warped by nearest neighbour with an exact transformer."""

from __future__ import annotations

import numpy as np
import rasterio
from rasterio.windows import Window

from aether.core.errors import AetherError, first_line
from aether.data.fetch.grid import Grid
from aether.data.fetch.index import SourceTile
from aether.geo.alphaearth import N_BANDS, NODATA_INT8, PIXEL_M
from aether.geo.raster import RasterInfo, open_raster, read_bands

# the warper's approximation error in pixels: so small that each pixel is transformed exactly (rasterio's
# tolerance 0 leaves GDAL without a transformer)
WARP_TOLERANCE_PX = 1e-9


class TileReader:
    """One source tile seen on the output grid: its own pixels where it shares the grid (a plain
    windowed read, either row order), else warped by nearest neighbour with an exact transformer."""

    def __init__(self, tile: SourceTile, grid: Grid):
        self.tile, self.grid = tile, grid
        self.info: RasterInfo = open_raster(tile.url)
        if not self.info.is_int8:
            raise AetherError(f"tile {tile.url} is {self.info.dtype}, not AlphaEarth's int8")
        self.src = rasterio.open(self.info.path)
        nu = self.info.north_up_transform
        dc, dr = (grid.transform.c - nu.c) / PIXEL_M, (nu.f - grid.transform.f) / PIXEL_M
        self.aligned = (
            self.info.crs == grid.crs
            and abs(nu.a - PIXEL_M) < 1e-9
            and abs(nu.e + PIXEL_M) < 1e-9
            and abs(dc - round(dc)) < 1e-6
            and abs(dr - round(dr)) < 1e-6
        )
        self.dc, self.dr = int(round(dc)), int(round(dr))
        self.vrt = None
        if not self.aligned:
            from rasterio.enums import Resampling
            from rasterio.vrt import WarpedVRT

            self.vrt = WarpedVRT(
                self.src,
                crs=grid.crs,
                transform=grid.transform,
                width=grid.width,
                height=grid.height,
                resampling=Resampling.nearest,
                tolerance=WARP_TOLERANCE_PX,
                src_nodata=NODATA_INT8,
                nodata=NODATA_INT8,
            )
        planar = self.src.interleaving == rasterio.enums.Interleaving.band
        self.bands = range(1, self.info.count + 1) if planar else range(1, 2)

    def source_window(self, window: Window) -> tuple[int, int, int, int] | None:
        """File rows r0:r1 and columns c0:c1 of the tile that `window` of the output needs, or None."""
        if self.aligned:
            c0, c1 = window.col_off + self.dc, window.col_off + window.width + self.dc
            n0, n1 = window.row_off + self.dr, window.row_off + window.height + self.dr
            c0, c1, n0, n1 = max(c0, 0), min(c1, self.info.width), max(n0, 0), min(n1, self.info.height)
            if c0 >= c1 or n0 >= n1:
                return None
            r0 = self.info.north_up_rows(n0, n1 - n0)
            return r0, r0 + n1 - n0, c0, c1
        from rasterio.warp import transform_bounds

        t = self.grid.transform
        left, top = t @ (window.col_off, window.row_off)
        right, bottom = t @ (window.col_off + window.width, window.row_off + window.height)
        x0, y0, x1, y1 = transform_bounds(self.grid.crs, self.info.crs, left, bottom, right, top, densify_pts=21)
        cols, rows = ~self.info.transform @ (np.array([x0, x1, x0, x1]), np.array([y0, y0, y1, y1]))
        c0, c1 = max(int(np.floor(cols.min())), 0), min(int(np.ceil(cols.max())), self.info.width)
        r0, r1 = max(int(np.floor(rows.min())), 0), min(int(np.ceil(rows.max())), self.info.height)
        return (r0, r1, c0, c1) if c0 < c1 and r0 < r1 else None

    def blocks(self, window: Window) -> set[tuple[int, int]]:
        """The tile's storage blocks (block row, block column) that `window` reads."""
        span = self.source_window(window)
        if span is None:
            return set()
        r0, r1, c0, c1 = span
        bh, bw = self.info.block_shape
        return {(i, j) for i in range(r0 // bh, (r1 - 1) // bh + 1) for j in range(c0 // bw, (c1 - 1) // bw + 1)}

    def block_bytes(self, block: tuple[int, int]) -> int:
        """The compressed size of a block (all bands), as the file's directory gives it."""
        try:
            return sum(self.src.block_size(b, *block) for b in self.bands)
        except (rasterio.errors.RasterioError, ValueError):  # a driver that does not say: its raw size
            bh, bw = self.info.block_shape
            return bh * bw * self.info.count

    def read(self, window: Window) -> np.ndarray | None:
        """(bands, h, w) int8 of `window` on the output grid, -128 where the tile has nothing."""
        span = self.source_window(window)
        if span is None:
            return None
        if not self.aligned:
            try:
                return self.vrt.read(window=window)
            except rasterio.errors.RasterioIOError as exc:
                raise AetherError(f"cannot read tile {self.tile.url}: {first_line(exc)}") from None
        r0, r1, c0, c1 = span
        pixels = read_bands(self.src, Window(c0, r0, c1 - c0, r1 - r0), self.info)
        if self.info.bottom_up:
            pixels = pixels[:, ::-1, :]
        out = np.full((self.info.count, window.height, window.width), NODATA_INT8, dtype=np.int8)
        n0 = self.info.north_up_rows(r0, r1 - r0) - self.dr - window.row_off
        out[:, n0 : n0 + r1 - r0, c0 - self.dc - window.col_off : c1 - self.dc - window.col_off] = pixels
        return out

    def close(self) -> None:
        if self.vrt is not None:
            self.vrt.close()
        self.src.close()


def read_window(readers: list[TileReader], window: Window) -> np.ndarray:
    """The output window: each pixel from the first reader (tiles of the output CRS first) that
    has it; -128 where none has."""
    block = np.full((N_BANDS, window.height, window.width), NODATA_INT8, dtype=np.int8)
    empty = np.ones((window.height, window.width), dtype=bool)
    for reader in readers:
        if not empty.any():
            break
        part = reader.read(window)
        if part is None:
            continue
        take = empty & ~(part == NODATA_INT8).any(axis=0)
        block[:, take] = part[:, take]
        empty &= ~take
    return block
