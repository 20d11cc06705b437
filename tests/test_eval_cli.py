"""`clakit eval` / `clakit report` through clakit.cli.main: reports, refusals, and every bad input (exit 2, one
line on stderr, no output written)."""

import hashlib
import json
import shutil

import pytest
from conftest import make_text, tiny_model

from clakit.cli import main
from clakit.convert.inmemory import cla_model_from
from clakit.eval import evaluate, write_json


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_refused(capsys, argv, needle: str, output) -> None:
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    assert err.startswith("clakit: error:") and err.count("\n") == 1, err
    assert needle in err, err
    assert not output.exists()


@pytest.fixture(scope="module")
def reports(tmp_path_factory, tokenizer):
    """Two comparable reports (a model and its CLA2) and one on other settings."""
    d = tmp_path_factory.mktemp("reports")
    model, text = tiny_model("llama"), make_text(500, 21)
    kwargs = dict(tokenizer=tokenizer, text=text, batch_size=2, decode_steps=2, quiet=True)
    write_json(evaluate(model, seq_len=32, name="orig", **kwargs), d / "orig.json")
    write_json(evaluate(cla_model_from(model, [0, 0, 2, 2]), seq_len=32, name="cla2", **kwargs), d / "cla2.json")
    write_json(evaluate(model, seq_len=16, name="short", **kwargs), d / "short.json")
    write_json(evaluate(model, seq_len=32, name="other", **{**kwargs, "text": make_text(500, 22)}), d / "other.json")
    return d


def test_eval_cli_writes_a_report(capsys, tmp_path, tiny_llama_checkpoint, corpus_dir):
    out = tmp_path / "r.json"
    code, stdout, _ = run_cli(
        capsys,
        "eval",
        tiny_llama_checkpoint,
        "-o",
        out,
        "--data",
        corpus_dir / "heldout.txt",
        "--seq-len",
        32,
        "--stride",
        16,
        "--max-tokens",
        300,
        "--quiet",
    )
    assert code == 0 and "perplexity" in stdout
    r = json.loads(out.read_text())
    assert r["num_tokens"] == 300 and r["settings"]["stride"] == 16
    assert r["provenance"]["model"] == str(tiny_llama_checkpoint) and r["kv_cache"]["saving_factor"] == 1.0
    assert r["data"]["sources"] == [str(corpus_dir / "heldout.txt")]


def test_report_writes_table_plot_and_page(capsys, tmp_path, reports):
    out = tmp_path / "rep"
    code, stdout, _ = run_cli(capsys, "report", reports / "orig.json", reports / "cla2.json", "-o", out)
    assert code == 0 and "report.html" in stdout
    md = (out / "report.md").read_text()
    orig, cla2 = (json.loads((reports / f"{n}.json").read_text()) for n in ("orig", "cla2"))
    delta = 100 * (cla2["perplexity"] / orig["perplexity"] - 1)
    assert f"| cla2 | {cla2['perplexity']:.3f} | {delta:+.1f}% |" in md
    assert "| 2.00 |" in md  # CLA2 saving factor
    assert (out / "ppl_vs_kv.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "data:image/png;base64," in (out / "report.html").read_text()
    # the folder's own record: which reports (their bytes) it was made from, and by what (report.md's prose only)
    record = json.loads((out / "clakit_report.json").read_text())
    read = [(reports / f"{n}.json") for n in ("orig", "cla2")]
    assert record["reports"] == [{"path": str(p), "sha256": hashlib.sha256(p.read_bytes()).hexdigest()} for p in read]
    assert record["command"] and record["clakit"] and record["torch"] and record["cwd"]


def test_report_shows_an_unknown_saving_factor_as_unknown():
    """kv_cache.saving_factor null is a valid report (records.FIELDS) and was shown as a saving of 0.00x."""
    from clakit.eval.comparison import rows

    run = {"model": "m", "perplexity": 10.0, "bits_per_byte": 1.0, "kv_cache": {"bytes_per_token": 8}}
    assert rows([{**run, "kv_cache": {"bytes_per_token": 8, "saving_factor": None}}])[0][5] == "–"
    assert rows([{**run, "kv_cache": {"bytes_per_token": 8, "saving_factor": 2.0}}])[0][5] == "2.00"


def test_report_markdown_keeps_a_model_name_with_a_pipe_in_one_cell(capsys, tmp_path, reports):
    """A model labelled `runs/a|b` split its row into one more column than the header."""
    report = json.loads((reports / "cla2.json").read_text())
    write_json({**report, "model": "runs/a|b\nc"}, tmp_path / "pipe.json")
    assert main(["report", str(reports / "orig.json"), str(tmp_path / "pipe.json"), "-o", str(tmp_path / "rep")]) == 0
    lines = (tmp_path / "rep" / "report.md").read_text().splitlines()
    table = [line for line in lines if line.startswith("| ")][:3]  # header and both rows of the first table
    assert table[2].startswith("| a\\|b c | ")  # the label: the name's last part, its pipe escaped
    assert len({line.replace("\\|", "").count("|") for line in table}) == 1  # every row as wide as the header


@pytest.mark.parametrize(("other", "field"), [("short", "settings.seq_len"), ("other", "data.sha256")])
def test_report_refuses_runs_on_different_data_or_settings(capsys, tmp_path, reports, other, field):
    assert_refused(
        capsys,
        ["report", reports / "orig.json", reports / f"{other}.json", "-o", tmp_path / "rep"],
        field,
        tmp_path / "rep",
    )


def test_report_refuses_files_that_are_not_reports(capsys, tmp_path, reports):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "other.json").write_text(json.dumps({"perplexity": 3}))
    for bad, needle in [
        ("notes.txt", "not a clakit eval report"),
        ("other.json", "not a clakit eval report"),
        ("missing.json", "does not exist"),
    ]:
        assert_refused(
            capsys, ["report", reports / "orig.json", tmp_path / bad, "-o", tmp_path / "rep"], needle, tmp_path / "rep"
        )


@pytest.fixture(scope="module")
def not_a_causal_lm(tmp_path_factory):
    from transformers import ViTConfig

    path = tmp_path_factory.mktemp("vit")
    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(path)
    return path


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("missing model", "does not exist"),
        ("not a causal LM", "not a causal language model"),
        ("missing data", "does not exist"),
        ("empty data", "is empty"),
        ("text shorter than a window", "fewer than one window"),
        ("seq-len 0", "--seq-len must be a positive"),
        ("seq-len negative", "--seq-len must be a positive"),
        ("stride 0", "--stride must be a positive"),
        ("stride > seq-len", "must not exceed --seq-len"),
        ("max-tokens 0", "--max-tokens must be a positive"),
        ("batch-size 0", "--batch-size must be a positive"),
        ("seq-len past the window", "--seq-len 300 exceeds the model's context window (max_position_embeddings 256)"),
        ("revision of a local model", "--revision v1 selects a Hub revision, but"),
        ("lm-eval tasks naming none", "--lm-eval-tasks ',' names no task"),
    ],
)
def test_eval_bad_input(capsys, tmp_path, tiny_llama_checkpoint, corpus_dir, not_a_causal_lm, case, needle):
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "short.txt").write_text("the king said")
    model, data, extra = tiny_llama_checkpoint, corpus_dir / "heldout.txt", []
    if case == "missing model":
        model = tmp_path / "nope"
    elif case == "not a causal LM":
        model = not_a_causal_lm
    elif case == "missing data":
        data = tmp_path / "nope.txt"
    elif case == "empty data":
        data = tmp_path / "empty.txt"
    elif case == "text shorter than a window":
        data = tmp_path / "short.txt"
    else:
        extra = {
            "seq-len 0": ["--seq-len", 0],
            "seq-len negative": ["--seq-len", -5],
            "stride 0": ["--stride", 0],
            "stride > seq-len": ["--seq-len", 16, "--stride", 17],
            "max-tokens 0": ["--max-tokens", 0],
            "batch-size 0": ["--batch-size", 0],
            "seq-len past the window": ["--seq-len", 300],  # positions never trained: extrapolation, not the model
            "revision of a local model": ["--revision", "v1"],  # it would be recorded, never read
            "lm-eval tasks naming none": ["--lm-eval-tasks", ","],  # it scored nothing and said nothing
        }[case]
    out = tmp_path / "r.json"
    assert_refused(capsys, ["eval", model, "-o", out, "--data", data, "--quiet", *extra], needle, out)


def test_eval_refuses_a_rope_type_this_transformers_lacks(capsys, tmp_path, tiny_llama_checkpoint, corpus_dir):
    """transformers accepts an unknown rope_type with a warning and fails with KeyError('foo') building the model:
    eval said "check that its files are complete (download it again)"; the same line as convert's now."""
    model = tmp_path / "model"
    shutil.copytree(tiny_llama_checkpoint, model)
    config = json.loads((model / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "foo", "rope_theta": 10000.0}
    (model / "config.json").write_text(json.dumps(config))
    argv = ["eval", model, "-o", tmp_path / "r.json", "--data", corpus_dir / "heldout.txt", "--seq-len", 32, "-q"]
    assert_refused(capsys, argv, "rope_type 'foo' is not one this transformers", tmp_path / "r.json")


def test_a_byte_order_mark_is_not_scored(capsys, tmp_path, tiny_llama_checkpoint, corpus_dir):
    """A UTF-8 file saved with a BOM (Windows editors) is the same text: the same tokens, sha256 and numbers."""
    plain = corpus_dir / "heldout.txt"
    marked = tmp_path / "bom.txt"
    marked.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    reports = {}
    for name, text in (("plain", plain), ("bom", marked)):
        out = tmp_path / f"{name}.json"
        argv = ["eval", tiny_llama_checkpoint, "-o", out, "--data", text, "--seq-len", 32, "--max-tokens", 200]
        code, _, err = run_cli(capsys, *argv, "--no-speed", "-q")
        assert code == 0, err
        reports[name] = json.loads(out.read_text())
    for key in ("perplexity", "num_tokens", "bits_per_byte"):
        assert reports["bom"][key] == reports["plain"][key], key
    assert reports["bom"]["data"]["sha256"] == reports["plain"]["data"]["sha256"]


def test_provenance_keeps_the_command_quoted_and_the_working_directory(
    capsys, tmp_path, tiny_llama_checkpoint, corpus_dir, monkeypatch
):
    """Relative paths in a record are found again from the recorded working directory; a path with a space reads
    back as one argument."""
    import shlex
    import sys

    spaced = tmp_path / "my texts"
    spaced.mkdir()
    shutil.copy(corpus_dir / "heldout.txt", spaced / "held out.txt")
    monkeypatch.chdir(tmp_path)
    argv = ["eval", tiny_llama_checkpoint, "-o", "r.json", "--data", "my texts/held out.txt", "--seq-len", "32",
            "--max-tokens", "200", "--no-speed", "-q"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", ["clakit", *map(str, argv)])
    code, _, err = run_cli(capsys, *argv)
    assert code == 0, err
    provenance = json.loads((tmp_path / "r.json").read_text())["provenance"]
    assert shlex.split(provenance["command"])[1:] == [str(a) for a in argv]
    assert provenance["cwd"] == str(tmp_path)


def test_every_eval_setting_is_one_flag_and_recorded_whole(capsys, tmp_path, tiny_llama_checkpoint, corpus_dir):
    """EvalConfig is the single source of truth: one `clakit eval` flag per field, the report's provenance holds
    the whole config, and a library call with a value of the wrong type is one ClakitError naming the field."""
    import dataclasses

    from clakit.cli import build_parser
    from clakit.errors import ClakitError
    from clakit.eval.config import EvalConfig

    eval_parser = build_parser()._subparsers._group_actions[0].choices["eval"]
    flags = {s for action in eval_parser._actions for s in action.option_strings}
    fields = [f.name for f in dataclasses.fields(EvalConfig)]
    assert all(f"--{name.replace('_', '-')}" in flags for name in fields)
    out = tmp_path / "r.json"
    argv = ["eval", tiny_llama_checkpoint, "-o", out, "--data", corpus_dir / "heldout.txt", "--seq-len", 32,
            "--max-tokens", 200, "--batch-size", 3, "--no-speed", "-q"]  # fmt: skip
    code, _, err = run_cli(capsys, *argv)
    assert code == 0, err
    recorded = json.loads(out.read_text())["provenance"]["config"]
    assert recorded == {**EvalConfig().to_dict(), "data": [str(corpus_dir / "heldout.txt")], "seq_len": 32,
                        "max_tokens": 200, "batch_size": 3, "speed": False}  # fmt: skip
    for bad, needle in [({"batch_size": "4"}, "eval setting batch_size must be int"),
                        ({"speed": 1}, "eval setting speed must be bool"),
                        ({"data": "a.txt"}, "eval setting data must be list")]:  # fmt: skip
        with pytest.raises(ClakitError, match=needle):
            evaluate(tiny_llama_checkpoint, **bad)


def test_a_checkpoint_without_tokenizer_files_is_named_as_such(capsys, tmp_path, tiny_llama_checkpoint, corpus_dir):
    """transformers says "Couldn't instantiate the backend tokenizer from one of"; the fix: the tokenizer files."""
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in tiny_llama_checkpoint.iterdir():
        if not f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template")):
            (bare / f.name).symlink_to(f)
    out = tmp_path / "r.json"
    argv = ["eval", bare, "-o", out, "--data", corpus_dir / "heldout.txt", "--seq-len", 32, "--no-speed", "-q"]
    assert_refused(capsys, argv, "has no tokenizer files (tokenizer.json, tokenizer.model, ...)", out)
