"""Per-zone features (`aether zonal`) against reading the raster once, in the same run.

    python benchmarks/bench_zonal.py [--size 4096] [--zones 10000] [--h3 9]

The raster: a SIZE x SIZE x 128 int8 AETHER raster, the output of `aether infer --dtype int8` on the
generated smooth AlphaEarth raster of bench_inference.py with its random-weight mlp checkpoint
(made once, cached in benchmarks/out). Each case runs in a fresh process, for its own peak memory:
- read once: every tile decoded and de-quantized to float32 vectors, as zonal reads them;
- polygons: zonal statistics (mean, std, count, coverage) over ZONES Voronoi polygons of random
  points, clipped to the raster (irregular zones of about SIZE^2 / ZONES pixels each);
- H3: the same over the H3 cells of resolution H3 whose centres lie on the raster.
Prints seconds, pixels/s, peak memory, and each zonal case's time over the read-once time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import shapely
from bench_inference import checkpoint
from common import OUT, SMOOTH_NOISE, generated_raster, machine, peak_rss_mib

from aether.geo.gdal import streaming_cache
from aether.geo.raster import open_raster
from aether.geo.zones import Zones, h3_zones
from aether.infer.pipeline import embed_raster
from aether.infer.reader import tile_grid
from aether.infer.spec import EmbedOptions
from aether.infer.zonal import TILE_PX, StoredVectors, ZonalOptions, write_zonal


def aether_raster(size: int) -> Path:
    path = OUT / f"aether_{size}_int8_mlp.tif"
    if not path.exists():
        src = generated_raster(size, noise=SMOOTH_NOISE)
        embed_raster(str(src), str(checkpoint("mlp")), str(path), EmbedOptions(dtype="int8"), progress=False)
    return path


def voronoi_zones(info, n: int, seed: int = 0) -> Zones:
    from pyproj import CRS

    left, top = info.transform.c, info.transform.f
    right, bottom = left + info.width * info.transform.a, top + info.height * info.transform.e
    rng = np.random.default_rng(seed)
    points = shapely.points(rng.uniform(left, right, n), rng.uniform(bottom, top, n))
    frame = shapely.box(left, bottom, right, top)
    cells = shapely.get_parts(shapely.voronoi_polygons(shapely.multipoints(points), extend_to=frame))
    cells = shapely.intersection(cells, frame)
    crs = CRS.from_user_input(info.crs)
    return Zones(np.arange(len(cells)), "zone_id", cells, crs, cells)


def case(name: str, raster: Path, zones: int, h3: int) -> dict:
    info = open_raster(str(raster), None)
    source = StoredVectors(info)
    t0 = time.perf_counter()
    if name == "read once":
        with streaming_cache():  # GDAL's cache as zonal keeps it
            for _ in source.tiles(tile_grid(info, TILE_PX)):
                pass
        n_zones = 0
    else:
        z = voronoi_zones(info, zones) if name == "polygons" else h3_zones(info, h3)
        t0 = time.perf_counter()  # the zones are made by the benchmark, not counted
        out = OUT / f"zonal_{name.replace(' ', '_')}.parquet"
        write_zonal(source, z, out, ZonalOptions(), progress=False)
        n_zones = len(z)
        out.unlink()
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "zones": n_zones, "px_s": info.width * info.height / seconds, "peak": peak_rss_mib()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--zones", type=int, default=10_000)
    parser.add_argument("--h3", type=int, default=9)
    parser.add_argument("--case", help=argparse.SUPPRESS)  # one case, in a child process
    args = parser.parse_args()
    raster = aether_raster(args.size)
    if args.case:
        print(json.dumps(case(args.case, raster, args.zones, args.h3)))
        return
    print(f"machine: {machine()}")
    print(f"raster: {args.size} x {args.size} x 128 int8 AETHER ({raster.stat().st_size / 2**20:,.0f} MiB on disk)")
    results = {}
    for name in ("read once", "polygons", "H3"):
        done = subprocess.run(
            [sys.executable, __file__, "--size", str(args.size), "--zones", str(args.zones), "--h3", str(args.h3),
             "--case", name],
            capture_output=True, text=True, cwd=Path(__file__).parent,
        )  # fmt: skip
        if done.returncode != 0:
            sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
        r = results[name] = json.loads(done.stdout.strip().splitlines()[-1])
        label = f"{name} ({r['zones']:,} zones)" if r["zones"] else name
        ratio = f", {r['seconds'] / results['read once']['seconds']:.2f} x read once" if r["zones"] else ""
        print(f"  {label}: {r['seconds']:.1f} s, {r['px_s']:,.0f} px/s, peak memory {r['peak']:,.0f} MiB{ratio}")


if __name__ == "__main__":
    main()
