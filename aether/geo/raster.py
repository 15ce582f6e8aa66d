"""Opening AlphaEarth rasters and reading blocks of them as masked vectors.

Accepts what users actually have: Earth Engine exports (float32/float64, NaN or a
declared nodata), the Cloud Storage int8 encoding (-128 masked), any CRS, north-up
or bottom-up rows, and VRT mosaics.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.windows import Window

from aether.core.errors import AetherError, first_line
from aether.geo.alphaearth import MAX_ABS_VALUE, N_BANDS, NODATA_INT8, NODATA_INT16, dequantize, dequantize_int16
from aether.geo.gdal import gdal_path, is_remote, remote_hint

MAX_WINDOW_HALF_PX = 1024  # a window made from metres spans at most this many pixels each way (2,049 across)

# WGS84 ellipsoid, for metres per degree at a latitude.
_WGS84_A = 6378137.0
_WGS84_E2 = 6.69437999014e-3


@dataclass(frozen=True)
class RasterInfo:
    """What the rest of AETHER needs to know about an embedding raster."""

    path: str
    width: int
    height: int
    count: int
    crs: CRS
    transform: Affine
    dtype: str
    nodata: float | None
    block_shape: tuple[int, int]

    @property
    def is_int8(self) -> bool:
        return self.dtype == "int8"

    @property
    def is_int16(self) -> bool:
        """AETHER's int16 encoding (value = q / 32767, nodata -32768)."""
        return self.dtype == "int16"

    @property
    def is_geographic(self) -> bool:
        return bool(self.crs.is_geographic)

    @property
    def unit_m(self) -> float:
        """Metres per map unit of a projected CRS (1 for a geographic CRS, whose units are degrees)."""
        return 1.0 if self.is_geographic else float(self.crs.linear_units_factor[1])

    @property
    def bottom_up(self) -> bool:
        """Rows stored south-first (positive y pixel size), as some mirrors store tiles."""
        return self.transform.e > 0

    @property
    def north_up_transform(self) -> Affine:
        """The transform of the same grid with rows stored north-first (outputs are written so)."""
        if not self.bottom_up:
            return self.transform
        return self.transform @ Affine.translation(0, self.height) @ Affine.scale(1, -1)

    def north_up_rows(self, row0: int, height: int) -> int:
        """The first north-up row of the file rows row0 .. row0 + height - 1."""
        return self.height - row0 - height if self.bottom_up else row0

    def pixel_size_m(self, lat_deg: np.ndarray | float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Pixel width and height on the ground in metres (at `lat_deg` for a geographic CRS)."""
        sx, sy = abs(self.transform.a), abs(self.transform.e)
        if not self.is_geographic:
            return np.asarray(sx * self.unit_m, dtype=np.float64), np.asarray(sy * self.unit_m, dtype=np.float64)
        if lat_deg is None:
            raise ValueError("a geographic raster needs a latitude to convert degrees to metres")
        m_lat, m_lon = metres_per_degree(np.asarray(lat_deg, dtype=np.float64))
        return sx * m_lon, sy * m_lat

    def radius_px(self, radius_m: float, lat_deg: np.ndarray | float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Half-widths (columns, rows) in whole pixels of a window of ground radius `radius_m`.

        45 m at 10 m pixels gives 4, i.e. a 9 x 9 window. `check_window` bounds them first.
        """
        sx_m, sy_m = self.pixel_size_m(lat_deg)
        with np.errstate(divide="ignore", invalid="ignore"):
            fx, fy = radius_m / sx_m, radius_m / sy_m
        # at or beyond a pole there is no pixel size: clipped so the cast stays quiet (check_window refuses it)
        rx, ry = (
            np.floor(np.clip(np.nan_to_num(f, nan=2.0**40), 0, 2.0**40) + 1e-6).astype(np.int64) for f in (fx, fy)
        )
        return rx, ry

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """(west, south, east, north) in the raster's CRS, whatever its row order."""
        xs = (self.transform.c, self.transform.c + self.width * self.transform.a)
        ys = (self.transform.f, self.transform.f + self.height * self.transform.e)
        return min(xs), min(ys), max(xs), max(ys)

    def row_latitudes(self) -> np.ndarray | None:
        """Latitude of each row's pixel centres of a geographic raster; None for a projected one."""
        if not self.is_geographic:
            return None
        return self.xy(np.arange(self.height), np.zeros(self.height, dtype=np.int64))[1]

    def radius_px_rows(self, radius_m: float) -> tuple[np.ndarray, np.ndarray]:
        """`radius_px` for every row, (height,) each: at each row's latitude on a geographic raster."""
        rx, ry = self.radius_px(radius_m, self.row_latitudes())
        return (np.broadcast_to(np.asarray(r, dtype=np.int64), (self.height,)) for r in (rx, ry))

    def latitude_range(self) -> np.ndarray | None:
        """Latitudes of the first and last rows' pixel centres of a geographic raster (the pixels are
        narrowest on the ground at the one nearer a pole); None for a projected raster."""
        if not self.is_geographic:
            return None
        return self.xy(np.array([0, self.height - 1]), np.array([0, 0]))[1]

    def check_window(
        self, radius_m: float, lat_deg: np.ndarray | float | None = None, fix: str = "use a smaller radius"
    ) -> None:
        """Refuse a window of ground radius `radius_m` more than MAX_WINDOW_HALF_PX pixels each way from its
        centre (at the latitudes `lat_deg` of a geographic raster; default: all its rows), before any
        memory is asked for it: 1 mm pixels would make a 45 m window 90,001 pixels across, and so would
        longitude degrees near a pole. `fix` says what the caller's user can change besides the raster."""
        if self.is_geographic and lat_deg is None:
            lat_deg = self.latitude_range()
        lat = None if lat_deg is None else np.atleast_1d(np.asarray(lat_deg, dtype=np.float64))
        if lat is not None and not len(lat):
            return
        if lat is not None and not (np.abs(lat) <= 90).all():
            raise AetherError(
                f"raster {self.path} has pixel centres at latitude {float(np.max(np.abs(lat))):.6g}, "
                f"beyond a pole; fix its georeferencing (gdal_edit.py -a_ullr) and retry"
            )
        sx_m, sy_m = self.pixel_size_m(lat)
        check_window_px(f"raster {self.path}", radius_m, sx_m, sy_m, lat, fix)

    def rowcol(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Array row and column of map coordinates (either row orientation)."""
        cols, rows = ~self.transform @ (np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64))
        finite = np.isfinite(rows) & np.isfinite(cols)  # non-finite points land off the raster, at -1
        rows = np.floor(np.clip(np.where(finite, rows, -1), -1, 2**52)).astype(np.int64)
        cols = np.floor(np.clip(np.where(finite, cols, -1), -1, 2**52)).astype(np.int64)
        return rows, cols

    def xy(self, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Map coordinates of pixel centres."""
        return self.transform @ (np.asarray(cols, dtype=np.float64) + 0.5, np.asarray(rows, dtype=np.float64) + 0.5)


def check_window_px(source: str, radius_m: float, sx_m, sy_m, lat_deg=None, fix: str = "use a smaller radius") -> None:
    """Refuse a window of ground radius `radius_m` on pixels of sx_m x sy_m metres (arrays: one per
    latitude in `lat_deg`) that would reach more than MAX_WINDOW_HALF_PX pixels from its centre."""
    sx_m, sy_m = np.atleast_1d(np.asarray(sx_m, dtype=np.float64)), np.atleast_1d(np.asarray(sy_m, dtype=np.float64))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        hx, hy = radius_m / sx_m, radius_m / sy_m
    # no positive pixel size (at or beyond a pole): no window fits
    half = np.maximum(*(np.where(np.isnan(h) | (h < 0), np.inf, h) for h in (hx, hy)))
    worst = int(np.argmax(half))
    if half[worst] < MAX_WINDOW_HALF_PX + 1 - 1e-6:
        return
    where = f" at latitude {float(np.atleast_1d(lat_deg)[worst]):.6g}" if lat_deg is not None else ""
    across = f"{2 * int(half[worst]) + 1:,} pixels" if math.isfinite(half[worst]) else "unboundedly many pixels"
    raise AetherError(
        f"{source} has pixels of {float(sx_m[worst]):.3g} x {float(sy_m[worst]):.3g} m{where}: a window "
        f"of radius {radius_m:g} m would be {across} across, more than the {2 * MAX_WINDOW_HALF_PX + 1:,} "
        f"AETHER allows; resample the raster to coarser pixels (gdalwarp -tr; near a pole, into a polar "
        f"CRS such as EPSG:3413 or EPSG:3976) or {fix}"
    )


def metres_per_degree(lat_deg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Metres per degree of latitude and of longitude at `lat_deg` on the WGS84 ellipsoid."""
    phi = np.radians(lat_deg)
    w = 1.0 - _WGS84_E2 * np.sin(phi) ** 2
    meridian = _WGS84_A * (1.0 - _WGS84_E2) / w**1.5
    normal = _WGS84_A / np.sqrt(w)
    return meridian * math.pi / 180.0, normal * np.cos(phi) * math.pi / 180.0


def ground_distances_m(
    x0: float,
    y0: float,
    x: np.ndarray,
    y: np.ndarray,
    geographic: bool,
    unit_m: float = 1.0,
    lat_deg: float | None = None,
) -> np.ndarray:
    """Ground distances in metres from (x0, y0) to points (x, y) in one CRS: `unit_m` is a projected
    CRS's unit in metres; a geographic CRS is scaled at `lat_deg` (default: each pair's mid-latitude)."""
    if not geographic:
        return np.hypot(x - x0, y - y0) * unit_m
    m_lat, m_lon = metres_per_degree(np.asarray((y + y0) / 2.0 if lat_deg is None else lat_deg))
    return np.hypot((x - x0) * m_lon, (y - y0) * m_lat)


def raster_files(path: str) -> list[str]:
    """The local files that reading the raster `path` reads, resolved (real paths), the raster's
    own first: for a VRT also its sources, followed through VRTs of VRTs (GDAL lists one level).
    URLs and /vsi paths read no local file; a file that cannot be opened adds only itself."""
    found: dict[str, None] = {}
    todo = [str(path)]
    while todo:
        name = todo.pop(0)
        if is_remote(name):
            continue
        real = os.path.realpath(name)
        if real in found:
            continue
        found[real] = None
        try:
            with open(real, "rb") as f:
                is_vrt = b"<VRTDataset" in f.read(4096)  # after an XML declaration or a comment too
        except OSError:
            continue
        if is_vrt:
            try:
                with rasterio.open(real) as src:
                    todo += src.files  # the VRT itself, then its sources (relative ones resolved)
            except rasterio.errors.RasterioIOError:
                continue
    return list(found)


def open_raster(path: str, n_bands: int | None = N_BANDS) -> RasterInfo:
    """Open and check an embedding raster (a file, a VRT, or a URL: see `gdal_path`); refuse what
    AETHER cannot read correctly.

    `n_bands=None` leaves the band count to the caller (who can name what it must match).
    """
    given, path = str(path), gdal_path(path)
    try:
        with rasterio.open(path) as src:
            info = RasterInfo(
                path=str(path),
                width=src.width,
                height=src.height,
                count=src.count,
                crs=src.crs,
                transform=src.transform,
                dtype=src.dtypes[0],
                nodata=src.nodata,
                block_shape=tuple(src.block_shapes[0]) if src.count else (0, 0),
            )
            dtypes = set(src.dtypes)
    except rasterio.errors.RasterioIOError as exc:
        raise AetherError(f"cannot open raster {given}: {first_line(exc)}{remote_hint(given)}") from None
    if info.crs is None:
        raise AetherError(f"raster {path} has no CRS; assign one (e.g. gdal_edit.py -a_srs EPSG:32635) and retry")
    if n_bands is not None and info.count != n_bands:
        raise AetherError(
            f"raster {path} has {info.count} bands, expected {n_bands} (set data.n_bands if this is intended)"
        )
    if len(dtypes) != 1:
        raise AetherError(f"raster {path} mixes band types {sorted(dtypes)}; expected one type for all bands")
    if info.dtype not in ("int8", "int16", "float16", "float32", "float64"):
        raise AetherError(
            f"raster {path} has type {info.dtype}; expected int8 (AlphaEarth Cloud Storage), int16 "
            f"(AETHER's int16 output) or float16/float32/float64"
        )
    if info.transform.b != 0 or info.transform.d != 0:
        raise AetherError(f"raster {path} is rotated or sheared; warp it to a north-up grid first (gdalwarp)")
    if info.is_int8 and info.nodata is not None and info.nodata != NODATA_INT8:
        raise AetherError(
            f"raster {path} is int8 with nodata {info.nodata}; the AlphaEarth encoding uses {NODATA_INT8}"
        )
    if info.is_int16 and info.nodata is not None and info.nodata != NODATA_INT16:
        raise AetherError(
            f"raster {path} is int16 with nodata {info.nodata}; AETHER's int16 encoding uses {NODATA_INT16}"
        )
    return info


def invalid_pixels(pixels: np.ndarray, info: RasterInfo, axis: int = -1) -> np.ndarray:
    """Pixels where any band is nodata, of an (h, w, C) block (or a (C, h, w) one, with axis=0). In a
    float raster that is NaN, the declared nodata, and any value no embedding has (see
    `implausible_pixels`), so that no sum of them overflows."""
    if info.is_int8 or info.is_int16:  # nodata is the type's smallest value: the band minimum finds it, no copy
        return pixels.min(axis=axis) == (NODATA_INT8 if info.is_int8 else NODATA_INT16)
    bad = ~(np.abs(pixels) <= MAX_ABS_VALUE)  # NaN, inf and impossible magnitudes in one test
    if info.nodata is not None and not math.isnan(info.nodata):
        bad |= pixels == info.nodata
    return bad.any(axis=axis)


def implausible_pixels(pixels: np.ndarray, info: RasterInfo, axis: int = -1) -> int:
    """How many pixels of a block (as `invalid_pixels` takes it) hold a value no AlphaEarth or AETHER
    vector has (unit vectors: components in [-1, 1]): beyond +-MAX_ABS_VALUE or infinite, other than
    the declared nodata. They are invalid pixels; this counts them, to be reported once."""
    if info.is_int8 or info.is_int16:
        return 0  # every int8 and int16 code decodes into [-1, 1]
    odd = np.abs(pixels) > MAX_ABS_VALUE  # NaN compares False: it is nodata, not odd
    if info.nodata is not None and not math.isnan(info.nodata) and abs(info.nodata) > MAX_ABS_VALUE:
        odd &= pixels != info.nodata
    return int(np.count_nonzero(odd.any(axis=axis)))


def read_pixels(src: rasterio.io.DatasetReader, window: Window, info: RasterInfo) -> np.ndarray:
    """Read a block as (h, w, C), pixel-major, in the file's own type (`read_bands` is faster
    where band-major will do)."""
    window = Window(*(int(v) for v in (window.col_off, window.row_off, window.width, window.height)))
    pixels = np.empty((window.height, window.width, info.count), dtype=info.dtype)
    try:
        src.read(window=window, out=pixels.transpose(2, 0, 1))
    except rasterio.errors.RasterioIOError as exc:
        raise AetherError(
            f"cannot read raster {info.path} at {window}: {first_line(exc)}{remote_hint(info.path)}"
        ) from None
    return pixels


def read_bands(src: rasterio.io.DatasetReader, window: Window, info: RasterInfo) -> np.ndarray:
    """Read a block as (C, h, w), band-major, in the file's own type: the layout the summed-area
    tables scan, and for a pixel-interleaved GeoTIFF about 25% less CPU than `read_pixels`."""
    window = Window(*(int(v) for v in (window.col_off, window.row_off, window.width, window.height)))
    try:
        return src.read(window=window)
    except rasterio.errors.RasterioIOError as exc:
        raise AetherError(
            f"cannot read raster {info.path} at {window}: {first_line(exc)}{remote_hint(info.path)}"
        ) from None


def read_vectors(src: rasterio.io.DatasetReader, window: Window, info: RasterInfo) -> tuple[np.ndarray, np.ndarray]:
    """Read a block as float32 vectors (h, w, C), invalid pixels zeroed, and the valid mask (h, w)."""
    pixels = read_pixels(src, window, info)
    invalid = invalid_pixels(pixels, info)
    return decode_pixels(pixels, invalid, info), ~invalid


def decode_pixels(
    pixels: np.ndarray, invalid: np.ndarray, info: RasterInfo, out: np.ndarray | None = None
) -> np.ndarray:
    """(h, w, C) pixels in the file's type as float32 values (AlphaEarth int8 de-quantized, AETHER
    int16 scaled), invalid pixels (h, w) zeroed first, so no cast overflows; into `out` (float32,
    the pixels' shape) when given, so a caller decoding many blocks reuses one array."""
    if info.is_int8:
        values = dequantize(pixels, out=out)
    elif info.is_int16:
        values = dequantize_int16(pixels, out=out)
    else:
        cleaned = np.where(invalid[..., None], 0, pixels)
        if out is None:
            values = cleaned.astype(np.float32)
        else:
            values = out
            np.copyto(values, cleaned, casting="same_kind")
    values[invalid] = 0.0
    return values


class BlockCache:
    """Reads windows of a raster so that each storage block is decoded once.

    Windows that overlap (a chunk and its neighbours' halos) share blocks; GDAL's own
    cache does not keep them when it decodes in several threads. Missing blocks are
    decoded in parallel, one dataset handle per thread. The caller says which blocks
    can go (`evict`), which keeps memory bounded by a band of blocks, not the raster.
    """

    UNIT_PX = 256  # blocks smaller than this are grouped, so tiny blocks do not mean tiny reads

    def __init__(self, info: RasterInfo, threads: int = 2):
        self.info = info
        bh, bw = info.block_shape if all(info.block_shape) else (self.UNIT_PX, self.UNIT_PX)
        self.unit_h = bh * max(1, -(-self.UNIT_PX // bh))
        self.unit_w = min(bw * max(1, -(-self.UNIT_PX // bw)), info.width)
        self.units: dict[tuple[int, int], np.ndarray] = {}
        self.implausible = 0  # pixels read that hold values no embedding has (`implausible_pixels`)
        self._local = __import__("threading").local()
        self._handles: list = []
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(max_workers=max(1, threads))

    def _read_unit(self, key: tuple[int, int]) -> np.ndarray:
        if not hasattr(self._local, "src"):
            self._local.src = rasterio.open(self.info.path)
            self._handles.append(self._local.src)
        r0, c0 = key[0] * self.unit_h, key[1] * self.unit_w
        window = Window(c0, r0, min(self.unit_w, self.info.width - c0), min(self.unit_h, self.info.height - r0))
        return read_bands(self._local.src, window, self.info)

    def read(self, r0: int, r1: int, c0: int, c1: int) -> list[list[np.ndarray]]:
        """Rows r0:r1, columns c0:c1 (inside the raster), in the file's type, as a grid of band-major
        (C, h, w) views of the cached blocks: rows of pieces, left to right, top to bottom.
        Not copying them into one array saves a copy and its page faults for every chunk."""
        rows = range(r0 // self.unit_h, (r1 - 1) // self.unit_h + 1)
        cols = range(c0 // self.unit_w, (c1 - 1) // self.unit_w + 1)
        missing = [(i, j) for i in rows for j in cols if (i, j) not in self.units]
        for key, unit in zip(missing, self._pool.map(self._read_unit, missing)):
            self.units[key] = unit
            self.implausible += implausible_pixels(unit, self.info, axis=0)
        grid = []
        for i in rows:
            ur0 = i * self.unit_h
            grid.append(
                [
                    self.units[(i, j)][
                        :, max(r0 - ur0, 0) : r1 - ur0, max(c0 - j * self.unit_w, 0) : c1 - j * self.unit_w
                    ]
                    for j in cols
                ]
            )
        return grid

    def evict(self, keep) -> None:
        """Drop cached blocks for which keep(row_start, row_end, col_start, col_end) is False."""
        for i, j in list(self.units):
            r, c = i * self.unit_h, j * self.unit_w
            if not keep(r, r + self.unit_h, c, c + self.unit_w):
                del self.units[(i, j)]

    def close(self) -> None:
        self._pool.shutdown()
        for src in self._handles:
            src.close()
        self.units.clear()
