"""Command-line plumbing shared by the entry points: one line and exit code 2 for user errors."""
from __future__ import annotations

import sys
from typing import Callable

from aether.errors import AetherError


def run(main: Callable[[], object]) -> None:
    """Run `main`; an AetherError becomes 'error: ...' on stderr and exit code 2."""
    try:
        main()
    except AetherError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
