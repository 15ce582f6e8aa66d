"""The one error type users see: a message that names the problem and the fix."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type name when the message is empty."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class AetherError(Exception):
    """A problem with the user's input (config, files, checkpoint), not a bug.

    Command-line entry points print it as one line and exit with code 2.
    """
