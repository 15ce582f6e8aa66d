"""One output GeoTIFF that survives interruption: how inference and fetching write theirs.

Until the run ends the output grows in a partial file beside it (`.OUT.partial.tif`, laid out by
GDAL, its blocks written by `aether.geo.blocks`), with a journal (`.OUT.partial.json`) of the
finished pieces and their blocks. At the end the partial file is renamed over OUT, so readers
never see half an output. An interrupted run keeps both; the next run that resumes checks every
journaled block against the file (inside it, pointed at by its index, same CRC-32) and redoes
the pieces that fail, so a partial file cut short or changed is never published. A run that
fails keeps what it resumed from (a full disk must not throw away an earlier run's work), and
removes what it started itself.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import rasterio

from aether.core.errors import AetherError, first_line
from aether.core.files import raise_if_disk_full
from aether.core.journal import Journal, OtherWork, partial_paths
from aether.geo.blocks import CheckpointedBlocks

logger = logging.getLogger(__name__)


class ResumableOutput:
    """The partial file and journal of one output `out`.

    `fingerprint` says what the run reads and how (a journal of another fingerprint is not
    continued); `create(path)` lays out an empty partial file; `what` names the work in messages
    ("tiles", "windows"). Use as a context manager around `start`, `write`/`skip` and `finish`:
    leaving it by KeyboardInterrupt, or by an error of a type in `keep_on`, keeps the work done
    (made durable and journaled); any other error keeps the partial output only if this run
    resumed it, and removes it otherwise.
    """

    def __init__(
        self,
        out: Path,
        fingerprint: dict,
        create: Callable[[Path], None],
        *,
        what: str = "tiles",
        checkpoint_s: float = 5.0,
        level: int = 1,
        threads: int = 1,
        keep_on: tuple[type[BaseException], ...] = (),
    ):
        self.out = Path(out)
        self.partial, journal_path = partial_paths(self.out)
        self.journal = Journal(journal_path, fingerprint)
        self.create, self.what, self.keep_on = create, what, keep_on
        self.checkpoint_s, self.level, self.threads = checkpoint_s, level, threads
        self.blocks: CheckpointedBlocks | None = None
        self.resumed = False

    def start(self, resume: bool | None, other: str = "an earlier interrupted run") -> set[int]:
        """Open the partial output and return the pieces already finished. `resume` True continues
        the interrupted run of this work (refused in one line when there is none, or it was other
        work); None continues it when there is one of the same work and starts over otherwise,
        saying why; False starts over (discarding a partial output of `other`, and saying so)."""
        done, recorded = set(), {}
        if resume is None and self.journal.exists(self.partial):
            try:
                done, recorded = self.journal.load(self.partial)
                resume = True
            except OtherWork as exc:
                logger.info(f"the interrupted run of {self.out.name} had other {', '.join(exc.changed)}: starting over")
                resume = False
            except AetherError as exc:
                logger.info(f"{first_line(exc).split(';')[0]}: starting over")
                resume = False
        elif resume:
            done, recorded = self.journal.load(self.partial)
        if resume:
            try:
                self.blocks = self._open(done, recorded)
            except (AetherError, rasterio.errors.RasterioIOError, OSError) as exc:
                logger.info(f"the partial output {self.partial.name} is damaged ({first_line(exc)}): starting over")
                done, resume = set(), False
        if not resume:
            self.journal.discard(self.partial, other)
            try:
                self.create(self.partial)
                self.journal.save(set())
                self.blocks = self._open(set(), {})
            except BaseException as exc:
                self.journal.discard(self.partial)
                raise_if_disk_full(exc, self.out)
                raise
            return set()
        self.resumed = True
        damaged = self.blocks.damaged()
        if damaged:
            logger.info(
                f"{len(damaged)} of the {len(done) + len(damaged)} finished {self.what} failed their check in "
                f"{self.partial.name} (the file was cut short or changed since it was written): they are done again"
            )
        return self.blocks.done

    def _open(self, done: set[int], recorded: dict[int, list]) -> CheckpointedBlocks:
        return CheckpointedBlocks(
            self.partial, self.journal, set(done), self.checkpoint_s, self.level, self.threads, recorded
        )

    def write(self, piece: int, array: np.ndarray, row0: int, col0: int) -> None:
        """Write one finished piece: pixel-major (h, w, bands) whole blocks at (row0, col0)."""
        self.blocks.write(piece, array, row0, col0)

    def skip(self, piece: int) -> None:
        """Record a piece that stays nodata (nothing is written for it)."""
        self.blocks.skip(piece)

    def finish(self, finalize: Callable[[Path], None] | None = None) -> Path:
        """Close the partial output, let `finalize(path)` rewrite it in place (a COG), and rename it
        over OUT (saying so when that replaces a file)."""
        self.blocks.close()
        if finalize is not None:
            finalize(self.partial)
        replaced = self.out.exists()
        os.replace(self.partial, self.out)
        self.journal.remove()
        if replaced:
            logger.info(f"replaced the earlier {self.out}")
        return self.out

    def __enter__(self) -> ResumableOutput:
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if exc is None or self.blocks is None:
            return
        if isinstance(exc, (KeyboardInterrupt, *self.keep_on)):
            self.blocks.close()  # what was written is made durable and journaled
            return
        self.blocks.abandon()
        if not self.resumed:
            self.journal.discard(self.partial)
            raise_if_disk_full(exc, self.out)
            return
        try:
            raise_if_disk_full(exc, self.out)
        except AetherError as full:
            raise AetherError(
                f"{full} (the partial output {self.partial.name} is kept: resume once there is room)"
            ) from None
