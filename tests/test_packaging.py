"""Packaging: the wheel holds every clakit module and the root recipes/ as package data `clakit.recipes`, and an
installed (non-editable) clakit finds its default recipe through importlib.resources from any folder."""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from clakit.uptrain import DEFAULT_RECIPE, resolve_recipe, shipped_recipes

REPO = Path(__file__).resolve().parent.parent
RECIPES = sorted(p.relative_to(REPO / "recipes").as_posix() for p in (REPO / "recipes").rglob("*.yaml"))


def pip(*args, cwd=None) -> None:
    subprocess.run([sys.executable, "-m", "pip", "-q", *args], check=True, cwd=cwd, capture_output=True)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, str]:
    """The wheel and the build's verbose log (setuptools' warnings are only shown with -v)."""
    out = tmp_path_factory.mktemp("wheel")
    cmd = [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", str(REPO), "-w", str(out)]
    run = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return next(out.glob("clakit-*.whl")), run.stdout + run.stderr


@pytest.fixture(scope="module")
def wheel(built) -> Path:
    return built[0]


def test_the_build_lists_every_recipe_folder_as_a_package(built):
    """A recipe folder missing from pyproject's packages list still shipped (package-data's `**`), but setuptools
    warned of each one ("Package 'clakit.recipes.smollm2' is absent from the `packages` configuration"), and
    warns it will stop shipping them."""
    assert "is absent from the `packages` configuration" not in built[1], built[1][-3000:]


def test_wheel_holds_every_module_and_the_recipes_unduplicated(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(REPO).as_posix() for p in (REPO / "clakit").rglob("*.py")}
    assert modules <= names, f"packages missing from pyproject's list: {sorted(modules - names)}"
    # and nothing else: setuptools builds in the tree's build/lib and ships whatever an earlier build left there
    # (a module or recipe deleted since), with no warning
    expected = modules | {"clakit/recipes/__init__.py"} | {f"clakit/recipes/{r}" for r in RECIPES}
    stale = sorted(n for n in names if n.startswith("clakit/") and n not in expected)
    assert not stale, f"files in the wheel that are not in the source tree (remove build/ and rebuild): {stale}"
    assert RECIPES and all(f"clakit/recipes/{r}" in names for r in RECIPES)
    with zipfile.ZipFile(wheel) as z:
        assert all(z.read(f"clakit/recipes/{r}") == (REPO / "recipes" / r).read_bytes() for r in RECIPES)
    assert not (REPO / "clakit" / "recipes").exists()  # one copy in the tree: the root recipes/


def test_installed_wheel_finds_the_default_recipe_through_importlib_resources(wheel, tmp_path):
    site, elsewhere = tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    pip("install", "--no-deps", "--target", str(site), str(wheel))
    env = {**os.environ, "PYTHONPATH": str(site)}  # the installed copy, not this checkout
    probe = (
        "import importlib.resources, json, clakit.uptrain as u; "
        "print(json.dumps([str(importlib.resources.files('clakit.recipes')), str(u.DEFAULT_RECIPE), u.__file__]))"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    folder, default, module = json.loads(out.stdout.strip().splitlines()[-1])
    assert Path(module).is_relative_to(site) and Path(folder) == site / "clakit" / "recipes"
    assert Path(default) == site / "clakit" / "recipes" / "smollm2" / "135m_cla2_cpu.yaml"
    assert Path(default).read_bytes() == DEFAULT_RECIPE.read_bytes()
    cli = [sys.executable, "-m", "clakit", "uptrain", "recipes/smollm2/135m_cla2_cpu.yaml", "--dry-run"]
    run = subprocess.run(cli, cwd=elsewhere, env=env, capture_output=True, text=True)
    assert run.returncode == 0 and "SmolLM2-135M" in run.stdout, run.stderr


def test_default_recipe_is_the_shipped_one():
    assert DEFAULT_RECIPE == shipped_recipes() / "smollm2" / "135m_cla2_cpu.yaml" and DEFAULT_RECIPE.is_file()
    assert sorted(p.relative_to(shipped_recipes()).as_posix() for p in shipped_recipes().rglob("*.yaml")) == RECIPES


def test_recipe_names_resolve_from_any_folder_and_local_files_win(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for spec in ("recipes/smollm2/135m_cla2_cpu.yaml", "smollm2/135m_cla2_cpu.yaml", "smollm2/135m_cla2_cpu"):
        assert resolve_recipe(spec) == DEFAULT_RECIPE
    local = tmp_path / "recipes" / "smollm2" / "135m_cla2_cpu.yaml"
    local.parent.mkdir(parents=True)
    local.write_text("model: {}\n")
    assert resolve_recipe("recipes/smollm2/135m_cla2_cpu.yaml").resolve() == local
    assert resolve_recipe("recipes/none/missing.yaml") == Path("recipes/none/missing.yaml")


# Dependencies point one way: modeling <- convert/eval <- uptrain <- demo/cli. A package may import those below it
# (and convert its peer eval's perplexity), never those above: the rank of each package, and what it must not import.
RANK = {"modeling": 0, "convert": 1, "eval": 1, "uptrain": 2, "demo": 3, "cli": 3}
ALSO_FORBIDDEN = {"eval": {"convert"}}  # eval measures any model; it must not depend on how CLA models are made


def clakit_imports(path: Path) -> set[str]:
    """The clakit subpackages a module imports anywhere in it (function-local imports included)."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        names += [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module == "clakit":
            names += [f"clakit.{a.name}" for a in node.names]
        found |= {n.split(".")[1] for n in names if n.startswith("clakit.")}
    return found & set(RANK)


def test_dependencies_point_one_way():
    bad = []
    for package, rank in RANK.items():
        files = [REPO / "clakit" / f"{package}.py"] if package == "cli" else (REPO / "clakit" / package).rglob("*.py")
        for f in files:
            imported = clakit_imports(f)
            above = {p for p in imported if RANK[p] > rank} | (imported & ALSO_FORBIDDEN.get(package, set()))
            bad += [f"{f.relative_to(REPO)} imports clakit.{p}" for p in sorted(above)]
    assert not bad, bad
