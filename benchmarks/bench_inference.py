"""Inference benchmark: generated N x N x 64 int8 AlphaEarth rasters (spatially smooth, so the
output compresses as real AETHER rasters do) to int8 AETHER rasters (AlphaEarth's encoding, the
one output type every checkout can write), on one device.

Prints, in one run, for the machine it runs on:
- end to end with the default options (window pooling, int8 output, precision auto), each in a
  fresh process: seconds, pixels/s, peak host memory (and GPU memory on CUDA), and the
  CPU-seconds of each stage (decode, pool, project, quantize, encode, write) summed over threads;
- with `--baseline DIR` (another checkout, e.g. `git worktree add /tmp/base <commit>`) the same
  end-to-end case run by that checkout's code, for a same-run comparison;
- the compute floor: pooling-free projection and quantization of unit vectors already on the
  device, and the same from host arrays (transfers included);
- the I/O floor: decode the input and compress and write an output of the same shape and
  compressibility, with the thread counts the pipeline uses, no compute.

    python benchmarks/bench_inference.py [--device auto|cpu|cuda] [--sizes 2048 4096 8192]
        [--archs aether mlp] [--baseline DIR]

Targets: on one H200 with 16 cores, >= 10 M px/s end to end at 4096 (or within 1.3 x of the
I/O floor where that binds), >= 4 M px/s on its 16 cores; host memory < 2 GiB at 4096 and 8192;
on 2 cores, no slower than the baseline commit in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import OUT, SMOOTH_NOISE, generated_raster, machine, peak_rss_mib

ARCHS = ("aether", "mlp")
STAGES = ("decode", "pool", "project", "quantize", "encode", "write")


def checkpoint(arch: str = "aether") -> Path:
    """A checkpoint of architecture `arch` (64 bands -> 128, hidden 256) with random weights."""
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"bench_ckpt_{arch}.pt"
    if not path.exists():  # made by this checkout's code (main() makes it before any baseline case runs)
        import torch

        from aether.config.schema import Config
        from aether.model.architectures import AetherModel
        from aether.model.checkpoint import Checkpoint, TextSpec

        torch.manual_seed(0)
        cfg = Config()
        cfg.model.arch = arch
        model = AetherModel.from_config(cfg, 64, 384)
        text = TextSpec("sentence-transformers", "sentence-transformers/all-MiniLM-L6-v2", None, 384)
        Checkpoint.of(model, cfg, text, 0, {}).save(path)
    return path


def process_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def end_to_end(size: int, arch: str, device: str) -> dict:
    """One default run of `embed_raster` (int8 output), in this (fresh) process."""
    import torch

    try:
        from aether.infer.pipeline import embed_raster
        from aether.infer.spec import EmbedOptions

        def embed(src, ckpt, out):
            return embed_raster(src, ckpt, out, EmbedOptions(dtype="int8", device=device), progress=False)
    except ImportError:  # a baseline checkout from before the package's rooms and EmbedOptions
        from aether.inference import embed_raster

        def embed(src, ckpt, out):
            return embed_raster(src, ckpt, out, dtype="int8", device=device, progress=False)

    src, ckpt = generated_raster(size, noise=SMOOTH_NOISE), checkpoint(arch)
    try:
        from aether.core.stages import measure
    except ImportError:  # a baseline checkout from before the package's rooms
        from aether.stages import measure
    with tempfile.TemporaryDirectory(dir=OUT) as tmp:
        cpu0, t0 = process_cpu_s(), time.perf_counter()
        with measure() as stages:
            out = embed(str(src), str(ckpt), str(Path(tmp) / "out.tif"))
        seconds = time.perf_counter() - t0
        result = {
            "size": size,
            "arch": arch,
            "seconds": seconds,
            "px_per_s": size * size / seconds,
            "peak_mib": peak_rss_mib(),
            "cpu_s": process_cpu_s() - cpu0,
            "stages": dict(stages or {}),
            "output_mib": Path(out).stat().st_size / 2**20,
        }
    if torch.cuda.is_available() and device != "cpu":
        result["gpu_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def run_case(size: int, arch: str, device: str, code: Path | None = None) -> dict:
    """`end_to_end` in a fresh process, with this checkout's code or that of `code`."""
    env = dict(os.environ)
    if code is not None:
        env["AETHER_BENCH_CODE"] = str(code)
    out = subprocess.run(
        [sys.executable, __file__, "--case", str(size), arch, device], capture_output=True, text=True, env=env
    )
    if out.returncode:
        raise SystemExit(f"the {size} x {size} {arch} case failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def compute_floor(arch: str, device: str, n_px: int = 2048 * 2048) -> tuple[float, float]:
    """Pixels/s of projection and int8 quantization alone: (vectors already on the device, from
    host arrays with the transfers). On a CPU both run as the pipeline does, one tile per thread."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from aether.infer.pipeline import tile_workers
    from aether.model.projector import Projector, encode_latent

    projector = Projector(checkpoint(arch), device=device)
    x = np.random.default_rng(0).standard_normal((n_px, 64)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    with tile_workers(projector.device, 512, "int8") as threads:
        parts = np.array_split(x, max(threads.compute, 1) if projector.device.type == "cpu" else 1)

        def on_device(part: torch.Tensor) -> None:
            encode_latent(projector.project_on_device(part), "int8")

        resident = [torch.from_numpy(p).to(projector.device) for p in parts]
        timings = []
        for work, inputs in ((on_device, resident), (lambda p: projector.project_pixels(p, "int8"), parts)):
            with ThreadPoolExecutor(len(parts)) as pool:
                list(pool.map(work, [p[:65536] for p in inputs]))  # warm-up
                if projector.device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                list(pool.map(work, inputs))
                if projector.device.type == "cuda":
                    torch.cuda.synchronize()
                timings.append(n_px / (time.perf_counter() - t0))
    return timings[0], timings[1]


def io_floor(size: int, device: str) -> float:
    """Pixels/s to decode the input and compress and write an int8 output of 128 bands, tile by
    tile with the pipeline's reader and writer threads, no compute. The output is a real AETHER
    tile's block repeated, so it compresses as real output does."""
    from aether.core.pipeline import run_pipeline
    from aether.geo.blocks import BlockFile, create_sparse
    from aether.geo.layout import ZSTD_LEVEL, geotiff_layout
    from aether.geo.raster import open_raster
    from aether.infer.pipeline import tile_workers
    from aether.infer.reader import PooledTileReader, tile_grid
    from aether.infer.spec import TILE_PX
    from aether.model.devices import pick_device
    from aether.model.projector import Projector

    info = open_raster(str(generated_raster(size, noise=SMOOTH_NOISE)))
    projector = Projector(checkpoint("aether"), device="cpu")
    reader = PooledTileReader(info, projector, "window")
    tiles = tile_grid(info, TILE_PX)
    ((_, first),) = list(reader.produce(tiles[:1]))
    sample = reader.block(first, "int8")
    with tempfile.TemporaryDirectory(dir=OUT) as tmp, tile_workers(pick_device(device), TILE_PX, "int8") as threads:
        path = Path(tmp) / "io.tif"
        create_sparse(
            path,
            dict(
                driver="GTiff",
                width=size,
                height=size,
                count=128,
                dtype="int8",
                nodata=-128,
                crs=info.crs,
                transform=info.transform,
                **geotiff_layout("int8", 256),
            ),
            [f"E{i:03d}" for i in range(128)],
            {},
        )
        out = BlockFile(path, ZSTD_LEVEL, threads.compress)
        t0 = time.perf_counter()
        run_pipeline(
            lambda: reader.produce(tiles, threads.read),
            lambda tile, data: sample[: tile.height, : tile.width],
            lambda tile, block: out.write(block, tile.row0, tile.col0),
        )
        out.close()
        return size * size / (time.perf_counter() - t0)


def stage_line(r: dict) -> str:
    stages = r.get("stages") or {}
    if not stages:
        return "CPU-s by stage: not counted by this code"
    parts = ", ".join(f"{name} {stages.get(name, 0.0):.1f}" for name in STAGES)
    return f"CPU-s by stage: {parts}; all threads {r['cpu_s']:.1f}"


def describe_device(device: str) -> str:
    import torch

    from aether.model.devices import pick_device

    d = pick_device(device)
    if d.type == "cuda":
        return f"{torch.cuda.get_device_name(d)} (CUDA {torch.version.cuda}), PyTorch {torch.__version__}"
    return f"CPU, {torch.get_num_threads()} PyTorch threads, PyTorch {torch.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--archs", nargs="+", choices=ARCHS, default=list(ARCHS))
    parser.add_argument("--baseline", type=Path, help="another checkout whose code runs the same end-to-end cases")
    parser.add_argument("--case", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(end_to_end(int(args.case[0]), args.case[1], args.case[2])))
        return
    print(f"machine: {machine()}")
    print(f"device: {describe_device(args.device)}", flush=True)
    runs = {}
    for size in args.sizes:
        src = generated_raster(size, noise=SMOOTH_NOISE)
        print(
            f"input {size} x {size}: {src.stat().st_size / 2**20:,.0f} MiB "
            f"({src.stat().st_size / (size * size * 64):.0%} of its raw size)",
            flush=True,
        )
        for arch in args.archs:
            checkpoint(arch)
            runs[size, arch] = r = run_case(size, arch, args.device)
            gpu = f", GPU memory {r['gpu_peak_mib']:,.0f} MiB" if "gpu_peak_mib" in r else ""
            print(
                f"end to end {size} x {size}, {arch}: {r['seconds']:.2f} s, {r['px_per_s']:,.0f} px/s, "
                f"peak host memory {r['peak_mib']:,.0f} MiB{gpu}, output {r['output_mib']:,.0f} MiB",
                flush=True,
            )
            print(f"    {stage_line(r)}", flush=True)
            if args.baseline is not None:
                b = run_case(size, arch, args.device, args.baseline.resolve())
                print(
                    f"    baseline {args.baseline}: {b['seconds']:.2f} s, {b['px_per_s']:,.0f} px/s, peak "
                    f"{b['peak_mib']:,.0f} MiB, output {b['output_mib']:,.0f} MiB; this code / baseline: "
                    f"{r['px_per_s'] / b['px_per_s']:.2f} x",
                    flush=True,
                )
    floors = {}
    for arch in args.archs:
        resident, host = floors[arch] = compute_floor(arch, args.device)
        print(
            f"compute floor, {arch} (project + quantize): {resident:,.0f} px/s on device-resident vectors, "
            f"{host:,.0f} px/s from host arrays",
            flush=True,
        )
    for size in args.sizes:
        io = io_floor(size, args.device)
        print(f"I/O floor {size} x {size} (decode, compress and write with the pipeline's threads): {io:,.0f} px/s")
        for arch in args.archs:
            floor = min(io, floors[arch][1])
            print(f"    {arch}: end to end / lower floor = {runs[size, arch]['px_per_s'] / floor:.2f}")


if __name__ == "__main__":
    main()
