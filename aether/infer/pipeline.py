"""Raster inference: stream an AlphaEarth raster through the trained AE projector.

By default every output pixel sees what the projector saw in training: the nodata-masked,
renormalised mean over the base-view window (ground radius from the checkpoint), computed per
tile with a halo so seams cannot appear. Reading (`aether.infer.reader`), computing and writing
overlap in a three-stage pipeline, and memory is bounded by the tile. The output grows in a
resumable partial file (`aether.geo.resumable`); the Dask fan-out over tiles or bands of rows is
`aether.infer.at_scale`'s.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from affine import Affine
from tqdm.auto import tqdm

from aether.core.errors import AetherError
from aether.core.files import check_output_file, output_lock
from aether.core.pipeline import run_pipeline
from aether.core.runtime import thread_budget
from aether.geo.alphaearth import band_names
from aether.geo.blocks import create_sparse
from aether.geo.gdal import streaming_cache
from aether.geo.identity import content_identity
from aether.geo.layout import ZSTD_LEVEL, geotiff_layout, output_block_px, raster_tag, to_cog
from aether.geo.raster import RasterInfo, open_raster
from aether.geo.resumable import ResumableOutput
from aether.geo.tiles import input_files
from aether.infer.reader import PooledTileReader, Tile, tile_computer, tile_grid
from aether.infer.spec import ENCODINGS, NODATA, OUTPUT_LAYOUT, STRIP_PX, EmbedOptions
from aether.model.embed import check_raster
from aether.model.projector import Projector

logger = logging.getLogger(__name__)


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


def embed_raster(
    ae_tif: str,
    ckpt: str,
    out: str,
    options: EmbedOptions | None = None,
    *,
    progress: bool = True,
    resume: bool = False,
    rows: tuple[int, int] | None = None,
    skip_finished: bool = False,
    threads: Threads | None = None,
    strip_px: int = STRIP_PX,
) -> Path:
    """Write the AETHER raster of `ae_tif` to `out` (GeoTIFF), atomically, as `options` ask.

    Until the run ends, the output grows in a partial file beside `out`, with a journal of
    finished tiles. An interrupted run (Ctrl-C, SIGTERM, SIGKILL, a crash) leaves `out`
    untouched; `resume=True` continues from the journal and gives the same output as an
    uninterrupted run. A run without `resume` discards any earlier partial output. While it runs
    it holds `.OUT.lock` beside `out` (see `aether.core.files.RunLock`): a second run of the same `out`
    is refused, and `out` may be none of the files the run reads.

    `rows` (input rows start:stop, start a multiple of the tile side) writes only that band of the
    raster, georeferenced where it lies: the bands of a split raster mosaic into the whole
    output. `skip_finished` returns at once when `out` was already written by the same run
    (same input, checkpoint and options: its AETHER_RUN tag says so), and continues an
    interrupted run of the same work from its journal. `threads` (how many decode, compute and
    compress; default `tile_workers`) and `strip_px` (pixels pooled at a time) tune the run and
    change no output byte.
    """
    options = (options or EmbedOptions()).check()
    out = Path(out)
    check_output_file(out, input_files([ae_tif], ckpt), example="aether.tif")
    with output_lock(out):  # a second run into `out` is refused while this one lives
        projector = Projector(ckpt, device=options.device, precision=options.precision)
        return _embed_raster(ae_tif, projector, out, options, progress, resume, rows, skip_finished, threads, strip_px)


def output_tags(ae_tif: str, projector: Projector, options: EmbedOptions, fingerprint: dict) -> dict[str, str]:
    """What an AETHER raster says of itself: the checkpoint (file digest and model identity), the
    source, pooling, type, encoding, precision and text encoder, and the run that made it."""
    pooling = options.pooling
    return {
        "AETHER_CHECKPOINT_SHA256": projector.ckpt_sha256,
        "AETHER_CHECKPOINT": projector.name,
        "AETHER_SOURCE": Path(ae_tif).name,
        "AETHER_POOLING": pooling if pooling == "pixel" else f"window, base radius {projector.base_radius_m:g} m",
        "AETHER_DTYPE": options.dtype,
        "AETHER_PRECISION": projector.precision,
        "AETHER_ENCODING": ENCODINGS.get(options.dtype, f"{options.dtype} unit vectors, nodata NaN"),
        "AETHER_TEXT_ENCODER": projector.checkpoint.text.model,
        "AETHER_MODEL": json.dumps(projector.identity, sort_keys=True),
        "AETHER_RUN": json.dumps(fingerprint, sort_keys=True),
    }


def _embed_raster(
    ae_tif: str,
    projector: Projector,
    out: Path,
    options: EmbedOptions,
    progress: bool,
    resume: bool,
    rows: tuple[int, int] | None,
    skip_finished: bool,
    threads: Threads | None,
    strip_px: int,
) -> Path:
    """`embed_raster` once the options and paths are checked and `out` is locked."""
    info = open_raster(ae_tif, n_bands=None)
    check_raster(projector, info, options.pooling)
    tile_px, dtype = options.tile_px, options.dtype
    if rows is not None and not (0 <= rows[0] < rows[1] <= info.height and rows[0] % tile_px == 0):
        raise AetherError(
            f"rows {rows[0]}:{rows[1]} are not a band of whole tiles of {ae_tif} "
            f"({info.height} rows, tiles of {tile_px})"
        )
    r_start, r_stop = rows if rows is not None else (0, info.height)
    first_row = info.north_up_rows(r_start, r_stop - r_start)
    # output blocks tile the tiles (of a north-up input), so each block is written once, whole
    profile = dict(
        driver="GTiff",
        width=info.width,
        height=r_stop - r_start,
        count=projector.latent_dim,
        dtype=dtype,
        crs=info.crs,
        transform=info.north_up_transform @ Affine.translation(0, first_row),
        nodata=NODATA[dtype],
        **geotiff_layout(dtype, output_block_px(tile_px)),
    )
    fingerprint = run_fingerprint(ae_tif, projector, options, (r_start, r_stop))
    tags = output_tags(ae_tif, projector, options, fingerprint)
    if skip_finished and finished_output(out, tags["AETHER_RUN"]):
        logger.info(f"{out.name} is already finished (same input, checkpoint and options); skipping it")
        return out
    tiles = tile_grid(info, tile_px, rows)
    descriptions = band_names(projector.latent_dim, "E", digits=3)
    reader = PooledTileReader(info, projector, options.pooling, strip_px)
    workers = contextlib.nullcontext(threads) if threads is not None else tile_workers(projector.device, tile_px, dtype)
    with streaming_cache(), workers as threads:
        output = ResumableOutput(
            out,
            fingerprint,
            lambda path: create_sparse(path, profile, descriptions, tags),
            what="tiles",
            checkpoint_s=options.checkpoint_s,
            level=ZSTD_LEVEL,
            threads=threads.compress,
        )
        with output:
            done = output.start(True if resume else None if skip_finished else False)
            todo = [t for t in tiles if t.index not in done]
            if output.resumed:
                logger.info(f"resuming: {len(tiles) - len(todo)} of {len(tiles)} tiles were done")
            bar = tqdm(
                total=info.width * (r_stop - r_start),
                desc="embedding",
                unit="px",
                unit_scale=True,
                disable=not progress,
                initial=sum(t.width * t.height for t in tiles if t.index in done),
            )
            try:
                compute = tile_computer(reader)
                run_pipeline(
                    lambda: reader.produce(todo, threads.read),
                    lambda tile, data: compute(data, dtype),
                    _TileWriter(output, info, bar, first_row),
                    workers=threads.compute,
                )
                reader.report_implausible()
                output.finish(to_cog if options.cog else None)
            except KeyboardInterrupt:
                logger.info(
                    f"interrupted; finished tiles are kept in {output.partial}. "
                    + ("Run the same command again to continue" if skip_finished else "Continue with --resume")
                )
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
def tile_workers(device: torch.device, tile_px: int, dtype: str):
    """How many threads decode, compute and compress, from this process's share of the cores
    (`aether.core.runtime.thread_budget`) and a memory budget (TILES_IN_FLIGHT_MIB for the tiles being
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


def run_fingerprint(ae_tif: str, projector: Projector, options: EmbedOptions, rows: tuple[int, int]) -> dict:
    """What makes two runs write the same output: the input and what it holds (`content_identity`:
    each file read, a VRT's sources included, by content), checkpoint, options, and which rows."""
    local = Path(ae_tif).exists()
    return {
        "input": str(Path(ae_tif).resolve()) if local else ae_tif,
        "input content": content_identity(ae_tif),
        "checkpoint": projector.ckpt_sha256,
        "pooling": options.pooling,
        "dtype": options.dtype,
        "precision": projector.precision,
        "device": projector.device.type,
        "tile size": options.tile_px,
        "rows": list(rows),
        "cog": options.cog,
        "layout": OUTPUT_LAYOUT,
    }


def finished_output(out: Path, run_tag: str) -> bool:
    """Is `out` a finished output of the run that `run_tag` (its AETHER_RUN tag) describes?"""
    return raster_tag(out, "AETHER_RUN") == run_tag
