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
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    pip("wheel", "--no-deps", str(REPO), "-w", str(out))
    return next(out.glob("clakit-*.whl"))


def test_wheel_holds_every_module_and_the_recipes_unduplicated(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(REPO).as_posix() for p in (REPO / "clakit").rglob("*.py")}
    assert modules <= names, f"packages missing from pyproject's list: {sorted(modules - names)}"
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
