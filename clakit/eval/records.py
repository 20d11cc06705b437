"""Eval report files: written atomically, read back with a check that they are clakit reports."""

import json
import os
import tempfile
from pathlib import Path

from clakit.errors import ClakitError

FORMAT = "clakit-eval-report/1"
REQUIRED = ("perplexity", "word_perplexity", "bits_per_byte", "num_tokens", "kv_cache", "settings", "provenance")


def write_json(report: dict, path) -> Path:
    """Write into a temp file beside `path`, then rename: a crash never leaves a half-written report."""
    path = Path(path)
    if path.is_dir():
        raise ClakitError(f"output {path} is a folder; give a file name such as {path / 'report.json'}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(report, f, indent=2, sort_keys=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_report(path) -> dict:
    """A clakit eval report, or a one-line error saying why the file is not one."""
    path = Path(path)
    try:
        report = json.loads(path.read_text())
    except FileNotFoundError:
        raise ClakitError(f"report {path} does not exist") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ClakitError(
            f"{path} is not a clakit eval report (not readable JSON: {str(e)[:120]}); "
            "give files written by `clakit eval -o`"
        ) from None
    if not isinstance(report, dict) or report.get("format") != FORMAT:
        raise ClakitError(
            f"{path} is not a clakit eval report (no format {FORMAT!r}); give files written by `clakit eval -o`"
        )
    missing = [k for k in REQUIRED if k not in report]
    if missing:
        raise ClakitError(f"{path} is not a complete clakit eval report (missing {', '.join(missing)})")
    return report
