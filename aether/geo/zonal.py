"""Per-zone statistics of a raster's pixel vectors, streamed tile by tile.

Each pixel counts in a zone by the fraction of it the zone covers (exactextract's `coverage`,
computed on each tile's grid): a polygon that cuts a pixel in half counts half of it, a hole
removes what it covers. Invalid (nodata) pixels weigh nothing. Per zone the weighted count, sum
and sum of squares are kept in float64, only while some tile the zone meets is still to come:
memory holds the tile and the zones in it, not the raster or every zone. exactextract is used
because it is the well-kept library for exact coverage fractions (GDAL's rasterisation counts a
pixel wholly or not at all, which biases small zones).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import shapely
from scipy import sparse

from aether.geo.raster import RasterInfo

STATS = ("mean", "std", "count", "coverage")
STRIP_BYTES = 4 << 20  # pixel values converted to float64 at a time: two buffers, in cache


class TileWindow(Protocol):
    """A window of the raster file: rows row0:row0+height, columns col0:col0+width (an inference tile)."""

    row0: int
    col0: int
    height: int
    width: int


@dataclass
class ZoneSums:
    """What a finished zone's statistics come from: `count` weighted valid pixels, their weighted
    `total` and `squares` (bands,), and `area_px`, the zone's area in pixels."""

    index: int  # the zone's row in the zones given
    count: float
    total: np.ndarray
    squares: np.ndarray
    area_px: float

    def statistics(self, stats: tuple[str, ...]) -> np.ndarray:
        """The values of `stats` (mean and std per band, then count and coverage), NaN for a zone
        with no valid pixel."""
        values = []
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = self.total / self.count if self.count > 0 else np.full_like(self.total, np.nan)
            if "mean" in stats:
                values.append(mean)
            if "std" in stats:
                var = np.maximum(self.squares / self.count - mean * mean, 0.0) if self.count > 0 else mean
                values.append(np.sqrt(var))
        if "count" in stats:
            values.append([self.count])
        if "coverage" in stats:
            values.append([min(1.0, self.count / self.area_px) if self.area_px > 0 else np.nan])
        return np.concatenate([np.asarray(v, dtype=np.float64) for v in values])


def statistic_names(band_names: list[str], stats: tuple[str, ...]) -> list[str]:
    """The output's columns for `stats`: BAND_mean..., BAND_std..., count, coverage."""
    names = [f"{b}_{s}" for s in ("mean", "std") if s in stats for b in band_names]
    return names + [s for s in ("count", "coverage") if s in stats]


class ZonalSums:
    """Coverage-weighted sums of one or more feature sets per zone, fed tile by tile (`add`),
    each zone handed back (`add`'s return, then `unmet`) once no tile it meets remains."""

    def __init__(self, info: RasterInfo, polygons: np.ndarray, windows: list[TileWindow], names: list[str]):
        """`polygons` in the raster's CRS; `windows` every tile that will be added; `names` the feature
        sets (e.g. one raster's vectors, or AlphaEarth and AETHER side by side)."""
        t = info.transform
        if t.b != 0 or t.d != 0:
            raise ValueError("rotated rasters are not supported")
        self.info, self.polygons, self.names = info, polygons, names
        self.pixel_area = abs(t.a * t.e)
        self.tree = shapely.STRtree(polygons)
        boxes = np.array([shapely.box(*self.extent(w)) for w in windows])
        pairs = self.tree.query(boxes, predicate="intersects")
        self.remaining = np.bincount(pairs[1], minlength=len(polygons))  # tiles still to come, per zone
        self.off_raster = np.flatnonzero(self.remaining == 0)  # zones no tile meets
        self.sums: dict[int, dict] = {}  # zones met so far and not finished: name -> [count, total, squares]

    def extent(self, w: TileWindow) -> tuple[float, float, float, float]:
        """(xmin, ymin, xmax, ymax) of a window, in the raster's CRS."""
        t = self.info.transform
        xs = (t.c + w.col0 * t.a, t.c + (w.col0 + w.width) * t.a)
        ys = (t.f + w.row0 * t.e, t.f + (w.row0 + w.height) * t.e)
        return min(xs), min(ys), max(xs), max(ys)

    def met_by(self, w: TileWindow) -> np.ndarray:
        """The zones whose polygons meet window `w` (as counted when the sums were set up)."""
        return self.tree.query(shapely.box(*self.extent(w)), predicate="intersects")

    def coverage(self, w: TileWindow, met: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(zone, pixel, fraction) of every pixel of window `w` one of the zones `met` covers part of:
        zone rows into the zones given, pixel as row * width + column of the window in file order."""
        from exactextract import exact_extract
        from exactextract.raster import NumPyRasterSource

        xmin, ymin, xmax, ymax = self.extent(w)
        if len(met) == 0:
            return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0)
        grid = NumPyRasterSource(np.broadcast_to(np.float32(0), (w.height, w.width)), xmin, ymin, xmax, ymax)
        features = [
            {"type": "Feature", "properties": {"z": int(z)}, "geometry": self.polygons[z].__geo_interface__}
            for z in met
        ]
        zone, pixel, fraction = [], [], []
        for feature in exact_extract(grid, features, ["cell_id", "coverage"], include_cols=["z"]):
            props = feature["properties"]
            cells = np.asarray(props["cell_id"], dtype=np.int64)
            zone.append(np.full(len(cells), props["z"], dtype=np.int64))
            pixel.append(cells)
            fraction.append(np.asarray(props["coverage"], dtype=np.float64))
        zone, pixel, fraction = np.concatenate(zone), np.concatenate(pixel), np.concatenate(fraction)
        if self.info.bottom_up:  # exactextract counts rows from the north; a bottom-up file from the south
            row, col = np.divmod(pixel, w.width)
            pixel = (w.height - 1 - row) * w.width + col
        return zone, pixel, fraction

    def add(self, w: TileWindow, features: dict[str, tuple[np.ndarray, np.ndarray]]) -> list[dict[str, ZoneSums]]:
        """Add window `w`'s pixels: for each feature set, (h * w, bands) float vectors and the (h * w,)
        valid mask, in file order. Returns the zones this window finished, each as {name: ZoneSums}."""
        candidates = self.met_by(w)
        zone, pixel, fraction = self.coverage(w, candidates)
        met = np.unique(zone)
        local = np.searchsorted(met, zone)
        order = np.argsort(pixel, kind="stable")  # pixel-major: the rows of W transposed, in CSR order
        local, pixel, fraction = local[order], pixel[order], fraction[order]
        n_px = w.height * w.width
        row_starts = np.searchsorted(pixel, np.arange(n_px + 1))
        for name in self.names:
            vectors, valid = features[name]
            weight = fraction * valid[pixel]
            count = np.bincount(local, weights=weight, minlength=len(met))
            total = np.zeros((len(met), vectors.shape[1]))
            squares = np.zeros_like(total)
            step = max(1, STRIP_BYTES // (8 * vectors.shape[1]))
            values, values2 = np.empty((step, vectors.shape[1])), np.empty((step, vectors.shape[1]))
            for start in range(0, n_px, step):  # float64 a strip at a time, in reused buffers (no page faults)
                stop = min(start + step, n_px)
                lo, hi = row_starts[start], row_starts[stop]
                if lo == hi:
                    continue
                x, x2 = values[: stop - start], values2[: stop - start]
                np.copyto(x, vectors[start:stop])
                np.multiply(x, x, out=x2)
                weights_t = sparse.csr_matrix(
                    (weight[lo:hi], local[lo:hi], row_starts[start : stop + 1] - lo), shape=(stop - start, len(met))
                )
                total += weights_t.T @ x
                squares += weights_t.T @ x2
            for i, z in enumerate(met.tolist()):
                held = self.sums.setdefault(z, {}).get(name)
                if held is None:
                    self.sums[z][name] = [count[i], total[i], squares[i]]
                else:
                    held[0] += count[i]
                    held[1] += total[i]
                    held[2] += squares[i]
        self.remaining[candidates] -= 1
        done = candidates[self.remaining[candidates] == 0]
        bands = {name: features[name][0].shape[1] for name in self.names}
        return [self._finish(int(z), bands) for z in done]

    def _finish(self, z: int, bands: dict[str, int]) -> dict[str, ZoneSums]:
        """Zone `z`'s sums, taken out of memory (zeros for a zone whose tiles held none of its pixels)."""
        held = self.sums.pop(z, {})
        area = float(shapely.area(self.polygons[z])) / self.pixel_area
        empty = {n: [0.0, np.zeros(bands[n]), np.zeros(bands[n])] for n in self.names}
        return {n: ZoneSums(z, float(c), t, s, area) for n, (c, t, s) in {**empty, **held}.items()}

    def unmet(self, bands: dict[str, int]) -> list[dict[str, ZoneSums]]:
        """The zones no tile meets (off the raster): no pixel, statistics NaN, coverage 0."""
        return [self._finish(int(z), bands) for z in self.off_raster]
