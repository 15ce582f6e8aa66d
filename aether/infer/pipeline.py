"""Raster inference: stream an AlphaEarth raster through the trained AE projector.

By default every output pixel sees what the projector saw in training: the
nodata-masked, renormalised mean over the base-view window (ground radius from the
checkpoint), computed per tile with a halo so seams cannot appear. Reading, computing
and writing overlap in a three-stage pipeline, and memory is bounded by the tile.
The projector is aether.model.projector's, the resume journal aether.core.journal's, and the Dask
fan-out over tiles or bands of rows lives in aether.infer.at_scale.
"""
from __future__ import annotations

import contextlib
import json
import os
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
import torch
from affine import Affine
from rasterio.windows import Window
from tqdm.auto import tqdm

from aether.core.runtime import keep_tile_buffers
from aether.geo.alphaearth import MAX_ABS_VALUE, NODATA_INT8, NODATA_INT16, band_names
from aether.geo.blocks import create_sparse
from aether.core.log import log
from aether.model.devices import thread_budget
from aether.model.projector import AetherEmbedder, unit_rows
from aether.core.errors import AetherError
from aether.core.files import (
    check_inputs_kept,
    output_lock,
    raise_if_disk_full,
    temp_file_beside,
)
from aether.geo.pooling import window_means
from aether.geo.raster import (
    ZSTD_LEVEL,
    RasterInfo,
    content_identity,
    decode_pixels,
    geotiff_layout,
    implausible_pixels,
    invalid_pixels,
    open_raster,
    output_block_px,
    raster_files,
    raster_tag,
    read_bands,
)
from aether.geo.resumable import ResumableOutput
from aether.core.stages import stage
from aether.core.pipeline import run_pipeline

OUTPUT_DTYPES = ("int8", "int16", "float16", "float32")
NODATA = {"int8": NODATA_INT8, "int16": NODATA_INT16, "float16": float("nan"), "float32": float("nan")}
ENCODINGS = {"int8": "AlphaEarth int8: value = sign(q) * (q / 127.5)**2, nodata -128, unit vectors",
             "int16": "AETHER int16: value = q / 32767, nodata -32768, unit vectors"}
POOLINGS = ("window", "pixel")
TILE_PX = 512
MAX_TILE_PX = 4096  # largest --tile: a 4,096-pixel int8 tile is 1 GiB in and 2 GiB out, and several are in flight
STRIP_PX = 32768  # pixels of a tile pooled and projected at a time (8 MiB of float32 means)
GDAL_CACHE_MB = 64
CHECKPOINT_S = 5.0  # how often finished tiles are made durable for --resume
OUTPUT_LAYOUT = 3  # of tiles and blocks in the partial output: 2 = bottom-up rasters tiled from the north, blocks
# written by aether.geo.blocks; 3 = each journaled block's checksum (a partial output of another layout is not resumed)


@dataclass(frozen=True)
class Tile:
    index: int
    row0: int  # input array row of the tile's first row
    col0: int
    height: int
    width: int


def tile_grid(info: RasterInfo, tile_px: int, rows: tuple[int, int] | None = None) -> list[Tile]:
    """The raster (or its rows rows[0]:rows[1], a multiple of `tile_px` apart from the raster's end)
    cut into tiles of `tile_px`, smaller at the right and bottom edges, row by row. The tiles of a
    band of rows are the raster's own tiles there, so a band computes exactly what a whole run does.
    A bottom-up raster is cut from its northern end (its last rows), so that every tile starts on a
    block of the north-up output."""
    r_start, r_stop = rows if rows is not None else (0, info.height)
    if info.bottom_up:
        bands = [(max(r_start, r - tile_px), r) for r in range(r_stop, r_start, -tile_px)]
    else:
        bands = [(r, min(r + tile_px, r_stop)) for r in range(r_start, r_stop, tile_px)]
    origins = [(r0, r1, c) for r0, r1 in bands for c in range(0, info.width, tile_px)]
    return [Tile(i, r0, c, r1 - r0, min(tile_px, info.width - c)) for i, (r0, r1, c) in enumerate(origins)]


class PooledTileReader:
    """Reads tiles with the halo that window pooling needs, and pools and projects them."""

    def __init__(self, info: RasterInfo, embedder: AetherEmbedder, pooling: str):
        if pooling not in POOLINGS:
            raise AetherError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        self.info, self.embedder, self.pooling = info, embedder, pooling
        if pooling == "window":
            lat = None
            if info.is_geographic:
                lat = info.xy(np.arange(info.height), np.zeros(info.height, dtype=np.int64))[1]
            info.check_window(embedder.base_radius_m, lat, fix="use --pooling pixel")
            rx, ry = info.radius_px(embedder.base_radius_m, lat)
            self.rx = np.broadcast_to(rx, (info.height,))
            self.ry = np.broadcast_to(ry, (info.height,))
        else:
            self.rx = self.ry = np.zeros(info.height, dtype=np.int64)
        self.implausible = 0  # pixels of the tiles read holding values no embedding has (`implausible_pixels`)

    def produce(self, tiles: list[Tile], readers: int = 1):
        """(tile, data) for each tile, in order; `readers` threads decode tiles at once, each
        with its own dataset handle (GDAL releases the GIL while it decodes)."""
        local, handles = threading.local(), []

        def read(tile: Tile):
            src = getattr(local, "src", None)
            if src is None:  # a GDAL dataset is used by one thread at a time
                src = local.src = rasterio.open(self.info.path)
                handles.append(src)
            rows = slice(tile.row0, tile.row0 + tile.height)
            hx, hy = int(self.rx[rows].max()), int(self.ry[rows].max())
            with stage("decode"):
                bands = _read_with_halo(src, self.info, tile, hx, hy)
            odd = implausible_pixels(bands[:, hy:hy + tile.height, hx:hx + tile.width], self.info, axis=0)
            return (bands, self.rx[rows], self.ry[rows], hx, hy), odd  # odd: the tile's own, each pixel once

        pool = ThreadPoolExecutor(max_workers=readers, thread_name_prefix="read")
        pending: deque = deque()
        try:
            for tile in tiles:
                pending.append((tile, pool.submit(read, tile)))
                if len(pending) > readers:
                    yield self._take(*pending.popleft())
            while pending:
                yield self._take(*pending.popleft())
        finally:
            for _, future in pending:
                future.cancel()
            pool.shutdown(wait=True)
            for src in handles:
                src.close()

    def _take(self, tile: Tile, future) -> tuple[Tile, tuple]:
        data, odd = future.result()
        self.implausible += odd
        return tile, data

    def report_implausible(self) -> None:
        """One line saying how many pixels read held values no embedding has, if any did."""
        if self.implausible:
            log(f"raster {self.info.path}: {self.implausible:,} pixels hold values no AlphaEarth vector has "
                f"(beyond +-{MAX_ABS_VALUE:g}, or infinite); they count as nodata")

    def pooled(self, data, strip_px: int | None = None):
        """(start, stop, means, valid) for the rows start:stop of one tile, `strip_px` pixels at a
        time (all rows when None): (rows, w, bands) unit vectors (zeros where invalid) and the
        (rows, w) valid mask."""
        bands, rx_rows, ry_rows, hx, hy = data
        height, width = bands.shape[1] - 2 * hy, bands.shape[2] - 2 * hx
        step = height if strip_px is None else max(1, strip_px // width)
        for start in range(0, height, step):
            stop = min(height, start + step)
            with stage("pool"):
                if self.pooling == "window":  # the strip's own summed-area tables: a few MiB, not the tile's ~70
                    means, valid = window_means(bands[:, start:stop + 2 * hy], self.info, rx_rows[start:stop],
                                                ry_rows[start:stop], hx, hy)
                else:
                    pixels = bands[:, start:stop].transpose(1, 2, 0)
                    valid = ~invalid_pixels(pixels, self.info)
                    means = unit_rows(decode_pixels(pixels, ~valid, self.info))
            yield start, stop, means, valid

    def latent(self, data) -> tuple[torch.Tensor, np.ndarray]:
        """(latent, h * w) AETHER vectors (zeros where invalid) and the flat valid mask of one tile."""
        _, _, means, valid = next(self.pooled(data))
        return _latent_tile(self.embedder, means, valid), valid.reshape(-1)

    def block(self, data, dtype: str) -> np.ndarray:
        """The (h, w, latent) output block of one tile in `dtype`, nodata where invalid: pixel-major,
        as a pixel-interleaved GeoTIFF stores it. A strip of rows is pooled and projected at a
        time, so the tile's float32 means are never all held."""
        bands, _, _, hx, hy = data
        height, width = bands.shape[1] - 2 * hy, bands.shape[2] - 2 * hx
        block = torch.empty((height * width, self.embedder.latent_dim), dtype=getattr(torch, dtype))
        for start, stop, means, valid in self.pooled(data, STRIP_PX):
            rows = block[start * width:stop * width]
            _latent_tile(self.embedder, means, valid, dtype, out=rows, band_major=False)
            invalid = torch.from_numpy(~valid.reshape(-1))
            if invalid.any():
                rows[invalid] = NODATA[dtype]
        return block.numpy().reshape(height, width, -1)


def tile_computer(reader: PooledTileReader):
    """What computes a tile's output block (`block(data, dtype)`): on a GPU the torch path
    (`aether.infer.device_tiles`: pooling, projection and quantization on the device), on a CPU the
    NumPy pooling with the projector (as fast or faster there: measured in the README)."""
    if reader.embedder.device.type == "cpu":
        return reader.block
    from aether.infer.device_tiles import DeviceTileComputer

    return DeviceTileComputer(reader.embedder, reader.info, reader.pooling).block


class _TileWriter:
    """Writes finished tiles north-up into the output (`aether.geo.resumable.ResumableOutput`: compressed at
    the output's own level, made durable and journaled for a resume). `first_row` is the north-up
    input row of the output's first row (0 unless it is a band)."""

    def __init__(self, output: ResumableOutput, info: RasterInfo, bar, first_row: int = 0):
        self.output, self.info, self.first_row, self.bar = output, info, first_row, bar

    def __call__(self, tile: Tile, block: np.ndarray) -> None:
        if self.info.bottom_up:  # written north-up
            block = block[::-1]
        row0 = self.info.north_up_rows(tile.row0, tile.height) - self.first_row
        self.output.write(tile.index, block, row0, tile.col0)
        self.bar.update(tile.width * tile.height)


def embed_raster(ae_tif: str, ckpt: str, out: str, pooling: str = "window", dtype: str = "int8",
                 precision: str = "auto", tile_px: int = TILE_PX, cog: bool = False, device: str = "auto",
                 progress: bool = True, resume: bool = False,
                 checkpoint_s: float = CHECKPOINT_S, rows: tuple[int, int] | None = None,
                 skip_finished: bool = False) -> Path:
    """Write the AETHER raster of `ae_tif` to `out` (GeoTIFF), atomically.

    Until the run ends, the output grows in a partial file beside `out`, with a journal of
    finished tiles. An interrupted run (Ctrl-C, SIGTERM, SIGKILL, a crash) leaves `out`
    untouched; `resume=True` continues from the journal and gives the same output as an
    uninterrupted run. A run without `resume` discards any earlier partial output. While it runs
    it holds `.OUT.lock` beside `out` (see `aether.core.files.RunLock`): a second run of the same `out`
    is refused, and `out` may be none of the files the run reads.

    `rows` (input rows start:stop, start a multiple of `tile_px`) writes only that band of the
    raster, georeferenced where it lies: the bands of a split raster mosaic into the whole
    output. `skip_finished` returns at once when `out` was already written by the same run
    (same input, checkpoint and options: its AETHER_RUN tag says so), and continues an
    interrupted run of the same work from its journal.
    """
    check_embed_options(pooling, dtype, tile_px, checkpoint_s)
    out = Path(out)
    check_output_file(out, ae_tif, ckpt)
    with output_lock(out):  # a second run into `out` is refused while this one lives
        return _embed_raster(ae_tif, ckpt, out, pooling, dtype, precision, tile_px, cog, device, progress, resume,
                             checkpoint_s, rows, skip_finished)


def _embed_raster(ae_tif: str, ckpt: str, out: Path, pooling: str, dtype: str, precision: str, tile_px: int,
                  cog: bool, device: str, progress: bool, resume: bool, checkpoint_s: float,
                  rows: tuple[int, int] | None, skip_finished: bool) -> Path:
    """`embed_raster` once the options and paths are checked and `out` is locked."""
    keep_tile_buffers()
    embedder = AetherEmbedder(ckpt, device=device, precision=precision)
    info = open_raster(ae_tif, n_bands=None)
    embedder.check_raster(info, pooling)
    if rows is not None and not (0 <= rows[0] < rows[1] <= info.height and rows[0] % tile_px == 0):
        raise AetherError(f"rows {rows[0]}:{rows[1]} are not a band of whole tiles of {ae_tif} "
                          f"({info.height} rows, tiles of {tile_px})")
    r_start, r_stop = rows if rows is not None else (0, info.height)
    first_row = info.north_up_rows(r_start, r_stop - r_start)

    nodata = NODATA[dtype]
    # output blocks tile the tiles (of a north-up input), so each block is written once, whole
    block_px = output_block_px(tile_px)
    profile = dict(driver="GTiff", width=info.width, height=r_stop - r_start, count=embedder.latent_dim, dtype=dtype,
                   crs=info.crs, transform=info.north_up_transform @ Affine.translation(0, first_row), nodata=nodata,
                   **geotiff_layout(dtype, block_px))
    ckpt_sha = embedder.ckpt_sha256
    tags = {
        "AETHER_CHECKPOINT_SHA256": ckpt_sha,
        "AETHER_CHECKPOINT": Path(ckpt).name,
        "AETHER_SOURCE": Path(ae_tif).name,
        "AETHER_POOLING": pooling if pooling == "pixel" else f"window, base radius {embedder.base_radius_m:g} m",
        "AETHER_DTYPE": dtype,
        "AETHER_PRECISION": embedder.precision,
        "AETHER_ENCODING": ENCODINGS.get(dtype, f"{dtype} unit vectors, nodata NaN"),
        "AETHER_TEXT_ENCODER": embedder.ckpt["text_encoder"]["model"],
        "AETHER_MODEL": json.dumps(embedder.model_identity, sort_keys=True),
    }
    fingerprint = run_fingerprint(ae_tif, embedder, pooling, dtype, tile_px, (r_start, r_stop), cog)
    tags["AETHER_RUN"] = json.dumps(fingerprint, sort_keys=True)
    if skip_finished and finished_output(out, tags["AETHER_RUN"]):
        log(f"{out.name} is already finished (same input, checkpoint and options); skipping it")
        return out
    tiles = tile_grid(info, tile_px, rows)
    descriptions = band_names(embedder.latent_dim, "E", digits=3)
    reader = PooledTileReader(info, embedder, pooling)
    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB * 2**20), tile_workers(embedder.device, tile_px, dtype) as threads:
        output = ResumableOutput(out, fingerprint, lambda path: create_sparse(path, profile, descriptions, tags),
                                 what="tiles", checkpoint_s=checkpoint_s, level=ZSTD_LEVEL, threads=threads.compress)
        with output:
            done = output.start(True if resume else None if skip_finished else False)
            todo = [t for t in tiles if t.index not in done]
            if output.resumed:
                log(f"resuming: {len(tiles) - len(todo)} of {len(tiles)} tiles were done")
            bar = tqdm(total=info.width * (r_stop - r_start), desc="embedding", unit="px", unit_scale=True,
                       disable=not progress, initial=sum(t.width * t.height for t in tiles if t.index in done))
            try:
                compute = tile_computer(reader)
                run_pipeline(lambda: reader.produce(todo, threads.read), lambda tile, data: compute(data, dtype),
                             _TileWriter(output, info, bar, first_row), workers=threads.compute)
                reader.report_implausible()
                output.finish(_to_cog if cog else None)
            except KeyboardInterrupt:
                log(f"interrupted; finished tiles are kept in {output.partial}. "
                    + ("Run the same command again to continue" if skip_finished else "Continue with --resume"))
                raise
            finally:
                bar.close()
    return out


TILES_IN_FLIGHT_MIB = 1024  # host memory for the tiles being computed at once


@dataclass(frozen=True)
class Threads:
    compute: int  # tiles computed at once
    read: int  # tiles decoded at once
    compress: int  # output blocks compressed at once


_threads_lock = threading.Lock()
_threads_users = 0  # embed_raster runs inside tile_workers now, in any thread
_threads_saved = 1


def tile_mib(tile_px: int, dtype: str, bands: int = 64, latent: int = 128) -> float:
    """Host memory one tile in computation holds (MiB): input with a halo, a strip's tables and
    means, the output block."""
    out_bytes = np.dtype(dtype).itemsize * latent
    return (tile_px * tile_px * (1.1 * bands + out_bytes) + STRIP_PX * bands * 8) / 2**20


@contextlib.contextmanager
def tile_workers(device: torch.device, tile_px: int = TILE_PX, dtype: str = "int8"):
    """How many threads decode, compute and compress, from this process's share of the cores
    (`aether.model.devices.thread_budget`) and a memory budget (TILES_IN_FLIGHT_MIB for the tiles being
    decoded and computed). On a CPU: one tile computed per PyTorch thread, each with one PyTorch
    thread, so the single-threaded NumPy pooling runs on every core too, and no OpenMP thread
    spins at a barrier while GDAL's threads hold its core; a quarter of the cores (two at least)
    decode, a quarter compress. PyTorch's thread count is the process's: overlapping runs (threads
    of a Dask worker) share one saved value, restored when the last ends. On a GPU: up to three
    tiles in flight, each on its own CUDA stream, and half the cores decode and half compress."""
    global _threads_users, _threads_saved
    tiles = max(2, int(TILES_IN_FLIGHT_MIB // tile_mib(tile_px, dtype)))
    read = min(read_threads(device), max(1, tiles // 2))
    compress = max(1, _io_share(device))
    if device.type != "cpu":
        yield Threads(compute=max(1, min(3, tiles - read)), read=read, compress=compress)
        return
    with _threads_lock:
        if _threads_users == 0:
            _threads_saved = torch.get_num_threads()
            torch.set_num_threads(1)
        _threads_users += 1
        threads = _threads_saved
    try:
        yield Threads(compute=max(1, min(threads, tiles - read)), read=read, compress=compress)
    finally:
        with _threads_lock:
            _threads_users -= 1
            if _threads_users == 0:
                torch.set_num_threads(_threads_saved)


def read_threads(device: torch.device) -> int:
    """Tiles decoded at once: `_io_share` of the cores, two at least."""
    return max(2, _io_share(device))


def _io_share(device: torch.device) -> int:
    """The threads that decode (or compress) beside the computation: half the process's cores
    beside a GPU (the CPU has nothing else to do), else a quarter."""
    return thread_budget() // (2 if device.type != "cpu" else 4)


def check_tile_px(tile_px: int) -> None:
    """Refuse a tile side over MAX_TILE_PX (memory is bounded by the tile, so the tile must be bounded)."""
    if tile_px > MAX_TILE_PX:
        raise AetherError(f"--tile {tile_px} is over the largest tile, {MAX_TILE_PX:,} pixels (several tiles are in "
                          f"memory at once, each {tile_px}^2 x the bands); the tile is only the unit of work, the "
                          f"output is the same: use {TILE_PX} (the default) or at most {MAX_TILE_PX:,}")


def check_embed_options(pooling: str = "window", dtype: str = "int8", tile_px: int = TILE_PX,
                        checkpoint_s: float = CHECKPOINT_S, **_) -> None:
    """Refuse, before any work, options `embed_raster` cannot run with (other options pass)."""
    if pooling not in POOLINGS:
        raise AetherError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    if dtype not in OUTPUT_DTYPES:
        raise AetherError(f"dtype must be one of {', '.join(OUTPUT_DTYPES)}, got {dtype!r}")
    if dtype == "float16" and not rasterio.dtypes.check_dtype("float16"):
        raise AetherError(f"--dtype float16 needs GDAL 3.11 or newer (this rasterio has GDAL "
                          f"{rasterio.__gdal_version__}); use int8 or float32")
    if tile_px < 16 or tile_px % 16:
        raise AetherError(f"tile size must be a multiple of 16 pixels (GeoTIFF blocks), got {tile_px}")
    check_tile_px(tile_px)
    if not checkpoint_s >= 0:
        raise AetherError(f"checkpoint interval must be 0 or more seconds, got {checkpoint_s}")


def run_fingerprint(ae_tif: str, embedder: AetherEmbedder, pooling: str, dtype: str, tile_px: int,
                    rows: tuple[int, int], cog: bool) -> dict:
    """What makes two runs write the same output: the input and what it holds (`content_identity`:
    each file read, a VRT's sources included, by content), checkpoint, options, and which rows."""
    local = Path(ae_tif).exists()
    return {"input": str(Path(ae_tif).resolve()) if local else ae_tif,
            "input content": content_identity(ae_tif),
            "checkpoint": embedder.ckpt_sha256, "pooling": pooling, "dtype": dtype, "precision": embedder.precision,
            "device": embedder.device.type, "tile size": tile_px, "rows": list(rows), "cog": cog,
            "layout": OUTPUT_LAYOUT}


def finished_output(out: Path, run_tag: str) -> bool:
    """Is `out` a finished output of the run that `run_tag` (its AETHER_RUN tag) describes?"""
    return raster_tag(out, "AETHER_RUN") == run_tag


def check_output_file(out: Path, source: str | None = None, ckpt: str | None = None) -> None:
    """Refuse, before any work, an output path that cannot be written or would overwrite a file
    the run reads (the input raster, a file behind it, the checkpoint)."""
    if out.exists() and out.is_dir():
        raise AetherError(f"output {out} is a folder; give a file name such as {out / 'aether.tif'}")
    if not out.parent.is_dir():
        raise AetherError(f"output folder {out.parent} does not exist")
    if not os.access(out.parent, os.W_OK):
        raise AetherError(f"output folder {out.parent} is not writable")
    check_name_length(out)
    check_inputs_kept([out], input_files([source] if source is not None else [], ckpt), "choose another file name")


PARTIAL_NAME_EXTRA = len(".") + len(".partial.json")  # what the partial files and journal add to a name


def check_name_length(out: Path) -> None:
    """Refuse, before any work, an output name its file system cannot hold with the partial file's
    additions (`.NAME.partial.json`)."""
    try:
        limit = os.pathconf(out.parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    length = len(os.fsencode(out.name))
    if length + PARTIAL_NAME_EXTRA > limit:
        raise AetherError(f"output name {out.name[:40]}... is {length} bytes long; this file system allows "
                          f"{limit}, and the run's partial files add {PARTIAL_NAME_EXTRA}: choose a name of at most "
                          f"{limit - PARTIAL_NAME_EXTRA} bytes")


def input_files(rasters: list[str], ckpt: str | None = None, tile_set: str | None = None) -> dict[str, str]:
    """Every local file a run reads, and what it is (for a refusal): each raster and the files
    behind it (`raster_files`: VRT sources, through VRTs of VRTs), the list naming the set of tiles
    `tile_set` (the rasters are then its tiles), and the checkpoint."""
    from aether.geo.tiles import LIST_SUFFIXES

    files = {}
    if ckpt is not None:
        files[ckpt] = "the checkpoint"
    if tile_set is not None and Path(tile_set).suffix.lower() in LIST_SUFFIXES:
        files[tile_set] = "the list of input tiles"
    for raster in rasters:
        found = raster_files(raster)
        if not found:  # a URL: no local file
            continue
        files.setdefault(found[0], "the input raster" if tile_set is None else f"an input tile (of {tile_set})")
        for path in found[1:]:
            files.setdefault(path, f"read through the input raster {raster} (a VRT source)")
    return files


def check_output_folder(out: Path) -> None:
    """Refuse, before any work, an output folder that is a file or cannot be created or written."""
    if out.exists() and not out.is_dir():
        raise AetherError(f"output {out} is a file; give a folder")
    if not out.parent.is_dir():
        raise AetherError(f"folder {out.parent} (holding the output folder) does not exist")
    if not os.access(out if out.exists() else out.parent, os.W_OK):
        raise AetherError(f"output folder {out} is not writable")


def _read_with_halo(src, info: RasterInfo, tile: Tile, hx: int, hy: int) -> np.ndarray:
    """The tile plus a halo, band-major (C, h, w) in the file's type; where the halo leaves the
    raster, nodata."""
    r0, r1 = tile.row0 - hy, tile.row0 + tile.height + hy
    c0, c1 = tile.col0 - hx, tile.col0 + tile.width + hx
    rr0, rr1, cc0, cc1 = max(r0, 0), min(r1, info.height), max(c0, 0), min(c1, info.width)
    inner = read_bands(src, Window(cc0, rr0, cc1 - cc0, rr1 - rr0), info)
    if (rr0, rr1, cc0, cc1) == (r0, r1, c0, c1):
        return inner
    fill = NODATA_INT8 if info.is_int8 else NODATA_INT16 if info.is_int16 else np.nan
    bands = np.full((info.count, r1 - r0, c1 - c0), fill, dtype=info.dtype)
    bands[:, rr0 - r0:rr1 - r0, cc0 - c0:cc1 - c0] = inner
    return bands


def _latent_tile(embedder: AetherEmbedder, means: np.ndarray, valid: np.ndarray, dtype: str = "float32",
                 out: torch.Tensor | None = None, band_major: bool = True) -> torch.Tensor:
    """(h, w, bands) pooled vectors -> (latent, h * w) AETHER vectors in `dtype` (int8: quantized),
    or (h * w, latent) when not `band_major`; zeros where not valid; into `out` if given."""
    h, w, bands = means.shape
    flat_valid = valid.reshape(-1)
    project = embedder.project_bands if band_major else embedder.project_pixels
    if flat_valid.all():
        return project(means.reshape(-1, bands), dtype, out=out)
    if out is None:
        shape = (embedder.latent_dim, h * w) if band_major else (h * w, embedder.latent_dim)
        out = torch.empty(shape, dtype=getattr(torch, dtype))
    out.zero_()
    if flat_valid.any():
        z = project(means.reshape(-1, bands)[flat_valid], dtype)
        if band_major:
            out[:, torch.from_numpy(flat_valid)] = z
        else:
            out[torch.from_numpy(flat_valid)] = z
    return out


def _to_cog(path: Path) -> None:
    """Rewrite `path` in place as a Cloud-Optimized GeoTIFF with overviews."""
    from rasterio.shutil import copy as rio_copy

    fd, cog_path = temp_file_beside(path, ".cog.partial.tif")
    os.close(fd)
    cog_name = str(cog_path)
    try:
        with rasterio.open(path) as src:
            options = dict(compress="ZSTD", level=1, blocksize=256, overview_resampling="average", bigtiff="if_safer")
            if src.dtypes[0] != "int8":
                options["predictor"] = "YES"
        rio_copy(str(path), cog_name, driver="COG", **options)
        os.replace(cog_name, path)
    except BaseException as exc:
        Path(cog_name).unlink(missing_ok=True)
        raise_if_disk_full(exc, path)
        raise
