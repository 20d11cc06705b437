"""clakit as a library in one long-lived process (a notebook): a call leaves the caller's objects and process-wide
state as it found them."""

import matplotlib
import pytest
import torch
from conftest import tiny_model
from uptrain_fixtures import tiny_cla_checkpoint, tiny_recipe, write_recipe  # noqa: F401

from clakit.convert.inmemory import cla_model_from
from clakit.convert.layout import uniform_layout
from clakit.errors import ClakitError
from clakit.eval import EvalConfig, evaluate, report, write_json
from clakit.uptrain import uptrain


def test_evaluate_hands_an_in_memory_model_back_in_its_modes_and_takes_path_objects(tokenizer, corpus_dir):
    model = tiny_model("llama").train()
    model.model.layers[0].eval()  # a mix, as a partly frozen model has
    r = evaluate(model, tokenizer=tokenizer, data=[corpus_dir / "heldout.txt"], seq_len=32, max_tokens=128,
                 speed=False, quiet=True)  # fmt: skip
    assert model.training and not model.model.layers[0].training and model.model.layers[1].training
    assert r["perplexity"] > 0
    assert EvalConfig(data=[corpus_dir / "heldout.txt"]).data == [str(corpus_dir / "heldout.txt")]


def test_report_leaves_the_callers_matplotlib_backend(tokenizer, corpus_dir, tmp_path):
    """report (and uptrain's plot) called matplotlib.use("Agg"): a notebook's inline backend was gone after it."""
    before = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        r = evaluate(tiny_model("llama"), tokenizer=tokenizer, data=[str(corpus_dir / "heldout.txt")], seq_len=32,
                     max_tokens=128, speed=False, quiet=True)  # fmt: skip
        report([write_json(r, tmp_path / "a.json")], tmp_path / "rep")
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)
    assert (tmp_path / "rep" / "ppl_vs_kv.png").stat().st_size > 0


def test_cla_model_from_leaves_the_global_generator_alone():
    model = tiny_model("llama")
    state = torch.get_rng_state()
    cla_model_from(model, uniform_layout(4, 2), "mean")
    assert torch.equal(torch.get_rng_state(), state)


def test_uptrain_hands_back_the_callers_generators(tiny_cla_checkpoint, corpus_dir, tmp_path):  # noqa: F811
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(corpus_dir, tmp_path / "run", model={
        "path": str(tiny_cla_checkpoint)}, train={"max_steps": 2, "save_steps": 2}))  # fmt: skip
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    uptrain(recipe, quiet=True)
    assert torch.equal(torch.rand(3), expected)
    with pytest.raises(ClakitError, match=r"give \['train.max_steps=3'\]"):
        uptrain(recipe, "train.max_steps=3", dry_run=True)
