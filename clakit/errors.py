"""The one exception type the CLI turns into a one-line message and a non-zero exit, and the one a SIGTERM raises."""


class ClakitError(Exception):
    """A user-facing problem: the message names what is wrong and what to do about it (one line, no traceback)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's time limit, `kill`, a container stopping) or SIGHUP (the terminal or ssh session closed)
    raised in the main thread: a KeyboardInterrupt, so every `finally` that removes a staging or scratch folder runs
    as it does for Ctrl-C. `signum`: the signal's number (the exit status is 128 + it)."""

    def __init__(self, signum: int = 15):
        super().__init__(signum)
        self.signum = signum
