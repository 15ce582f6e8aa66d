"""The one error type users see: a message that names the problem and the fix."""


class AetherError(Exception):
    """A problem with the user's input (config, files, checkpoint), not a bug.

    Command-line entry points print it as one line and exit with code 2.
    """
