"""The one error type users see: a message that names the problem and the fix."""

import reprlib

DISTRIBUTION = "aether-alphaearth"  # the package's name on the package index
SHOWN_CHARS = 80  # the most of a user's value an error message quotes

_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxlist, _repr.maxtuple, _repr.maxdict, _repr.maxset = 2, 4, 4, 4, 4
_repr.maxstring = _repr.maxother = _repr.maxlong = SHOWN_CHARS


def shown(value: object) -> str:
    """A user's value as an error message quotes it: repr, cut to about SHOWN_CHARS characters and two
    levels of nesting, so a huge or self-multiplying value (a YAML 'billion laughs') prints short."""
    try:
        text = _repr.repr(value)
    except ValueError:  # an int of more digits than Python converts to text
        return "a number of more than 4,300 digits"
    return text if len(text) <= SHOWN_CHARS + 10 else text[:SHOWN_CHARS] + "..."


def install_hint(extra: str) -> str:
    """How to install the optional part `extra` (openai, dask, osm) of AETHER."""
    return f"pip install '{DISTRIBUTION}[{extra}]'"


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type name when the message is empty."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class AetherError(Exception):
    """A problem with the user's input (config, files, checkpoint), not a bug.

    Command-line entry points print it as one line and exit with code 2.
    """


class Interrupted(Exception):
    """A run that stopped cleanly on a signal after saving its work.

    The message says where the work is and how to continue; the exit code is 128 plus the
    signal number (130 for SIGINT, 143 for SIGTERM), as shells report a signal.
    """

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code
