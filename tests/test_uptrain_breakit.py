"""Inputs a reviewer tried in order to break `clakit uptrain`: each test here failed before its fix."""

from pathlib import Path

import pytest
import yaml

from clakit.errors import ClakitError
from clakit.uptrain import load_recipe

MINIMAL = {
    "model": {"path": "some/cla"},
    "data": {"train": ["train.txt"]},
    "train": {"output_dir": "runs/x", "learning_rate": "3e-4"},
}


# --- recipe YAML --------------------------------------------------------------------------------------------------


def test_yaml_merge_keys_work_and_a_key_twice_beside_them_is_still_refused(tmp_path):
    """`<<: *base` is plain YAML (safe_load reads it); the duplicate-key loader refused it as 'not valid YAML'."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(MINIMAL) + "lora:\n  <<: {r: 4, lora_alpha: 8}\n  r: 8\n")
    r = load_recipe(recipe)
    assert (r.lora.r, r.lora.lora_alpha) == (8, 8)  # the key written beside the merge wins, as in safe_load
    recipe.write_text(yaml.safe_dump(MINIMAL) + "lora:\n  <<: {r: 4}\n  r: 8\n  r: 16\n")
    with pytest.raises(ClakitError, match="key 'r' is given twice"):
        load_recipe(recipe)
