"""Shared helpers for the benchmarks: a generated AlphaEarth-like int8 raster, peak memory."""

from __future__ import annotations

import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import rasterio
from rasterio.transform import from_origin
from rasterio.windows import Window

# the code measured: this checkout's, or another's (bench_inference.py --baseline)
sys.path.insert(0, os.environ.get("AETHER_BENCH_CODE", str(Path(__file__).resolve().parents[1])))

try:
    from aether.geo.alphaearth import N_BANDS, band_names, quantize
except ImportError:  # a baseline checkout from before the package's rooms (aether.alphaearth then)
    from aether.alphaearth import N_BANDS, band_names, quantize

OUT = Path(__file__).resolve().parent / "out"
ORIGIN = (380000.0, 6690000.0)
NOISE = 0.35  # per-pixel noise on the smooth field: a file that barely compresses (bench_pooling, bench_scale)
SMOOTH_NOISE = 0.1  # neighbouring pixels' cosine about 0.95: an output that compresses (bench_inference)


def generated_raster(size_px: int, seed: int = 0, noise: float = NOISE) -> Path:
    """A size x size x 64 int8 AlphaEarth-encoded GeoTIFF (10 m, EPSG:32635), cached in benchmarks/out.

    Values: a smooth random field (features ~80 m across, as fields and blocks are) plus
    per-pixel noise of `noise` (NOISE or SMOOTH_NOISE), normalised to unit length. Stored like the
    Cloud Storage COGs: int8, nodata -128, 256 x 256 tiles, DEFLATE, pixel-interleaved.
    """
    OUT.mkdir(exist_ok=True)
    path = OUT / (f"ae_{size_px}_int8.tif" if noise == NOISE else f"ae_{size_px}_int8_noise{noise:g}.tif")
    if path.exists():
        return path
    rng = np.random.default_rng(seed)
    smooth = 8
    coarse = rng.standard_normal((N_BANDS, size_px // smooth + 2, size_px // smooth + 2)).astype(np.float32)
    profile = dict(
        driver="GTiff",
        width=size_px,
        height=size_px,
        count=N_BANDS,
        dtype="int8",
        nodata=-128,
        crs="EPSG:32635",
        transform=from_origin(*ORIGIN, 10.0, 10.0),
        tiled=True,
        blockxsize=256,
        blockysize=256,
        compress="deflate",
        zlevel=1,
        interleave="pixel",
    )
    tmp = path.with_suffix(".tmp.tif")
    t0 = time.time()
    with rasterio.open(tmp, "w", **profile) as dst:
        cols = np.arange(size_px) / smooth
        c0 = cols.astype(int)
        fc = (cols - c0).astype(np.float32)
        for r0 in range(0, size_px, 256):
            rows = np.arange(r0, r0 + 256) / smooth
            i0 = rows.astype(int)
            fr = (rows - i0).astype(np.float32)[:, None]
            top = coarse[:, i0][:, :, c0] * (1 - fc) + coarse[:, i0][:, :, c0 + 1] * fc
            bottom = coarse[:, i0 + 1][:, :, c0] * (1 - fc) + coarse[:, i0 + 1][:, :, c0 + 1] * fc
            block = top * (1 - fr) + bottom * fr
            block += noise * rng.standard_normal(block.shape, dtype=np.float32)
            block /= np.linalg.norm(block, axis=0, keepdims=True)
            dst.write(quantize(block), window=Window(0, r0, size_px, 256))
        for i, name in enumerate(band_names(), start=1):
            dst.set_band_description(i, name)
    tmp.rename(path)
    print(f"generated {path.name}: {path.stat().st_size / 2**20:.0f} MiB in {time.time() - t0:.0f} s", flush=True)
    return path


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far: VmHWM, which a new program starts afresh
    (getrusage's ru_maxrss keeps the parent's peak across fork and exec, so a child started by a
    benchmark that had just generated a large raster would report the parent's memory)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine() -> str:
    import platform

    model = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, Python {platform.python_version()}"
