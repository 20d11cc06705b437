"""What every benchmark shares: one-line refusals of bad input (exit 2, no traceback), provenance, and an output
JSON written once, at the end, staged beside its destination and renamed into place (never over an existing file
without --force).

    from common import FORCE_HELP, OUT_HELP, Parser, check_output, emit, main_guard, positive, refuse
"""

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path


class Refusal(Exception):
    """Bad input: reported as one line `SCRIPT: error: MESSAGE` and exit status 2."""


def refuse(message: str):
    raise Refusal(message)


class Parser(argparse.ArgumentParser):
    """argparse with its own errors on one line (usage is what --help is for)."""

    def __init__(self, doc: str, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(description=doc, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def whole_number(text: str, least: int) -> int:
    """`text` as an integer >= `least`, or argparse's one-line error saying what to pass."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer: pass a whole number >= {least}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"{value} is below {least}: pass a whole number >= {least}")
    return value


def positive(text: str) -> int:
    """argparse type: an integer >= 1."""
    return whole_number(text, 1)


def non_negative(text: str) -> int:
    """argparse type: an integer >= 0."""
    return whole_number(text, 0)


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number: pass a number > 0") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{value} is not a finite number > 0: pass one")
    return value


def existing_file(text: str) -> Path:
    """argparse type: a readable file."""
    path = Path(text).expanduser()
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no such file {text!r}: pass the path of an existing file")
    return path


OUT_HELP = "also write the JSON report here, once, at the end (default: stdout only); an existing file needs --force"
FORCE_HELP = "replace an existing --out file"


def check_output(out: Path | None, force: bool, flag: str = "--out") -> None:
    """Refuse, before any work, an output file that cannot be written or would replace a file without --force."""
    if out is None:
        return
    if out.is_dir():
        refuse(f"{flag} {out} is a folder: pass a file path, e.g. {out / 'result.json'}")
    if out.exists() and not force:
        refuse(f"{flag} {out} exists: pass --force to replace it, or choose another path")
    if not out.parent.is_dir():
        refuse(f"{flag} {out}: folder {out.parent} does not exist: create it or choose another path")


def write_json(out: Path, result: dict) -> None:
    """Stage beside `out`, then rename into place: a reader never sees a half-written file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(result, indent=2, default=str) + "\n")
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_figure(fig, path: Path, dpi: int) -> None:
    """A matplotlib figure written beside `path`, then renamed into place (a reader never sees half a PNG)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial.png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=dpi)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def check_apart(out: Path | None, plot: Path | None, flags: str) -> None:
    """Refuse one path for the JSON report and the plot: the later write replaced the earlier (the plot lost)."""
    if out is not None and plot is not None and out.absolute() == plot.absolute():
        refuse(f"{flags} name one file {out}: pass another path for one of them")


def demo_text(name: str, flag: str) -> Path:
    """The demo cache's text `name` (`clakit fetch-demo`; CLAKIT_CACHE moves the cache), refused in one line when
    absent: a default of ~/.cache/clakit/demo ignored CLAKIT_CACHE and failed with a traceback without it."""
    from clakit.demo.fetch import default_cache_dir

    path = default_cache_dir() / "text" / name
    if not path.is_file():
        refuse(f"{flag} not given and the demo's {path} does not exist: run `clakit fetch-demo`, or pass {flag}")
    return path


def emit(result: dict, out: Path | None = None) -> None:
    """Print the report; with `out`, also write it (staged, renamed)."""
    print(json.dumps(result, indent=2, default=str), flush=True)
    if out is not None:
        write_json(out, result)


def provenance(args: argparse.Namespace | None = None, **extra) -> dict:
    """Versions (clakit, transformers, torch, python), the command, the time, and the settings this run used."""
    import torch

    from clakit.provenance import provenance as clakit_provenance

    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()} if args else {}
    return clakit_provenance(torch_threads=torch.get_num_threads(), settings=settings, **extra)


def main_guard(main) -> None:
    """Run `main`; a Refusal or a ClakitError (clakit's own one-line refusals) becomes one line and exit 2."""
    from clakit.errors import ClakitError

    prog = Path(sys.argv[0]).name
    try:
        main()
    except (Refusal, ClakitError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
