"""How every command runs: the process set up as a program owning it sets it up, and the one-line
errors and exit codes users see (2 for bad input, 128 + N for a clean stop on signal N)."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from collections.abc import Callable

from aether.core.errors import AetherError, Interrupted
from aether.core.log import show_messages
from aether.core.ranks import is_main
from aether.core.runtime import keep_tile_buffers
from aether.geo import gdal

FIXES = {errno.ENOSPC: "free some space or write elsewhere", errno.ENAMETOOLONG: "choose a shorter name"}


def setup_process() -> None:
    """What a command does to its process before any work, and the library never does on import:
    GDAL's settings for remote reads, the malloc settings for tile-sized arrays, the library's
    messages shown on stdout (rank 0 alone under torchrun), and GDAL's own log lines silenced
    (its failures that matter come back as exceptions, which become one line)."""
    gdal.configure()
    keep_tile_buffers()
    show_messages()
    logging.getLogger("rasterio").addHandler(logging.NullHandler())
    logging.getLogger("rasterio").propagate = False


def run(main: Callable[[], object]) -> None:
    """Set up the process and run `main`; an AetherError becomes 'error: ...' on stderr and exit
    code 2, a clean stop on a signal its message and 128 + the signal number. Under torchrun every
    process exits so, rank 0 alone printing the line (the ranks meet the same errors, or share
    them first)."""
    say = is_main()
    try:
        setup_process()
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
            print(
                f"error: {reason}{f' writing {exc.filename}' if exc.filename else ''}; "
                f"{FIXES.get(exc.errno, 'choose a writable place')}",
                file=sys.stderr,
            )
        sys.exit(2)
    except Interrupted as exc:
        if say:
            print(exc, file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        if say:
            print("interrupted", file=sys.stderr)
        sys.exit(130)


def launcher(script: str) -> list[str]:
    """The words that start this command again, for a message that says how to resume: `python
    SCRIPT`, `aether COMMAND`, or under torchrun `torchrun --nproc_per_node=N SCRIPT` (or
    `... --no-python aether COMMAND`, which is how torchrun starts the installed command)."""
    words = script.split()
    if "LOCAL_WORLD_SIZE" in os.environ:
        start = ["torchrun", f"--nproc_per_node={os.environ['LOCAL_WORLD_SIZE']}"]
        return [*start, "--no-python", *words] if words[0] == "aether" else [*start, sys.argv[0]]
    return words


def command(
    add_arguments: Callable[[argparse.ArgumentParser], None],
    run_command: Callable[[argparse.Namespace, list[str]], object],
    description: str,
    script: str,
) -> Callable[[list[str] | None], None]:
    """A command's `main(argv)`: its arguments parsed (`add_arguments`), then `run_command(args,
    launcher)` under `run`. `script` is how the top-level script is started (python train.py)."""

    def main(argv: list[str] | None = None) -> None:
        parser = argparse.ArgumentParser(description=description)
        add_arguments(parser)
        args = parser.parse_args(argv)
        run(lambda: run_command(args, launcher(script)))

    return main
