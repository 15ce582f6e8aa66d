"""The per-tile work of raster inference on a torch device: pooling, projection, quantization.

`DeviceTileComputer.block` computes what `aether.infer.reader.PooledTileReader.block` computes, with
torch on the projector's device, so that on a CUDA GPU a tile goes up once (the file's codes, with
its halo) and comes down once (the output block), and nothing in between touches the host. The
same code runs on a CPU, where the host is the device.

Window pooling is separable: cumulative sums down the columns give each output row's window of
rows (its own half-height), cumulative sums of those along the row give each pixel's window of
columns (its row's half-width), each a difference of two slices per run of rows whose windows are
alike, so geographic rasters, whose windows widen towards the poles, are pooled as projected ones
are. Valid pixels are counted the same way, and the mean's 1 / count cancels in the
renormalisation. int8 codes are summed exactly as the integers sign(q) * q**2 (in int32 where no
partial sum can reach 2**31, else int64), other rasters in float64, as `aether.geo.pooling` does.
On a GPU, each calling thread has its own CUDA stream and pinned staging buffer (`_CudaLane`).
"""

from __future__ import annotations

import contextlib
import math
import threading

import numpy as np
import torch

from aether.geo.alphaearth import (
    MAX_ABS_VALUE,
    NODATA_INT8,
    NODATA_INT16,
    dequantize_int16_torch_,
    dequantize_torch_,
    signed_squares_torch_,
)
from aether.geo.pooling import _INT8_MAX_SQUARE
from aether.geo.raster import RasterInfo
from aether.infer.spec import NODATA, STRIP_PX, check_pooling
from aether.model.projector import Projector, encode_latent

CUDA_STRIP_PX = 1 << 18  # pixels pooled at a time on a GPU: a few hundred MiB of int32 tables, twice that in float64


class DeviceTileComputer:
    """Pools, projects and quantizes tiles (as `PooledTileReader.produce` yields them) on
    `projector.device`, `strip_px` pixels at a time (default: `CUDA_STRIP_PX` on a GPU,
    aether.infer.spec.STRIP_PX on a CPU), so device memory is bounded by the strip and the tile.
    `block` may be called from several threads at once: on a GPU each thread has its own stream."""

    def __init__(self, projector: Projector, info: RasterInfo, pooling: str, strip_px: int | None = None):
        check_pooling(pooling)
        self.projector, self.info, self.pooling = projector, info, pooling
        self.device = projector.device
        self.strip_px = strip_px or (CUDA_STRIP_PX if self.device.type == "cuda" else STRIP_PX)
        self.nodata = NODATA
        self._thread = threading.local()  # each calling thread's lane to the device

    @torch.no_grad()
    def block(self, data, dtype: str) -> np.ndarray:
        """The (h, w, latent) output block of one tile in `dtype`, nodata where invalid (pixel-major, as
        a pixel-interleaved GeoTIFF stores it): the contract of `PooledTileReader.block`, for the same
        `data` (bands with halo, rx_rows, ry_rows, hx, hy)."""
        bands, rx_rows, ry_rows, hx, hy = data
        height, width = bands.shape[1] - 2 * hy, bands.shape[2] - 2 * hx
        lane = self._lane()
        with lane.active():
            tile = lane.upload(bands)
            out = torch.empty(
                (height * width, self.projector.latent_dim), dtype=getattr(torch, dtype), device=self.device
            )
            step = max(1, self.strip_px // width)
            for start in range(0, height, step):
                stop = min(height, start + step)
                if self.pooling == "window":
                    means, valid = self._window_means(
                        tile[:, start : stop + 2 * hy], rx_rows[start:stop], ry_rows[start:stop], hx, hy
                    )
                else:
                    means, valid = self._pixel_vectors(tile[:, start:stop])
                self._project_into(means, valid, dtype, out[start * width : stop * width])
            return lane.download(out).reshape(height, width, -1)

    def _invalid(self, bands: torch.Tensor) -> torch.Tensor:
        """`aether.geo.raster.invalid_pixels` of band-major (C, h, w) codes: the (h, w) mask, by one
        reduction over the bands (int8 and int16 nodata is the type's least value)."""
        if self.info.is_int8 or self.info.is_int16:
            return bands.amin(dim=0) == (NODATA_INT8 if self.info.is_int8 else NODATA_INT16)
        bad = ~(bands.abs().amax(dim=0) <= MAX_ABS_VALUE)  # NaN, inf and impossible magnitudes (amax keeps NaN)
        nodata = self.info.nodata
        if nodata is not None and not math.isnan(nodata) and abs(nodata) <= MAX_ABS_VALUE:
            bad |= (bands == nodata).any(dim=0)
        return bad

    def _window_means(
        self, bands: torch.Tensor, rx_rows: np.ndarray, ry_rows: np.ndarray, hx: int, hy: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(n * w, C) float32 unit-length window means of the rows of a strip (given with `hy` halo
        rows above and below and `hx` columns each side) and their (n * w,) valid mask; `rx_rows`/
        `ry_rows` are each row's half-widths."""
        channels, rows, cols = bands.shape
        n, width = len(rx_rows), cols - 2 * hx
        table_dtype = table_dtype_for(self.info, rows, cols, hy)
        invalid = self._invalid(bands)
        values = _table(rows, cols, channels, table_dtype, self.device)
        inner = values[1:]
        inner.copy_(bands.permute(1, 2, 0))
        inner.masked_fill_(invalid[..., None], 0)
        if self.info.is_int8:
            signed_squares_torch_(inner)
        counts = _table(rows, cols, 1, table_dtype, self.device)
        counts[1:, :, 0] = ~invalid
        runs = _runs(rx_rows, ry_rows)
        sums = _box_sums(values, runs, hx, hy, width).view(n * width, channels)
        count = _box_sums(counts, runs, hx, hy, width).view(n * width)
        means = sums.to(torch.float32)
        norm = torch.linalg.vector_norm(means, dim=1)
        valid = (count > 0) & (norm > 0)
        means.div_(torch.where(valid, norm, 1.0)[:, None])
        return means, valid

    def _pixel_vectors(self, bands: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(n * w, C) float32 unit-length pixel vectors of band-major (C, n, w) codes and the (n * w,)
        valid mask, as `PooledTileReader.pooled` gives them for pixel pooling (where not valid, the
        vectors are whatever the codes decode to: `_project_into` writes nodata there)."""
        channels, n, width = bands.shape
        values = torch.empty((n * width, channels), device=self.device)
        values.view(n, width, channels).copy_(bands.permute(1, 2, 0))
        if self.info.is_int8:
            dequantize_torch_(values)
        elif self.info.is_int16:
            dequantize_int16_torch_(values)
        norm = torch.linalg.vector_norm(values, dim=1)
        values.div_(torch.where(norm > 0, norm, 1.0)[:, None])
        return values, ~self._invalid(bands).view(-1)

    def _project_into(self, means: torch.Tensor, valid: torch.Tensor, dtype: str, out: torch.Tensor) -> None:
        """The (n, C) means projected and encoded in `dtype` into `out` (n, latent), nodata where not
        valid, `batch_px` at a time (on a CPU, a batch's latents stay in cache until encoded)."""
        batch_px = self.projector.batch_px
        for start in range(0, len(means), batch_px):
            latent = self.projector.project_on_device(means[start : start + batch_px])
            out[start : start + batch_px] = encode_latent(latent, dtype)
        out.masked_fill_(~valid[:, None], self.nodata[dtype])

    def _lane(self) -> _HostLane | _CudaLane:
        lane = getattr(self._thread, "lane", None)
        if lane is None:
            lane = _CudaLane(self.device) if self.device.type == "cuda" else _HostLane()
            self._thread.lane = lane
        return lane


def table_dtype_for(info: RasterInfo, rows: int, cols: int, hy: int) -> torch.dtype:
    """The type that sums a strip of `rows` x `cols` pixels (halo included) with windows at most
    2 * hy + 1 rows high: for int8 rasters int32 where no partial sum can reach 2**31 (the largest
    are a column of `rows` codes, and a row of `cols` windows' columns), else int64; float64 for others."""
    if not info.is_int8:
        return torch.float64
    return torch.int32 if max(rows, cols * (2 * hy + 1)) * _INT8_MAX_SQUARE < 2**31 else torch.int64


def _table(rows: int, cols: int, channels: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised (rows + 1, cols, channels) table whose first row is zero."""
    table = torch.empty((rows + 1, cols, channels), dtype=dtype, device=device)
    table[0] = 0
    return table


def _runs(rx_rows: np.ndarray, ry_rows: np.ndarray) -> list[tuple[int, int, int, int]]:
    """(start, stop, rx, ry) for each run of rows with the same half-widths: one run on a projected
    raster, a few on a geographic one (they change slowly with latitude)."""
    change = np.flatnonzero((np.diff(rx_rows) != 0) | (np.diff(ry_rows) != 0)) + 1
    bounds = [0, *change.tolist(), len(rx_rows)]
    return [(i, j, int(rx_rows[i]), int(ry_rows[i])) for i, j in zip(bounds[:-1], bounds[1:])]


def _box_sums(table: torch.Tensor, runs: list[tuple[int, int, int, int]], hx: int, hy: int, width: int) -> torch.Tensor:
    """(n, width, K) window sums of the (rows, cols, K) values held in `table` below its zero first
    row (overwritten), the strip's n rows in `runs`: cumulative sums down the columns, each row's
    window of rows as a difference of two of them (right of a zero column), cumulative sums of those
    along the row, each pixel's window of columns as a difference of two of those. Every run is
    sliced, no index is gathered."""
    n, cols, channels = runs[-1][1], table.shape[1], table.shape[2]
    _cumsum_rows_(table)  # table[k]: the sums of the rows above row k
    windows = table.new_empty((n, cols + 1, channels))
    windows[:, 0] = 0
    for i, j, _, ry in runs:
        torch.sub(table[hy + i + ry + 1 : hy + j + ry + 1], table[hy + i - ry : hy + j - ry], out=windows[i:j, 1:])
    windows.cumsum_(1)  # windows[i, k]: row i's window of rows, summed over the columns left of column k
    box = table.new_empty((n, width, channels))
    for i, j, rx, _ in runs:
        torch.sub(
            windows[i:j, hx + rx + 1 : hx + rx + 1 + width], windows[i:j, hx - rx : hx - rx + width], out=box[i:j]
        )
    return box


def _cumsum_rows_(table: torch.Tensor) -> torch.Tensor:
    """`table.cumsum_(0)`; on a CPU a row at a time, about 3 x faster there (its rows are contiguous)."""
    if table.device.type != "cpu":
        return table.cumsum_(0)
    for k in range(1, len(table)):
        table[k].add_(table[k - 1])
    return table


class _HostLane:
    """The way to a CPU device: the arrays are the tensors, nothing is staged or waited for."""

    def active(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def upload(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array)

    def download(self, tensor: torch.Tensor) -> np.ndarray:
        return tensor.numpy()


class _CudaLane:
    """One calling thread's way to a GPU: its own stream, so the tiles of several threads overlap,
    and a pinned buffer, reused tile after tile, that stages each tile for an asynchronous upload."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.staging = torch.empty(0, dtype=torch.uint8, pin_memory=True)

    def active(self) -> contextlib.AbstractContextManager:
        """Run the tile's work on this lane's stream."""
        return torch.cuda.stream(self.stream)

    def upload(self, array: np.ndarray) -> torch.Tensor:
        """`array` on the device, copied there asynchronously through the staging buffer."""
        self.stream.synchronize()  # the last upload from the buffer is done (normally it is already)
        if self.staging.numel() < array.nbytes:
            self.staging = torch.empty(array.nbytes, dtype=torch.uint8, pin_memory=True)
        staged = self.staging.numpy()[: array.nbytes].view(array.dtype).reshape(array.shape)
        np.copyto(staged, array)
        return torch.from_numpy(staged).to(self.device, non_blocking=True)

    def download(self, tensor: torch.Tensor) -> np.ndarray:
        """`tensor` as a host array, once the stream is done. The array holds pinned memory of its
        own (the caller keeps it while it writes); PyTorch's caching host allocator hands the same
        pages out again once it is dropped, so later tiles reuse them."""
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        host.copy_(tensor, non_blocking=True)
        self.stream.synchronize()
        return host.numpy()
