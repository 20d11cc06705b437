"""Recipe schema: strict keys and types, floats like 3e-4, dotted overrides; every shipped recipe validates."""

import datetime
import re
from pathlib import Path

import pytest
import yaml

from clakit.errors import ClakitError
from clakit.uptrain import load_recipe
from clakit.uptrain.recipe import Recipe

RECIPES = sorted((Path(__file__).parent.parent / "recipes").rglob("*.yaml"))

MINIMAL = {
    "model": {"path": "some/cla"},
    "data": {"train": ["train.txt"]},
    "train": {"output_dir": "runs/x", "learning_rate": "3e-4"},
}


def write(tmp_path, recipe: dict) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_exponent_strings_are_floats_and_defaults_fill_in(tmp_path):
    r = load_recipe(write(tmp_path, MINIMAL))
    assert isinstance(r, Recipe)
    assert r.train.learning_rate == pytest.approx(3e-4) and isinstance(r.train.learning_rate, float)
    assert r.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert r.data.train == ["train.txt"]


def test_dotted_overrides_parse_values_as_yaml(tmp_path):
    r = load_recipe(
        write(tmp_path, MINIMAL),
        [
            "train.max_steps=10",
            "lora.full_train=[k_proj, consumers.q_proj]",
            "distill.weight=0.5",
            "data.seq_len=64",
            "model.original=src",
        ],
    )
    assert r.train.max_steps == 10
    assert r.lora.full_train == ["k_proj", "consumers.q_proj"]
    assert r.distill.weight == 0.5 and r.data.seq_len == 64


def test_a_mapping_override_sets_only_the_keys_it_names(tmp_path):
    """`lora={r: 8}` replaced the whole section: alpha, dropout and target_modules silently went back to defaults."""
    recipe = {**MINIMAL, "lora": {"r": 4, "lora_alpha": 8, "target_modules": ["gate_proj"]}}
    r = load_recipe(write(tmp_path, recipe), ["lora={r: 8}", "train={max_steps: 3}"])
    assert (r.lora.r, r.lora.lora_alpha, r.lora.target_modules) == (8, 8, ["gate_proj"])
    assert r.train.max_steps == 3 and r.train.output_dir == "runs/x"
    reset = load_recipe(write(tmp_path, recipe), ["lora=null", "lora={r: 8}"])  # null first: the defaults
    assert (reset.lora.r, reset.lora.lora_alpha, reset.lora.target_modules[0]) == (8, 32, "q_proj")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"train": {"output_dir": "x", "learning_rat": 1e-3}}, "'train.learning_rat'"),
        ({"trian": {}}, "'trian'"),
        ({"train": {"output_dir": "x", "max_steps": "ten"}}, "train.max_steps must be an integer"),
        ({"train": {"output_dir": "x", "bf16": "yes"}}, "train.bf16 must be true/false"),
        ({"lora": {"r": 1.5}}, "lora.r must be an integer"),
        ({"data": {"train": ["a.txt"], "seq_len": 2}}, "data.seq_len must be at least 8"),
        ({"model": {"path": "a", "source": "b"}}, "exactly one of model.path"),
        ({"distill": {"weight": 2.0}}, "distill.weight must be between 0 and 1"),
        ({"train": {"output_dir": "x", "lr_scheduler_type": "cosin"}}, "lr_scheduler_type 'cosin'"),
        # one datasets text under two spellings (no split is "test"): calibrated on, then scored as held-out
        ({"model": {"source": "org/m", "convert": {"init": "calibrated", "calib_data": ["ds:cfg:test"]}},
          "data": {"train": ["a.txt"], "eval": ["ds:cfg"]}}, "calibration text ds:cfg:test of model.convert"),
        ({"data": {"train": [":::"]}}, "data.train ':::' is neither a file or folder nor a datasets spec NAME"),
    ],
)
def test_bad_recipes_name_the_key(tmp_path, change, message):
    recipe = {**MINIMAL, **change}
    with pytest.raises(ClakitError, match=message.replace("(", r"\(").replace(".", r"\.")) as e:
        load_recipe(write(tmp_path, recipe))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "change, message",
    [
        # the conversion would read one commit, the tokenizer, the teacher and the original's numbers another
        ({"model": {"source": "org/m", "revision": "v1", "convert": {"factor": 2, "revision": "v2"}}},
         "model.convert.revision v2 applies to the conversion only, but the run reads model.source again"),
        ({"model": {"source": "org/m", "convert": {"factor": 2, "revision": "v2"}}},
         "at model.revision (the default branch): set model.revision instead"),
        # recipe paths expand ~, not variables: output went to a folder literally named $HOME
        ({"train": {"output_dir": "$HOME/runs/x"}}, "train.output_dir '$HOME/runs/x' names an environment variable"),
        ({"data": {"train": ["${CORPUS}/a.txt"]}}, "data.train '${CORPUS}/a.txt' names an environment variable"),
        # an unquoted date is a datetime.date to YAML: the fix is to quote it, as for numbers
        ({"model": {"source": "org/m", "revision": datetime.date(2024, 1, 1)}}, "(YAML read the unquoted value as "
         "date); quote it"),
    ],
)
def test_revisions_variables_and_dates_in_recipes(tmp_path, change, message):
    with pytest.raises(ClakitError) as e:
        load_recipe(write(tmp_path, {**MINIMAL, **change}))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_dollar_that_names_no_variable_is_a_path(tmp_path):
    """`$3` is no variable name (a learning rate in a run's name): not refused as one."""
    recipe = load_recipe(write(tmp_path, MINIMAL), ["train.output_dir=runs/lr$3e-4"])
    assert recipe.train.output_dir == "runs/lr$3e-4"


def test_a_control_character_in_a_recipe_or_an_override_is_one_line(tmp_path):
    """PyYAML says where a NUL is on a second line ("  in '<unicode string>', position 0")."""
    path = tmp_path / "nul.yaml"
    path.write_bytes(yaml.safe_dump(MINIMAL).encode() + b"x: \x00\n")
    for recipe, overrides in ((path, []), (write(tmp_path, MINIMAL), ["train.output_dir=a\x00b"])):
        with pytest.raises(ClakitError, match="is not valid YAML") as e:
            load_recipe(recipe, overrides)
        assert "\n" not in str(e.value)


def test_unknown_key_lists_the_valid_ones(tmp_path):
    with pytest.raises(ClakitError) as e:
        load_recipe(write(tmp_path, MINIMAL), ["lora.rank=8"])
    assert "'lora.rank'" in str(e.value) and "lora_alpha" in str(e.value) and "full_train" in str(e.value)


def test_fingerprint_ignores_logging_but_not_training_settings(tmp_path):
    path = write(tmp_path, MINIMAL)
    base = load_recipe(path).fingerprint()
    assert load_recipe(path, ["train.logging_steps=3", "train.save_steps=7"]).fingerprint() == base
    # the held-out scoring batch trains nothing: a resume on a smaller GPU may lower it (it was refused)
    assert load_recipe(path, ["train.per_device_eval_batch_size=1"]).fingerprint() == base
    assert load_recipe(path, ["train.learning_rate=1e-3"]).fingerprint() != base


def test_recipes_are_shipped_and_each_starts_with_its_command():
    names = {p.relative_to(p.parents[1]).as_posix() for p in RECIPES}
    for wanted in [
        "smollm2/135m_cla2_cpu.yaml",
        "llama3_2/1b_cla2_lora.yaml",
        "llama3_1/8b_cla2_lora.yaml",
        "mistral/7b_cla2_lora.yaml",
    ]:
        assert wanted in names
    for path in RECIPES:
        first = path.read_text().splitlines()[0]
        assert first.startswith(f"# clakit uptrain recipes/{path.parent.name}/{path.name}"), path
        assert re.search(r"~[\d.]+ (min|h) ", first) and re.search(r"~[\d.]+ GB", first), path


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.parent.name + "/" + p.name)
def test_every_shipped_recipe_validates(path):
    r = load_recipe(path)
    assert r.train.output_dir and r.data.train
    assert r.model.convert is not None or r.model.path
