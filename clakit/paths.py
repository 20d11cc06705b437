"""Paths as users type them: `~` and `~name` expanded, and a home folder that cannot be found named in one line.

pathlib's expanduser raises RuntimeError ("Could not determine home directory") for `~name/...` of a user this
system does not know, and for `~` with HOME unset and no entry for the current user: a traceback from every
command that takes a path. Every path clakit reads or writes goes through `expand`, which also refuses a path that
is not UTF-8 text (its records are; convert failed writing its README after all the work).
"""

import os
from pathlib import Path

from clakit.errors import ClakitError

NAME_MAX = 255  # bytes in one file name on the usual file systems (ext4, xfs, btrfs, tmpfs, APFS)
PATH_MAX = 4096  # Linux's limit on a path given to a system call, its final NUL included


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
        expanded = Path(path).expanduser()
    except RuntimeError:
        raise ClakitError(
            f"{what} {path} names the home folder of an unknown user (or HOME is not set); check the path"
        ) from None
    check_length(expanded, what)
    return expanded


def check_length(path: Path, what: str = "path") -> None:
    """One line for a path the file system refuses outright (ENAMETOOLONG): a name in it longer than its file system
    takes (`name_max`), or the whole over PATH_MAX; else every look at it (exists, stat, open) was an OSError
    traceback."""
    size, name = max((len(os.fsencode(name)), name) for name in path.parts) if path.parts else (0, "")
    limit = name_max(path) if size > NAME_MAX else NAME_MAX  # statvfs only for a name over the usual limit
    if size > limit:
        raise ClakitError(
            f"{what} path has a name of {size} bytes ({name[:40]}...), over the {limit} its file system takes: "
            "choose a shorter name"
        )
    size = len(os.fsencode(str(path)))
    if size >= PATH_MAX:
        raise ClakitError(
            f"{what} path is {size} bytes long ({str(path)[:40]}...), over the {PATH_MAX - 1} a file system call "
            "takes: choose a shorter path"
        )


def name_max(path: Path) -> int:
    """The longest name, in bytes, the file system of `path` (its nearest folder that exists) takes: 255 on ext4, xfs,
    btrfs, tmpfs; more on vfat, exFAT or NTFS, whose limit is 255 UTF-16 units (a CJK name of 86+ characters there
    is over 255 bytes)."""
    for folder in [path, *path.parents]:
        try:
            return os.statvfs(folder).f_namemax
        except (OSError, ValueError):  # missing, or itself too long: its parent
            continue
    return NAME_MAX


def check_utf8(path, what: str = "path") -> None:
    """`path` as UTF-8 text, or one line: clakit records every path it reads or writes in UTF-8 files."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:  # bytes the file system encoding could not decode, kept as lone surrogates
        raise ClakitError(
            f"{what} {str(path)!r} is not valid UTF-8 (a file name with undecodable bytes), and clakit records every "
            "path it reads or writes in UTF-8 files (provenance, README.md); rename it"
        ) from None
