"""Inputs a reviewer tried in order to break `clakit uptrain`: each test here failed before its fix."""

import shutil

import pytest
import yaml
from uptrain_fixtures import tiny_cla_checkpoint, tiny_recipe, write_recipe  # noqa: F401

from clakit.errors import ClakitError
from clakit.uptrain import load_recipe, uptrain

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


# --- data -----------------------------------------------------------------------------------------------------------


def test_held_out_text_that_is_a_copy_of_training_text_is_refused_before_any_work(
    tiny_cla_checkpoint,
    corpus_dir,
    tmp_path,  # noqa: F811
):
    """The path rule saw two names; the run trained on its own held-out text and reported memorisation."""
    copy = tmp_path / "heldout_copy.txt"
    shutil.copy(corpus_dir / "heldout.txt", copy)
    out = tmp_path / "run"
    recipe = tiny_recipe(corpus_dir, out, model={"path": str(tiny_cla_checkpoint)}, data={"train": [str(copy)]})
    with pytest.raises(ClakitError, match=r"data.eval .*heldout.txt holds the same text as data.train .*heldout_copy"):
        uptrain(write_recipe(tmp_path / "r.yaml", recipe), quiet=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heldout_copy.txt", "r.yaml"]  # nothing half-written
