"""General-case correctness of `clakit uptrain`: what a run reads, trains, merges and records, checked against
independent computations on tiny models. Each fix's test failed before it."""

import json
from pathlib import Path

import pytest
import torch
from conftest import save_checkpoint, tiny_model
from safetensors.torch import load_file, save_file
from uptrain_fixtures import tiny_recipe, write_recipe

from clakit.cli import main


def run_cli(capsys, *args) -> tuple[int, str]:
    code = main(["uptrain", *map(str, args), "-q"])
    return code, capsys.readouterr().err.strip()


# --- what a run may execute: model.trust_remote_code / model.allow_pickle -----------------------------------------

CUSTOM_TOKENIZER = "from transformers import PreTrainedTokenizerFast\n\n\nclass CustomTokenizer(PreTrainedTokenizerFast):\n    pass\n"


@pytest.fixture(scope="module")
def code_running_source(tokenizer, tmp_path_factory) -> Path:
    """A stock Llama as some Hub releases ship it: a tokenizer class in a .py beside the weights (tokenizer_config's
    auto_map; early Yi did this) and pickle weights (pytorch_model.bin) only. Reading either runs its code."""
    path = save_checkpoint(tiny_model("llama"), tokenizer, tmp_path_factory.mktemp("code_src"), "10MB")
    (path / "tokenization_custom.py").write_text(CUSTOM_TOKENIZER)
    config = json.loads((path / "tokenizer_config.json").read_text())
    config |= {"auto_map": {"AutoTokenizer": [None, "tokenization_custom.CustomTokenizer"]}}
    (path / "tokenizer_config.json").write_text(json.dumps(config | {"tokenizer_class": "CustomTokenizer"}))
    torch.save(load_file(path / "model.safetensors"), path / "pytorch_model.bin")
    (path / "model.safetensors").unlink()
    return path


def test_a_source_that_runs_its_own_code_needs_the_recipes_keys_and_then_trains(
    code_running_source, corpus_dir, tmp_path, capsys
):
    """uptrain had no setting for either: the refusals named convert's --trust-remote-code / --allow-pickle, which
    `clakit uptrain` does not have, and model.convert.allow_pickle converted, then failed loading the teacher."""
    out = tmp_path / "run"
    recipe = tiny_recipe(corpus_dir, out, train={"max_steps": 2, "save_steps": 0}, distill={"weight": 1.0})
    recipe["model"] = {"source": str(code_running_source), "convert": {"factor": 2, "init": "mean"}}
    path = write_recipe(tmp_path / "r.yaml", recipe)
    for given, named in (
        ([], "set model.allow_pickle=true"),
        (["model.allow_pickle=true"], "set model.trust_remote_code=true"),
        (["model.convert.trust_remote_code=true", "model.allow_pickle=true"], "set model.trust_remote_code=true"),
        (["model.convert.allow_pickle=true"], "set model.allow_pickle=true"),
    ):
        code, err = run_cli(capsys, path, *given)
        assert code == 2 and named in err and "\n" not in err, (given, err)
        assert "--trust-remote-code" not in err and "--allow-pickle" not in err
        assert not out.exists()  # refused before the conversion
    assert run_cli(capsys, path, "model.trust_remote_code=true", "model.allow_pickle=true") == (0, "")
    record = json.loads((out / "model" / "uptrain.json").read_text())
    assert record["recipe"]["model"]["trust_remote_code"] and record["recipe"]["model"]["allow_pickle"]
    assert (out / "eval" / "original.json").is_file()  # the teacher (pickle, custom tokenizer) was read
