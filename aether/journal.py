"""What an interrupted inference run had finished: a small JSON journal beside its partial
output, so `--resume` (or a rerun of a Dask task) continues where it stopped."""
from __future__ import annotations

import json
from pathlib import Path

from aether.console import log
from aether.errors import AetherError
from aether.files import atomic_write_text


class Journal:
    """What an interrupted run had finished: a small JSON file beside its partial output.

    The partial GeoTIFF's blocks, then its block index, are forced to disk
    (`aether.block_writer.BlockFile.sync`) before tiles are recorded here, so every tile the
    journal names is really in the file.
    """

    def __init__(self, path: Path, fingerprint: dict):
        self.path, self.fingerprint = path, fingerprint

    def matches(self, partial: Path) -> bool:
        """Is there an interrupted run of the same work to continue?"""
        try:
            self.load(partial)
        except AetherError:
            return False
        return True

    def load(self, partial: Path) -> set[int]:
        if not self.path.is_file() or not partial.is_file():
            raise AetherError(f"nothing to resume: no interrupted run of this output ({partial.name} and "
                              f"{self.path.name} beside it); run without --resume")
        try:
            saved = json.loads(self.path.read_text())
            old, done = saved["fingerprint"], saved["done"]
        except (OSError, ValueError, KeyError, TypeError):
            raise AetherError(f"resume journal {self.path} is damaged; run without --resume to start over") from None
        changed = sorted(k for k in self.fingerprint if old.get(k) != self.fingerprint[k])
        if changed:
            raise AetherError(f"cannot resume: the interrupted run had other {', '.join(changed)}; "
                              f"run without --resume to start over")
        return set(int(i) for i in done)

    def save(self, done: set[int]) -> None:
        atomic_write_text(self.path, json.dumps({"fingerprint": self.fingerprint, "done": sorted(done)}))

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)

    def discard(self, partial: Path, what: str | None = None) -> None:
        """Remove `partial` and this journal (a run that failed, or one starting over the output of
        `what`: then saying so if either was there)."""
        if what is not None and (partial.exists() or self.path.exists()):
            log(f"discarding the partial output of {what} ({partial.name})")
        partial.unlink(missing_ok=True)
        self.remove()


def partial_paths(out: Path) -> tuple[Path, Path]:
    """The partial output and its journal that a run of `out` keeps beside it until it ends."""
    return out.parent / f".{out.name}.partial.tif", out.parent / f".{out.name}.partial.json"
