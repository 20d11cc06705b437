"""Eval report files: written atomically by the file rule of clakit.outputs, read back with a check that they are
clakit reports."""

import json
from pathlib import Path

from clakit import outputs
from clakit.errors import ClakitError

FORMAT = "clakit-eval-report/1"
REQUIRED = ("perplexity", "word_perplexity", "bits_per_byte", "num_tokens", "kv_cache", "settings", "provenance")


def check_output(path) -> Path:
    """Before evaluating: `path` may receive a report (new, or a clakit report it replaces; its folder writable)."""
    return outputs.check_file(path, FORMAT, noun="eval report")


def write_json(report: dict, path) -> Path:
    """Write by clakit's file rule (clakit.outputs): a temp file beside `path`, then an atomic rename; only a new
    file or an earlier clakit report is replaced."""
    return outputs.write_file(path, json.dumps(report, indent=2, sort_keys=False) + "\n", FORMAT, noun="eval report")


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
