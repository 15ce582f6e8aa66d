"""What an interrupted run had finished: a small JSON journal beside its partial output, so
`--resume` (or a rerun of a Dask task, or of a fetch) continues where it stopped."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from aether.core.errors import AetherError
from aether.core.files import atomic_write_text

logger = logging.getLogger(__name__)


class OtherWork(AetherError):
    """The journal is of another run (other input, options or checkpoint): `changed` names what differs."""

    def __init__(self, changed: list[str]):
        super().__init__(
            f"cannot resume: the interrupted run had other {', '.join(changed)}; run without --resume to start over"
        )
        self.changed = changed


class Journal:
    """What an interrupted run had finished: a small JSON file beside its partial output.

    It holds the run's fingerprint (what it reads and how: a run of other work is not continued),
    the finished pieces, and for each the blocks it wrote (index, offset, size, CRC-32). The
    partial GeoTIFF's blocks, then its block index, are forced to disk
    (`aether.geo.blocks.BlockFile.sync`) before pieces are recorded here, and a resume checks
    each recorded block against the file before trusting it.
    """

    def __init__(self, path: Path, fingerprint: dict):
        self.path, self.fingerprint = path, fingerprint

    def exists(self, partial: Path) -> bool:
        return self.path.is_file() and partial.is_file()

    def load(self, partial: Path) -> tuple[set[int], dict[int, list]]:
        """The finished pieces and their blocks; AetherError when there is nothing to resume or the
        journal is damaged, `OtherWork` when it is another run's."""
        if not self.exists(partial):
            raise AetherError(
                f"nothing to resume: no interrupted run of this output ({partial.name} and "
                f"{self.path.name} beside it); run without --resume"
            )
        try:
            saved = json.loads(self.path.read_text())
            old, done, blocks = saved["fingerprint"], _pieces(saved["done"]), saved.get("blocks", {})
            blocks = {_piece(k): [_block(b) for b in v] for k, v in blocks.items()}
            if not isinstance(old, dict):
                raise TypeError
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise AetherError(f"resume journal {self.path} is damaged; run without --resume to start over") from None
        changed = sorted(k for k in self.fingerprint if old.get(k) != self.fingerprint[k])
        if changed:
            raise OtherWork(changed)
        return done, blocks

    def save(self, done: set[int], blocks: dict[int, list] | None = None) -> None:
        record = {
            "fingerprint": self.fingerprint,
            "done": sorted(done),
            "blocks": {str(k): v for k, v in sorted((blocks or {}).items())},
        }
        atomic_write_text(self.path, json.dumps(record, separators=(",", ":")))

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)

    def discard(self, partial: Path, what: str | None = None) -> None:
        """Remove `partial` and this journal (a run that failed, or one starting over the output of
        `what`: then saying so if either was there)."""
        if what is not None and (partial.exists() or self.path.exists()):
            logger.info(f"discarding the partial output of {what} ({partial.name})")
        partial.unlink(missing_ok=True)
        self.remove()


def _piece(value) -> int:
    """A piece id from the journal: a whole number (JSON keys are text), never a bool or a fraction."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise TypeError
    number = int(value)
    if number < 0:
        raise ValueError
    return number


def _pieces(values) -> set[int]:
    if not isinstance(values, list):
        raise TypeError
    return {_piece(v) for v in values}


def _block(value) -> tuple[int, int, int, int]:
    """(index, offset, size, CRC-32) of one recorded block."""
    if (
        not isinstance(value, list)
        or len(value) != 4
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        raise TypeError
    return tuple(value)


def partial_paths(out: Path) -> tuple[Path, Path]:
    """The partial output and its journal that a run of `out` keeps beside it until it ends."""
    return out.parent / f".{out.name}.partial.tif", out.parent / f".{out.name}.partial.json"
