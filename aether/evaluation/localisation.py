"""Localisation: each held-out POI's own description against every pixel of the AETHER map within
a search radius of the POI; how far the best pixel lies from the POI."""

from __future__ import annotations

import math

import numpy as np
from tqdm.auto import tqdm

from aether.core.errors import AetherError
from aether.evaluation.probes import ProjectorPair
from aether.geo.pooling import pool_points
from aether.geo.raster import RasterInfo, ground_distances_m

DISTANCES_M = (50, 100, 250)


CANDIDATES_PER_BATCH = 500_000  # candidate pixels pooled and projected at once in localisation


def _disc_pixels(info: RasterInfo, x0: float, y0: float, lat_deg: float, radius_m: float):
    """Rows, columns and ground distances of the raster pixels whose centres lie within radius_m."""
    r0, c0 = info.rowcol(np.array([x0]), np.array([y0]))
    rx, ry = info.radius_px(radius_m, lat_deg if info.is_geographic else None)
    rx, ry = int(rx) + 1, int(ry) + 1
    rows = np.arange(max(int(r0[0]) - ry, 0), min(int(r0[0]) + ry + 1, info.height))
    cols = np.arange(max(int(c0[0]) - rx, 0), min(int(c0[0]) + rx + 1, info.width))
    rr, cc = np.meshgrid(rows, cols, indexing="ij")
    rr, cc = rr.ravel(), cc.ravel()
    px, py = info.xy(rr, cc)
    dist = ground_distances_m(x0, y0, px, py, info.is_geographic, info.unit_m, lat_deg)
    inside = dist <= radius_m
    return rr[inside], cc[inside], dist[inside]


def localisation(
    info: RasterInfo,
    x: np.ndarray,
    y: np.ndarray,
    lat: np.ndarray,
    base_radius_m: float,
    text_z: dict[str, np.ndarray],
    pairs: dict[str, ProjectorPair],
    radius_m: float,
    progress: bool = True,
) -> dict[str, dict[str, float]]:
    """Distance from the best-scoring pixel within `radius_m` of each POI to the POI, per pair, and chance.

    Pixel vectors are the base-window means the inference command computes (pooled at
    pixel centres with the checkpoint's base radius, then projected). POIs go in raster
    order, in batches of at most CANDIDATES_PER_BATCH candidate pixels, so memory is
    bounded by the batch. Chance picks a uniformly random valid pixel of the disc; its
    accuracies and mean are exact, its median comes from 1 m bins.
    """
    n = len(x)
    rows, cols = info.rowcol(x, y)
    order = np.lexsort((cols, rows))
    best_m = {name: np.full(n, np.nan) for name in pairs}
    chance_acc = {d: np.zeros(n) for d in DISTANCES_M}
    chance_mean = np.full(n, np.nan)
    bins = np.zeros(int(math.ceil(radius_m)) + 2)
    bar = tqdm(total=n, desc="localisation", unit="POI", disable=not progress)
    start = 0
    while start < n:
        batch, discs, total = [], [], 0
        while start < n and (not batch or total < CANDIDATES_PER_BATCH):
            i = int(order[start])
            disc = _disc_pixels(info, float(x[i]), float(y[i]), float(lat[i]), radius_m)
            batch.append(i)
            discs.append(disc)
            total += len(disc[0])
            start += 1
        flat = np.concatenate([d[0] * info.width + d[1] for d in discs])
        unique_px, inverse = np.unique(flat, return_inverse=True)
        cx, cy = info.xy(unique_px // info.width, unique_px % info.width)
        pooled = pool_points(info, cx, cy, [base_radius_m])  # a geographic raster's y is the latitude
        # scores of every candidate pixel against every query of the batch: (pixels, batch)
        scores = {name: pair.ae(pooled.views[0]) @ text_z[name][batch].T for name, pair in pairs.items()}
        offset = 0
        for j, (i, (_, _, dist)) in enumerate(zip(batch, discs)):
            idx = inverse[offset : offset + len(dist)]
            offset += len(dist)
            ok = pooled.valid[idx]
            if not ok.any():
                continue
            idx, dist = idx[ok], dist[ok]
            for name in pairs:
                best_m[name][i] = dist[int(np.argmax(scores[name][idx, j]))]
            for d in DISTANCES_M:
                chance_acc[d][i] = float(np.mean(dist <= d))
            chance_mean[i] = float(dist.mean())
            bins += np.bincount(np.minimum(dist, radius_m).astype(np.int64), minlength=len(bins))[: len(bins)] / len(
                dist
            )
        bar.update(len(batch))
    bar.close()
    scored = ~np.isnan(chance_mean)
    if not scored.any():
        raise AetherError("no held-out POI has a valid pixel within the search radius; check the raster's nodata")
    out = {}
    for name, dists in best_m.items():
        d = dists[scored]
        out[name] = {
            "median_m": float(np.median(d)),
            "mean_m": float(d.mean()),
            **{f"acc_{t}m": float(np.mean(d <= t)) for t in DISTANCES_M},
        }
    cumulative = np.cumsum(bins) / bins.sum()
    out["chance"] = {
        "median_m": float(np.searchsorted(cumulative, 0.5) + 0.5),
        "mean_m": float(chance_mean[scored].mean()),
        **{f"acc_{t}m": float(chance_acc[t][scored].mean()) for t in DISTANCES_M},
    }
    out["n"] = int(scored.sum())
    return out
