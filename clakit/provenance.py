"""Where an output came from: versions of the tools, the command line, the time."""

import datetime
import platform
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
    """Versions + command line + UTC time, merged with the caller's own fields (source, revision, settings...)."""
    return {
        **versions(),
        "command": " ".join(sys.argv),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }
