"""Writing files so that readers never see half of one: a temporary file beside the target,
renamed over it at the end. No heavy imports, so any module (and any picture) can use it."""
from __future__ import annotations

import hashlib
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator


def temp_file_beside(path: Path, suffix: str = ".tmp") -> tuple[int, Path]:
    """A new temporary file in `path`'s folder (same file system, so a rename is atomic),
    with the permissions an ordinary new file gets rather than mkstemp's 0600."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    return fd, Path(tmp)


@contextmanager
def atomic_write(path: str | Path) -> Iterator[BinaryIO]:
    """A binary file that replaces `path` (via a temporary file beside it and a rename) only when
    the block ends without an error: readers never see half a file."""
    path = Path(path)
    fd, tmp = temp_file_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """UTF-8 `text` to `path` through `atomic_write`."""
    with atomic_write(path) as f:
        f.write(text.encode("utf-8"))


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
