"""clakit installs beside the torch an environment already has: pip's real resolver, on a fresh venv holding a
torch newer than the CPU pin (a CUDA user's 2.14, say, as vLLM pins it), must not plan to replace that torch; and the
README's CPU-first install (torch==2.13.0, then clakit) must not pull another torch either.

The distributions are stand-ins (metadata-only wheels: a real CUDA torch is GBs): clakit's carries the
Requires-Dist of this checkout's pyproject.toml, every other dependency one version meeting its range. Offline
(--no-index) and blind to this machine's pip configuration (PIP_CONFIG_FILE=os.devnull).
"""

import json
import os
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
TORCH_RELEASES = ["2.13.0", "2.14.1", "3.0.0"]


def stand_in_wheel(folder: Path, name: str, version: str, requires: list[str] = ()) -> Path:
    """A wheel holding only its metadata."""
    stem = f"{canonicalize_name(name).replace('-', '_')}-{version}"
    info = f"{stem}.dist-info"
    files = {
        f"{info}/METADATA": "Metadata-Version: 2.1\n"
        + f"Name: {name}\nVersion: {version}\n"
        + "".join(f"Requires-Dist: {r}\n" for r in requires),
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: clakit-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{f},,\n" for f in [*files, f"{info}/RECORD"])
    path = folder / f"{stem}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for f, text in files.items():
            z.writestr(f, text)
    return path


def meeting(requirement: Requirement) -> str:
    """A version inside the requirement's range: its lower bound, else 1.0."""
    lower = [s.version for s in requirement.specifier if s.operator in (">=", "==", "~=")]
    version = lower[0] if lower else "1.0"
    assert requirement.specifier.contains(version), requirement
    return version


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("wheelhouse")
    requires = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    stand_in_wheel(folder, "clakit", "0.0.1", requires)
    for r in map(Requirement, requires):
        if r.name != "torch":
            stand_in_wheel(folder, r.name, meeting(r))
    for version in TORCH_RELEASES:
        stand_in_wheel(folder, "torch", version)
    return folder


def pip(venv: Path, wheelhouse: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PIP_CONFIG_FILE": os.devnull}
    # PYTHONPATH off too: a checkout on it (with a clakit.egg-info from a build) would count as installed
    drop = ("PIP_CONSTRAINT", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PYTHONPATH")
    env = {k: v for k, v in env.items() if k not in drop}
    command = [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), *args]
    command += ["--no-index", "--find-links", str(wheelhouse), "--disable-pip-version-check"]
    return subprocess.run(command, env=env, capture_output=True, text=True)


def planned_installs(torch_version: str, wheelhouse: Path, tmp_path: Path) -> dict[str, str]:
    venv = tmp_path / f"venv-{torch_version}"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    installed = pip(venv, wheelhouse, "install", "-q", f"torch=={torch_version}")
    assert installed.returncode == 0, installed.stderr
    report = tmp_path / f"report-{torch_version}.json"
    plan = pip(venv, wheelhouse, "install", "--dry-run", "--report", str(report), "clakit")
    assert plan.returncode == 0, plan.stderr[-2000:]
    items = json.loads(report.read_text())["install"]
    return {i["metadata"]["name"]: i["metadata"]["version"] for i in items}


@pytest.mark.parametrize("torch_version", TORCH_RELEASES)
def test_clakit_installs_without_replacing_the_torch_already_there(torch_version, wheelhouse, tmp_path):
    plan = planned_installs(torch_version, wheelhouse, tmp_path)
    assert "clakit" in plan and "transformers" in plan  # the resolver really planned clakit's install
    assert "torch" not in plan, f"pip would replace torch {torch_version} with {plan.get('torch')}"


def test_the_torch_range_admits_newer_releases_and_the_cpu_pin():
    torch_req = next(r for r in map(Requirement, tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"])
                     if r.name == "torch")  # fmt: skip
    assert all(torch_req.specifier.contains(v) for v in ["2.13.0", "2.14.1", "2.15.0", "3.1.0"])
