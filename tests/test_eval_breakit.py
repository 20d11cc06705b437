"""Inputs the other eval tests never tried: repeated passkey depths, model names that matplotlib reads as mathtext,
a tokenizer with neither BOS nor EOS (its first token is context only, so its bytes are not scored)."""

from pathlib import Path

import pytest
import torch
from conftest import build_tokenizer, make_text, save_checkpoint, tiny_model

from clakit.cli import main
from clakit.errors import ClakitError
from clakit.eval import evaluate, passkey, report, write_json
from clakit.eval.perplexity import count_bytes, tokenize
from clakit.eval.speed import fit_window

FILLER = make_text(3000, 61)
ROOT = Path(__file__).resolve().parents[1]


def test_repeated_passkey_depths_are_run_once():
    settings = passkey.PasskeySettings(lengths=[300], depths=[0.5, 0, 0.5], samples=1)
    prepared = passkey.prepare(build_tokenizer(), FILLER, settings, 512)
    # before: three cells (0.5 twice, counted twice in the accuracy) and settings [0.5, 0, 0.5]
    assert prepared.settings.depths == [0.0, 0.5]
    assert [cell[0].depth for cell in prepared.cells] == [0.0, 0.5]


def test_integer_and_float_depths_give_the_same_prompts():
    tokenizer = build_tokenizer()
    as_int = passkey.prepare(tokenizer, FILLER, passkey.PasskeySettings(lengths=[300], depths=[0, 1]), 512)
    as_float = passkey.prepare(tokenizer, FILLER, passkey.PasskeySettings(lengths=[300], depths=[0.0, 1.0]), 512)
    # before: the seed string held "0" vs "0.0", so equal settings drew other keys
    assert [p.key for c in as_int.cells for p in c] == [p.key for c in as_float.cells for p in c]


def _passkey_section() -> dict:
    cells = [{"length": 300, "depth": 0.0, "accuracy": 0.5, "correct": 1, "samples": 2}]
    return {"accuracy": 0.5, "cells": cells, "prompts": [],
            "settings": {"lengths": [300], "depths": [0.0], "samples": 2, "seed": 0, "new_tokens": 8}}  # fmt: skip


@pytest.mark.parametrize("name", ["runs/m$\\foo{$", "runs/lr$1e-4$"])
def test_report_takes_model_names_holding_dollars(tmp_path, name):
    r = evaluate(tiny_model(), tokenizer=build_tokenizer(), text=make_text(300, 62), seq_len=32, speed=False)
    paths = []
    for i, model in enumerate(["base", name]):
        path = tmp_path / f"{i}.json"
        write_json({**r, "model": model, "passkey": _passkey_section()}, path)
        paths.append(path)
    out = report(paths, tmp_path / "report")  # before: matplotlib's mathtext parser raised on `$\foo{$`
    assert {"report.md", "ppl_vs_kv.png", "passkey.png", "report.html"} <= {p.name for p in out.iterdir()}
    assert name.split("/")[-1] in (out / "report.html").read_text()


@pytest.mark.parametrize("max_tokens", [None, 20])
def test_without_bos_or_eos_only_the_scored_tokens_bytes_count(max_tokens):
    tokenizer = build_tokenizer()
    tokenizer.bos_token, tokenizer.eos_token = None, None
    text = make_text(60, 63)
    tokens = tokenize(tokenizer, text, max_tokens)
    # nothing predicts the first token; before, its bytes were counted and bits/byte came out too low
    scored = tokenizer.decode(tokens.ids[1:].tolist())
    assert count_bytes(tokens.text) == count_bytes(scored)
    assert tokens.text == text[len(tokenizer.decode(tokens.ids[:1].tolist())) :][: len(scored)]


def test_a_tokenizer_with_bos_still_counts_the_whole_text():
    text = make_text(60, 63)
    assert tokenize(build_tokenizer(), text).text == text


def test_text_without_whitespace_reports_word_perplexity_as_null(tmp_path):
    # 300 CJK characters are one "word" of ~900 tokens: exp(NLL / 1 word) is beyond a float
    text = "".join(chr(0x4E00 + (i * 37) % 200) for i in range(300))
    r = evaluate(tiny_model(), tokenizer=build_tokenizer(), text=text, seq_len=64, max_tokens=256, speed=False)
    assert r["word_perplexity"] is None and r["data"]["num_words"] == 1  # before: OverflowError, no report
    assert 1 < r["perplexity"] < float("inf") and r["bits_per_byte"] > 0
    write_json(r, tmp_path / "zh.json")
    assert (report([tmp_path / "zh.json"], tmp_path / "out") / "report.md").is_file()


def test_max_tokens_below_one_window_is_named_as_the_problem(capsys, tmp_path, tiny_llama_checkpoint, corpus_dir):
    out = tmp_path / "r.json"
    argv = ["eval", tiny_llama_checkpoint, "-o", out, "--data", corpus_dir / "heldout.txt", "--max-tokens", 100, "-q"]
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    # before: "the text has 100 tokens ...; give more text", though the file holds thousands
    assert err.count("\n") == 1 and "--max-tokens 100 is less than one window of --seq-len 256" in err, err
    assert not out.exists()


def test_speed_at_the_full_window_of_a_learned_position_model_stays_inside_it():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=320, n_positions=32, n_embd=16, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config).eval()
    # --seq-len = the window, then 4 decode steps: before, position 32 of a 32-row table raised IndexError
    r = evaluate(model, tokenizer=build_tokenizer(), text=make_text(200, 64), seq_len=32, decode_steps=4, batch_size=2)
    assert r["speed"]["prefill_length"] == 28 and r["speed"]["decode_steps"] == 4
    assert r["speed"]["prefill_tokens"] == 2 * 28 and r["speed"]["decode_tokens_per_s"] > 0


def test_decode_steps_over_half_the_window_are_refused_before_the_model_runs():
    """--decode-steps 300 in a 256-position window timed 1-token prefills, shown as the model's prefill speed without
    a word (helper 50e); half the window is the most now, and the refusal names it."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=320, n_positions=32, n_embd=16, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config).eval()
    with pytest.raises(ClakitError, match="--decode-steps 17 leaves the prefill .* 15 of this model's 32-position "
                                          "window .*give at most 16 decode steps, or --no-speed"):  # fmt: skip
        evaluate(model, tokenizer=build_tokenizer(), text=make_text(200, 64), seq_len=32, decode_steps=17)
    r = evaluate(model, tokenizer=build_tokenizer(), text=make_text(200, 64), seq_len=32, decode_steps=16)
    assert r["speed"]["prefill_length"] == 16
    with pytest.raises(ClakitError, match="--decode-steps 17 sets the decode speed's steps, which --no-speed"):
        evaluate(model, tokenizer=build_tokenizer(), text=make_text(200, 64), seq_len=32, decode_steps=17, speed=False)
    # a prefill that fits beside the steps is not shortened: --seq-len 8 and 17 steps in 32 positions time both whole
    r = evaluate(model, tokenizer=build_tokenizer(), text=make_text(200, 64), seq_len=8, decode_steps=17)
    assert (r["speed"]["prefill_length"], r["speed"]["decode_steps"]) == (8, 17)


@pytest.mark.parametrize(
    ("length", "steps", "window", "fitted"),
    [(64, 16, 256, (64, 16)), (256, 16, 256, (240, 16)), (10, 16, 12, (1, 11)), (64, 16, None, (64, 16))],
)
def test_fit_window(length, steps, window, fitted):
    assert fit_window(length, steps, window) == fitted


def test_a_tokenizer_beyond_the_models_vocabulary_is_refused_before_the_forward():
    model = tiny_model(vocab_size=300)  # the tokenizer has 320 tokens: not this model's
    with pytest.raises(ClakitError, match=r"gives token id 3\d\d but the model has 300 embeddings"):
        # before: IndexError (index out of range in self) from the embedding, a traceback after loading
        evaluate(model, tokenizer=build_tokenizer(), text=make_text(2000, 65), seq_len=32, speed=False)


def test_report_refuses_json_nested_too_deep_in_one_line(tmp_path):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 200_000 + "]" * 200_000)  # before: RecursionError traceback from json.loads
    with pytest.raises(ClakitError, match="is not a clakit eval report .not readable JSON"):
        report([deep], tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def cla_checkpoint(tmp_path_factory):
    from clakit.convert.inmemory import cla_model_from

    path = tmp_path_factory.mktemp("cla")
    return save_checkpoint(cla_model_from(tiny_model(), [0, 0, 2, 2]), build_tokenizer(), path)


@pytest.mark.parametrize(
    ("record", "refused"),
    [("[1]", True), ('{"settings": [1]}', False), ('{"source": {"path": 5, "spec": ["x"]}}', False)],
)
def test_a_damaged_conversion_record_is_named_or_ignored(cla_checkpoint, tmp_path, record, refused):
    (cla_checkpoint / "clakit_convert.json").write_text(record)
    kwargs = dict(text=make_text(400, 66), seq_len=32, speed=False)
    if refused:  # before: AttributeError ('list' object has no attribute 'get')
        with pytest.raises(ClakitError, match="clakit_convert.json is not a conversion record"):
            evaluate(cla_checkpoint, **kwargs)
    else:  # before: AttributeError, or TypeError from Path(5); fields of the wrong type are no source
        assert evaluate(cla_checkpoint, **kwargs)["kv_cache"]["source"] == "stock layout"


def test_default_passkey_lengths_in_a_window_too_short_blame_the_window():
    # before: "--passkey-lengths 120 is shorter than the prompt without filler", a flag the user never gave
    with pytest.raises(ClakitError, match="the model's window of 128 tokens is too short for a passkey prompt"):
        passkey.prepare(build_tokenizer(), FILLER, passkey.PasskeySettings(), 128)


def test_report_says_when_speeds_come_from_different_machines(tmp_path):
    r = evaluate(tiny_model(), tokenizer=build_tokenizer(), text=make_text(300, 67), seq_len=32, decode_steps=2)
    gpu = {**r, "model": "gpu", "provenance": {**r["provenance"], "device": "cuda:0", "device_name": "NVIDIA H200"}}
    for name, rep in [("a", r), ("b", r), ("c", gpu)]:
        write_json(rep, tmp_path / f"{name}.json")
    same = (report([tmp_path / "a.json", tmp_path / "b.json"], tmp_path / "same") / "report.md").read_text()
    assert "different machines" not in same
    # before: CPU and GPU tokens/s side by side with nothing said
    mixed = (report([tmp_path / "a.json", tmp_path / "c.json"], tmp_path / "mixed") / "report.md").read_text()
    assert "Speeds were timed on different machines (cpu" in mixed and "; NVIDIA H200)" in mixed


def test_report_says_when_kv_bytes_come_from_different_cache_dtypes(tmp_path):
    import torch

    kwargs = dict(tokenizer=build_tokenizer(), text=make_text(300, 68), seq_len=32, speed=False)
    write_json(evaluate(tiny_model(), **kwargs), tmp_path / "fp32.json")
    write_json(evaluate(tiny_model().to(torch.bfloat16), **kwargs), tmp_path / "bf16.json")
    text = (report([tmp_path / "fp32.json", tmp_path / "bf16.json"], tmp_path / "out") / "report.md").read_text()
    # before: 768 vs 384 bytes/token, read as a 2x saving, with nothing said
    assert "KV caches of different dtypes (float32, bfloat16)" in text


def test_an_output_written_as_a_folder_is_refused(capsys, tmp_path, tiny_llama_checkpoint, corpus_dir):
    out = tmp_path / "reports"
    argv = ["eval", tiny_llama_checkpoint, "-o", f"{out}/", "--data", corpus_dir / "heldout.txt", "--seq-len", 32]
    assert main([str(a) for a in [*argv, "-q", "--no-speed"]]) == 2
    err = capsys.readouterr().err
    # before: exit 0 and the report written as a file named `reports`
    assert err.count("\n") == 1 and f"output {out}/ names a folder" in err, err
    assert not out.exists()


def test_a_nan_lm_eval_score_is_dropped_so_clakit_report_reads_the_report(tmp_path):
    from clakit.eval.harness import scores

    results = {"results": {"t": {"alias": "t", "acc,none": 1.0, "acc_stderr,none": float("nan"), "f1,none": "N/A"}}}
    row = scores(results)["t"]
    assert row == {"acc": 1.0}  # before: acc_stderr NaN, written as JSON NaN
    r = evaluate(tiny_model(), tokenizer=build_tokenizer(), text=make_text(300, 69), seq_len=32, speed=False)
    write_json(
        {**r, "lm_eval": {"tasks": {"t": row}, "settings": {"limit": 1, "num_fewshot": None}}}, tmp_path / "a.json"
    )
    assert (report([tmp_path / "a.json"], tmp_path / "out") / "report.md").is_file()


def test_speed_reads_the_median_pass_not_one_pause_of_the_machine(monkeypatch):
    """One timed pass made the report's speed columns read a pause of a busy machine as the model's speed (a tiny
    model's prefill at 426 tok/s in one row, 103,003 in the next). Each figure is the median of 3 passes now: a clock
    that one prefill call stalls by 100 units still reads the usual 1 unit a call."""
    from clakit.eval import speed

    clock, calls = [0.0], []
    model = tiny_model().eval()
    forward = model.forward

    def clocked(*args, **kwargs):  # each call costs 1 unit; the first timed prefill (call 2 after the warm-up) 101
        calls.append(kwargs["input_ids"].shape)
        clock[0] += 101.0 if len(calls) == 2 else 1.0
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", clocked)
    monkeypatch.setattr(speed.time, "perf_counter", lambda: clock[0])
    r = speed.throughput(model, torch.arange(16), batch_size=2, decode_steps=4)
    assert (r["repeats"], len(calls)) == (3, 1 + 3 * (1 + 4))
    assert r["prefill_tokens_per_s"] == 2 * 16 / 1.0 and r["decode_tokens_per_s"] == 2 * 4 / 4.0, r


def test_the_speed_row_of_docs_eval_md_states_every_key_and_the_median():
    """docs/eval.md's record table said speed is prefill and decode tokens/s of one timed pass (no `repeats`, no
    median) after the figures became the median of 3 passes: every key throughput() records is named there, and how
    the figure is taken."""
    from clakit.eval import speed

    row = next(line for line in (ROOT / "docs" / "eval.md").read_text().splitlines() if line.startswith("| `speed` |"))
    keys = speed.throughput(tiny_model().eval(), torch.arange(16), batch_size=2, decode_steps=2)
    assert [key for key in keys if f"`{key}`" not in row] == []
    assert "median" in row


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (dict(head_dim=16), "has head_dim 16 but the evaluated model has 12"),  # saving read 2.67 for a CLA2
        (dict(num_key_value_heads=1), "has 1 KV heads but the evaluated model has 2"),  # saving read 1.00
    ],
)
def test_a_source_model_of_another_head_shape_is_refused(source, message):
    """--source-model of the same layers, width, heads and vocabulary but another head_dim, or fewer KV heads than
    the evaluated model, was taken for its source: the KV saving against it was a wrong number, not a refusal."""
    from conftest import tiny_kwargs
    from transformers import LlamaConfig

    from clakit.errors import ClakitError
    from clakit.eval.suite import _check_reference

    mine = LlamaConfig(**tiny_kwargs())
    theirs = LlamaConfig(**{**tiny_kwargs(), **source})
    with pytest.raises(ClakitError, match=message):
        _check_reference(mine, ("src", theirs, None))
    _check_reference(mine, ("src", LlamaConfig(**{**tiny_kwargs(), "num_key_value_heads": 4}), None))  # merged 4 -> 2
