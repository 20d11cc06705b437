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
        "command": shlex.join(sys.argv),
        "cwd": _cwd(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }


def _cwd() -> str | None:
    try:
        return os.getcwd()
    except OSError:  # the working directory was deleted under the process
        return None
