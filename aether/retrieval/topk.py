"""The best places for a query: the candidates a streaming pass keeps, and greedy non-maximum
suppression in ground metres over them.

Top-k is exact while streaming: greedy suppression takes pixels in falling score order and each
kept pixel suppresses at most D others (D = pixels within the radius), so the k hits are always
among the best k * (D + 1) pixels, which is all a tile-by-tile pass keeps.
"""

from __future__ import annotations

import logging
import math

import numpy as np
from rasterio.warp import transform as warp_transform

from aether.geo.raster import RasterInfo, ground_distances_m

logger = logging.getLogger(__name__)


MAX_CANDIDATES = 5_000_000  # per query; a cap on k * (D + 1) for huge radii


SCORES_BUDGET_MB = 64  # one tile's similarity scores, all queries together


def query_tile_px(tile_px: int, n_queries: int) -> int:
    """The tile side, shrunk (to a multiple of 16) so one tile's scores for all queries stay within
    SCORES_BUDGET_MB: memory is bounded by the work window however many queries there are."""
    fit = int(math.sqrt(SCORES_BUDGET_MB * 2**20 / (4 * n_queries)))
    return max(16, min(tile_px, fit // 16 * 16))


def nms_radius_px(info: RasterInfo, radius_m: float) -> int:
    """The largest number of pixels a radius spans along either axis (smallest pixel size)."""
    sx, sy = info.pixel_size_m(info.latitude_range())
    return int(math.ceil(radius_m / max(min(float(np.min(sx)), float(np.min(sy))), 1e-9)))


def candidates_needed(info: RasterInfo, top_k: int, nms_m: float) -> int:
    """How many best pixels per query make the top-k after suppression exact: k * (D + 1)."""
    return top_k * ((2 * nms_radius_px(info, nms_m) + 1) ** 2 + 1)


def non_max_suppression(
    scores: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    k: int,
    radius_m: float,
    geographic: bool = False,
    unit_m: float = 1.0,
    tiebreak: np.ndarray | None = None,
) -> np.ndarray:
    """Indices of up to k points chosen greedily by falling score, none within `radius_m` of a
    better chosen point (a point exactly at the radius is kept). Equal scores go to the smaller
    `tiebreak` (default: the index), so the answer does not depend on the order of the input."""
    order = np.lexsort((np.arange(len(scores)) if tiebreak is None else tiebreak, -scores))
    alive = np.ones(len(scores), dtype=bool)
    chosen: list[int] = []
    for i in order:
        if len(chosen) == k:
            break
        if not alive[i]:
            continue
        chosen.append(int(i))
        if radius_m > 0:
            alive &= ground_distances_m(x[i], y[i], x, y, geographic, unit_m) >= radius_m
        alive[i] = False
    return np.asarray(chosen, dtype=np.int64)


class TopCandidates:
    """The best `keep` pixels seen so far for one query (scores, input rows and columns)."""

    def __init__(self, keep: int):
        self.keep = keep
        self.scores = np.empty(0, dtype=np.float32)
        self.rows = np.empty(0, dtype=np.int64)
        self.cols = np.empty(0, dtype=np.int64)

    def add(self, scores: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> None:
        ok = np.isfinite(scores)
        scores, rows, cols = scores[ok], rows[ok], cols[ok]
        if len(scores) > self.keep:
            part = np.argpartition(-scores, self.keep - 1)[: self.keep]
            scores, rows, cols = scores[part], rows[part], cols[part]
        self.scores = np.concatenate([self.scores, scores])
        self.rows = np.concatenate([self.rows, rows])
        self.cols = np.concatenate([self.cols, cols])
        if len(self.scores) > 2 * self.keep:
            self._trim()

    def _trim(self) -> None:
        if len(self.scores) > self.keep:
            part = np.argpartition(-self.scores, self.keep - 1)[: self.keep]
            self.scores, self.rows, self.cols = self.scores[part], self.rows[part], self.cols[part]

    def final(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        self._trim()
        return self.scores, self.rows, self.cols


QUERIES_PER_PASS = 64  # queries scored in one pass over the raster: at most this many GeoTIFFs open at once


CANDIDATES_PER_PASS = 8_000_000  # best pixels kept in one pass, all its queries together (20 B each, ~3 x held)


def queries_per_pass(keep: int) -> int:
    """How many queries one pass over the raster scores, each keeping `keep` candidates: at most
    QUERIES_PER_PASS, and no more than CANDIDATES_PER_PASS candidates in all (at least one query)."""
    return max(1, min(QUERIES_PER_PASS, CANDIDATES_PER_PASS // keep))


def candidates_kept(info: RasterInfo, top_k: int, nms_m: float, say: bool = False) -> int:
    """The candidates each query keeps: k * (D + 1), at most MAX_CANDIDATES (`say`: note the cap)."""
    keep = candidates_needed(info, top_k, nms_m)
    if keep > MAX_CANDIDATES and say:
        logger.warning(
            f"top-{top_k} with {nms_m:g} m suppression would need {keep:,} candidates per query; keeping "
            f"{MAX_CANDIDATES:,}, so fewer than {top_k} places may be returned"
        )
    return min(keep, MAX_CANDIDATES)


def pass_tile_px(info: RasterInfo, tile_px: int, n_queries: int, top_k: int, nms_m: float) -> int:
    """The tile side of a search of `n_queries` on `info`: `query_tile_px` for one pass's queries."""
    return query_tile_px(tile_px, min(n_queries, queries_per_pass(candidates_kept(info, top_k, nms_m))))


def best_places(info: RasterInfo, cands: TopCandidates, top_k: int, nms_m: float) -> list[dict]:
    scores, rows, cols = cands.final()
    x, y = info.xy(rows, cols)
    chosen = non_max_suppression(
        scores, x, y, top_k, nms_m, info.is_geographic, info.unit_m, tiebreak=rows * info.width + cols
    )  # ties: first in raster order
    if len(chosen) == 0:
        return []
    lon, lat = warp_transform(info.crs, "EPSG:4326", x[chosen].tolist(), y[chosen].tolist())
    hits = []
    for rank, (i, lo, la) in enumerate(zip(chosen, lon, lat), start=1):
        out_row = info.north_up_rows(int(rows[i]), 1)
        hits.append(
            {
                "rank": rank,
                "score": round(float(scores[i]), 6),
                "lon": lo,
                "lat": la,
                "x": float(x[i]),
                "y": float(y[i]),
                "row": out_row,
                "col": int(cols[i]),
            }
        )
    return hits
