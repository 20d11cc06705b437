"""Inputs a reviewer tried in order to break `clakit convert`: each was mishandled once (see the test's docstring)."""

from pathlib import Path

import pytest
from conftest import make_text, save_checkpoint, tiny_model
from convert_fixtures import copy_checkpoint, run_cli
from test_convert_bad_input import assert_refused

import clakit.convert.pipeline


@pytest.fixture
def src(tiny_llama_checkpoint, tmp_path) -> Path:
    return copy_checkpoint(tiny_llama_checkpoint, tmp_path / "src")


@pytest.fixture
def no_model(monkeypatch):
    """Any model loaded fails the test: the refusal must come before the slow stages."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the refusal")

    monkeypatch.setattr(clakit.convert.pipeline.LayerwiseModel, "from_checkpoint", refuse)


def test_a_one_layer_model_without_a_layout_names_the_model_not_a_factor_never_given(tokenizer, tmp_path, capsys):
    """`clakit convert ONE_LAYER OUT` was refused as '--factor must be between 1 and the number of layers (1), got 2':
    a flag the user never gave (the default)."""
    src = save_checkpoint(tiny_model("llama", num_hidden_layers=1), tokenizer, tmp_path / "src")
    capsys.readouterr()  # save_pretrained's progress bar
    match = "a 1-layer model has no other layer to share its K/V with"
    assert_refused(capsys, src, tmp_path / "out", match=match)
    assert run_cli(src, tmp_path / "out1", "--factor", "1", "-q") == 0  # asked for explicitly: a plain copy


@pytest.mark.parametrize("extra", [[], ["--eval-data", "{calib}", "--factor", "2"]])
def test_seq_len_1_is_refused_before_any_model_runs(src, tmp_path, capsys, no_model, extra):
    """A window of one token has no next token: the calibration NLL was NaN (written into clakit_convert.json as a
    bare `NaN`, which is not JSON), the layout was chosen on NaN scores and the fits saw no gradient; exit 0."""
    calib = tmp_path / "calib.txt"
    calib.write_text(make_text(2000, 1))
    args = [a.format(calib=calib) for a in extra] or ["--calib-data", calib, "--calib-tokens", "64"]
    assert_refused(capsys, src, tmp_path / "out", *args, "--seq-len", "1", match="--seq-len 1 leaves no next token")
