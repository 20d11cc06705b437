"""Table machinery for the `tests/test_bad_input_*.py` files: run `clakit ...`, assert a clean refusal.

A clean refusal is: exit code 2, one stderr line `clakit[ COMMAND]: error: ...` containing the expected text, no
traceback anywhere, and nothing written, moved or deleted under the watched folders (a staging folder left behind
counts as written). A case is one line of a table:

    CASES = [
        Case("eval {model} -o {file}/r.json", "is a file, not a folder", setup=make_file("file")),
        ...
    ]

    @pytest.mark.parametrize("case", CASES, ids=str)
    def test_refused(case, tmp_path, tiny_llama_checkpoint):
        check(case, {"model": tiny_llama_checkpoint, "tmp": tmp_path}, watch=[tmp_path])

`{name}` placeholders in the command line are filled from the paths given to `check` plus `{tmp}`; a setup callable
receives the same dict (it may add entries) before the command runs; `protect` names placeholders whose files must
still exist afterwards (the data-loss cases).
"""

import contextlib
import hashlib
import io
import os
import re
import shlex
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from clakit.cli import main


@dataclass(frozen=True)
class Run:
    """What one `clakit` command did: exit code, stdout and stderr (an escaped exception's traceback included)."""

    code: int
    out: str
    err: str

    @property
    def err_lines(self) -> list[str]:
        return self.err.strip().splitlines()


def run_clakit(*args, subprocess_run: bool = False, cwd=None, env: dict | None = None, timeout: int = 600) -> Run:
    """`clakit ARGS`: in this process through `clakit.cli.main` (fast; an exception that escapes `main` is caught
    and returned as a traceback in `err`, so the assertions report it), or as `python -m clakit` in a subprocess
    (for HOME / working-directory cases, or where a crash must not take the test process with it)."""
    argv = [str(a) for a in args]
    if subprocess_run:
        full_env = {**os.environ, **(env or {})}
        p = subprocess.run(
            [sys.executable, "-m", "clakit", *argv], cwd=cwd, env=full_env, capture_output=True, text=True,
            timeout=timeout,
        )
        return Run(p.returncode, p.stdout, p.stderr)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.ExitStack() as stack:
        if cwd is not None:
            stack.enter_context(contextlib.chdir(cwd))
        stack.enter_context(_environ(env or {}))
        stack.enter_context(contextlib.redirect_stdout(out))
        stack.enter_context(contextlib.redirect_stderr(err))
        try:
            code = main(argv)
        except SystemExit as e:  # argparse
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:  # noqa: BLE001 - a crash is a test failure with its traceback, not a test error
            err.write(traceback.format_exc())
            code = 1
    return Run(code, out.getvalue(), err.getvalue())


@contextlib.contextmanager
def _environ(env: dict):
    old = {k: os.environ.get(k) for k in env}
    os.environ.update({k: str(v) for k, v in env.items()})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def snapshot(*paths) -> dict[str, str]:
    """Every file, folder and link at or below `paths`: path -> sha256 (files), 'dir' or 'link -> target'.
    Equal snapshots mean nothing was written, changed, moved or deleted there."""
    state = {}
    for root in map(Path, paths):
        for p in [root, *sorted(root.rglob("*"))] if root.is_dir() and not root.is_symlink() else [root]:
            if p.is_symlink():
                state[str(p)] = f"link -> {os.readlink(p)}"
            elif p.is_dir():
                state[str(p)] = "dir"
            elif p.is_file():
                state[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
            elif not p.exists():
                state[str(p)] = "absent"
    return state


def assert_clean_refusal(run: Run, match: str) -> None:
    """Exit 2, one stderr line `clakit[ COMMAND]: error: ...` containing `match`, no traceback in stdout or stderr."""
    assert "Traceback" not in run.err + run.out, run.err[-3000:]
    assert run.code == 2, (run.code, run.err[-2000:])
    lines = run.err_lines
    assert len(lines) == 1 and re.match(r"clakit( [\w-]+)?: error: ", lines[0]), lines
    assert match in lines[0], lines[0]


def assert_refused(args: Iterable, match: str, *, watch: Iterable = (), protect: Iterable = (), **run_options) -> Run:
    """Run `clakit ARGS`; assert a clean refusal, that nothing under `watch` changed and `protect` still exists."""
    watch, protect = list(watch), [Path(p) for p in protect]
    before = snapshot(*watch)
    run = run_clakit(*args, **run_options)
    assert_clean_refusal(run, match)
    missing = [str(p) for p in protect if not p.exists()]
    assert not missing, f"deleted: {missing}"
    after = snapshot(*watch)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    assert not changed, f"written, changed or deleted: {changed[:10]}"
    return run


@dataclass(frozen=True)
class Case:
    """One bad input: a clakit command line (with `{name}` placeholders), the text its one error line must contain,
    an optional setup(paths) run first, and placeholders whose paths must survive (data-loss cases)."""

    argv: str
    match: str
    setup: Callable[[dict], None] | None = None
    protect: tuple[str, ...] = ()
    env: dict = field(default_factory=dict)
    subprocess_run: bool = False
    id: str = ""
    forbid: str = ""  # text the error line must not contain (e.g. "--overwrite" where overwriting is not allowed)

    def __str__(self) -> str:
        return self.id or self.argv

    def args(self, paths: dict) -> list[str]:
        return [token.format(**paths) for token in shlex.split(self.argv)]


def check(case: Case, paths: dict, *, watch: Iterable = (), cwd=None) -> Run:
    """Set up and run one table case; assert it is refused cleanly with nothing under `watch` changed."""
    paths = {k: str(v) for k, v in paths.items()}
    if case.setup:
        case.setup(paths)
    env = {k: v.format(**paths) for k, v in case.env.items()}
    protect = [paths[name] for name in case.protect]
    run = assert_refused(
        case.args(paths),
        case.match,
        watch=watch,
        protect=protect,
        cwd=cwd,
        env=env,
        subprocess_run=case.subprocess_run,
    )
    assert not case.forbid or case.forbid not in run.err, run.err
    return run


# --- setup helpers for table cases -----------------------------------------------------------------------------


def make_file(name: str, text: str = "mine\n") -> Callable[[dict], None]:
    """setup: a plain file at {tmp}/NAME (placeholder {NAME})."""

    def setup(paths: dict) -> None:
        path = Path(paths["tmp"]) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        paths[name] = str(path)

    return setup


def make_folder(name: str, files: dict[str, str] | None = None) -> Callable[[dict], None]:
    """setup: a folder {tmp}/NAME holding `files` (relative path -> text), placeholder {NAME}."""

    def setup(paths: dict) -> None:
        folder = Path(paths["tmp"]) / name
        folder.mkdir(parents=True, exist_ok=True)
        for rel, text in (files if files is not None else {"keep.txt": "mine\n"}).items():
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (folder / rel).write_text(text)
        paths[name] = str(folder)

    return setup


def both(*setups: Callable[[dict], None]) -> Callable[[dict], None]:
    """setup: several setups in order."""

    def setup(paths: dict) -> None:
        for s in setups:
            s(paths)

    return setup
