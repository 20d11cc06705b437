"""Round 4 of uptrain: reproducibility, provenance and composed features. Layout-dependent LoRA patterns are
checked before the conversion."""

import dataclasses
import json
import re
import typing
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_model
from uptrain_fixtures import tiny_recipe, write_recipe

from clakit.errors import ClakitError
from clakit.uptrain import uptrain


def tensors_of(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def same_tensors(a: Path, b: Path) -> bool:
    x, y = tensors_of(a), tensors_of(b)
    return set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in x)


def train_lines(run: Path) -> list[dict]:
    """metrics.jsonl less its wall-clock fields."""
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in x.items() if k not in ("tokens_per_s", "elapsed_s")} for x in lines]


def key_paths(cls, prefix: str = "") -> list[str]:
    """Every settings key of a dataclass, nested sections (model.convert: ConvertConfig) by their dotted names: a
    field added to any settings class is a key the records must hold."""
    paths = []
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        inner = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)] or [tp]
        if dataclasses.is_dataclass(inner[0]):
            paths += key_paths(inner[0], f"{prefix}{f.name}.")
        else:
            paths.append(prefix + f.name)
    return paths


def lookup(d: dict, path: str):
    for part in path.split("."):
        assert isinstance(d, dict) and part in d, f"{path}: {part} missing"
        d = d[part]
    return d


def card_recipe(model_dir: Path) -> dict:
    """The YAML block of the card's `## Recipe` section."""
    card = (model_dir / "README.md").read_text()
    found = re.search(r"## Recipe\n.*?```yaml\n(.*?)\n```", card, re.S)
    assert found, "the card has no recipe block"
    return yaml.safe_load(found[1])


# --- layout-dependent patterns, before the conversion ----------------------------------------------------------------


@pytest.mark.parametrize(
    "convert,lora",
    [
        ({"factor": 2}, {"full_train": ["consumers.k_proj"]}),
        ({}, {"full_train": ["k_proj"], "target_modules": ["consumers.v_proj"]}),  # the default factor 2
        ({"kv_source_layers": [0, 1, 0, 1]}, {"full_train": ["consumers.v_proj", "q_proj"]}),
    ],
    ids=["factor", "default-factor", "interleaved"],
)
def test_a_consumer_kv_pattern_is_refused_before_the_conversion(
    tiny_llama_checkpoint, corpus_dir, tmp_path, monkeypatch, convert, lora
):
    """A consumer holds no k_proj/v_proj. With model.source the patterns naming producers./consumers. were skipped
    before the run (the layout was thought unknown) and refused only after the conversion and the converted model's
    evaluation (hours at 70B); a factor, an explicit layout or the default factor 2 fix the layout before any work."""
    from clakit.uptrain import student

    def no_conversion(*args, **kwargs):
        raise AssertionError("the conversion ran before the patterns were checked")

    monkeypatch.setattr(student, "convert_source", no_conversion)
    model = {"source": str(tiny_llama_checkpoint), "convert": {"init": "mean", **convert}}
    recipe = tiny_recipe(corpus_dir, tmp_path / "run", model=model, lora=lora)
    with pytest.raises(ClakitError, match=r"pattern 'consumers\.[kv]_proj' matches no linear module \(only producers"):
        uptrain(write_recipe(tmp_path / "r.yaml", recipe), quiet=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]


def test_a_layout_chosen_on_data_still_checks_its_producer_patterns_after_the_conversion():
    """layout auto: the converter chooses the layout on the calibration text, so no layout is planned and the
    producers./consumers. patterns wait for the conversion (as before)."""
    from clakit.convert.config import ConvertConfig
    from clakit.uptrain.recipe import ModelSection
    from clakit.uptrain.student import planned_layout

    config = tiny_model("llama").config
    auto = ModelSection(source="s", convert=ConvertConfig(calib_data=["c.txt"]))
    assert planned_layout(auto, config) is None
    assert planned_layout(ModelSection(source="s", convert=ConvertConfig(factor=3)), config) == [0, 0, 0, 3]
    assert planned_layout(ModelSection(source="s", convert=ConvertConfig(factor=9)), config) is None  # convert refuses
