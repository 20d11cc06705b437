"""Where an output came from: versions of the tools, the command line, the time."""

import datetime
import functools
import hashlib
import os
import platform
import shlex
import sys
import urllib.parse
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

# the records clakit writes beside a checkpoint, read by eval's lineage and uptrain's origins: one name each
CONVERT_RECORD = "clakit_convert.json"  # clakit convert's (convert.output_folder)
UPTRAIN_RECORD = "uptrain.json"  # clakit uptrain's beside its model (uptrain.card); its `conversion`: the start's
REPORT_RECORD = "clakit_report.json"  # clakit report's: the eval reports it read (sha256), the command, versions


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
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "clakit_source_sha256": source_sha256(),
        "clakit_origin": clakit_origin(),
        "cpu": cpu_name(),
        **hub_client(),
        **extra,
    }


def hub_client() -> dict:
    """The Hub client and the endpoint it reads from (HF_ENDPOINT: a mirror or a private Hub serves other files
    under the same repo ids and commits)."""
    from huggingface_hub import constants

    endpoint = urllib.parse.urlsplit(constants.ENDPOINT)
    if "@" in endpoint.netloc:  # user:token@host: a secret in records that ship with the model ([::1]:8080 kept)
        endpoint = endpoint._replace(netloc=endpoint.netloc.rpartition("@")[2])
    return {**library_versions(["huggingface_hub"]), "hf_endpoint": endpoint.geturl()}


@functools.cache
def source_sha256() -> str:
    """sha256 of every .py file of the clakit package in use (its path and bytes): the version (0.1.0 through the
    whole history) could not tell records of two revisions apart, e.g. before and after a change in how bits/byte
    are counted."""
    root = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    # clakit/recipes/ exists only in an installed wheel (pyproject maps the root recipes/ onto it): skipped, so a
    # checkout and the wheel built from it record the same hash
    for path in sorted(p for p in root.rglob("*.py") if p.relative_to(root).parts[0] != "recipes"):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


@functools.cache
def clakit_origin() -> dict | None:
    """Where the clakit in use came from, which the version (0.1.0 through the whole history) does not say: a source
    checkout's git commit (and whether its tree had changes), else pip's record of the install (PEP 610
    direct_url.json: the wheel's URL and sha256, a VCS install's commit_id); None when neither is known."""
    import json
    import subprocess
    from importlib.metadata import distribution

    root = Path(__file__).resolve().parent.parent
    if (root / ".git").exists():
        try:
            # --no-optional-locks: status takes no index.lock a git command the user runs meanwhile would fail on;
            # GIT_DIR & co. (set in a git hook, exported by some CI) would name another repository's commit
            git = ["git", "--no-optional-locks", "-C", str(root)]
            env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
            commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, env=env)
            dirty = subprocess.run([*git, "status", "--porcelain", "--", "clakit", "recipes"], capture_output=True,
                                   text=True, timeout=10, env=env)  # fmt: skip
            if commit.returncode == 0:
                return {"git_commit": commit.stdout.strip(), "git_dirty": bool(dirty.stdout.strip())}
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        dist = distribution("clakit")
        if Path(dist.locate_file("clakit/__init__.py")).resolve() == Path(__file__).resolve().parent / "__init__.py":
            text = dist.read_text("direct_url.json")
            return json.loads(text) if text else None
    except Exception:  # no metadata, or an unreadable one: unknown, never a failed run
        pass
    return None


@functools.cache
def cpu_name() -> str | None:
    """The CPU's model name (/proc/cpuinfo's, else the platform's; None when unknown): CPU speeds differ by host
    (bf16 ~45x between an AVX2 and an AMX machine), and "cpu (2 threads)" named neither."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip() or None
    except OSError:
        pass
    return platform.processor() or None


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


def library_versions(names) -> dict[str, str | None]:
    """Installed versions of the libraries an output also depends on beside `versions()`' (None where one is absent:
    gguf is needed for GGUF sources only, and a broken install must still be recorded as such)."""
    found = {}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def windows_sha256(windows: list) -> str:
    """sha256 of token-id tensors (None skipped), their shapes and int64 values in order (convert's calib_ids_sha256,
    eval's data.ids_sha256)."""
    digest = hashlib.sha256()
    for ids in (w for w in windows if w is not None):
        digest.update(str(tuple(ids.shape)).encode() + ids.long().numpy().tobytes())
    return digest.hexdigest()


def text_sha256(text: str) -> str:
    """sha256 of a text as read, as every record names data by content (eval's data.sha256, convert's calib_sha256
    and eval.sha256): one encoding, so the same text has the same hash in each. surrogatepass only matters for a
    str given in code with a lone surrogate; files are read with errors="replace" and hold none."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in 16 MiB blocks: a GGUF source is hundreds of MB (SmolLM2-135M's 98 MB Q4_1 file:
    0.75-1.2 s on 2 shared cores; a 70B's Q4 file ~40 GB). Remembered per version of the file (its device, inode,
    size, modification and change times, as git's index judges a change) when over 64 MiB: uptrain's conversion and
    its baseline's eval both hash the source. (Smaller files are read again: hashing them is quick, and two writes
    of one size within the clock's tick, milliseconds, would share its times.)"""
    version = file_version(path)
    if version[2] <= CACHED_HASH_BYTES:
        return _read_sha256(path)
    return _remembered_sha256(os.path.realpath(path), version)


CACHED_HASH_BYTES = 64 << 20


def file_version(path) -> tuple:
    """(device, inode, size, mtime, ctime) of a file: the key of every per-file cache (this hash, a GGUF's parsed
    header and config). ctime too, as git's index keeps it: an in-place rewrite of the same size whose mtime was set
    back (cp -p, rsync --inplace, tar, os.utime) keeps size and mtime, but the kernel sets ctime on every change, and
    nothing sets it back."""
    stat = os.stat(path)
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns


@functools.lru_cache(maxsize=1024)  # a 405B's 191 shards, each hashed once per command
def _remembered_sha256(path: str, version: tuple) -> str:
    return _read_sha256(path)


def _read_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(16 << 20):
            digest.update(block)
    return digest.hexdigest()


def settings_from_record(cls, record, what: str, derived: tuple[str, ...] = ()):
    """The settings dataclass `cls` rebuilt from the mapping a record holds (report.json's provenance.config and
    passkey.settings, run.json's recipe): the keys `derived` names were written for the reader, computed from the
    settings (passkey's new_tokens), and are dropped; a field the record lacks (written before the field existed)
    takes its default, which is what ran then for most fields, not all (eval's decode_steps was a keyword, and the
    demo passed 8: its report's speed section records the steps that ran); a key no field has (a newer clakit's,
    or hand-edited) is one line."""
    import dataclasses

    from clakit.errors import ClakitError

    if not isinstance(record, dict):
        raise ClakitError(f"{what} is not a mapping of settings ({type(record).__name__}); it cannot be rebuilt")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(record) - names - set(derived))
    if unknown:
        raise ClakitError(
            f"{what} holds {unknown[0]!r}, which {cls.__name__} has no field for (written by another clakit "
            f"version?); valid keys: {', '.join(sorted(names))}"
        )
    return cls(**{k: v for k, v in record.items() if k in names})

