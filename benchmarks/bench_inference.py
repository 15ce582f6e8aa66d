"""Inference benchmark on generated 2048 x 2048 x 64 (and 4096 x 4096) int8 rasters.

Prints, in one run: end-to-end pixels/s with the default options (window pooling,
int8 output, precision auto); the compute floor (the projector alone on in-memory tensors, same
precision); the I/O floor (read the input and write an output of the same shape, no
compute); and peak memory at 2048 and 4096 (each run in a fresh process).

    python benchmarks/bench_inference.py [--sizes 2048 4096]

Targets (2 cores): end-to-end >= 0.6 x the compute floor; peak memory < 1 GiB at both sizes.
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


def checkpoint() -> Path:
    """A checkpoint with the default architecture (64 -> 256 -> 128) and random weights."""
    import torch

    from aether.checkpoint import make_checkpoint
    from aether.config import Config
    from aether.model import AetherModel

    path = OUT / "bench_ckpt.pt"
    if not path.exists():
        torch.manual_seed(0)
        cfg = Config()
        model = AetherModel(64, 384, cfg.model.latent_dim, cfg.model.hidden_dim)
        identity = {"backend": "sentence-transformers", "model": "sentence-transformers/all-MiniLM-L6-v2",
                    "dimensions": None}
        torch.save(make_checkpoint(model, cfg, identity, 384, 0, {}), path)
    return path


def end_to_end(size: int) -> dict:
    from aether.inference import embed_raster

    src = generated_raster(size)
    with tempfile.TemporaryDirectory(dir=OUT) as tmp:
        t0 = time.perf_counter()
        embed_raster(str(src), str(checkpoint()), str(Path(tmp) / "out.tif"), progress=False)
        seconds = time.perf_counter() - t0
    return {"size": size, "seconds": seconds, "px_per_s": size * size / seconds, "peak_mib": peak_rss_mib()}


def compute_floor(precision: str = "auto", n_px: int = 2048 * 2048) -> float:
    """Pixels/s of the projector alone on in-memory unit vectors, (N, 64) -> (N, 128), the faster
    of: as embed_raster runs it (tile_workers threads at once, on a CPU one PyTorch thread each),
    and one call with all of PyTorch's threads."""
    from concurrent.futures import ThreadPoolExecutor

    from aether.inference import AetherEmbedder, tile_workers

    embedder = AetherEmbedder(checkpoint(), precision=precision)
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
    parser.add_argument("--case", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(end_to_end(args.case)))
        return
    print(f"machine: {machine()}")
    checkpoint()
    runs = {}
    for size in args.sizes:
        generated_raster(size)
        out = subprocess.run([sys.executable, __file__, "--case", str(size)], capture_output=True, text=True,
                             check=True)
        runs[size] = json.loads(out.stdout.strip().splitlines()[-1])
        r = runs[size]
        print(f"end-to-end {size} x {size}: {r['seconds']:.2f} s, {r['px_per_s']:,.0f} px/s, "
              f"peak memory {r['peak_mib']:.0f} MiB", flush=True)
    from aether.inference import resolve_precision
    import torch

    default = resolve_precision("auto", torch.device("cpu"))
    floor = compute_floor(default)
    print(f"compute floor (projector alone, default precision {default}): {floor:,.0f} px/s")
    other = "bf16" if default == "fp32" else "fp32"
    print(f"compute floor (projector alone, {other}): {compute_floor(other):,.0f} px/s")
    size = args.sizes[0]
    print(f"I/O floor {size} x {size} (read input, write int8 output, no compute): {io_floor(size):,.0f} px/s")
    print(f"end-to-end / compute floor at {size}: {runs[size]['px_per_s'] / floor:.2f} (target >= 0.6)")


if __name__ == "__main__":
    main()
