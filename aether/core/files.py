"""Writing files safely: so that readers never see half of one (a temporary file beside the target,
renamed over it at the end), so that two runs never write the same one (an exclusive lock held for
the whole run), and never over a file the run reads. No heavy imports, so any module (and any
picture) can use it."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from aether.core.errors import AetherError

logger = logging.getLogger(__name__)


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
    try:
        fd, tmp = temp_file_beside(path)
    except OSError as exc:
        raise_if_disk_full(exc, path)
        raise AetherError(f"cannot write {path}: {exc.strerror or exc} (in {path.parent})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        raise_if_disk_full(exc, path)
        raise


DISK_FULL_BYTES = 1 << 20  # a write that failed with less than this free is taken as "no space left"


def raise_if_disk_full(exc: BaseException, path: str | Path) -> None:
    """Turn a failed write of `path` into one line when its file system is full: ENOSPC, or any
    error (torch's zip writer reports a short write as a RuntimeError) while under
    DISK_FULL_BYTES are free there. Anything else is left to the caller to raise."""
    if isinstance(exc, (KeyboardInterrupt, SystemExit, AetherError)):
        return
    folder = Path(path).parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = None
    if getattr(exc, "errno", None) == errno.ENOSPC or (free is not None and free < DISK_FULL_BYTES):
        raise AetherError(
            f"cannot write {path}: no space left on device ({free if free is not None else '?'} bytes "
            f"free in {folder}); free some space or write elsewhere"
        ) from None


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


class RunLock:
    """An exclusive lock (flock) on the file `path`, held while a run writes what it guards.

    A second run that asks while the first holds it is refused with one line naming `what`, the
    holder's pid and `fix`. The kernel releases the lock when its holder dies, SIGKILL included,
    so a lock file left by a dead run blocks nothing: the next run takes it over. The holder
    removes the file when it lets go; a run that opened the file just before is not fooled, as it
    checks, once locked, that the path still names the file it locked.
    """

    def __init__(self, path: str | Path, what: str, fix: str):
        self.path, self.what, self.fix = Path(path), what, fix
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        import fcntl

        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except IsADirectoryError:
                raise AetherError(
                    f"the lock file {self.path} of {self.what} is a folder; remove it, or {self.fix}"
                ) from None
            except OSError as exc:
                raise_if_disk_full(exc, self.path)
                raise AetherError(
                    f"cannot make the lock file {self.path} of {self.what}: "
                    f"{(exc.strerror or str(exc)).lower()}; {self.fix}"
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 256).decode("utf-8", "replace").split()
                os.close(fd)
                raise AetherError(
                    f"{self.what} is being written by another run ({_holder(holder)}); wait for it or {self.fix}"
                ) from None
            except OSError as exc:  # a file system without locks (some network mounts): go on, and say so
                os.close(fd)
                self.path.unlink(missing_ok=True)
                logger.warning(f"cannot lock {self.path} ({exc.strerror}); make sure no other run writes {self.what}")
                return self
            try:
                here, locked = os.stat(self.path), os.fstat(fd)
                current = (here.st_dev, here.st_ino) == (locked.st_dev, locked.st_ino)
            except FileNotFoundError:
                current = False
            if current:
                break
            os.close(fd)  # its holder removed it between our open and our lock: try the new one
        self._fd = fd
        try:  # who holds it, for a refusal's message; the lock holds without it (a full disk)
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        except OSError:
            pass
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)  # while still locked, so no one locks the old file meanwhile
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _holder(words: list[str]) -> str:
    if not words:
        return "pid unknown"
    if len(words) > 1 and words[1] != socket.gethostname():
        return f"pid {words[0]} on {words[1]}"
    return f"pid {words[0]}"


def output_lock(out: str | Path, fix: str = "choose another --out") -> RunLock:
    """The lock a run holds while it writes the file `out`: `.OUT.lock` beside it."""
    out = Path(out)
    return RunLock(out.parent / f".{out.name}.lock", str(out), fix)


@contextmanager
def folder_lock(folder: str | Path, name: str, what: str, fix: str) -> Iterator[Path]:
    """Hold the lock file `name` inside `folder` for the block (`what` names the folder in a
    refusal). The folder (and any missing parents) is created if missing, and removed again at
    the end if the block left it empty: a run that failed leaves nothing behind."""
    folder = Path(folder)
    created = []  # the folders made here, deepest first
    missing = folder
    while not missing.exists():
        created.append(missing)
        missing = missing.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        for made in created:  # what mkdir made before it failed
            if made.is_dir() and not any(made.iterdir()):
                made.rmdir()
        raise_if_disk_full(exc, folder / name)
        raise AetherError(
            f"cannot make the {what}: {(exc.strerror or str(exc)).lower()} ({exc.filename or folder}); {fix}"
        ) from None
    try:
        with RunLock(folder / name, what, fix):
            yield folder
    finally:
        for made in created:
            if any(made.iterdir()):
                break
            made.rmdir()


def check_inputs_kept(outputs: Iterable[str | Path], inputs: dict[str, str], fix: str) -> None:
    """Refuse, before any work, to write any of `outputs` over one of the files a run reads:
    `inputs` maps each such file to what it is ('the input raster', ...). Paths are compared
    resolved (symbolic links, `..`), and existing files also by identity (hard links)."""
    by_path = {os.path.realpath(p): what for p, what in inputs.items()}
    by_file = {}
    for p, what in inputs.items():
        try:
            st = os.stat(p)
        except OSError:
            continue
        by_file.setdefault((st.st_dev, st.st_ino), what)
    for out in outputs:
        what = by_path.get(os.path.realpath(out))
        if what is None:
            try:
                st = os.stat(out)
                what = by_file.get((st.st_dev, st.st_ino))
            except OSError:
                pass
        if what is not None:
            raise AetherError(f"output {out} is {what}; {fix}")


def check_output_file(
    out: Path,
    inputs: dict[str, str] | None = None,
    example: str = "output.tif",
    suffixes: tuple[str, ...] | None = None,
    fix: str = "choose another file name",
) -> None:
    """Refuse, before any work, an output file path that cannot be written (a folder, a missing or
    read-only folder, a name too long for the partial files beside it, another suffix than
    `suffixes`) or that is one of `inputs`, the files the run reads (`check_inputs_kept`)."""
    out = Path(out)
    if out.is_dir():
        raise AetherError(f"output {out} is a folder; give a file name such as {out / example}")
    if not out.parent.is_dir():
        raise AetherError(f"output folder {out.parent} does not exist")
    if suffixes is not None and out.suffix.lower() not in suffixes:
        raise AetherError(f"output {out} should end in {' or '.join(suffixes)}")
    if not os.access(out.parent, os.W_OK):
        raise AetherError(f"output folder {out.parent} is not writable")
    check_name_length(out)
    if inputs:
        check_inputs_kept([out], inputs, fix)


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
        raise AetherError(
            f"output name {out.name[:40]}... is {length} bytes long; this file system allows "
            f"{limit}, and the run's partial files add {PARTIAL_NAME_EXTRA}: choose a name of at most "
            f"{limit - PARTIAL_NAME_EXTRA} bytes"
        )


def check_output_folder(out: Path) -> None:
    """Refuse, before any work, an output folder that is a file or cannot be created or written."""
    if out.exists() and not out.is_dir():
        raise AetherError(f"output {out} is a file; give a folder")
    if not out.parent.is_dir():
        raise AetherError(f"folder {out.parent} (holding the output folder) does not exist")
    if not os.access(out if out.exists() else out.parent, os.W_OK):
        raise AetherError(f"output folder {out} is not writable")


def check_writable_dir(path: Path, what: str) -> None:
    """Refuse, before any work, a folder that cannot be created or written; create nothing."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise AetherError(f"{what}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise AetherError(f"{what}: cannot write to {existing} (permission denied)")
