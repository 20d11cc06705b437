"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class ClakitError(Exception):
    """A user-facing problem: the message names what is wrong and what to do about it (one line, no traceback)."""
