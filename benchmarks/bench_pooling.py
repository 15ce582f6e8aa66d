"""Pooling benchmark: 1,000,000 random POIs on a generated 4096 x 4096 x 64 int8 raster.

Both views per POI, at base radius 45 m (views 45 m and 95 m, the defaults) and at
base radius 500 m (views 500 m and 550 m), timed end to end including reading the
raster. Each case runs in a fresh process so its peak memory is its own.

    python benchmarks/bench_pooling.py [--size 4096] [--points 1000000]

Targets (2 cores): >= 100,000 POIs/s at both radii, within 20% of each other, peak < 2 GiB.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import numpy as np
from common import ORIGIN, generated_raster, machine, peak_rss_mib


def one_case(path: str, size: int, points: int, base_m: float, aug_m: float) -> dict:
    from aether.geo.pooling import pool_points
    from aether.geo.raster import open_raster

    rng = np.random.default_rng(1)
    x = ORIGIN[0] + rng.uniform(0, size * 10.0, points)
    y = ORIGIN[1] - rng.uniform(0, size * 10.0, points)
    t0 = time.perf_counter()
    info = open_raster(path)
    pooled = pool_points(info, x, y, [base_m, aug_m])
    seconds = time.perf_counter() - t0
    assert pooled.valid.all()
    return {
        "base_m": base_m,
        "aug_m": aug_m,
        "seconds": seconds,
        "pois_per_s": points / seconds,
        "peak_mib": peak_rss_mib(),
    }


def read_floor(path: str, size: int) -> float:
    """Seconds to decode the whole raster once, block-aligned, with no pooling: the I/O floor."""
    import rasterio
    from rasterio.windows import Window

    from aether.geo.raster import open_raster, read_pixels

    info = open_raster(path)
    t0 = time.perf_counter()
    with rasterio.open(path, NUM_THREADS="ALL_CPUS") as src:
        for r in range(0, size, 1024):
            for c in range(0, size, 1024):
                read_pixels(src, Window(c, r, min(1024, size - c), min(1024, size - r)), info)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--points", type=int, default=1_000_000)
    parser.add_argument("--case", nargs=2, type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    path = generated_raster(args.size)
    if args.case:
        print(json.dumps(one_case(str(path), args.size, args.points, *args.case)))
        return
    print(f"machine: {machine()}")
    print(
        f"raster: {path.name}, {args.size} x {args.size} x 64 int8, {path.stat().st_size / 2**20:.0f} MiB; "
        f"{args.points:,} POIs"
    )
    results = []
    for base_m, aug_m in ((45.0, 95.0), (500.0, 550.0)):
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--size",
                str(args.size),
                "--points",
                str(args.points),
                "--case",
                str(base_m),
                str(aug_m),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        r = json.loads(out.stdout.strip().splitlines()[-1])
        results.append(r)
        print(
            f"radius {base_m:g} m (views {base_m:g} m + {aug_m:g} m): {r['seconds']:.2f} s, "
            f"{r['pois_per_s']:,.0f} POIs/s, peak memory {r['peak_mib']:.0f} MiB",
            flush=True,
        )
    a, b = (r["pois_per_s"] for r in results)
    print(f"radius 500 m vs 45 m speed: {b / a:.2f} x")
    floor = read_floor(str(path), args.size)
    print(f"I/O floor (decode the raster once, no pooling): {floor:.2f} s = {args.points / floor:,.0f} POIs/s at most")


if __name__ == "__main__":
    main()
