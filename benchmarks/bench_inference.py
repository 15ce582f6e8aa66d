"""Inference benchmark on generated 2048 x 2048 x 64 (and 4096 x 4096) int8 rasters, for both
architectures (aether: the paper's projector, the default; mlp).

Prints, in one run: end-to-end pixels/s with the default options (window pooling, int8 output,
precision auto) for each architecture; the compute floor (the projector alone on in-memory
tensors, same precision) of each, and their ratio of time per pixel against their ratio of
matrix work (123,777 / 49,536 weights = 2.5); the I/O floor (read the input and write an output
of the same shape, no compute); and peak memory (each end-to-end run in a fresh process).

    python benchmarks/bench_inference.py [--sizes 2048 4096] [--archs aether mlp]

Targets (2 cores): end-to-end >= 0.6 x the compute floor; peak memory < 1 GiB at both sizes;
the aether projector's time per pixel within 2.5 x the mlp's.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import OUT, generated_raster, machine, peak_rss_mib

ARCHS = ("aether", "mlp")
WORK_RATIO = 123_777 / 49_536  # weights (multiply-adds per pixel) of the aether AE projector over the mlp's


def checkpoint(arch: str = "aether") -> Path:
    """A checkpoint of architecture `arch` (64 bands -> 128, hidden 256) with random weights."""
    import torch

    from aether.checkpoint import make_checkpoint
    from aether.config import Config
    from aether.model import AetherModel

    OUT.mkdir(exist_ok=True)
    path = OUT / f"bench_ckpt_{arch}.pt"
    if not path.exists():
        torch.manual_seed(0)
        cfg = Config()
        cfg.model.arch = arch
        model = AetherModel.from_config(cfg, 64, 384)
        identity = {"backend": "sentence-transformers", "model": "sentence-transformers/all-MiniLM-L6-v2",
                    "dimensions": None}
        torch.save(make_checkpoint(model, cfg, identity, 384, 0, {}), path)
    return path


def end_to_end(size: int, arch: str) -> dict:
    from aether.inference import embed_raster

    src = generated_raster(size)
    with tempfile.TemporaryDirectory(dir=OUT) as tmp:
        t0 = time.perf_counter()
        embed_raster(str(src), str(checkpoint(arch)), str(Path(tmp) / "out.tif"), progress=False)
        seconds = time.perf_counter() - t0
    return {"size": size, "arch": arch, "seconds": seconds, "px_per_s": size * size / seconds,
            "peak_mib": peak_rss_mib()}


def compute_floor(arch: str, precision: str = "auto", n_px: int = 2048 * 2048) -> float:
    """Pixels/s of the projector alone on in-memory unit vectors, (N, 64) -> (N, 128), the faster
    of: as embed_raster runs it (tile_workers threads at once, on a CPU one PyTorch thread each),
    and one call with all of PyTorch's threads."""
    from concurrent.futures import ThreadPoolExecutor

    from aether.embedder import AetherEmbedder
    from aether.inference import tile_workers

    embedder = AetherEmbedder(checkpoint(arch), precision=precision)
    x = np.random.default_rng(0).standard_normal((n_px, 64)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    embedder.project(x[:65536])  # warm-up
    t0 = time.perf_counter()
    embedder.project(x)
    best = n_px / (time.perf_counter() - t0)
    with tile_workers(embedder.device) as workers, ThreadPoolExecutor(workers) as pool:
        parts = np.array_split(x, workers)
        list(pool.map(embedder.project, [p[:65536] for p in parts]))  # warm-up
        t0 = time.perf_counter()
        list(pool.map(embedder.project, parts))
        return max(best, n_px / (time.perf_counter() - t0))


def io_floor(size: int) -> float:
    """Pixels/s to read the input and write a same-shaped int8 output (128 bands), no compute."""
    import rasterio
    from rasterio.windows import Window

    from aether.raster import open_raster, read_pixels

    src_path = generated_raster(size)
    info = open_raster(str(src_path))
    rng = np.random.default_rng(0)
    fake = rng.integers(-127, 128, (128, 512, 512), dtype=np.int8)  # incompressible like real output
    with tempfile.TemporaryDirectory(dir=OUT) as tmp:
        profile = dict(driver="GTiff", width=size, height=size, count=128, dtype="int8", nodata=-128,
                       crs=info.crs, transform=info.transform, tiled=True, blockxsize=256, blockysize=256,
                       compress="zstd", zstd_level=1, interleave="pixel")
        t0 = time.perf_counter()
        with rasterio.open(src_path, NUM_THREADS="ALL_CPUS") as src, rasterio.open(Path(tmp) / "io.tif", "w", **profile) as dst:
            for r in range(0, size, 512):
                for c in range(0, size, 512):
                    read_pixels(src, Window(c, r, 512, 512), info)
                    dst.write(fake, window=Window(c, r, 512, 512))
        return size * size / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--archs", nargs="+", choices=ARCHS, default=list(ARCHS))
    parser.add_argument("--case", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(end_to_end(int(args.case[0]), args.case[1])))
        return
    print(f"machine: {machine()}")
    runs = {}
    for size in args.sizes:
        generated_raster(size)
        for arch in args.archs:
            checkpoint(arch)
            out = subprocess.run([sys.executable, __file__, "--case", str(size), arch], capture_output=True, text=True,
                                 check=True)
            runs[size, arch] = r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"end-to-end {size} x {size}, {arch}: {r['seconds']:.2f} s, {r['px_per_s']:,.0f} px/s, "
                  f"peak memory {r['peak_mib']:.0f} MiB", flush=True)
    from aether.embedder import resolve_precision
    import torch

    default = resolve_precision("auto", torch.device("cpu"))
    other = "bf16" if default == "fp32" else "fp32"
    floors = {}
    for arch in args.archs:
        floors[arch] = compute_floor(arch, default)
        print(f"compute floor, {arch} (projector alone, default precision {default}): {floors[arch]:,.0f} px/s")
        print(f"compute floor, {arch} ({other}): {compute_floor(arch, other):,.0f} px/s", flush=True)
    if set(ARCHS) <= set(floors):
        ratio = floors["mlp"] / floors["aether"]
        print(f"time per pixel, aether / mlp: {ratio:.2f} (matrix work {WORK_RATIO:.2f}; target <= {WORK_RATIO:.2f})")
    size = args.sizes[0]
    print(f"I/O floor {size} x {size} (read input, write int8 output, no compute): {io_floor(size):,.0f} px/s")
    for arch in args.archs:
        print(f"end-to-end / compute floor at {size}, {arch}: {runs[size, arch]['px_per_s'] / floors[arch]:.2f} "
              f"(target >= 0.6)")


if __name__ == "__main__":
    main()
