"""Scale-out benchmark: inference over 8 generated tiles with 1 and with 2 Dask workers.

The 8 tiles (1024 x 512 px x 64 bands, int8, EPSG:32635) are cut from the generated
2048 x 2048 raster of bench_inference.py and cached in benchmarks/out. Prints, in one run:
the time in this process without Dask, with a local cluster of 1 worker (all cores' threads)
and of 2 workers (the cores split between them), the speed-up of 2 workers over 1, the
cluster start-up time, and an estimate for a country-sized set of full 8192 x 8192 tiles.

    python benchmarks/bench_scale.py [--country-tiles 60] [--workers 1 2]

60 tiles is a country the size of Finland (338,000 km^2; one 8192 x 8192 tile at 10 m covers
82 x 82 km, and tiles of neighbouring UTM zones overlap).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import rasterio
from common import OUT, generated_raster, machine
from rasterio.windows import Window

from aether.core.cluster import Cluster

TILE_W, TILE_H = 1024, 512
FULL_TILE_PX = 8192 * 8192


def tiles() -> list[Path]:
    """8 tiles that cover the generated 2048 x 2048 raster, each its own GeoTIFF (as Google ships)."""
    folder = OUT / "tiles8"
    paths = [folder / f"tile_{r}_{c}.tif" for r in range(4) for c in range(2)]
    if all(p.exists() for p in paths):
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    with rasterio.open(generated_raster(2048)) as src:
        for path in paths:
            r, c = (int(v) for v in path.stem.split("_")[1:])
            window = Window(c * TILE_W, r * TILE_H, TILE_W, TILE_H)
            profile = dict(src.profile, width=TILE_W, height=TILE_H, transform=src.window_transform(window))
            with rasterio.open(path, "w", **profile) as dst:
                dst.write(src.read(window=window))
                dst.descriptions = src.descriptions
    return paths


def run(spec: str, ckpt: Path, workers: int | None) -> dict:
    from aether.core.cluster import dask_client
    from aether.infer.at_scale import embed_at_scale

    with tempfile.TemporaryDirectory(dir=OUT) as tmp:
        t0 = time.perf_counter()
        if workers is None:
            embed_at_scale(spec, str(ckpt), str(Path(tmp) / "out"), progress=False)
            start_s = 0.0
        else:
            with dask_client(Cluster(workers=workers)) as client:
                start_s = time.perf_counter() - t0
                t1 = time.perf_counter()
                embed_at_scale(
                    spec,
                    str(ckpt),
                    str(Path(tmp) / "out"),
                    progress=False,
                    cluster=Cluster(scheduler=client.scheduler.address),
                )
                work_s = time.perf_counter() - t1
            return {"workers": workers, "start_s": start_s, "work_s": work_s}
        return {"workers": 0, "start_s": start_s, "work_s": time.perf_counter() - t0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument(
        "--country-tiles",
        type=int,
        default=60,
        help="full 8192 x 8192 tiles in the country-sized estimate (default 60, about Finland)",
    )
    args = parser.parse_args()
    from bench_inference import checkpoint

    paths = tiles()
    spec = str(paths[0].parent / "tile_*.tif")
    ckpt = checkpoint()
    n_px = len(paths) * TILE_W * TILE_H
    print(f"machine: {machine()}")
    print(
        f"{len(paths)} tiles of {TILE_W} x {TILE_H} px x 64 bands (int8), {n_px / 1e6:.1f} Mpx in all; "
        f"default options (window pooling, int8 output)"
    )
    results = [run(spec, ckpt, None)] + [run(spec, ckpt, w) for w in args.workers]
    for r in results:
        label = "no Dask (this process)" if r["workers"] == 0 else f"{r['workers']} Dask worker(s)"
        print(
            f"  {label:>24}: {r['work_s']:6.1f} s for the tiles ({n_px / r['work_s']:,.0f} px/s)"
            + (f", cluster start {r['start_s']:.1f} s" if r["workers"] else "")
        )
    by_workers = {r["workers"]: r for r in results}
    if 1 in by_workers and 2 in by_workers:
        print(f"speed-up, 2 workers over 1: {by_workers[1]['work_s'] / by_workers[2]['work_s']:.2f} x")
    best = min(results, key=lambda r: r["work_s"])
    rate = n_px / best["work_s"]  # px/s of one such machine
    hours = args.country_tiles * FULL_TILE_PX / rate / 3600
    print(
        f"estimate: {args.country_tiles} full 8192 x 8192 tiles at {rate:,.0f} px/s per machine like this one: "
        f"{hours:.1f} h on 1 machine, {hours / 8:.1f} h on 8, {hours / 32 * 60:.0f} min on 32 "
        f"(tiles are independent tasks; ignores download time)"
    )


if __name__ == "__main__":
    main()
