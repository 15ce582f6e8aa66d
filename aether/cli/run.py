"""Command-line plumbing shared by the entry points: one line and exit code 2 for user errors."""
from __future__ import annotations

import errno
import logging
import sys
from typing import Callable

from aether.core.log import is_main_process
from aether.core.errors import AetherError


class Interrupted(Exception):
    """A run that stopped cleanly on a signal after saving its work.

    The message says where the work is and how to continue; the exit code is 128 plus the
    signal number (130 for SIGINT, 143 for SIGTERM), as shells report a signal.
    """

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


FIXES = {errno.ENOSPC: "free some space or write elsewhere", errno.ENAMETOOLONG: "choose a shorter name"}


def run(main: Callable[[], object]) -> None:
    """Run `main`; an AetherError becomes 'error: ...' on stderr and exit code 2, a clean stop
    on a signal its message and 128 + the signal number. Under torchrun every process exits so,
    rank 0 alone printing the line (the ranks meet the same errors, or share them first)."""
    say = is_main_process()
    # GDAL's messages reach Python's logging through rasterio; its failures that matter come back as
    # exceptions, which become the one line below, so its log lines would only be noise before it
    logging.getLogger("rasterio").addHandler(logging.NullHandler())
    logging.getLogger("rasterio").propagate = False
    try:
        main()
    except AetherError as exc:
        if say:
            print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.ENAMETOOLONG):
            raise
        if say:  # a write the code did not expect to fail (the writers that know their file say so)
            reason = (exc.strerror or "cannot write").lower()
            print(f"error: {reason}{f' writing {exc.filename}' if exc.filename else ''}; "
                  f"{FIXES.get(exc.errno, 'choose a writable place')}", file=sys.stderr)
        sys.exit(2)
    except Interrupted as exc:
        if say:
            print(exc, file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        if say:
            print("interrupted", file=sys.stderr)
        sys.exit(130)
