"""Messages for the user, through `logging`: each module logs to its own logger under "aether"
(`logging.getLogger(__name__)`), and nothing is shown until someone shows it. The command line
calls `show_messages`, which prints them one line each on stdout, above any active progress bar,
from rank 0 alone under torchrun; a notebook may call it too, or configure logging its own way."""

from __future__ import annotations

import logging

from tqdm.auto import tqdm

from aether.core.ranks import is_main

LOGGER = "aether"


class _ProgressBarHandler(logging.Handler):
    """Writes each record as one line through tqdm, so progress bars are redrawn below it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record))
        except Exception:  # a closed stream: as logging's own handlers do
            self.handleError(record)


def _main_process_only(record: logging.LogRecord) -> bool:
    return is_main()


def show_messages(level: int = logging.INFO) -> logging.Handler:
    """Show the library's messages (at `level` and above) on stdout, once per process; returns the
    handler (calling again returns the one already installed)."""
    logger = logging.getLogger(LOGGER)
    for handler in logger.handlers:
        if isinstance(handler, _ProgressBarHandler):
            return handler
    handler = _ProgressBarHandler()
    handler.addFilter(_main_process_only)
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False  # shown once, here, not again by a root handler
    return handler
