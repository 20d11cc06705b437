"""Where an output came from: versions of the tools, the command line, the time."""

import datetime
import os
import platform
import shlex
import sys


def versions() -> dict:
    import torch
    import transformers

    import clakit

    return {
        "clakit": clakit.__version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def provenance(**extra) -> dict:
    """Versions + command line + UTC time, merged with the caller's own fields (source, revision, settings...).

    The command is shell-quoted (a path with a space reads back as one argument) and the working directory is kept:
    relative paths in the command and the records are relative to it."""
    return {
        **versions(),
        "command": _command(),
        "cwd": _cwd(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }


def _command() -> str:
    """The command line as typed. Under `python -m clakit`, sys.argv[0] is the path of clakit/__main__.py, which
    does not run as a command (`/x/clakit/__main__.py convert ...`: permission denied): the interpreter's own
    arguments (`python -m clakit convert ...`) are recorded instead."""
    if sys.argv and sys.argv[0].endswith("__main__.py") and getattr(sys, "orig_argv", None):
        return shlex.join(sys.orig_argv)
    return shlex.join(sys.argv)


def _cwd() -> str | None:
    try:
        return os.getcwd()
    except OSError:  # the working directory was deleted under the process
        return None
