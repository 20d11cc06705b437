"""clakit: retrofit Cross-Layer Attention (CLA) onto pretrained Llama and Mistral checkpoints."""

import importlib.metadata
import os
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import InvalidVersion, Version

__version__ = "0.1.0"


def _requirements() -> list[str]:
    """The one table of floors: this checkout's pyproject.toml, else the installed clakit's metadata (built from it).
    The checkout first, since an editable install's metadata is as old as its last `pip install -e`."""
    import tomllib

    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    try:  # beside an installed clakit (site-packages/) any project's file, or none
        project = tomllib.loads(pyproject.read_text()).get("project", {})
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        project = {}
    if project.get("name") == "clakit":
        return project.get("dependencies", [])
    return _installed_requirements()


def _installed_requirements() -> list[str]:
    """The floors in the metadata of the clakit installation that holds this very file; none (unchecked) for a copy
    that no metadata describes (a zip on sys.path, a vendored folder), which read whichever clakit was installed
    elsewhere in the environment, however old, and refused or passed by its table."""
    try:
        dist = importlib.metadata.distribution("clakit")
    except importlib.metadata.PackageNotFoundError:
        return []
    if Path(dist.locate_file("clakit/__init__.py")).resolve() != Path(__file__).resolve():
        return []
    return dist.requires or []


def _too_old(requirement: Requirement) -> tuple[str, str] | None:
    """(floor, installed version) where the installed version is below the requirement's `>=` bound, else None. A
    missing package is left to its import's own error, upper bounds to pip. A local build (2.13.0+cpu) counts as its
    release; a pre-release sorts before it (2.14.0.dev20260101 passes a 2.6 floor, 2.6.0.dev0 does not)."""
    try:
        found = importlib.metadata.version(requirement.name)
        version = Version(found)
    except (importlib.metadata.PackageNotFoundError, InvalidVersion, TypeError):
        return None  # not installed, or a version no floor compares with ('unknown', none in its METADATA): unchecked
    for spec in requirement.specifier:
        if spec.operator == ">=" and version < Version(spec.version):
            return spec.version, found
    return None


def check_floors() -> None:
    """Raise ImportError, one line naming the package, the version found and the fix, where an installed dependency
    is older than clakit's floor. pip enforces them, but an environment built with --no-deps, conda or a later
    downgrade does not, and then e.g. transformers silently disables a torch < 2.6 or an accelerate < 1.1 and
    clakit fails far from the cause (docs/install.md)."""
    for line in _requirements():
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue  # an extra's, or another platform's
        old = _too_old(requirement)
        if old is not None:
            floor, found = old
            fix = f'pip install "{requirement}"'
            _refuse(f"clakit needs {requirement.name}>={floor} (found {found}): {fix}")


def _is_command() -> bool:
    """Whether this process is the `clakit` command (its console script, or `python -m clakit`), which imports this
    package before cli.main can catch anything."""
    argv = getattr(sys, "orig_argv", [])
    module = any(a == "-m" and b == "clakit" for a, b in zip(argv, argv[1:], strict=False))
    return Path(sys.argv[0]).stem == "clakit" or module  # clakit.exe: pip's console script on Windows


def _refuse(message: str) -> None:
    """ImportError for a library import; for the `clakit` command the CLI's one line and exit 2, not a traceback."""
    if _is_command():
        print(f"clakit: error: {message}", file=sys.stderr)
        raise SystemExit(2)
    raise ImportError(message)


def check_cwd() -> None:
    """transformers resolves a path against the working directory when it is imported: in a folder deleted since
    (changed into, then removed) every command, `--help` too, ended in FileNotFoundError's traceback."""
    try:
        os.getcwd()
    except FileNotFoundError:
        _refuse("the working directory no longer exists (removed since); cd into an existing folder and run again")


check_floors()
check_cwd()

try:
    from clakit import modeling  # noqa: E402,F401  (registers the CLA classes with the Auto* factories)
except KeyboardInterrupt:  # Ctrl-C in the ~10 s torch and transformers take to import: the CLI's line, not 60 lines
    if not _is_command():
        raise
    print("clakit: interrupted", file=sys.stderr)
    raise SystemExit(130) from None
