"""Compressed GeoTIFF blocks written in parallel into a file GDAL laid out, durable as they go.

GDAL writes a GeoTIFF's blocks from one thread, and a file it reopens in update mode to make
written blocks durable forgets its creation options (ZSTD at level 9 instead of the level asked
for: five times the CPU). So GDAL only lays the file out (`create_sparse`: georeferencing,
tags, band names, an empty block index), and `BlockFile` compresses blocks itself, several at
once (zstandard releases the GIL), appends them to the file and points the block index at them.
`BlockFile.sync` makes what was written durable: data first, then the index, each fsynced, so a
kill at any moment leaves a valid GeoTIFF whose unwritten blocks read as nodata. Each block's
place, size and CRC-32 are returned by `sync`, so a journal can record them and a resume can
check them (`BlockFile.intact`) before trusting the blocks: a file cut short, or bytes changed
inside a block, is found there rather than published.
"""

from __future__ import annotations

import errno
import os
import struct
import threading
import time
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import rasterio

from aether.core.errors import AetherError
from aether.core.stages import stage

TILE_OFFSETS, TILE_BYTE_COUNTS = 324, 325  # TIFF tags of the block index
PREDICTOR_TAG, COMPRESSION_TAG, PLANAR_TAG = 317, 259, 284
ZSTD_COMPRESSION = 50000
_TYPE_SIZE = {3: 2, 4: 4, 16: 8}  # SHORT, LONG, LONG8
_TYPE_CODE = {2: "H", 4: "I", 8: "Q"}


def create_sparse(path: Path, profile: dict, descriptions: list[str], tags: dict[str, str]) -> None:
    """A GeoTIFF of `profile` (tiled, ZSTD, pixel-interleaved: `aether.geo.layout.geotiff_layout`)
    with no block written: every block reads as nodata until `BlockFile` writes it."""
    options = {k: v for k, v in profile.items() if k != "num_threads"}
    with rasterio.open(path, "w", sparse_ok=True, **options) as dst:
        for i, name in enumerate(descriptions, start=1):
            dst.set_band_description(i, name)
        dst.update_tags(**tags)


class BlockFile:
    """Writes windows of whole blocks into a file from `create_sparse`, compressing blocks in
    `threads` threads at `level`. Windows must start on block boundaries and be whole blocks
    (or reach the raster's right and bottom edges)."""

    def __init__(self, path: Path, level: int = 1, threads: int = 1, pool: ThreadPoolExecutor | None = None):
        """`pool`: compressing threads shared with other files (of `threads` workers), which this
        file then neither starts nor stops."""
        import zstandard

        self.path = Path(path)
        with rasterio.open(path) as src:
            self.width, self.height, self.count = src.width, src.height, src.count
            self.dtype = np.dtype(src.dtypes[0])
            self.block_h, self.block_w = src.block_shapes[0]
            nodata = src.nodata
        self.fill = 0 if nodata is None or (np.isnan(nodata) and self.dtype.kind != "f") else nodata
        self.blocks_across = -(-self.width // self.block_w)
        self.fd = os.open(path, os.O_RDWR)
        try:
            self._read_layout()
        except BaseException:
            os.close(self.fd)
            raise
        self.end = os.fstat(self.fd).st_size
        self.level = level
        self._local = threading.local()
        self._zstd = zstandard
        self.threads = max(1, threads)
        self._own_pool = pool is None
        self._pool = pool or ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="compress")
        self._pending: deque = deque()  # blocks being compressed and appended, oldest first
        self._lock = threading.Lock()  # the file's end and `_index`
        self._index: dict[int, tuple[int, int, int]] = {}  # block -> (offset, size, CRC-32) not yet in the index

    def _read_layout(self) -> None:
        """Where the block index lies in the file, and the compression and predictor it declares."""
        head = os.pread(self.fd, 16, 0)
        if head[:2] != b"II":
            raise AetherError(f"{self.path}: expected a little-endian GeoTIFF")
        big = struct.unpack_from("<H", head, 2)[0] == 43
        self.big = big
        ifd = struct.unpack_from("<Q", head, 8)[0] if big else struct.unpack_from("<I", head, 4)[0]
        n_size, entry_size = (8, 20) if big else (2, 12)
        n = struct.unpack("<Q" if big else "<H", os.pread(self.fd, n_size, ifd))[0]
        entries = os.pread(self.fd, n * entry_size, ifd + n_size)
        found = {}
        for k in range(n):
            at = k * entry_size
            if big:
                tag, typ, count = struct.unpack_from("<HHQ", entries, at)
                value_at, inline = ifd + n_size + at + 12, 8
            else:
                tag, typ, count = struct.unpack_from("<HHI", entries, at)
                value_at, inline = ifd + n_size + at + 8, 4
            size = _TYPE_SIZE.get(typ, 0)
            if tag in (TILE_OFFSETS, TILE_BYTE_COUNTS):
                if size == 0:
                    raise AetherError(f"{self.path}: unexpected TIFF type {typ} for tag {tag}")
                if count * size > inline:
                    value_at = struct.unpack_from("<Q" if big else "<I", entries, at + (12 if big else 8))[0]
                found[tag] = (value_at, size, count)
            elif tag in (PREDICTOR_TAG, COMPRESSION_TAG, PLANAR_TAG):
                found[tag] = struct.unpack_from("<H", entries, at + (12 if big else 8))[0]
        if found.get(COMPRESSION_TAG) != ZSTD_COMPRESSION or TILE_OFFSETS not in found:
            raise AetherError(f"{self.path}: expected a tiled ZSTD GeoTIFF")
        self.offsets_at, self.offset_size, n_blocks = found[TILE_OFFSETS]
        self.counts_at, self.count_size, _ = found[TILE_BYTE_COUNTS]
        self.predictor = found.get(PREDICTOR_TAG, 1)
        expected = self.blocks_across * -(-self.height // self.block_h)
        if found.get(PLANAR_TAG, 1) != 1 or n_blocks != expected:
            raise AetherError(f"{self.path}: expected one pixel-interleaved image of {expected} blocks")

    def _compressor(self):
        c = getattr(self._local, "compressor", None)
        if c is None:
            c = self._local.compressor = self._zstd.ZstdCompressor(level=self.level)
        return c

    def _encode(self, block: np.ndarray) -> bytes:
        """One (bh, bw, count) block -> its compressed bytes as libtiff stores them: pixel-interleaved
        rows, padded to the full block with nodata, the predictor applied."""
        with stage("encode"):
            return self._compressor().compress(self._predicted(self._padded(block)).tobytes())

    def _padded(self, block: np.ndarray) -> np.ndarray:
        h, w, count = block.shape
        if (h, w) == (self.block_h, self.block_w) and block.dtype == self.dtype:
            return np.ascontiguousarray(block)
        pixels = np.empty((self.block_h, self.block_w, count), dtype=self.dtype)
        if h < self.block_h or w < self.block_w:  # an edge block: the part beyond the raster is nodata
            pixels[...] = self.fill
        pixels[:h, :w] = block
        return pixels

    def _predicted(self, pixels: np.ndarray) -> np.ndarray:
        """The block's rows as the TIFF predictor stores them (libtiff's horizontal and floating-point ones)."""
        count = pixels.shape[2]
        if self.predictor == 2:  # each band differenced along the row, wrapping
            data = pixels.copy()
            data[:, 1:] -= pixels[:, :-1]
            return data
        if self.predictor == 3:  # each row's bytes as planes, most significant first, then differenced
            row = pixels.astype(self.dtype.newbyteorder("<"), copy=False).view(np.uint8)
            row = row.reshape(self.block_h, self.block_w * count, self.dtype.itemsize)[:, :, ::-1]
            planes = np.ascontiguousarray(row.transpose(0, 2, 1)).reshape(self.block_h, -1)
            data = planes.copy()
            data[:, count:] -= planes[:, :-count]
            return data
        return pixels

    def write(self, array: np.ndarray, row0: int, col0: int) -> list[int]:
        """Write the pixel-major (h, w, count) `array` with its top-left pixel at (row0, col0) of the
        file: whole blocks, or blocks that reach the raster's right or bottom edge. Its blocks are
        compressed and appended in the background (at most twice `threads` blocks wait), so the
        caller goes on with the next window; `sync` waits for them, and raises what failed.
        Returns the indices of the blocks written."""
        h, w, count = array.shape
        ends = ((row0 + h) % self.block_h == 0 or row0 + h == self.height) and (
            (col0 + w) % self.block_w == 0 or col0 + w == self.width
        )
        if (
            row0 % self.block_h
            or col0 % self.block_w
            or count != self.count
            or not ends
            or row0 + h > self.height
            or col0 + w > self.width
        ):
            raise ValueError(f"a window of {count} bands at ({row0}, {col0}) is not whole blocks of {self.path}")
        indices = []
        for r in range(0, h, self.block_h):
            for c in range(0, w, self.block_w):
                index = (row0 + r) // self.block_h * self.blocks_across + (col0 + c) // self.block_w
                block = array[r : r + self.block_h, c : c + self.block_w]
                self._pending.append(self._pool.submit(self._append, index, block))
                indices.append(index)
        self._wait(keep=2 * self.threads)
        return indices

    def _append(self, index: int, block: np.ndarray) -> None:
        """Compress one block and append it to the file (in a compressing thread)."""
        data = self._encode(block)
        with self._lock:
            offset = self.end
            self.end += len(data)
        if not self.big and offset + len(data) >= 2**32:
            raise AetherError(f"{self.path} grew past 4 GiB, the most a classic TIFF can hold")
        if len(data) >= 1 << (8 * self.count_size):
            raise AetherError(
                f"a compressed block of {self.path} is {len(data):,} bytes, more than its block index holds"
            )
        with stage("write"):
            _write_all(self.fd, data, offset)
        checksum = zlib.crc32(data)
        with self._lock:
            self._index[index] = (offset, len(data), checksum)

    def _wait(self, keep: int = 0) -> None:
        """Wait until at most `keep` blocks are still being compressed or written; raise what failed."""
        while len(self._pending) > keep:
            self._pending[0].result()  # tracked until done: an interrupt here leaves it to `sync` or `abandon`
            self._pending.popleft()

    def sync(self) -> dict[int, tuple[int, int, int]]:
        """Make every block written so far durable: the data, then the block index pointing at it.
        Returns the blocks made durable: block -> (offset, size, CRC-32 of the stored bytes)."""
        self._wait()
        with self._lock:
            written, self._index = self._index, {}
        if not written:
            return {}
        os.fsync(self.fd)
        off_code, count_code = _TYPE_CODE[self.offset_size], _TYPE_CODE[self.count_size]
        for index, (offset, size, _) in written.items():
            _write_all(self.fd, struct.pack("<" + off_code, offset), self.offsets_at + index * self.offset_size)
            _write_all(self.fd, struct.pack("<" + count_code, size), self.counts_at + index * self.count_size)
        os.fsync(self.fd)
        return written

    def intact(self, blocks: list[tuple[int, int, int, int]]) -> bool:
        """Are these blocks (index, offset, size, CRC-32, as `sync` returned them) in the file as
        recorded: inside it, pointed at by its block index, and with the bytes they had?"""
        end = os.fstat(self.fd).st_size
        n_blocks = self.blocks_across * -(-self.height // self.block_h)
        off_code, count_code = _TYPE_CODE[self.offset_size], _TYPE_CODE[self.count_size]
        for index, offset, size, checksum in blocks:
            if not 0 <= index < n_blocks or offset < 0 or size <= 0 or offset + size > end:
                return False
            pointed = (
                struct.unpack(
                    "<" + off_code, os.pread(self.fd, self.offset_size, self.offsets_at + index * self.offset_size)
                )[0],
                struct.unpack(
                    "<" + count_code, os.pread(self.fd, self.count_size, self.counts_at + index * self.count_size)
                )[0],
            )
            if pointed != (offset, size) or zlib.crc32(os.pread(self.fd, size, offset)) != checksum:
                return False
        return True

    def close(self) -> None:
        """Sync and close (idempotent)."""
        if self.fd < 0:
            return
        try:
            self.sync()
        finally:
            self._stop()
            os.close(self.fd)
            self.fd = -1

    def abandon(self) -> None:
        """Close without syncing what is not yet durable."""
        if self.fd >= 0:
            self._stop(cancel=True)
            os.close(self.fd)
            self.fd = -1

    def _stop(self, cancel: bool = False) -> None:
        """Wait for this file's blocks in flight (or cancel those not started) and stop its own threads."""
        if self._own_pool:
            self._pool.shutdown(wait=True, cancel_futures=cancel)
            return
        for future in self._pending:
            if not (cancel and future.cancel()):
                try:
                    future.result()
                except BaseException:
                    pass  # `sync` raised it already, or the file is being abandoned
        self._pending.clear()


class CheckpointedBlocks:
    """A `BlockFile` whose finished pieces (tiles, windows: any ids) enter `journal` every
    `checkpoint_s` seconds, once `sync` has made them durable, each with its blocks' places, sizes
    and checksums; `done` is the set of pieces an earlier run finished (updated in place), and
    `blocks` what the journal recorded of their blocks. What a run resumes from."""

    def __init__(
        self,
        path: Path,
        journal,
        done: set[int],
        checkpoint_s: float,
        level: int = 1,
        threads: int = 1,
        blocks: dict[int, list] | None = None,
    ):
        self.file = BlockFile(path, level, threads)
        self.journal, self.done, self.pending = journal, done, {}
        self.blocks = dict(blocks or {})
        self.checkpoint_s, self.last = checkpoint_s, time.monotonic()

    def damaged(self) -> set[int]:
        """The finished pieces whose blocks are not in the file as the journal recorded them (a file
        cut short, bytes changed, an index entry lost): they are no longer finished."""
        bad = {
            piece for piece in self.done if not self.file.intact(self.blocks.get(piece, ())) or piece not in self.blocks
        }
        self.done -= bad
        for piece in bad:
            self.blocks.pop(piece, None)
        return bad

    def write(self, piece: int, array: np.ndarray, row0: int, col0: int) -> None:
        """`BlockFile.write` of one piece; a checkpoint when `checkpoint_s` has passed."""
        self.pending[piece] = self.file.write(array, row0, col0)
        self.after_write()

    def skip(self, piece: int) -> None:
        """Record `piece` as finished with no block written (a part of the output that stays nodata)."""
        self.pending[piece] = []
        self.after_write()

    def after_write(self) -> None:
        if time.monotonic() - self.last >= self.checkpoint_s:
            self.checkpoint()

    def checkpoint(self) -> None:
        """Make the pieces written so far durable, then record them and their blocks in the journal."""
        synced = self.file.sync()
        for piece, indices in self.pending.items():
            self.blocks[piece] = [[index, *synced[index]] for index in indices]
        self.done |= set(self.pending)
        self.pending = {}
        self.journal.save(self.done, self.blocks)
        self.last = time.monotonic()

    def close(self) -> None:
        """A last checkpoint, and close (also what an interrupted run keeps); once."""
        if self.file.fd < 0:
            return
        try:
            self.checkpoint()
        finally:
            self.file.close()

    def abandon(self) -> None:
        """Close without recording what is not yet in the journal (a failed run)."""
        self.file.abandon()


def _write_all(fd: int, data: bytes, offset: int) -> None:
    """pwrite all of `data` at `offset` (a short write, as on a nearly full disk, is continued, and
    one that writes nothing is the disk being full)."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        if n == 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view, offset = view[n:], offset + n
