"""Every folder and file clakit writes for the user goes through here: check (before any work), stage, publish.

The ownership rule. clakit replaces only what it wrote:
- an output folder carries a marker, MARKER: {"kind", "run_id", "files", "clakit", "created"}; a folder is replaced
  (with --overwrite, or always for a report folder) only when it is a clakit output of the same kind and holds
  nothing beyond the files the marker lists (so files a user added are never deleted). Outputs of older clakit
  (no marker) are recognised by their records (LEGACY);
- never `/`, HOME, the working directory or an ancestor of them; never a folder that contains, or is inside, an
  input of the run (model, teacher, data, recipe); never a plain file or a link where a folder is wanted;
- a file (an eval report) is replaced only when it is a clakit JSON file of the same format;
- the refusal suggests --overwrite only when overwriting would be allowed.

Writing: `staged()` makes a unique hidden folder beside the destination (`.NAME.XXXXXXXX.partial`, one per run, so
two runs never share one), `publish()` renames it into place; an old output is moved aside first and removed only
once the new one is in place. Any OSError becomes a one-line ClakitError, and a failed run leaves nothing behind.
A killed run (kill -9) leaves its staging folder: the next run writing into the same folder (any output name there)
removes it only when clakit stamped it on this host (STAGING_STAMP) and no live process holds the stamp's lock
(`reclaim_leftovers`); a second run on a destination another live process is staging is refused before its work.
"""

import contextlib
import errno
import fcntl
import fnmatch
import json
import os
import re
import shutil
import socket
import stat
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path

from safetensors import SafetensorError

from clakit.errors import ClakitError
from clakit.paths import NAME_MAX, check_length, expand, name_max
from clakit.provenance import CONVERT_RECORD, REPORT_RECORD

MARKER = ".clakit_output.json"
# in a staging folder until it is published: which host's clakit made it, so a leftover is known to be clakit's
STAGING_STAMP = ".clakit_staging.json"
NOUNS = {"convert": "convert output", "uptrain": "uptrain run", "model": "uptrained model", "report": "report folder"}
# passkey.png: reports with passkeys; the record: a report folder whose marker was lost (an older one has none)
REPORT_FILES = {"report.md", "report.html", "ppl_vs_kv.png", "passkey.png", REPORT_RECORD}
# The names clakit before the marker (2026-12-02, c56d9aa) wrote into each kind of output: anything else in such a
# folder is a user's (notes, an eval report, an analysis folder), and --overwrite deleted it with the output.
LEGACY_NAMES = {
    "convert": (
        "config.json", "generation_config.json", "README.md", CONVERT_RECORD, "configuration_cla.py",
        "modeling_cla.py", "*.safetensors", "model.safetensors.index.json", "tokenizer*", "special_tokens_map.json",
        "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "*.model", "chat_template.jinja",
        "chat_template.json",
    ),  # (no *tokenization*.py, additional_chat_templates: clakit wrote them only after the marker)
    "uptrain": (
        "run.json", "recipe.yaml", "metrics.jsonl", "checkpoints", "eval", "model", "report", "converted",
        "tensorboard", ".model.tmp",  # the result's staging, left by a run killed as it saved
    ),
    "report": tuple(REPORT_FILES),
}  # fmt: skip


def _legacy_kind(folder: Path) -> str | None:
    """Outputs of clakit versions that wrote no marker, recognised by their own records."""
    if (folder / CONVERT_RECORD).is_file():
        return "convert"
    with contextlib.suppress(OSError, ValueError):
        run = json.loads(read_regular(folder / "run.json"))
        if isinstance(run, dict) and {"fingerprint", "recipe"} <= set(run):
            return "uptrain"
    try:
        names = {p.name for p in folder.iterdir()}
    except OSError:  # a folder this user may not list (an ancestor of OUT): not one clakit wrote for this user
        return None
    return "report" if names <= REPORT_FILES and _clakit_page(folder / "report.html") else None


REPORT_PAGE_HEAD = b"<title>clakit eval report</title>"  # in the <head> of every report.html clakit has written


def _clakit_page(page: Path) -> bool:
    """Whether `page` is a report.html that clakit wrote: a user's own report.html (with report.md beside it) is
    not an older clakit report folder, and replacing it would delete the user's files."""
    with contextlib.suppress(OSError):
        return REPORT_PAGE_HEAD in read_regular(page, 512)
    return False


def read_regular(path: Path, limit: int = 1 << 20) -> bytes:
    """At most `limit` bytes of `path`, or OSError where it is not a regular file: clakit reads the files of a folder
    it may replace, and a FIFO under one of its names blocked that read for good (a device would read on and on)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read(limit)
    finally:
        os.close(fd)


def read_marker(folder: Path) -> dict | None:
    try:
        marker = json.loads(read_regular(folder / MARKER))
    except (OSError, ValueError):
        return None
    ok = isinstance(marker, dict) and marker.get("kind") in NOUNS and isinstance(marker.get("files", []), list)
    return marker if ok else None


def owner(folder: Path) -> str | None:
    """The kind of clakit output `folder` is ("convert", "uptrain", ...), or None when clakit did not write it."""
    marker = read_marker(folder)
    if marker:
        return marker["kind"]
    # one clakit cannot read (damaged, a FIFO or a folder of that name) is not an older clakit's missing marker
    return None if os.path.lexists(folder / MARKER) else _legacy_kind(folder)


WRITE_PROBE = ".clakit-write-test."  # the prefix of the files that probe whether a folder takes new files


def foreign_files(folder: Path) -> list[str]:
    """Names in a marked clakit output that its marker does not list (files a user put there)."""
    marker = read_marker(folder)
    if marker is None:  # an older clakit's output: its file list was not recorded, the names it could write were
        kind = _legacy_kind(folder)
        patterns = LEGACY_NAMES.get(kind, ())
        return sorted(
            p.name for p in folder.iterdir()
            # a leftover of clakit's staging only for a name clakit writes there (a resumed run's `.model.*.partial`;
            # `.notes.20261205.old` is a user's backup)
            if not any(fnmatch.fnmatchcase(n, pat) for n in (p.name, _staged_name(p.name) or "") for pat in patterns)
            and not p.name.startswith(WRITE_PROBE)
        )  # fmt: skip
    known = set(marker.get("files", [])) | {MARKER, STAGING_STAMP}  # the stamp: a run killed as it published
    # a write probe of another process checking this folder now (check_writable, _check_replaceable): not a user's
    return sorted(
        p.name for p in folder.iterdir()
        if p.name not in known and _staged_name(p.name) not in known and not p.name.startswith(WRITE_PROBE)
    )  # fmt: skip


def _staged_name(name: str) -> str | None:
    """The output a leftover of clakit's own belongs to (`.NAME.XXXXXXXX.partial` staging folders, `.scratch` ones (a
    conversion's calibration streams), `.NAME.XXXXXXXX.old` outputs moved aside, left by a killed process), or None
    for any other name."""
    m = re.fullmatch(r"\.(.+)\.[\w]{8}\.(partial|scratch|old)", name)
    return m and m.group(1)


# --- checks, before any work ---------------------------------------------------------------------------------------


def _protected() -> dict[Path, str]:
    places = {Path("/"): "the root folder"}
    with contextlib.suppress(OSError):  # a working directory that was deleted meanwhile
        places[Path.cwd().resolve()] = "the working directory"
    with contextlib.suppress(RuntimeError, KeyError):
        places[Path.home().resolve()] = "your home folder"
    return places


def _input_paths(inputs: Iterable[tuple[str, object]]) -> list[tuple[str, Path]]:
    """(role, resolved path) of every input that is a local path (Hub ids and NAME:CONFIG:SPLIT specs are not)."""
    out = []
    for role, specs in inputs:
        for spec in [specs] if isinstance(specs, str | Path) else specs or []:
            path = expand(str(spec), role)
            if str(spec) and path.exists():
                out.append((role, path.resolve()))
    return out


def _absolute(path, label: str) -> Path:
    """`path` expanded and made absolute, its length checked as clakit uses it: a relative path under a deep working
    folder passed expand()'s check and was over PATH_MAX once absolute (an OSError traceback at the first look)."""
    absolute = expand(path, label).absolute()
    check_length(absolute, label)
    return absolute


def _check_place(out: Path, label: str, inputs: Iterable[tuple[str, object]]) -> None:
    """Refuse `out` where replacing it could destroy something: a link (first: a loop of them cannot be resolved),
    a protected folder, an input."""
    if out.is_symlink():
        raise ClakitError(f"{label} {out} is a link to {os.readlink(out)}; give a real folder or a new name")
    dest = out.resolve()
    for place, name in _protected().items():
        if dest == place or dest in place.parents:
            what = name if dest == place else f"an ancestor of {name} ({place})"
            raise ClakitError(f"{label} {out} is {what}; clakit never replaces it: choose a new folder")
    for role, path in _input_paths(inputs):
        if dest == path:
            raise ClakitError(f"{label} {out} is the {role}; choose another folder")
        if dest in path.parents:
            raise ClakitError(f"{label} {out} contains the {role} {path}; choose another folder")
        if path in dest.parents:
            raise ClakitError(f"{label} {out} is inside the {role} {path}; choose a folder outside it")


def _check_name(out: Path, label: str) -> None:
    """The staging folder beside `out` is named `.NAME.XXXXXXXX.partial`: a name without room for that would fail
    only once the work is done (or, past the file system's limit, as an OSError at the first look at `out`)."""
    size, room = len(os.fsencode(out.name)), len(".XXXXXXXX.partial") + 1
    longest = (name_max(out.parent) if size > NAME_MAX - room else NAME_MAX) - room  # statvfs only past the usual
    if size > longest:
        raise ClakitError(
            f"{label} name {out.name[:40]}... is too long ({len(os.fsencode(out.name))} bytes; clakit needs it at "
            f"most {longest} to stage the output beside it): choose a shorter name"
        )


def _is_mount_point(path: Path) -> bool:
    """Whether a file system is mounted at `path` (a disk or volume given as OUT): another device than its parent's
    (os.path.ismount), or a bind mount of a folder of the same device, which only /proc/self/mountinfo shows (its
    5th field, spaces and such written as octal escapes like \\040)."""
    if os.path.ismount(path):
        return True
    with contextlib.suppress(OSError):
        resolved = str(path.resolve())
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            fields = line.split(" ")
            if len(fields) > 4 and re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), fields[4]) == resolved:
                return True
    return False


def check_writable(folder: Path) -> None:
    """The nearest existing folder at or above `folder` must be a folder we can create files in (probed: the
    permission bits say nothing for root or on a read-only file system)."""
    folder = Path(folder).absolute()
    existing = next(p for p in [folder, *folder.parents] if p.exists() or p.is_symlink())
    if not existing.is_dir():
        what = "a file" if existing.exists() else "a link that leads to nothing"  # a dangling link, a loop of them
        raise ClakitError(f"{existing} is {what}, not a folder; choose an output path whose folders are folders")
    try:
        _probe_write(existing)
    except OSError as e:
        raise ClakitError(f"cannot write into {existing}: {e.strerror or e}; choose a writable location") from None


def _probe_write(folder: Path) -> None:
    """Create and remove a file in `folder` (OSError where it takes none): the permission bits say nothing for root
    or on a read-only or immutable file system."""
    fd, probe = tempfile.mkstemp(prefix=WRITE_PROBE, dir=folder)
    os.close(fd)
    os.unlink(probe)


LOOK_WAITS = (0.01, 0.05, 0.2)  # seconds between looks at an `out` another run may be replacing at that instant


def _refusal(out: Path, kind: str, overwrite: bool, label: str, replace_hint: str) -> str | None:
    """Why an existing `out` may not be replaced now, or None when it may; FileNotFoundError when it went away.
    A refusal is given only when looks a moment apart agree: another run replacing `out` in the middle of a look
    (renamed away between listing it and reading its marker) read as "not written by clakit" or "an existing
    file" (6 false refusals in 900 publishes of three processes into one report folder)."""
    for wait in (*LOOK_WAITS, None):
        reason = _look(out, kind, overwrite, label, replace_hint)
        if reason is None or wait is None:
            return reason
        time.sleep(wait)


def _look(out: Path, kind: str, overwrite: bool, label: str, replace_hint: str) -> str | None:
    """One look at `out` for _refusal."""
    if not out.is_dir() and (out.exists() or out.is_symlink()):  # gone meanwhile: iterdir says so below
        return f"{label} {out} is an existing file; choose a folder name (clakit never replaces a file with a folder)"
    if not any(out.iterdir()):
        return None  # an empty folder: nothing to lose
    found = owner(out)
    if found != kind:
        what = f"a clakit {NOUNS[found]}" if found else "not written by clakit"
        return (
            f"{label} {out} already exists and is not a clakit {NOUNS[kind]} ({what}); clakit replaces only its "
            "own outputs: choose another folder"
        )
    extra = foreign_files(out)
    if extra:
        shown = ", ".join(extra[:3]) + (", ..." if len(extra) > 3 else "")
        return f"{label} {out} holds files clakit did not write ({shown}); move them out or choose another folder"
    if in_use(out):
        return _busy(label, out)
    if not overwrite:
        return f"{label} {out} already exists; {replace_hint}, or choose another"
    return None


def _busy(label: str, folder: Path) -> str:
    return f"{label} {folder} is in use by a running clakit process; wait for it to end or choose another folder"


def in_use(folder: Path) -> bool:
    """Whether a running clakit process holds `folder` (see `hold`)."""
    return _held(folder / MARKER, probe=fcntl.LOCK_SH)  # hold()'s is exclusive; two probes at once never conflict


def _held(path: Path, flags: int = 0, probe: int = fcntl.LOCK_EX) -> bool:
    """Whether another live process holds a lock on `path` (an output's marker, a staging folder's stamp): an
    exclusive flock tried and released at once. False without the file, or on a file system without locks
    (nothing can be known held there)."""
    fd = _open_lockable(path, flags)
    if fd is None:
        return False
    try:
        fcntl.flock(fd, probe | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # releases the probe's lock


def _open_marker(folder: Path) -> int | None:
    """The marker, opened as `_open_lockable` does; None without a marker (an older clakit's output)."""
    return _open_lockable(folder / MARKER)


def _open_lockable(path: Path, flags: int = 0) -> int | None:
    """`path` opened for writing where it may be (nothing is written): NFS emulates flock as a whole-file fcntl lock,
    whose exclusive kind needs a descriptor open for writing (EBADF on a read-only one); read-only otherwise (a file
    or a file system we may not write). None where it cannot be opened."""
    for mode in (os.O_RDWR, os.O_RDONLY):
        with contextlib.suppress(OSError):
            fd = os.open(path, mode | flags | os.O_NONBLOCK)  # a FIFO of that name: no wait for a writer
            if stat.S_ISREG(os.fstat(fd).st_mode):
                return fd
            os.close(fd)
            return None
    return None


@contextlib.contextmanager
def hold(folder: Path, label: str = "output folder") -> Iterator[None]:
    """Hold `folder` while a run keeps writing into it (an uptrain run trains in place): another clakit process
    then refuses to replace or resume it. An advisory lock on the marker, released when the process ends (also on
    kill -9). On a file system without locks (flock fails with ENOLCK, ENOSYS, ...) the run goes on unheld."""
    fd = _open_marker(folder)
    if fd is None:  # an older clakit's output: no marker to lock
        yield
        return
    with held(fd, _busy(label, folder)):
        yield


@contextlib.contextmanager
def held(fd: int, busy: str) -> Iterator[None]:
    """An exclusive flock on the descriptor `fd` while the body runs, then `fd` closed (the lock goes with the
    process, also on kill -9): `busy`, one line, where another process holds it; where flock fails otherwise (a file
    system without locks: ENOLCK, ENOSYS; NFS on a descriptor not open for writing: EBADF) the body runs unheld."""
    try:
        try:
            _lock_exclusive(fd)
        except BlockingIOError:
            raise ClakitError(busy) from None
        except OSError:
            pass  # no locks here: as for an output without a marker
        yield
    finally:
        os.close(fd)


PROBE_WAITS = (0.01, 0.05, 0.2)  # seconds: another process's in_use probe holds its lock for microseconds


def _lock_exclusive(fd: int) -> None:
    """flock(fd, LOCK_EX | LOCK_NB), tried again after short waits: another process probing the folder at that
    instant (in_use, a shared lock taken and released at once) read as a run holding it. BlockingIOError when a
    run holds it still."""
    for wait in (*PROBE_WAITS, None):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if wait is None:
                raise
            time.sleep(wait)


def check_not_inside_an_output(out: Path | str, label: str = "OUT") -> None:
    """An output inside another clakit output (a run folder, its model/, a converted checkpoint) is a file that
    output did not write: at its top level it blocks that output's --overwrite; deeper (an eval report in a run's
    eval/ or model/) that --overwrite removed it unseen, for a marker lists top-level names only; and a model folder
    holding a run or a checkpoint is no plain checkpoint. Checked by every command that writes (convert, uptrain,
    `clakit eval -o`, `clakit report -o`, the demo's --work-dir). (uptrain's own converted/, eval/ and report/ are
    its run's: written by the library, not through these commands' checks.)"""
    out = _absolute(out, label)
    for parent in out.parents:
        kind = owner(parent) if parent.is_dir() else None
        if kind is not None:
            raise ClakitError(
                f"{label} {out} is inside {parent}, a clakit {NOUNS.get(kind, kind)}; clakit does not write into "
                "another output: choose a folder outside it"
            )


# an uptrain run's parts, defined here (below uptrain, whose pipeline.RESULT and checkpoint.CHECKPOINTS they are)
# for the commands that take a model and are given a run instead
RUN_MODEL, RUN_CHECKPOINTS = "model", "checkpoints"


def run_model_hint(folder: Path, spec) -> str | None:
    """Where a model is wanted and `folder` (no config.json, or missing) is a clakit uptrain run, its checkpoints/,
    one step-N in it or its model/ before the run wrote it: one line naming the model folder to give (RUN/model,
    written when the run finishes) and how to get it, else None."""
    run, what = _run_of(Path(folder).absolute())
    if run is None:
        return None
    model = run / RUN_MODEL
    if (model / "config.json").is_file():
        return f"{spec} is {what}; give the model it trained: {model}"
    now = "it is still training" if in_use(run) else "continue it with `clakit uptrain RECIPE --resume`"
    return f"{spec} is {what}, which has not written its model yet ({now}); then give {model}"


def _run_of(folder: Path) -> tuple[Path | None, str | None]:
    """(the uptrain run `folder` is or is part of, what `folder` is there); (None, None) for any other folder. A
    training checkpoint holds the trainable tensors and optimizer state, not a model."""
    run = "a clakit uptrain run"
    candidates = [(folder, run)]
    if folder.name == RUN_MODEL:  # no config.json: not written yet (a run in progress, or killed)
        candidates.append((folder.parent, f"the model of {run}"))
    if folder.name == RUN_CHECKPOINTS:
        candidates.append((folder.parent, f"the training checkpoints of {run}"))
    if folder.parent.name == RUN_CHECKPOINTS:
        what = f"a training checkpoint of {run} (trainable tensors and optimizer state, not a model)"
        candidates.append((folder.parent.parent, what))
    return next(((r, w) for r, w in candidates if r.is_dir() and owner(r) == "uptrain"), (None, None))


def check_folder(
    out,
    kind: str,
    *,
    overwrite: bool = False,
    inputs: Iterable[tuple[str, object]] = (),
    label: str = "output folder",
    replace_hint: str = "pass --overwrite to replace it",
    live_writers: bool = True,
) -> Path:
    """Before any work: raise a one-line ClakitError unless `out` may become this run's `kind` output.

    inputs: (role, path or spec or a list of them) of the run's inputs, e.g. ("source", model_dir), ("data", [..]);
    only local paths count. `live_writers`: refuse `out` while another process stages it (False for the other
    processes of a multi-process launch, whose main process may have made its staging folder already). Returns
    `out` made absolute."""
    out = _absolute(out, label)
    _check_name(out, label)
    try:
        _check_place(out, label, inputs)
    except (OSError, RuntimeError) as e:  # a path the file system refuses outright; a loop of links above `out`
        reason = getattr(e, "strerror", None) or e  # RuntimeError "Symlink loop from ..." before Python 3.13
        raise ClakitError(f"{label} {out} cannot be used ({reason}); choose another folder") from None
    # a report is seconds of work, always replaced: the later one wins
    clear_leftovers(out, label, refuse_live=kind != "report" and live_writers)
    if out.exists() and _is_mount_point(out):
        raise ClakitError(
            f"{label} {out} is a mount point: clakit writes beside it and renames the result into place, which a "
            f"mount point cannot take (only at the end, after all the work); give a new folder inside it, such as "
            f"{out / 'out'}"
        )
    if out.exists():
        try:
            reason = _refusal(out, kind, overwrite, label, replace_hint)
        except FileNotFoundError:  # moved away by another run's publish since the look: publish judges what is there
            reason = None
        except OSError as e:  # a folder we may not even list is not ours to replace
            raise ClakitError(f"{label} {out} cannot be read ({e.strerror or e}); choose another folder") from None
        if reason:
            raise ClakitError(reason)
        try:
            _check_replaceable(out, label)
        except FileNotFoundError:  # moved away by another run's publish since the look: nothing left to replace
            pass
    check_writable(out.parent)
    return out


def _check_replaceable(out: Path, label: str) -> None:
    """An existing `out` the run will replace must be movable and removable by this user, checked before the work:
    a read-only or immutable folder (`chmod a-w`, `chattr +i`) was hidden beside the new output for good (its
    removal failed silently), or refused at the rename after hours of work, as was another user's folder in a shared
    sticky-bit folder (/tmp, a scratch disk), which only its owner may move."""
    parent, owner_uid = out.parent.stat(), out.stat().st_uid
    if parent.st_mode & stat.S_ISVTX and os.geteuid() not in (0, owner_uid, parent.st_uid):
        raise ClakitError(
            f"{label} {out} belongs to another user (uid {owner_uid}) in a shared folder with the sticky bit, "
            "so this user cannot move or replace it; choose another folder"
        )
    if not any(out.iterdir()):  # an empty folder (even read-only: `mkdir -m 555`) is moved and removed by its parent
        return
    try:
        _probe_write(out)
    except FileNotFoundError:  # moved away by another run's publish since the look: nothing to replace now
        return
    except OSError as e:
        raise ClakitError(
            f"{label} {out} cannot be replaced: its files cannot be removed ({e.strerror or e}); make it writable "
            f"(chmod -R u+w {out}) or choose another folder"
        ) from None


# --- staging and publishing ----------------------------------------------------------------------------------------


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def file_mode() -> int:
    """The mode a new file gets under this process's umask (0666 less the umask)."""
    return 0o666 & ~_umask()


def usual_mode(*files: Path) -> None:
    """safetensors' writer (save_file, and save_pretrained through it) creates files 0600, unlike every other file
    clakit writes: give clakit's own new files the usual mode, so whoever can read the folder can read the weights."""
    for file in files:
        file.chmod(file_mode())


def make_staging(out: Path, kind: str = "partial", exclusive: bool = True) -> Path:
    """A fresh, uniquely named hidden folder beside `out` (`.NAME.XXXXXXXX.partial`; kind "scratch": a conversion's
    scratch folder, never published), stamped and locked by this process until it is published or discarded; what
    killed runs left beside `out` is reclaimed first (`reclaim_leftovers`)."""
    tmp = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        # another process that began writing `out` since this run's checks: refused before the work
        clear_leftovers(out, "output folder", refuse_live=exclusive)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=f".{kind}", dir=out.parent))
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the result should look like any folder
        _STAGING_LOCKS[str(tmp)] = _stamp(tmp)
    except OSError as e:
        if tmp is not None:  # made by this run, but its stamp could not be written (a full disk, no inodes left):
            shutil.rmtree(tmp, ignore_errors=True)  # unstamped, no later run would ever reclaim it
        what = "a scratch folder" if kind == "scratch" else "the output folder"
        raise ClakitError(
            f"cannot create {what} beside {out}: {e.strerror or e}; free disk space there or choose another folder"
        ) from None
    return tmp


# staging folders this process holds, path -> the descriptor of its shared lock on the folder's stamp
_STAGING_LOCKS: dict[str, int] = {}


def _stamp(tmp: Path) -> int:
    """Write STAGING_STAMP (this host) into `tmp` and hold a shared flock on it while this process writes the folder:
    a kill -9 releases it, so a later run tells a dead run's leftover (unlocked) from a live one's. The lock is on a
    file, not the folder: on NFS flock is a POSIX lock, whose exclusive kind (the reclaim's) needs a descriptor open
    for writing, which a folder never has. Locked before its final name, so no reclaim sees it stamped and free.
    Where the file system has no locks it stays unlocked, and is never reclaimed (`_lock_free` fails there too)."""
    draft = tmp / f"{STAGING_STAMP}.new"
    fd = os.open(draft, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        os.write(fd, (json.dumps({"host": socket.gethostname(), "pid": os.getpid()}) + "\n").encode())
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        draft.rename(tmp / STAGING_STAMP)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _release(tmp: Path) -> None:
    fd = _STAGING_LOCKS.pop(str(tmp), None)
    if fd is not None:
        os.close(fd)


def _lock_free(folder: Path) -> int | None:
    """An exclusive flock on `folder`'s stamp when no live process holds it (its descriptor: keep it while removing
    the folder), else None: held by a running clakit, or a file system without locks (then nothing is reclaimed)."""
    try:
        fd = os.open(folder / STAGING_STAMP, os.O_RDWR | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def clear_leftovers(out: Path, label: str, refuse_live: bool = True) -> None:
    """What killed runs left beside `out` reclaimed first (reclaim_leftovers), then `out` refused while another live
    process stages it (check_no_live_writer; unless not `refuse_live`): one rule for the checks before the work and
    for the making of the staging folder."""
    reclaim_leftovers(out)
    if refuse_live:
        check_no_live_writer(out, label)


def reclaim_leftovers(out: Path) -> list[str]:
    """Remove what a killed run (kill -9, a node lost, out of memory) left beside `out`: staging and scratch
    folders `.NAME.XXXXXXXX.partial` this host stamped and no live process holds (of any NAME in that folder), and
    `.OUT.XXXXXXXX.old` (an earlier output moved aside by a run killed while publishing: put back when `out` is
    missing, else removed). Without this every killed run kept its staged output (the whole checkpoint) on the
    disk for good. Returns the names reclaimed."""
    out = Path(out).absolute()
    with contextlib.suppress(OSError):
        # every output's staging in this folder (a killed run's under another OUT name was kept for good), the
        # moved-aside outputs of this one only (put back under their own name)
        found = [p for p in out.parent.iterdir() if _staged_name(p.name) is not None and not p.is_symlink()]
        done, live = [], set()
        # the outputs a killed publish moved aside, as its stamp names them: a look-alike name alone (a user's
        # backup `.out.20261207.old`, a copy of the output) is not proof that clakit moved it there. Every output
        # name's: a staging folder of another OUT removed here took with it the only record of that OUT's aside
        asides = _asides_named(out)
        for folder in sorted(p for p in found if p.name.endswith((".partial", ".scratch")) and p.is_dir()):
            # this process's own first, unread: on NFS (POSIX locks) closing any descriptor of the stamp drops its lock
            own = str(folder) in _STAGING_LOCKS
            fd = _lock_free(folder) if not own and _stamped_here(folder) else None
            if fd is None:
                # a run writing this output now (or no locks here): its .old may be mid-publish
                live.add(_staged_name(folder.name))
                continue
            asides |= _aside_in(folder, fd)  # under the lock taken above
            try:  # removed under the lock: another reclaim waits
                remove_stamped(folder)
            finally:
                os.close(fd)
            shutil.rmtree(folder, ignore_errors=True)  # NFS kept the open stamp (as .nfsXXXX) until it was closed
            done.append(folder.name)
        for name in sorted({_staged_name(a) for a in asides} - live):
            olds = [p for p in found if p.name in asides and _staged_name(p.name) == name and p.name.endswith(".old")]
            done += _reclaim_old(out.parent / name, sorted(p for p in olds if p.is_dir()))
        return done
    return []


def _asides_named(out: Path) -> set[str]:
    """The name of the output `publish` moved aside, as the stamp left in `out` records it (a run killed after its
    second rename, before the stamp went), when no live process holds that stamp; empty otherwise."""
    fd = _lock_free(out) if _stamped_here(out) else None
    if fd is None:
        return set()
    try:
        return _aside_in(out, fd)
    finally:
        os.close(fd)


def _aside_in(folder: Path, fd: int) -> set[str]:
    """{the aside name} `folder`'s stamp records (`_name_aside`) for the same output name, else empty; read through
    `fd` (the reclaim's locked descriptor of it): closing another descriptor drops a POSIX (NFS) lock."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        aside = json.loads(os.pread(fd, 1 << 16, 0)).get("aside")
        if isinstance(aside, str) and _staged_name(aside) == _out_name(folder):
            return {aside}
    return set()


def _out_name(folder: Path) -> str:
    """The output name a staging folder stages (`.NAME.XXXXXXXX.partial`), or the name of an output itself."""
    return _staged_name(folder.name) or folder.name


def check_no_live_writer(out: Path, label: str) -> None:
    """Refuse `out` while another live clakit process on this host is writing it (its stamped staging or scratch
    folder beside `out`, whose lock that process holds): two converts into one new OUT both ran to the end before,
    and the second was refused only at publish, after all its work. Checked before the work and again when a run
    makes its staging folder. Another host's folder is not judged (its lock may not be seen here)."""
    out = Path(out).absolute()
    with contextlib.suppress(OSError):
        for folder in sorted(out.parent.iterdir()):
            if _staged_name(folder.name) != out.name or not folder.name.endswith((".partial", ".scratch")):
                continue
            if str(folder) in _STAGING_LOCKS or folder.is_symlink() or not _stamped_here(folder):
                continue
            pid = _held_by(folder)
            if pid is not None:
                raise ClakitError(
                    f"{label} {out} is being written by another clakit process now (process {pid}, its folder "
                    f"{folder.name} beside it); wait for it to end or choose another folder"
                )


def _held_by(folder: Path) -> int | str | None:
    """The process id its stamp names when a live process holds `folder`'s stamp lock, else None (a dead run's
    leftover, or a file system without locks: nothing known held)."""
    if not _held(folder / STAGING_STAMP, os.O_NOFOLLOW):
        return None
    with contextlib.suppress(OSError, ValueError, AttributeError, KeyError, TypeError):
        return int(json.loads(read_regular(folder / STAGING_STAMP))["pid"])
    return "unknown"


def _stamped_here(folder: Path) -> bool:
    """Whether `folder` is a staging folder clakit made on this host (its STAGING_STAMP). Not reclaimed otherwise:
    a user's folder of a look-alike name (`.out.download.partial`), an older clakit's (no stamp, no lock: it may be
    live), or another host's, whose lock this host may not see (NFS mounted nolock or local_lock=flock, Lustre
    -o localflock keep flock local to each host)."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        return json.loads(read_regular(folder / STAGING_STAMP)).get("host") == socket.gethostname()
    return False


def _moved_aside(old: Path) -> bool:
    """Whether `old` can be an output publish moved aside: a clakit output holding only its own files, or empty (a
    user's backup of a look-alike name, `.out.20261205.old`, is neither)."""
    with contextlib.suppress(OSError):
        return not any(old.iterdir()) or (owner(old) is not None and not foreign_files(old))
    return False


def _reclaim_old(out: Path, olds: list[Path]) -> list[str]:
    """An output moved aside by a run killed between its two renames (publish): back into place when `out` is
    missing, as the interrupted run itself does on Ctrl-C, or when the dead run that published `out` was keeping it
    aside (publish(keep_replaced): an uptrain --overwrite killed before its first checkpoint); removed once `out`
    holds the new output otherwise."""
    olds = [old for old in olds if _moved_aside(old)]
    for old in olds:
        if not (out.exists() or out.is_symlink()):
            old.rename(out)
        elif _kept_for(out, old):  # publish(keep_replaced) killed before drop_replaced: the new one is not kept
            _swap_back(out, old)
        else:
            remove_stamped(old, last=MARKER)
    return [old.name for old in olds]


def _kept_for(out: Path, old: Path) -> bool:
    """Whether `out`'s stamp (unlocked: its run is dead) says it replaced `old` with keep_replaced and never dropped
    it."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        stamp = json.loads(read_regular(out / STAGING_STAMP))
        return stamp.get("kept") is True and stamp.get("aside") == old.name and _lock_free_now(out)
    return False


def _lock_free_now(folder: Path) -> bool:
    fd = _lock_free(folder)
    if fd is None:
        return False
    os.close(fd)
    return True


@contextlib.contextmanager
def new_parents_removed_on_failure(out: Path) -> Iterator[None]:
    """The folders above `out` that a run creates (its staging and scratch folders go beside `out`) are removed again
    when it fails, so a refusal or a crash leaves nothing behind. rmdir removes only empty folders: nothing else is
    touched."""
    missing = [p for p in Path(out).absolute().parents if not p.exists()]  # innermost first
    try:
        yield
    except BaseException:
        for folder in missing:
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def discard(tmp: Path) -> None:
    _release(tmp)  # first: NFS keeps an open file removed (as .nfsXXXX), and the folder with it
    remove_stamped(tmp)


def remove_stamped(folder: Path, last: str = STAGING_STAMP) -> None:
    """rmtree of a stamped staging folder, its stamp last: rmtree goes in directory order, which put the stamp
    before most shards of a large output (19th of 33 entries for 30 shards on ext4), so a kill during a slow
    removal (a scheduler's SIGKILL after its SIGTERM's grace) left shards in an unstamped folder no run reclaims.
    `last`: MARKER for an output moved aside (unmarked, its rest is not recognisably clakit's: kept for good)."""
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            if entry.name == last:
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
    shutil.rmtree(folder, ignore_errors=True)


def write_marker(folder: Path, kind: str, run_id: str | None = None, later: Iterable[str] = ()) -> dict:
    """The marker: what kind of output this is, which run made it, and every top-level name clakit writes there
    (`later`: names a run adds after publishing, such as an uptrain run's checkpoints/)."""
    from clakit import __version__

    files = sorted(({p.name for p in folder.iterdir()} | set(later)) - {MARKER, STAGING_STAMP})
    marker = {
        "kind": kind,
        "run_id": run_id or uuid.uuid4().hex,
        "files": files,
        "clakit": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    (folder / MARKER).write_text(json.dumps(marker, indent=1) + "\n")
    return marker


PUBLISH_TRIES = 5  # another run publishing the same `out` at the same moment (reports: the later one wins)


def publish(
    tmp: Path,
    out: Path,
    kind: str,
    *,
    overwrite: bool = False,
    later: Iterable[str] = (),
    keep_replaced: bool = False,
    **labels,
) -> Path | None:
    """Mark the finished staging folder and rename it to `out`. An `out` that appeared meanwhile is checked by the
    same rule; an old output is moved aside, and removed only once the new one is in place. Another run publishing
    `out` between this one's look and its renames (two `clakit report -o` into one folder) is looked at again: its
    output is judged by the same rule, and an output this run moved aside that the other replaced meanwhile is
    removed (it was left hidden beside `out` for good, and the run failed "Directory not empty; check free disk
    space").

    keep_replaced: the old output is left moved aside, and its path returned, for the caller to remove once the new
    one is worth keeping (drop_replaced) or to put back when it fails before that (restore_replaced): an uptrain run
    publishes its folder before it trains; `out` keeps its stamp, naming the old one, until then."""
    write_marker(tmp, kind, later=later)
    label = labels.get("label", "output folder")
    for _ in range(PUBLISH_TRIES):
        if not (out.exists() or out.is_symlink()) and _renamed_into_place(tmp, out):
            _published(tmp, out)
            return None
        _check_place(out, label, ())
        try:
            reason = _refusal(out, kind, overwrite, label, "pass --overwrite to replace it")
        except FileNotFoundError:  # moved aside by another run's publish while this one looked: look again
            continue
        if reason:
            raise ClakitError(reason.replace("already exists", "appeared while this run was working", 1))
        old = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.old")
        # first: only a folder a stamp names is put back or removed (reclaim_leftovers)
        _name_aside(tmp, old.name, keep_replaced)
        if _swapped(tmp, out, old):
            if keep_replaced:  # the stamp's lock stays held (now `out`'s): no other run reclaims `old` meanwhile
                if str(tmp) in _STAGING_LOCKS:
                    _STAGING_LOCKS[str(out)] = _STAGING_LOCKS.pop(str(tmp))
                return old
            drop_replaced(tmp, out, old)  # a file in it we may not remove (a read-only subfolder): said, not hidden
            return None
    raise ClakitError(f"{label} {out} kept being replaced by other clakit runs while this one published; run it again")


def drop_replaced(tmp: Path, out: Path, old: Path | None) -> None:
    """The output that publish(keep_replaced=True) moved aside to `old` (None: there was none) removed, and `out`,
    published from the staging folder `tmp`, no longer stamped."""
    if old is not None:
        remove_stamped(old, last=MARKER)
        if old.exists():
            print(f"clakit: note: the replaced {out.name} could not be removed whole; what is left is in {old}",
                  file=sys.stderr)  # fmt: skip
    _release(out)
    _published(tmp, out)


def restore_replaced(tmp: Path, out: Path, old: Path | None) -> None:
    """The new output in `out` removed and the one publish(keep_replaced=True) moved aside to `old` put back under
    its name (None: nothing was replaced, `out` is just removed)."""
    if str(tmp) in _STAGING_LOCKS:  # the stamp's lock, under the name publish left it (moved to `out` when kept)
        _STAGING_LOCKS[str(out)] = _STAGING_LOCKS.pop(str(tmp))
    _swap_back(out, old)


def _swap_back(out: Path, old: Path | None) -> None:
    """The new output in `out` renamed to a staging name first, still stamped (and locked, where this process holds
    its stamp): a kill from here on leaves what reclaim_leftovers puts back (`out` missing, the aside its stamp
    names); then `old` back under its name, and the new one removed after its lock is released (NFS keeps an open
    file removed as .nfsXXXX, and the folder with it)."""
    gone = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.partial")
    out.rename(gone)
    if str(out) in _STAGING_LOCKS:
        _STAGING_LOCKS[str(gone)] = _STAGING_LOCKS.pop(str(out))
    if old is not None and old.exists() and not out.exists():
        old.rename(out)
    discard(gone)


def _swapped(tmp: Path, out: Path, old: Path) -> bool:
    """`out` moved aside to `old`, then `tmp` renamed to `out`; False where another run moved `out` away first, or
    published its own between the two renames (the output moved aside, judged replaceable, is then removed): look
    again. Both renames in one try: Ctrl-C or SIGTERM between them left OUT absent, the old one hidden."""
    try:
        out.rename(old)
        tmp.rename(out)
    except OSError as e:
        if not old.exists():  # the first rename failed: another run moved `out` aside first (or a real error)
            if e.errno == errno.ENOENT:
                return False
            raise
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST):  # another run published in between (whatever is there now)
            remove_stamped(old, last=MARKER)
            return False
        _put_back(old, out)
        raise
    except BaseException:
        if old.exists() and not out.exists():
            _put_back(old, out)
        raise
    return True


def _put_back(old: Path, out: Path) -> None:
    """The output moved aside renamed back to `out`; where another run published `out` meanwhile, removed instead
    (it was judged replaceable, and is replaced), not left hidden beside it."""
    try:
        old.rename(out)
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        remove_stamped(old, last=MARKER)


def _name_aside(tmp: Path, name: str, kept: bool = False) -> None:
    """Record in `tmp`'s stamp the name its publish moves the old output aside to, written through the descriptor
    this process holds the stamp's lock on: on NFS (flock emulated by POSIX locks) opening and closing the stamp
    anew dropped that lock, and a truncate-then-write left a moment with an empty stamp."""
    fd = _STAGING_LOCKS.get(str(tmp))
    if fd is None:  # no stamp (a file system that lost it): kept, as before
        return
    with contextlib.suppress(OSError, ValueError, TypeError):
        fields = {"aside": name, **({"kept": True} if kept else {})}  # kept: put back if killed before drop_replaced
        text = (json.dumps({**json.loads(os.pread(fd, 1 << 16, 0)), **fields}) + "\n").encode()
        os.pwrite(fd, text, 0)  # longer than the stamp it extends: never shorter, never empty
        os.ftruncate(fd, len(text))


def _published(tmp: Path, out: Path) -> None:
    """The stamp goes once the output is in place: removed before the renames, a run killed between them left a
    staging folder no later run could tell from a user's (kept, and the output moved aside never put back)."""
    _release(tmp)
    (out / STAGING_STAMP).unlink(missing_ok=True)


def _renamed_into_place(tmp: Path, out: Path) -> bool:
    """rename(2) onto a missing `out`; False when another run published `out` since it was looked at (the rename
    then fails with ENOTEMPTY or EEXIST, which read "cannot write OUT: Directory not empty; check free disk space"):
    that output is then judged by the rule like one found there."""
    try:
        tmp.rename(out)
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        return False
    return True


@contextlib.contextmanager
def os_errors(out: Path) -> Iterator[None]:
    """OSError (disk full, permissions, read-only file system) -> one line naming `out`; so is safetensors' own
    error for a failed write (it raises no OSError: "Error while serializing: I/O error: No space left ...")."""
    try:
        yield
    except OSError as e:
        raise ClakitError(f"cannot write {out}: {e.strerror or e}; check free disk space and permissions") from None
    except SafetensorError as e:
        if "I/O error" not in str(e):
            raise
        reason = str(e).split("I/O error:", 1)[1].strip()
        raise ClakitError(f"cannot write {out}: {reason}; check free disk space and permissions") from None


@contextlib.contextmanager
def staged(out, kind: str, *, overwrite: bool = False, later: Iterable[str] = ()) -> Iterator[Path]:
    """`with staged(out, "convert", overwrite=...) as tmp:` write into tmp; on a clean exit tmp is published as
    `out`; on any error (one line for OSErrors) or interrupt it is removed and `out` is as it was."""
    out = _absolute(out, "output")
    tmp = make_staging(out, exclusive=kind != "report")
    try:
        with os_errors(out):
            yield tmp
            publish(tmp, out, kind, overwrite=overwrite, later=later)
    finally:
        discard(tmp)  # a no-op once published


# --- single files (eval reports) -----------------------------------------------------------------------------------


def _json_format(path: Path) -> str | None:
    """The "format" field of a small JSON file, or None when it is not one."""
    with contextlib.suppress(OSError, ValueError):
        text = read_regular(path, 64 << 20)
        if len(text) < 64 << 20:
            data = json.loads(text)
            return data.get("format") if isinstance(data, dict) else None
    return None


# JSON files clakit wrote before it recorded their "format": the keys each had (clakit before 2026-12-02, 97984fb:
# the demo's summary, which a rerun of the demo in the same --work-dir was refused to replace as "not a clakit demo
# summary")
LEGACY_FILE_KEYS = {"clakit-demo/1": {"timings_s", "total_s", "models", "settings", "provenance"}}


def _legacy_file(path: Path, fmt: str) -> bool:
    """Whether `path` is a file of `fmt` written by a clakit that recorded no format: exactly its keys, no format,
    and clakit's version in its provenance."""
    keys = LEGACY_FILE_KEYS.get(fmt)
    with contextlib.suppress(OSError, ValueError):
        data = json.loads(read_regular(path, 1 << 20))
        prov = data.get("provenance") if isinstance(data, dict) else None
        ok = isinstance(data, dict) and set(data) == keys  # a user's `5` or `null`: no keys, not iterable
        return bool(keys) and ok and isinstance(prov, dict) and isinstance(prov.get("clakit"), str)
    return False


def check_file(
    path,
    fmt: str,
    *,
    noun: str = "output file",
    label: str = "output",
    inputs: Iterable[tuple[str, object]] = (),
    fix: str | None = None,
) -> Path:
    """Before any work: `path` may be written when it does not exist yet, or is a clakit JSON file of `fmt` (a
    report clakit wrote, which it replaces); its folder must be a folder we can write in; it must not be one of the
    run's `inputs` ((role, path or specs), as check_folder's): a report read as data passes the format check, but
    replacing it would destroy the input of the very run that writes it. `fix`: the way out where the name is not
    the user's choice (the demo's demo.json), instead of choosing another name. Returns it absolute."""
    path = _absolute(path, label)
    if path.is_dir():
        fix_dir = fix or f"give a file name such as {path / 'report.json'}"
        raise ClakitError(f"{label} {path} is a folder; {fix_dir}")
    if path.is_symlink():
        raise ClakitError(f"{label} {path} is a link to {os.readlink(path)}; {fix or 'give a new file name'}")
    if path.exists() and _json_format(path) != fmt and not _legacy_file(path, fmt):
        raise ClakitError(
            f"{label} {path} exists and is not a clakit {noun}; clakit replaces only its own files: "
            f"{fix or 'choose another name'}"
        )
    if path.exists() and _is_mount_point(path):  # a file bind-mounted into a container: rename(2) onto it is EBUSY
        raise ClakitError(
            f"{label} {path} is a mount point (a bind-mounted file): clakit writes a new file beside it and renames "
            f"it into place, which a mount point cannot take; {fix or 'mount its folder and give a name in it'}"
        )
    check_writable(path.parent)
    for role, source in _input_paths(inputs):
        if path.resolve() == source:
            raise ClakitError(f"{label} {path} is also given as {role}; write the {noun} to another file")
    return path


FILE_ROOM = 1 << 20  # bytes free that a single output file (a report: tens of KB) is checked for before the work


def check_file_room(path: Path) -> None:
    """Before the work whose result `path` is (an evaluation: minutes to hours): a disk with no room for it was found
    only at the write, after all the work, and the numbers were lost with it (they are printed after the write)."""
    folder = next(p for p in [Path(path).absolute().parent, *Path(path).absolute().parents] if p.is_dir())
    free = shutil.disk_usage(folder).free
    if free < FILE_ROOM:
        raise ClakitError(
            f"no room for {Path(path).name} in {folder}: {size_text(free)} is free; free some space or choose "
            "another place for it"
        )


def write_file(path, text: str, fmt: str, *, noun: str = "output file", label: str = "output") -> Path:
    """Write `text` (JSON of `fmt`) to `path` by the file rule: a unique temp file beside it, then an atomic rename;
    a crash or a full disk never leaves a half-written or a lost file."""
    path = check_file(path, fmt, noun=noun, label=label)
    with os_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
        try:
            os.fchmod(fd, file_mode())  # mkstemp makes it private; the result should look like any file
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
    return path


def size_text(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.2f} MB"


def check_free_space(
    out: Path, nbytes: int, what: str = "the output weights", fix: str = "choose another output folder"
) -> None:
    """Room for `nbytes` where `out` goes (its nearest existing folder: OUT and its parents may not exist yet),
    checked before the work that writes them, which at 70B takes hours."""
    folder = next(p for p in [out, *out.parents] if p.is_dir())
    free = shutil.disk_usage(folder).free
    if free < nbytes:
        raise ClakitError(
            f"not enough disk space in {folder}: {what} take {size_text(nbytes)}, {size_text(free)} is free; "
            f"free some space or {fix}"
        )
    # bytes free but no inodes (many small files: a full ext4 inode table, a tmpfs nr_inodes): every new file fails
    # with ENOSPC, which read as a full disk with gigabytes free. f_files 0: no fixed inode count (btrfs, NFS)
    found = os.statvfs(folder)
    if found.f_files and found.f_favail < FILES_NEEDED:
        raise ClakitError(
            f"no room for new files in {folder}: its file system has {found.f_favail} free inodes (file entries) "
            f"left, and an output needs some {FILES_NEEDED}; remove files there or {fix}"
        )


FILES_NEEDED = 64  # a conversion writes ~12 files, an uptrain run's checkpoints a few dozen
