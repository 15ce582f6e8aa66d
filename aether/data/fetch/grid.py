"""On which grid: the output CRS (the UTM zone holding most of the box, or one asked for) and the
10 m grid of the tiles there, so their pixels are copied, never resampled."""

from __future__ import annotations

import math
from dataclasses import dataclass

import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.windows import Window

from aether.core.errors import AetherError
from aether.data.fetch.index import SourceTile
from aether.geo.alphaearth import N_BANDS, PIXEL_M

MAX_OUTPUT_BYTES = 64 * 2**30  # larger requests are refused: fetch pieces instead


@dataclass(frozen=True)
class Grid:
    """The output raster's grid (north-up)."""

    crs: CRS
    transform: Affine
    width: int
    height: int


def utm_zone(crs: str) -> tuple[int, str] | None:
    """(zone number, 'N' or 'S') of a WGS84 UTM CRS (EPSG:326zz / 327zz), else None."""
    epsg = CRS.from_user_input(crs).to_epsg()
    if epsg and 32601 <= epsg <= 32660:
        return epsg - 32600, "N"
    if epsg and 32701 <= epsg <= 32760:
        return epsg - 32700, "S"
    return None


def zone_share(crs: str, bbox: tuple[float, float, float, float]) -> float:
    """The fraction of the box (in degrees) that lies in the UTM zone of `crs` (0 for another CRS)."""
    zone = utm_zone(crs)
    if zone is None:
        return 0.0
    west, south, east, north = bbox
    z0 = -180.0 + 6.0 * (zone[0] - 1)
    lon = max(0.0, min(east, z0 + 6.0) - max(west, z0)) / (east - west)
    lat0, lat1 = (0.0, 90.0) if zone[1] == "N" else (-90.0, 0.0)
    lat = max(0.0, min(north, lat1) - max(south, lat0)) / (north - south)
    return lon * lat


def choose_crs(tiles: list[SourceTile], bbox, crs: str | None = None) -> tuple[CRS, str]:
    """The output CRS and why: `crs` if given (a projected CRS in metres), else the CRS of the tiles
    whose UTM zone holds most of the box (ties: the first in EPSG order)."""
    if crs is not None:
        try:
            chosen = CRS.from_user_input(crs)
        except rasterio.errors.CRSError:
            raise AetherError(f"--crs {crs!r} is not a CRS (e.g. EPSG:32635)") from None
        if not chosen.is_projected or abs(chosen.linear_units_factor[1] - 1.0) > 1e-9:
            raise AetherError(
                f"--crs {crs}: give a projected CRS in metres (e.g. a UTM zone): AlphaEarth pixels are {PIXEL_M:g} m"
            )
        return chosen, "as --crs asked"
    candidates = sorted({t.crs for t in tiles}, key=lambda c: (CRS.from_user_input(c).to_epsg() or 0, c))
    best = max(candidates, key=lambda c: zone_share(c, bbox))
    zone = utm_zone(best)
    why = f"UTM {zone[0]}{zone[1]} holds {zone_share(best, bbox):.0%} of the box" if zone else "the tiles' CRS"
    return CRS.from_user_input(best), why


def output_grid(tiles: list[SourceTile], crs: CRS, bbox) -> Grid:
    """The grid covering `bbox` in `crs` with AlphaEarth's pixels: snapped to the pixel grid of the
    tiles in that CRS (so their pixels are copied, not resampled), or to whole 10 m in another CRS."""
    from rasterio.warp import transform_bounds

    x0 = y0 = 0.0
    for t in tiles:
        if CRS.from_user_input(t.crs) == crs:
            x0, y0 = t.bounds[0], t.bounds[1]
            break
    minx, miny, maxx, maxy = transform_bounds("EPSG:4326", crs, *bbox, densify_pts=21)
    eps = 1e-6
    left = x0 + math.floor((minx - x0) / PIXEL_M + eps) * PIXEL_M
    right = x0 + math.ceil((maxx - x0) / PIXEL_M - eps) * PIXEL_M
    bottom = y0 + math.floor((miny - y0) / PIXEL_M + eps) * PIXEL_M
    top = y0 + math.ceil((maxy - y0) / PIXEL_M - eps) * PIXEL_M
    width, height = int(round((right - left) / PIXEL_M)), int(round((top - bottom) / PIXEL_M))
    size = width * height * N_BANDS
    if size > MAX_OUTPUT_BYTES:
        raise AetherError(
            f"the box is {width * PIXEL_M / 1000:,.0f} x {height * PIXEL_M / 1000:,.0f} km: its "
            f"AlphaEarth raster would be {size / 2**30:,.0f} GiB, more than the "
            f"{MAX_OUTPUT_BYTES / 2**30:.0f} GiB AETHER fetches at once; fetch a smaller box (or pieces)"
        )
    return Grid(crs, Affine(PIXEL_M, 0.0, left, 0.0, -PIXEL_M, top), max(width, 1), max(height, 1))


def windows_of(grid: Grid, tile_px: int) -> list[Window]:
    """The output cut into windows of `tile_px`, row by row (smaller at the right and bottom)."""
    return [
        Window(c, r, min(tile_px, grid.width - c), min(tile_px, grid.height - r))
        for r in range(0, grid.height, tile_px)
        for c in range(0, grid.width, tile_px)
    ]
