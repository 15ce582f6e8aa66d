"""Window pooling of AlphaEarth vectors around points, with summed-area tables.

For each point the base and augmented views are the nodata-masked mean of the
vectors in a square window centred on the point's pixel (clipped at the raster's
edges), renormalised to unit length. The raster is visited in chunks that hold
points, in raster order; each chunk (plus a halo of the largest radius) gets one
summed-area table of values and one of valid counts, so a window of any size costs
four lookups, and memory is bounded by the chunk, not by the raster.
"""

from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from rasterio.warp import transform as warp_transform
from tqdm.auto import tqdm

from aether.core.cluster import run_tasks
from aether.geo.gdal import streaming_cache
from aether.geo.raster import BlockCache, RasterInfo, invalid_pixels
from aether.geo.tiles import route_points

_INT8_MAX_SQUARE = 127 * 127

ROWS_AT_ONCE = 8  # tile rows of window means computed at once: 1-2 MiB, in cache
CHUNK_PX = 1024  # chunk side; a multiple of common block sizes (256, 512)


@dataclass
class PooledViews:
    """Unit-length pooled vectors for each point, and which points can be used."""

    views: list[np.ndarray]  # one (N, C) float32 array per radius; zeros where that window is empty
    valid: np.ndarray  # (N,) bool: on the raster, and every view has a valid pixel
    inside: np.ndarray  # (N,) bool: the point's pixel is on the raster
    implausible: int = 0  # pixels read holding values no embedding has (treated as nodata; `implausible_pixels`)


def pool_points(
    info: RasterInfo,
    x: np.ndarray,
    y: np.ndarray,
    radii_m: list[float],
    lat_deg: np.ndarray | None = None,
    chunk_px: int = CHUNK_PX,
    threads: int = 2,
    progress: bool = False,
) -> PooledViews:
    """Pool a window of each radius in `radii_m` (metres) around points (x, y) in the raster's CRS.

    `lat_deg` (the points' latitudes) matters only for a geographic CRS, where a
    window's size in degrees depends on latitude; it defaults to y there.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n = len(x)
    rows, cols = info.rowcol(x, y)
    inside = (rows >= 0) & (rows < info.height) & (cols >= 0) & (cols < info.width)
    lat = (y if lat_deg is None else np.asarray(lat_deg, dtype=np.float64)) if info.is_geographic else None
    info.check_window(max(radii_m, default=0.0), None if lat is None else lat[inside])
    half = []
    for radius_m in radii_m:
        rx, ry = info.radius_px(radius_m, lat)
        half.append((np.broadcast_to(rx, (n,)), np.broadcast_to(ry, (n,))))
    channels = info.count
    views = [np.zeros((n, channels), dtype=np.float32) for _ in radii_m]
    valid = inside.copy()

    def work(members: np.ndarray, grid: list[list[np.ndarray]], r0: int, c0: int) -> int:
        values, counts = _summed_area_tables(grid, info, _window_area(members, half))
        flat = values.reshape(-1, channels)
        flat_counts = counts.reshape(-1)
        stride = values.shape[1]
        r, c = rows[members], cols[members]
        for k, (rx, ry) in enumerate(half):
            top = (np.clip(r - ry[members], 0, info.height) - r0) * stride
            bottom = (np.clip(r + ry[members] + 1, 0, info.height) - r0) * stride
            left = np.clip(c - rx[members], 0, info.width) - c0
            right = np.clip(c + rx[members] + 1, 0, info.width) - c0
            corners = (bottom + right, top + right, bottom + left, top + left)
            box = np.take(flat, corners[0], axis=0)  # np.take is about twice as fast as flat[idx] here
            box -= np.take(flat, corners[1], axis=0)
            box -= np.take(flat, corners[2], axis=0)
            box += np.take(flat, corners[3], axis=0)
            box = box.astype(np.float32)
            count = (
                flat_counts[corners[0]] - flat_counts[corners[1]] - flat_counts[corners[2]] + flat_counts[corners[3]]
            )
            norm = np.linalg.norm(box, axis=1)
            ok = (count > 0) & (norm > 0)
            # the mean's scale (1 / count, and 1 / 127.5**2 for int8) cancels in the renormalisation
            views[k][members] = box / np.where(ok, norm, 1.0)[:, None]
            valid[members] &= ok
        return len(members)

    bar = tqdm(total=int(inside.sum()), desc="pooling POIs", unit="POI", disable=not progress)
    hx_max = max(int(h[0][inside].max()) if inside.any() else 0 for h in half)
    hy_max = max(int(h[1][inside].max()) if inside.any() else 0 for h in half)
    blocks = BlockCache(info, threads)
    try:
        # blocks are kept by BlockCache, so GDAL's own cache is kept small
        with streaming_cache(), ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            pending: deque = deque()
            for members in _chunk_groups(rows, cols, inside, info.width, chunk_px):
                hx = max(int(h[0][members].max()) for h in half)
                hy = max(int(h[1][members].max()) for h in half)
                r, c = rows[members], cols[members]
                r0, r1 = max(int(r.min()) - hy, 0), min(int(r.max()) + hy + 1, info.height)
                c0, c1 = max(int(c.min()) - hx, 0), min(int(c.max()) + hx + 1, info.width)
                # chunks come in raster order: later chunks start no higher than this chunk row's
                # top halo, and later chunk rows no higher than the next chunk row's top halo
                chunk_top = (int(r[0]) // chunk_px) * chunk_px
                chunk_left = (int(c.min()) // chunk_px) * chunk_px
                next_row_top = chunk_top + chunk_px - hy_max
                blocks.evict(  # called here, while the loop's values are this chunk's
                    lambda br0, br1, bc0, bc1: (
                        br1 > chunk_top - hy_max and (br1 > next_row_top or bc1 > chunk_left - hx_max)  # noqa: B023
                    )
                )
                pending.append(pool.submit(work, members, blocks.read(r0, r1, c0, c1), r0, c0))
                while len(pending) > max(1, threads):
                    bar.update(pending.popleft().result())
            while pending:
                bar.update(pending.popleft().result())
    finally:
        blocks.close()
        bar.close()

    return PooledViews(views=views, valid=valid, inside=inside, implausible=blocks.implausible)


def _chunk_groups(rows, cols, inside, width: int, chunk_px: int) -> list[np.ndarray]:
    """Indices of the points on the raster, grouped by chunk, chunks in raster order."""
    idx = np.flatnonzero(inside)
    if not len(idx):
        return []
    chunk_ids = (rows[idx] // chunk_px) * (-(-width // chunk_px)) + cols[idx] // chunk_px
    order = np.lexsort((cols[idx], rows[idx], chunk_ids))  # raster order inside a chunk: cache-friendly lookups
    idx, chunk_ids = idx[order], chunk_ids[order]
    starts = np.flatnonzero(chunk_ids[1:] != chunk_ids[:-1]) + 1
    return np.split(idx, starts)


def _window_area(members: np.ndarray, half) -> int:
    """The largest window area (pixels) among these points' views."""
    return max(int(((2 * rx[members] + 1) * (2 * ry[members] + 1)).max()) for rx, ry in half)


_local = threading.local()


def _scratch(shape: tuple[int, ...], dtype, name: str = "table") -> np.ndarray:
    """A per-thread reusable array (one per `name`): allocating a fresh table for every chunk
    costs as much in page faults as filling it."""
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    buf = getattr(_local, name, None)
    if buf is None or buf.size < size:
        buf = np.empty(size, dtype=np.uint8)
        setattr(_local, name, buf)
    return buf[:size].view(dtype).reshape(shape)


def _summed_area_tables(
    grid: list[list[np.ndarray]], info: RasterInfo, max_window_px: int
) -> tuple[np.ndarray, np.ndarray]:
    """Summed-area tables (h+1, w+1, C) of a block's values and (h+1, w+1) of its valid pixels.

    The block is a grid of band-major (C, h, w) pieces (`BlockCache.read`; one array is [[array]]).
    The tables are pixel-major: a window's C sums are one contiguous read. int8 blocks are
    integrated exactly, as the integers sign(q) * q**2. When every window sum fits in int32
    the table is int32 and may wrap around: a box sum taken from it is exact modulo 2**32,
    hence exact. Float blocks use float64.
    """
    channels = grid[0][0].shape[0]
    heights = [row[0].shape[1] for row in grid]
    widths = [piece.shape[2] for piece in grid[0]]
    h, w = sum(heights), sum(widths)
    col_starts = np.cumsum([0] + widths)
    if info.is_int8:
        dtype = np.int32 if max_window_px * _INT8_MAX_SQUARE < 2**31 else np.int64
    else:
        dtype = np.float64
    table = _scratch((h + 1, w + 1, channels), dtype)
    table[0] = 0
    table[:, 0] = 0
    invalid = np.empty((h, w), dtype=bool)
    # Row by row, so that each row's work stays in cache, band-major (each band's row is
    # contiguous): a row's values are added to the column sums above it, the column sums are
    # scanned along the row, and the scan is transposed into the pixel-major table.
    line = _scratch((channels, w), grid[0][0].dtype, "line")  # one row of the block, contiguous
    codes = _scratch((channels, w), np.int16, "codes")
    values = _scratch((channels, w), dtype, "values")
    column_sums = _scratch((channels, w), dtype, "column_sums")
    column_sums[...] = 0
    scan = _scratch((channels, w), dtype, "scan")
    i = 0
    for row_of_pieces, piece_h in zip(grid, heights):
        for piece, b0, b1 in zip(row_of_pieces, col_starts[:-1], col_starts[1:]):
            invalid[i : i + piece_h, b0:b1] = invalid_pixels(piece, info, axis=0)
        for k in range(piece_h):
            for piece, b0, b1 in zip(row_of_pieces, col_starts[:-1], col_starts[1:]):
                line[:, b0:b1] = piece[:, k]
            if info.is_int8:  # sign(q) * q**2 (nodata pixels are zeroed below)
                np.copyto(codes, line)
                np.multiply(codes, np.abs(codes), out=values, dtype=dtype)
            else:
                values[...] = line
            if invalid[i].any():
                values[:, invalid[i]] = 0
            column_sums += values
            np.cumsum(column_sums, axis=1, dtype=dtype, out=scan)  # dtype: else NumPy sums int32 as int64
            np.copyto(table[i + 1, 1:], scan.T)
            i += 1
    valid = np.zeros((h + 1, w + 1), dtype=np.int32)
    valid[1:, 1:] = ~invalid
    np.cumsum(valid, axis=0, out=valid)
    np.cumsum(valid, axis=1, out=valid)
    return table, valid


def window_means(
    bands: np.ndarray, info: RasterInfo, rx_rows: np.ndarray, ry_rows: np.ndarray, hx: int, hy: int
) -> tuple[np.ndarray, np.ndarray]:
    """Dense window pooling of a tile: the unit-length masked mean around every pixel.

    `bands` is the band-major (C, h, w) tile with a halo of `hy` rows and `hx` columns on each
    side (nodata where the halo leaves the raster), in the file's type; `rx_rows`/`ry_rows` are
    each tile row's half-widths (they vary with latitude on a geographic raster). Returns
    (th, tw, C) float32 means (zero where invalid) and the (th, tw) valid mask. Sums are exact
    for int8 rasters, so tiles (or strips of them) of any size give identical results.
    """
    channels, th, tw = bands.shape[0], bands.shape[1] - 2 * hy, bands.shape[2] - 2 * hx
    table, counts = _summed_area_tables([[bands]], info, (2 * hx + 1) * (2 * hy + 1))
    means = np.empty((th, tw, channels), dtype=np.float32)
    count = np.empty((th, tw), dtype=np.int32)
    i = 0
    while i < th:  # runs of rows with the same half-widths (all rows, on a projected raster) at once
        rx, ry = int(rx_rows[i]), int(ry_rows[i])
        j = i + 1
        while j < min(th, i + ROWS_AT_ONCE) and rx_rows[j] == rx and ry_rows[j] == ry:
            j += 1
        top, bottom = slice(hy + i - ry, hy + j - ry), slice(hy + i + ry + 1, hy + j + ry + 1)
        left, right = slice(hx - rx, hx - rx + tw), slice(hx + rx + 1, hx + rx + 1 + tw)
        box = _scratch((j - i, tw, channels), table.dtype, "box")  # in the table's type: int32 may wrap
        np.subtract(table[bottom, right], table[top, right], out=box)
        box -= table[bottom, left]
        box += table[top, left]
        means[i:j] = box
        count[i:j] = counts[bottom, right] - counts[top, right] - counts[bottom, left] + counts[top, left]
        i = j
    norm = np.linalg.norm(means, axis=2)
    valid = (count > 0) & (norm > 0)
    means /= np.where(valid, norm, 1.0)[..., None]
    return means, valid


POINTS_PER_TASK = 50_000  # points per Dask task when one raster's points are split


def pool_at_scale(
    infos: list[RasterInfo],
    lon: np.ndarray,
    lat: np.ndarray,
    radii_m: list[float],
    client=None,
    xy: tuple[np.ndarray, np.ndarray] | None = None,
    chunk_px: int = CHUNK_PX,
    points_per_task: int = POINTS_PER_TASK,
    progress: bool = False,
) -> PooledViews:
    """`pool_points` for points in lon/lat over one raster or a set of tiles (`infos`), as Dask
    tasks on `client` (or here, one after another, when it is None). `xy` gives the points in
    the raster's CRS when there is one raster (otherwise each tile's are computed from lon/lat).

    Each point is pooled from the one tile that `aether.geo.tiles.route_points` gives it. A task
    holds whole chunks of one tile, so every chunk's summed-area table is the one a
    single-process run builds, and the result is the same bit for bit.
    """
    lon = np.asarray(lon, dtype=np.float64)
    lat = np.asarray(lat, dtype=np.float64)
    n, channels = len(lon), infos[0].count
    owner = route_points(infos, lon, lat) if len(infos) > 1 else np.zeros(n, dtype=np.int64)
    tasks, points_of = [], []
    for t, info in enumerate(infos):
        members = np.flatnonzero(owner == t)
        if not len(members):
            continue
        if xy is not None and len(infos) == 1:
            x, y = np.asarray(xy[0], dtype=np.float64), np.asarray(xy[1], dtype=np.float64)
        else:
            x, y = map(np.asarray, warp_transform("EPSG:4326", info.crs, lon[members].tolist(), lat[members].tolist()))
        rows, cols = info.rowcol(x, y)
        inside = (rows >= 0) & (rows < info.height) & (cols >= 0) & (cols < info.width)
        groups = _chunk_groups(rows, cols, inside, info.width, chunk_px)
        while groups:
            take = 1 + int(np.searchsorted(np.cumsum([len(g) for g in groups]), points_per_task))
            select = np.concatenate(groups[:take])
            groups = groups[take:]
            tasks.append((info, x[select], y[select], radii_m, lat[members][select], chunk_px))
            points_of.append(members[select])
    results = run_tasks(
        client, pool_points, tasks, [len(p) for p in points_of], desc="pooling POIs", unit="POI", progress=progress
    )
    views = [np.zeros((n, channels), dtype=np.float32) for _ in radii_m]
    valid = np.zeros(n, dtype=bool)
    inside = np.zeros(n, dtype=bool)
    for points, pooled in zip(points_of, results):
        for k in range(len(radii_m)):
            views[k][points] = pooled.views[k]
        valid[points], inside[points] = pooled.valid, True
    # a block two tasks of one tile share counts twice: exact when one task reads each tile
    implausible = sum(pooled.implausible for pooled in results)
    return PooledViews(views=views, valid=valid, inside=inside, implausible=implausible)
