"""One context-window rule for convert, eval and uptrain (`clakit.sources.context_window`): a sequence length above
the model's max_position_embeddings (transformers' class default when config.json has none; never Mistral's
sliding_window) is refused in one line before any weights are read; convert's and eval's defaults shrink to it."""

import json
import shutil
from pathlib import Path

import pytest
from conftest import make_text, save_checkpoint, tiny_model
from convert_fixtures import run_cli as run_convert
from transformers import LlamaConfig, MistralConfig

import clakit.convert.pipeline
import clakit.eval.perplexity
from clakit.cli import main
from clakit.convert import ConvertConfig, convert
from clakit.errors import ClakitError
from clakit.eval import evaluate
from clakit.uptrain.recipe import ModelSection
from clakit.uptrain.student import check_model_section


def one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("clakit: error: "), lines
    return lines[0]


def with_config(src: Path, dest: Path, **changes) -> Path:
    """A copy of checkpoint `src` whose config.json has `changes` applied (a value None removes the key)."""
    shutil.copytree(src, dest)
    config = json.loads((dest / "config.json").read_text())
    config.update({k: v for k, v in changes.items() if v is not None})
    for key in [k for k, v in changes.items() if v is None]:
        config.pop(key, None)
    (dest / "config.json").write_text(json.dumps(config))
    return dest


@pytest.fixture
def no_weights_read(monkeypatch):
    """Reading the source's weights fails the test: refusals must come before them."""

    def refuse(*args, **kwargs):
        raise AssertionError("the source's weights were read")

    monkeypatch.setattr(clakit.convert.pipeline, "open_checkpoint", refuse)
    monkeypatch.setattr(clakit.convert.pipeline, "load_model", refuse)


def test_the_window_is_max_position_embeddings_or_the_class_default_never_the_sliding_window():
    from clakit.sources import check_seq_len, context_window  # here: the other tests run on code without it too

    assert context_window(LlamaConfig(max_position_embeddings=256)) == 256
    assert context_window(LlamaConfig()) == 2048  # what transformers builds (and saves) without the key
    mistral = MistralConfig(max_position_embeddings=256, sliding_window=16)
    assert context_window(mistral) == 256  # the sliding window limits attention, not positions
    check_seq_len(256, mistral, "--seq-len")
    with pytest.raises(ClakitError, match=r"^--seq-len 257 exceeds the model's context window \(max_position_embed"):
        check_seq_len(257, mistral, "--seq-len")
    assert context_window(object()) is None  # an architecture without the setting: nothing to check against
    check_seq_len(10**6, object(), "--seq-len")


@pytest.mark.parametrize("seq_len", [257, 512])  # 512: the default's value, given explicitly, is not clipped either
def test_convert_refuses_a_given_seq_len_above_the_window_before_reading_weights(
    tiny_llama_checkpoint, tmp_path, capsys, no_weights_read, seq_len
):
    """convert clipped any --seq-len to max_position_embeddings silently; a given one is refused like eval's."""
    out = tmp_path / "out"
    assert run_convert(tiny_llama_checkpoint, out, "--seq-len", seq_len, "--quiet") == 2
    line = one_error_line(capsys)
    assert f"--seq-len {seq_len} exceeds the context window of {tiny_llama_checkpoint}" in line, line
    assert line.endswith("(max_position_embeddings 256); use at most 256"), line
    assert not out.exists()


def test_convert_shrinks_only_its_default_seq_len_and_records_the_windows_used(tiny_llama_checkpoint, tmp_path):
    heldout = tmp_path / "heldout.txt"  # windows are read (held-out text): without text none is recorded
    heldout.write_text(make_text(2000, 1))
    kwargs = dict(factor=2, eval_data=[str(heldout)], eval_tokens=300, quiet=True)
    default = convert(str(tiny_llama_checkpoint), tmp_path / "default", **kwargs)
    given = convert(str(tiny_llama_checkpoint), tmp_path / "given", seq_len=256, **kwargs)
    bare = convert(str(tiny_llama_checkpoint), tmp_path / "bare", factor=2, quiet=True)  # reads no text
    records = [json.loads((out / "clakit_convert.json").read_text()) for out in (default, given, bare)]
    assert [r["settings"]["seq_len"] for r in records] == [256, 256, None]  # 512 shrunk; 256 as given; none read
    assert [r["config"]["seq_len"] for r in records] == [None, 256, None]  # what the user asked for


def test_a_config_without_max_position_embeddings_gets_the_class_default_in_all_three(
    tiny_llama_checkpoint, corpus_dir, tmp_path, capsys, no_weights_read
):
    """Uptrain skipped the check when config.json lacked the key, while eval held the model to transformers' class
    default (2048 for Llama), the value every converted or uptrained checkpoint is saved with: now all three do."""
    src = with_config(tiny_llama_checkpoint, tmp_path / "src", max_position_embeddings=None)
    needle = "--seq-len 2049 exceeds {}(max_position_embeddings 2048); use at most 2048"
    argv = ["eval", src, "-o", tmp_path / "r.json", "--data", corpus_dir / "heldout.txt", "--seq-len", 2049, "-q"]
    assert main([str(a) for a in argv]) == 2
    assert one_error_line(capsys).endswith(needle.format("the model's context window "))
    assert run_convert(src, tmp_path / "out", "--seq-len", 2049, "--quiet") == 2
    assert one_error_line(capsys).endswith(needle.format(f"the context window of {src} "))
    section = ModelSection(source=str(src), convert=ConvertConfig(factor=2))
    check_model_section(section, 2048)
    with pytest.raises(ClakitError, match=r"^data\.seq_len 2049 exceeds .* \(max_position_embeddings 2048\); use at"):
        check_model_section(section, 2049)


def test_uptrain_refuses_a_convert_seq_len_above_the_window_with_the_recipe(tiny_llama_checkpoint, no_weights_read):
    """model.convert.seq_len was clipped silently when the pipeline converted; now refused with the recipe's checks."""
    section = ModelSection(source=str(tiny_llama_checkpoint), convert=ConvertConfig(factor=2, seq_len=300))
    match = r"^model\.convert\.seq_len 300 exceeds the context window of .* \(max_position_embeddings 256\); use at"
    with pytest.raises(ClakitError, match=match):
        check_model_section(section, 32)
    check_model_section(ModelSection(source=str(tiny_llama_checkpoint), convert=ConvertConfig(seq_len=256)), 32)


def test_a_mistral_sliding_window_is_not_the_context_window(tokenizer, tmp_path):
    """Mistral's sliding_window (16 in the tiny model) limits how far back a token attends; windows up to
    max_position_embeddings (256) are the model's, in convert and uptrain alike."""
    src = save_checkpoint(tiny_model("mistral"), tokenizer, tmp_path / "mistral")
    section = ModelSection(source=str(src), convert=ConvertConfig(factor=2))
    check_model_section(section, 256)
    out = convert(str(src), tmp_path / "out", factor=2, seq_len=64, quiet=True)  # taken, not refused
    assert json.loads((out / "clakit_convert.json").read_text())["config"]["seq_len"] == 64


@pytest.mark.parametrize("value", [0, -1])
def test_a_max_position_embeddings_below_one_is_refused(tiny_llama_checkpoint, tmp_path, capsys, value):
    """transformers accepts max_position_embeddings 0 or -1; convert then wrote a checkpoint with it (and -1 made
    its windows -1 tokens long)."""
    src = with_config(tiny_llama_checkpoint, tmp_path / "src", max_position_embeddings=value)
    assert run_convert(src, tmp_path / "out", "--quiet") == 2
    assert f"max_position_embeddings must be a positive integer, got {value}" in one_error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_eval_checks_the_stride_once_against_the_windows_it_steps_through(monkeypatch, tokenizer):
    """evaluate checked --stride against a guessed 1024-token window, then again against the model's (64 here)."""
    calls = []
    check = clakit.eval.perplexity.check_window
    monkeypatch.setattr(clakit.eval.perplexity, "check_window", lambda *a: calls.append(a) or check(*a))
    model, text = tiny_model("llama", max_position_embeddings=64), make_text(200, 5)
    report = evaluate(model, tokenizer=tokenizer, text=text, stride=32, speed=False, quiet=True)
    assert calls == [(64, 32)]
    assert (report["settings"]["seq_len"], report["settings"]["stride"]) == (64, 32)


@pytest.mark.parametrize(
    ("seq_len", "stride", "message"),
    [
        (None, 65, "--stride (65) must not exceed --seq-len (64)"),  # the default window is the model's, 64
        (None, 0, "--stride must be a positive number of tokens, got 0"),
        (16, 17, "--stride (17) must not exceed --seq-len (16)"),
        (65, None, "--seq-len 65 exceeds the model's context window (max_position_embeddings 64); use at most 64"),
    ],
)
def test_eval_refuses_the_same_windows_as_before(tokenizer, seq_len, stride, message):
    model, text = tiny_model("llama", max_position_embeddings=64), make_text(200, 5)
    with pytest.raises(ClakitError) as refused:
        evaluate(model, tokenizer=tokenizer, text=text, seq_len=seq_len, stride=stride, speed=False, quiet=True)
    assert str(refused.value).startswith(message)
