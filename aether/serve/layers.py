"""Map tiles of an embedding raster, rendered on demand in Web Mercator: a PCA false-colour layer and
the similarity of every pixel to a query vector. rio-tiler reads and warps each 256 px tile (any
CRS, north-up or bottom-up, int8, int16 or float); AETHER decodes it and colours it. Memory holds
the tiles being drawn and a small cache of finished PNGs, never the raster."""

from __future__ import annotations

import functools
import io
import logging
import math
import queue
import threading
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.warp import transform_bounds

from aether.geo.gdal import streaming_cache
from aether.geo.raster import RasterInfo, decode_pixels, invalid_pixels
from aether.geo.tiles import write_mosaic_vrt
from aether.model.projector import unit_rows
from aether.pictures.pca import STRETCH_PERCENTILES, PcaFit

logger = logging.getLogger(__name__)

TILE_PX = 256
VIEW_PX = (880, 800)  # the map's part of a 1200 x 800 window, beside the side panel
MAX_WARM_TILES = 30
OVERVIEW_FROM_PX = 2048  # a raster longer than this without overviews gets them, for the map
OVERVIEW_MIN_PX = 256  # the smallest overview's longer side, about
SAMPLE_PX = 40_000  # pixels read once to fit the PCA and each query's colour scale
CACHE_TILES = 512  # finished PNGs kept (about 100 KiB each)
RAW_TILES = 32  # warped tiles kept (8 MiB each for int8 AETHER, 16 for int16): more than a 1920 x 1080 view shows
PAINTERS = 2  # tiles decoded and coloured at once (one per core)
BAND_ROWS = 16  # a tile is decoded and coloured this many rows at a time, in the painter's own float32 block
COLOURS = "viridis"


class TileCache:
    """The last CACHE_TILES PNGs by key (layer, z, x, y), shared by threads."""

    def __init__(self, size: int = CACHE_TILES):
        self.size, self.items, self.lock = size, OrderedDict(), threading.Lock()

    def get(self, key):
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key]
        return None

    def put(self, key, value: bytes) -> None:
        with self.lock:
            self.items[key] = value
            while len(self.items) > self.size:
                self.items.popitem(last=False)

    def drop(self, prefix) -> None:
        with self.lock:
            for key in [k for k in self.items if k[0] == prefix]:
                del self.items[key]


def png(rgba: np.ndarray) -> bytes:
    """(h, w, 4) uint8 as PNG bytes."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


@functools.cache
def empty_tile() -> bytes:
    """A transparent tile: what the map gets off the raster."""
    return png(np.zeros((TILE_PX, TILE_PX, 4), np.uint8))


class EmbeddingLayer:
    """An embedding raster as map tiles: PCA false colour, and scores against query vectors."""

    def __init__(self, info: RasterInfo, work_dir: Path | None = None):
        """`work_dir`: where overviews of a large raster without its own are built (a VRT and its
        .ovr), so that a tile of the whole map reads a few blocks, not the whole raster."""
        self.info = info
        self.tile_path = overviews(info, work_dir) if work_dir is not None else info.path
        self.bands = list(range(1, info.count + 1))  # named, so rio-tiler need not inspect each band
        self.bounds = transform_bounds(info.crs, "EPSG:4326", *info.bounds, densify_pts=21)
        self.sample = self._sample()
        # the picture's own PCA fit (aether.pictures.pca), on the sample; none for a raster all nodata
        self.pca = PcaFit.of_sample(self.sample, info.path) if len(self.sample) >= 3 else None
        self.cache = TileCache()
        self.raw = TileCache(RAW_TILES)
        # a tile's rows are decoded into these, made once, BAND_ROWS at a time (2 MiB for 128 bands):
        # they stay in the CPU's cache (a fresh 32 MiB array per tile, page-faulted by six request
        # threads at once, made a question's first tiles take seconds)
        self.workspaces = queue.Queue()
        self.last_drawn = time.monotonic()  # when a tile was last drawn: searches wait for a quiet moment
        for _ in range(PAINTERS):
            self.workspaces.put(np.ones((BAND_ROWS, TILE_PX, info.count), np.float32))

    def warm_up(self, view_px: tuple[int, int] = VIEW_PX) -> int:
        """Draw now the PCA tiles of the view a map of `view_px` (width, height) opens on (the
        zoom at which the raster fits it, as Leaflet's fitBounds picks): the first page shows them
        from the cache. Returns how many."""
        tiles = fitted_tiles(self.bounds, view_px)
        for z, x, y in tiles:
            self.pca_tile(z, x, y)
        _colour_table()  # and the heatmaps' colours (matplotlib's import is a second)
        return len(tiles)

    def _sidecars(self) -> rasterio.Env:
        """GDAL settings that let it find the overviews' .ovr beside the VRT (the command line turns
        the folder listing off, for remote rasters, and with it the search for sidecar files)."""
        if self.tile_path == self.info.path:
            return rasterio.Env()
        return rasterio.Env(GDAL_DISABLE_READDIR_ON_OPEN="FALSE")

    def _sample(self) -> np.ndarray:
        """Up to SAMPLE_PX valid vectors, read once at a reduced resolution (nearest pixels)."""
        info = self.info
        step = max(1.0, float(np.sqrt(info.width * info.height / SAMPLE_PX)))
        shape = (info.count, max(1, int(info.height / step)), max(1, int(info.width / step)))
        with streaming_cache(), self._sidecars(), rasterio.open(self.tile_path) as src:  # from the overviews
            pixels = src.read(out_shape=shape, resampling=Resampling.nearest).transpose(1, 2, 0)
        invalid = invalid_pixels(pixels, info)
        vectors = decode_pixels(pixels, invalid, info)[~invalid]
        return vectors.astype(np.float32)

    def score_range(self, vector: np.ndarray) -> tuple[float, float]:
        """The colour scale of a query: the STRETCH_PERCENTILES of its scores (as the PCA pictures) over the sample."""
        if len(self.sample) == 0:
            return -1.0, 1.0
        scores = self.sample @ vector
        low, high = np.percentile(scores, STRETCH_PERCENTILES)
        return float(low), float(max(high, low + 1e-6))

    def _read(self, z: int, x: int, y: int):
        """(pixels (256, 256, bands) in the file's type, invalid mask) of tile z/x/y, or False off the
        raster. The last RAW_TILES are kept: a new query's tiles are those in view, already read for
        the layer below it."""
        key = ("raw", z, x, y)
        raw = self.raw.get(key)
        if raw is None:
            raw = self._warp(z, x, y)
            self.raw.put(key, raw)
        return raw

    def _warp(self, z: int, x: int, y: int):
        """(pixels (256, 256, bands) in the file's type, invalid mask) of tile z/x/y, or False off the
        raster: invalid where outside the raster or nodata (found once per tile, not per question)."""
        from rio_tiler.errors import TileOutsideBounds
        from rio_tiler.io import Reader

        try:
            with streaming_cache(), self._sidecars(), Reader(self.tile_path) as src:
                image = src.tile(x, y, z, tilesize=TILE_PX, indexes=self.bands, resampling_method="nearest")
        except TileOutsideBounds:
            return False
        pixels = np.ascontiguousarray(np.asarray(image.array.data).transpose(1, 2, 0))
        outside = np.asarray(np.ma.getmaskarray(image.array)).any(axis=0)
        return pixels, invalid_pixels(pixels, self.info) | outside

    def _tile(self, name: str, z: int, x: int, y: int, paint) -> bytes:
        """Tile z/x/y of layer `name` as PNG: from the cache, or painted BAND_ROWS rows at a time by
        `paint(vectors, valid)` -> (N, 4) RGBA of those N pixels, then cached; transparent off the raster."""
        key = (name, z, x, y)
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        raw = self._read(z, x, y)
        if raw is False:
            return empty_tile()
        pixels, invalid = raw
        rgba = np.empty((TILE_PX, TILE_PX, 4), np.uint8)
        workspace = self.workspaces.get()  # waits while PAINTERS tiles are being painted
        try:
            for top in range(0, TILE_PX, BAND_ROWS):
                rows = slice(top, top + BAND_ROWS)
                vectors = decode_pixels(pixels[rows], invalid[rows], self.info, out=workspace)
                valid = ~invalid[rows].reshape(-1)
                rgba[rows] = paint(vectors.reshape(-1, self.info.count), valid).reshape(-1, TILE_PX, 4)
        finally:
            self.workspaces.put(workspace)
        out = png(rgba)
        self.cache.put(key, out)
        self.last_drawn = time.monotonic()
        return out

    def wait_until_quiet(self, quiet_s: float, at_most_s: float) -> None:
        """Return once no tile has been drawn for `quiet_s` seconds, or after `at_most_s`."""
        started = time.monotonic()
        while time.monotonic() - started < at_most_s and time.monotonic() - self.last_drawn < quiet_s:
            time.sleep(0.05)

    def pca_tile(self, z: int, x: int, y: int) -> bytes:
        """Tile z/x/y in PCA false colour (the sample's fit); nodata transparent."""

        def paint(vectors: np.ndarray, valid: np.ndarray) -> np.ndarray:
            rgba = np.zeros((len(valid), 4), np.uint8)
            rgba[:, :3] = self.pca.colours(vectors) if self.pca is not None else 128
            rgba[:, 3] = np.where(valid, 255, 0)
            return rgba

        return self._tile("pca", z, x, y, paint)

    def score_tile(self, name: str, vector: np.ndarray, low: float, high: float, z: int, x: int, y: int) -> bytes:
        """Tile z/x/y of the scores against `vector`, coloured from `low` to `high`; nodata transparent."""
        return self._tile(name, z, x, y, lambda vectors, valid: colour((vectors @ vector - low) / (high - low), valid))

    def vector_at(self, lon: float, lat: float) -> np.ndarray | None:
        """The stored vector of the pixel at lon/lat (an AETHER raster's pixels are already
        window-pooled, as inference writes them), or None off the raster or on nodata."""
        from pyproj import Transformer

        x, y = Transformer.from_crs("EPSG:4326", self.info.crs, always_xy=True).transform(lon, lat)
        row, col = self.info.rowcol(np.array([x]), np.array([y]))
        row, col = int(row[0]), int(col[0])
        if not (0 <= row < self.info.height and 0 <= col < self.info.width):
            return None
        with rasterio.open(self.info.path) as src:
            pixels = src.read(window=rasterio.windows.Window(col, row, 1, 1)).transpose(1, 2, 0)
        invalid = invalid_pixels(pixels, self.info)
        if invalid.all():
            return None
        return unit_rows(decode_pixels(pixels, invalid, self.info).reshape(1, -1))[0]


@functools.cache
def _colour_table() -> np.ndarray:
    from matplotlib import colormaps

    return (colormaps[COLOURS](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.uint8)


def colour(scores: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Scores in [0, 1] (clipped) as RGBA of COLOURS; invalid pixels transparent."""
    index = np.clip(np.nan_to_num(scores) * 255, 0, 255).astype(np.uint8)
    rgba = np.zeros((len(scores), 4), np.uint8)
    rgba[:, :3] = _colour_table()[index]
    rgba[:, 3] = np.where(valid, 210, 0)
    return rgba


def colour_stops(n: int = 6) -> list[str]:
    """The colour scale's colours, as CSS hex, for the legend."""
    from matplotlib import colormaps

    return ["#" + "".join(f"{int(c * 255):02x}" for c in colormaps[COLOURS](t)[:3]) for t in np.linspace(0, 1, n)]


def fitted_tiles(bounds, view_px: tuple[int, int]) -> list[tuple[int, int, int]]:
    """The Web Mercator tiles (z, x, y) covering `bounds` (west, south, east, north) at the largest
    zoom where they fit in `view_px`, at most MAX_WARM_TILES."""
    west, south, east, north = bounds

    def xy(lon: float, lat: float, z: int) -> tuple[float, float]:
        n = 2**z
        return (lon + 180) / 360 * n, (1 - math.asinh(math.tan(math.radians(lat))) / math.pi) / 2 * n

    for z in range(20, -1, -1):
        x0, y0 = xy(west, north, z)
        x1, y1 = xy(east, south, z)
        if (x1 - x0) * TILE_PX <= view_px[0] and (y1 - y0) * TILE_PX <= view_px[1]:
            tiles = [(z, x, y) for x in range(int(x0), int(x1) + 1) for y in range(int(y0), int(y1) + 1)]
            return tiles[:MAX_WARM_TILES]
    return []


def overviews(info: RasterInfo, work_dir: Path) -> str:
    """The path tiles are read from: the raster itself when it is small or has overviews; else a VRT
    over it in `work_dir` with overviews (nearest pixels, factors of 2 until OVERVIEW_MIN_PX), built
    once, beside the VRT: the raster itself is never written."""
    with rasterio.open(info.path) as src:
        has = bool(src.overviews(1))
    if has or max(info.width, info.height) <= OVERVIEW_FROM_PX:
        return info.path
    factors, f = [], 2
    while max(info.width, info.height) / f >= OVERVIEW_MIN_PX:
        factors.append(f)
        f *= 2
    vrt = write_mosaic_vrt([info.path], Path(work_dir) / f"overviews_{Path(info.path).stem}.vrt")
    logger.info(f"building map overviews of {Path(info.path).name} (x{', x'.join(map(str, factors))}); once per start")
    started = time.perf_counter()
    with rasterio.Env(COMPRESS_OVERVIEW="ZSTD", INTERLEAVE_OVERVIEW="PIXEL", GDAL_NUM_THREADS="ALL_CPUS"):
        with rasterio.open(vrt, "r+") as dst:
            dst.build_overviews(factors, Resampling.nearest)
    logger.info(f"overviews built in {time.perf_counter() - started:.1f} s")
    return str(vrt)
