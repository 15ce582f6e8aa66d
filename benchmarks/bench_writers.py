"""Output writers: AETHER's block writer against GDAL's own routes, on the same AETHER tiles.

Each route writes a SIZE x SIZE x 128 AETHER raster of 512 px tiles (int16 by default, inference's
default output) with AETHER's creation options (ZSTD level 1, 256 px blocks, horizontal predictor
for int16) and the same number of compression threads (benchmarks/writers.py says how):
- block writer: aether.geo.blocks, what inference and fetch use;
- GDAL once: one GTiff opened for writing once, GDAL's NUM_THREADS and ZSTD_LEVEL;
- GDAL bands + VRT + copy: what a Dask run does with one raster: a GeoTIFF per band of 1,024
  rows, a VRT, one copy into a GTiff, or into a COG with overviews (`--cog`).

Prints, for the machine it runs on:
- speed: seconds and pixels/s of each route, its peak memory, output size and disk use at peak, and
  whether its output equals the tiles it was given;
- resume: each route killed (SIGKILL) once half its tiles are written, then run again: what the
  killed run left, how many tiles the rerun wrote, its seconds, and whether the result is whole.

The tiles are real AETHER output: the 2048 x 2048 smooth input of bench_inference.py embedded with
its random-weight checkpoint (cached in benchmarks/out), its 16 tiles repeated to fill SIZE.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import rasterio
from bench_inference import checkpoint
from common import OUT, SMOOTH_NOISE, generated_raster, machine, peak_rss_mib
from rasterio.transform import from_origin
from rasterio.windows import Window
from writers import ROUTES

from aether.core.journal import partial_paths
from aether.geo.layout import geotiff_layout
from aether.infer.pipeline import embed_raster
from aether.infer.spec import TILE_PX, EmbedOptions

SOURCE_PX = 2048


def source_tiles(dtype: str) -> list[np.ndarray]:
    """The (512, 512, 128) tiles of a real AETHER output in `dtype` (made once, cached)."""
    path = OUT / f"aether_{SOURCE_PX}_{dtype}.tif"
    if not path.exists():
        src = generated_raster(SOURCE_PX, noise=SMOOTH_NOISE)
        embed_raster(str(src), str(checkpoint("aether")), str(path), EmbedOptions(dtype=dtype), progress=False)
    with rasterio.open(path) as src:
        return [
            np.moveaxis(src.read(window=Window(c, r, TILE_PX, TILE_PX)), 0, -1)
            for r in range(0, SOURCE_PX, TILE_PX)
            for c in range(0, SOURCE_PX, TILE_PX)
        ]


def layout(size: int, dtype: str) -> tuple[dict, list[tuple[int, int, int, int]]]:
    profile = dict(
        driver="GTiff",
        width=size,
        height=size,
        count=128,
        dtype=dtype,
        nodata={"int8": -128, "int16": -32768}.get(dtype),
        crs="EPSG:32635",
        transform=from_origin(380000.0, 6690000.0, 10.0, 10.0),
        **geotiff_layout(dtype, 256),
    )
    tiles = [(r, c, TILE_PX, TILE_PX) for r in range(0, size, TILE_PX) for c in range(0, size, TILE_PX)]
    return profile, tiles


def disk_use(folder: Path) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total


class PeakDisk:
    """The most bytes on disk under `folder` while the block runs (sampled every 0.2 s)."""

    def __init__(self, folder: Path):
        self.folder, self.peak, self.stop = folder, 0, threading.Event()

    def __enter__(self):
        def sample():
            while not self.stop.wait(0.2):
                self.peak = max(self.peak, disk_use(self.folder))

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, disk_use(self.folder))


def whole(out: Path, tiles, block_of) -> str:
    """'equal' when `out` holds every tile as given, or what differs."""
    try:
        with rasterio.open(out) as src:
            for i, (row0, col0, height, width) in enumerate(tiles):
                got = np.moveaxis(src.read(window=Window(col0, row0, width, height)), 0, -1)
                if not np.array_equal(got, block_of(i)):
                    return f"tile {i} differs"
    except rasterio.errors.RasterioIOError as exc:
        return f"does not open ({str(exc).splitlines()[0][:80]})"
    return "equal"


def left_after_kill(out: Path, tiles, block_of) -> str:
    """What a killed run left on disk that a rerun can use."""
    part_dir = out.with_name(out.name + ".parts")
    if part_dir.exists():
        return f"{len(list(part_dir.glob('*.tif')))} finished band files"
    partial, journal = partial_paths(out)
    if journal.exists():
        recorded = len(json.loads(journal.read_text())["done"])
        return f"a partial file and a journal recording {recorded} tiles (journaled every 5 s)"
    partial = out.with_name(out.name + ".partial.tif")
    try:
        with rasterio.open(partial) as src:
            intact = sum(
                np.array_equal(np.moveaxis(src.read(window=Window(c, r, w, h)), 0, -1), block_of(i))
                for i, (r, c, h, w) in enumerate(tiles)
            )
        return f"a partial GeoTIFF that opens, {intact} tiles in it intact but none known to be"
    except rasterio.errors.RasterioIOError as exc:
        return f"a partial file that does not open ({str(exc).splitlines()[0][:60]})"


def child(route: str, out: Path, size: int, dtype: str, threads: int) -> None:
    """Run `route`, printing each finished tile's index, then its seconds, peak memory and the
    tiles it wrote (the parent may kill this process first)."""
    blocks = source_tiles(dtype)
    profile, tiles = layout(size, dtype)
    t0 = time.perf_counter()
    written = ROUTES[route](
        out, tiles, lambda i: blocks[i % len(blocks)], profile, threads, lambda i: print(i, flush=True)
    )
    print(f"done {time.perf_counter() - t0} {peak_rss_mib()} {written}", flush=True)


def run_child(args, route: str, out: Path, kill_after: int | None = None) -> dict:
    """`route` in a fresh process: killed with SIGKILL once `kill_after` tiles are written, or
    after --timeout seconds; what it printed."""
    command = [sys.executable, __file__, "--size", str(args.size), "--dtype", args.dtype]
    command += ["--threads", str(args.threads), "--child", route, str(out)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parent)
    timer = threading.Timer(args.timeout, proc.kill)
    timer.start()
    result = {"tiles": 0}
    try:
        for line in proc.stdout:
            if line.startswith("done"):
                _, seconds, peak, written = line.split()
                result.update(seconds=float(seconds), peak_mib=float(peak), written=int(written))
            elif line.strip().isdigit():
                result["tiles"] += 1
                if result["tiles"] == kill_after:
                    proc.send_signal(signal.SIGKILL)
                    break
        proc.wait()
    finally:
        timer.cancel()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096, help="output side in pixels (a multiple of 512)")
    parser.add_argument("--dtype", default="int16", choices=["int8", "int16", "float32"])
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="compression threads")
    parser.add_argument("--routes", nargs="+", choices=list(ROUTES), default=list(ROUTES))
    parser.add_argument("--timeout", type=float, default=600, help="seconds a run may take before it is stopped")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], Path(args.child[1]), args.size, args.dtype, args.threads)
        return
    print(f"machine: {machine()}; GDAL {rasterio.__gdal_version__}, rasterio {rasterio.__version__}")
    blocks = source_tiles(args.dtype)
    profile, tiles = layout(args.size, args.dtype)
    raw = args.size * args.size * 128 * np.dtype(args.dtype).itemsize
    print(
        f"{args.size} x {args.size} x 128 {args.dtype} ({raw / 2**20:,.0f} MiB raw), {len(tiles)} tiles of "
        f"{TILE_PX} px, {args.threads} compression threads; each run in a fresh process, which holds the "
        f"{len(blocks)} source tiles ({sum(b.nbytes for b in blocks) / 2**20:,.0f} MiB of its memory)",
        flush=True,
    )

    def block_of(i: int) -> np.ndarray:
        return blocks[i % len(blocks)]

    print("speed:")
    for name in args.routes:
        with tempfile.TemporaryDirectory(dir=OUT) as tmp:
            out = Path(tmp) / "out.tif"
            with PeakDisk(Path(tmp)) as disk:
                r = run_child(args, name, out)
            if "seconds" not in r:
                print(f"    {name}: stopped after {args.timeout:.0f} s ({r['tiles']} tiles written)", flush=True)
                continue
            print(
                f"    {name}: {r['seconds']:.1f} s, {args.size**2 / r['seconds']:,.0f} px/s, peak memory "
                f"{r['peak_mib']:,.0f} MiB, output {out.stat().st_size / 2**20:,.0f} MiB, disk at peak "
                f"{disk.peak / 2**20:,.0f} MiB; output {whole(out, tiles, block_of)}",
                flush=True,
            )
    print("resume after SIGKILL at half the tiles:")
    for name in args.routes:
        with tempfile.TemporaryDirectory(dir=OUT) as tmp:
            out = Path(tmp) / "out.tif"
            killed = run_child(args, name, out, kill_after=len(tiles) // 2)
            left = left_after_kill(out, tiles, block_of)
            r = run_child(args, name, out)
            if "seconds" not in r:
                print(f"    {name}: left {left}; the rerun stopped after {args.timeout:.0f} s", flush=True)
                continue
            print(
                f"    {name}: killed after {killed['tiles']} of {len(tiles)} tiles, left {left}; the rerun wrote "
                f"{r['written']} tiles in {r['seconds']:.1f} s; output {whole(out, tiles, block_of)}",
                flush=True,
            )


if __name__ == "__main__":
    main()
