"""Hostile recipes and overrides: each refused in one bounded line, before any work (helper U's sweep)."""

import pytest
import yaml
from uptrain_fixtures import tiny_cla_checkpoint  # noqa: F401

from clakit.errors import ClakitError
from clakit.uptrain.recipe import apply_override, load_recipe

BASE = {
    "model": {"path": "m"},
    "data": {"train": ["t.txt"]},
    "train": {"output_dir": "out", "max_steps": 2},
}


def built_with(override: str):
    """The base recipe with `override` applied, built into the settings (where field types are checked)."""
    from clakit.uptrain.recipe import Recipe, _build

    raw = yaml.safe_load(yaml.safe_dump(BASE))
    apply_override(raw, override)
    return _build(Recipe, raw, "")


def _recipe(tmp_path, text: str):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def test_alias_bomb_refused_in_a_short_line(tmp_path):
    """~700 bytes of nested aliases are 10**9 items once repr() walks them: the message hung the run for minutes."""
    anchors = ", ".join(
        f"&{chr(97 + i)} [" + ",".join([f"*{chr(96 + i)}"] * 10 if i else ["x"] * 10) + "]" for i in range(9)
    )
    path = _recipe(tmp_path, yaml.safe_dump(BASE).replace("max_steps: 2", f"max_steps: [{anchors}]"))
    with pytest.raises(ClakitError, match="train.max_steps must be an integer") as e:
        load_recipe(path)
    assert len(str(e.value)) < 2000


@pytest.mark.parametrize("nested", ["[" * 2000 + "]" * 2000, "{a: " * 2000 + "1" + "}" * 2000])
def test_deep_nesting_is_one_line(tmp_path, nested):
    with pytest.raises(ClakitError, match="too deeply"):
        load_recipe(_recipe(tmp_path, yaml.safe_dump(BASE) + f"x: {nested}\n"))
    with pytest.raises(ClakitError, match="too deeply"):
        apply_override({}, f"train.max_steps={nested}")


@pytest.mark.parametrize("value, read", [("0755", 493), ("10:20", 620), ("007", 7)])
def test_yaml11_ints_refused_for_numbers(value, read):
    with pytest.raises(ClakitError, match=f"is written {value}, which YAML reads as {read}"):
        built_with(f"train.max_steps={value}")


@pytest.mark.parametrize("override", ["train.output_dir=runs/exp #2", "train.max_steps=3 # three"])
def test_override_comment_refused(override):
    with pytest.raises(ClakitError, match="start of a comment"):
        apply_override({}, override)


def test_override_quoted_hash_kept():
    raw = {}
    apply_override(raw, "train.output_dir='runs/exp #2'")
    apply_override(raw, "data.train=[a#b.txt]")
    assert raw == {"train": {"output_dir": "runs/exp #2"}, "data": {"train": ["a#b.txt"]}}


def test_unknown_key_suggests_the_close_one():
    with pytest.raises(ClakitError, match=r"did you mean train\.max_steps\?"):
        built_with("train.max_step=3")


@pytest.mark.parametrize("override", ["train.save_total_limit=#3", "model.revision=#v1.0", "train.max_tokens=#1000"])
def test_an_override_that_is_all_comment_is_refused(override):
    """`key=#3`: YAML reads the whole value as a comment, null, and an optional field took it silently (keep every
    checkpoint, the default revision; helper R2)."""
    with pytest.raises(ClakitError, match="starting with '#' as a comment, so the value would be null"):
        apply_override({}, override)


@pytest.mark.parametrize(("value", "hint"), [("-010", "train.max_steps=-10"), ("-00", "train.max_steps=0")])
def test_a_negative_octal_gets_a_hint_that_differs_from_it(value, hint):
    with pytest.raises(ClakitError, match=f"e.g. {hint}$"):
        built_with(f"train.max_steps={value}")


@pytest.mark.parametrize("override", ["train.learning_rate=1:30.5", "data.copy_fraction=0:0.5"])
def test_a_base_60_float_is_refused(override):
    with pytest.raises(ClakitError, match="a ':' counts in base 60"):
        built_with(override)


@pytest.mark.parametrize("flags", [[], ["--dry-run"]])  # --dry-run passed it (helper R2)
def test_a_run_inside_the_shipped_recipes_is_refused_before_any_work(capsys, tmp_path, corpus_dir,
                                                                     tiny_cla_checkpoint, flags):  # noqa: F811
    """`cd recipes/smollm2 && clakit uptrain 135m_cla2_cpu.yaml` wrote runs/ among the shipped recipes, where its
    recipe.yaml was then offered as a shipped recipe and packaged by a build (helper U)."""
    from uptrain_fixtures import tiny_recipe, write_recipe

    from clakit.cli import main
    from clakit.uptrain.recipe import shipped_recipes

    out = shipped_recipes() / "smollm2" / "runs-test-refused"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(corpus_dir, out, model={"path": str(tiny_cla_checkpoint)}))
    assert main(["uptrain", str(recipe), "-q", *flags]) == 2
    assert "is inside clakit's shipped recipes" in capsys.readouterr().err
    assert not out.exists() and not (shipped_recipes() / "smollm2" / "runs").exists()


def test_the_quoting_named_for_a_comment_value_is_valid_yaml():
    """`#it's` was told to be written `'#it's'`, which does not parse (helper R3): quotes are doubled."""
    with pytest.raises(ClakitError, match="train.output_dir='#it''s'") as e:
        apply_override({}, "train.output_dir=#it's")
    fixed = {}
    apply_override(fixed, str(e.value).split('in a shell: "')[1].split('"')[0])
    assert fixed == {"train": {"output_dir": "#it's"}}


@pytest.mark.parametrize(
    ("override", "path_hint"), [("train.output_dir=~", True), ("train.max_steps=", False), ("data.train=~", False)]
)
def test_a_value_yaml_reads_as_null_names_why(override, path_hint):
    """`train.output_dir=~` (the home folder meant) said only "must be a string, got None" (helper U)."""
    with pytest.raises(ClakitError, match="got None \\(YAML reads a bare ~, null or an empty value as null\\)") as e:
        built_with(override)
    assert ("~/NAME" in str(e.value)) == path_hint



def test_a_convert_refusal_in_a_recipe_names_the_key_of_a_no_flag():
    """--no-train-o-proj in a refusal of model.convert was left unnamed (only --init was translated): the user wrote
    train_o_proj: false (helper 50s)."""
    from clakit.convert.config import ConvertConfig
    from clakit.settings import recipe_keys

    refusal = "--no-train-o-proj acts in --init reconstruct's fit; --init mean"
    line = recipe_keys(refusal, ConvertConfig, "model.convert")
    assert "--no-train-o-proj is model.convert.train_o_proj: false, --init is model.convert.init" in line
