"""Paths as users type them: `~` and `~name` expanded, and a home folder that cannot be found named in one line.

pathlib's expanduser raises RuntimeError ("Could not determine home directory") for `~name/...` of a user this
system does not know, and for `~` with HOME unset and no entry for the current user: a traceback from every
command that takes a path. Every path clakit reads or writes goes through `expand`, which also refuses a path that
is not UTF-8 text (its records are; convert failed writing its README after all the work).
"""

from pathlib import Path

from clakit.errors import ClakitError


def expand(path, what: str = "path") -> Path:
    """`path` with `~` / `~name` expanded; `what` names it in the message (e.g. "--work-dir", "text data").

    `-`, the usual "standard input/output", is refused: it became a file or folder named `-` in the working
    directory (eval -o -, report -o -, fetch-demo -, demo --work-dir -), or, as text data, was looked up on the Hub."""
    if str(path) == "-":
        raise ClakitError(
            f"{what} - (standard input or output) is not supported: clakit reads and writes files, not streams; "
            "give a file or folder path (save the text to a file first)"
        )
    check_utf8(path, what)
    try:
        return Path(path).expanduser()
    except RuntimeError:
        raise ClakitError(
            f"{what} {path} names the home folder of an unknown user (or HOME is not set); check the path"
        ) from None


def check_utf8(path, what: str = "path") -> None:
    """`path` as UTF-8 text, or one line: clakit records every path it reads or writes in UTF-8 files."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:  # bytes the file system encoding could not decode, kept as lone surrogates
        raise ClakitError(
            f"{what} {str(path)!r} is not valid UTF-8 (a file name with undecodable bytes), and clakit records every "
            "path it reads or writes in UTF-8 files (provenance, README.md); rename it"
        ) from None
