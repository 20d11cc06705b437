"""`clakit convert` on tiny sharded checkpoints: the written folder is the in-memory CLA model, loads everywhere,
and is reproducible."""

import json
import os
import subprocess
import sys

import pytest
import torch
from convert_fixtures import TOKENS, load, logits, read_json, run_cli, safetensors_files
from safetensors import safe_open

from clakit.convert import convert
from clakit.convert.checkpoint import parse_size
from clakit.convert.inmemory import cla_model_from
from clakit.convert.layout import KEY_TEMPLATES
from clakit.convert.reconstruct import BASE_STEPS, MAX_DEFAULT_STEPS, default_steps


@pytest.mark.parametrize("init", ["producer", "mean"])
def test_converted_folder_equals_in_memory_cla_model(tiny_checkpoint, tmp_path, init):
    out = tmp_path / "cla"
    assert run_cli(tiny_checkpoint, out, "--init", init, "--max-shard-size", "60KB", "--quiet") == 0
    assert len(safetensors_files(out)) > 1 and (out / "model.safetensors.index.json").is_file()
    converted, source = load(out), load(tiny_checkpoint)
    assert converted.config.kv_source_layers == [0, 0, 2, 2]
    assert type(converted).__name__.endswith("CLAForCausalLM")
    reference = cla_model_from(source, [0, 0, 2, 2], init)
    torch.testing.assert_close(logits(converted), logits(reference), rtol=0, atol=0)
    # the layouts really differ from the source, so this is not a copy
    assert not torch.allclose(logits(converted), logits(source))


def test_explicit_layout_and_consumers_hold_no_kv(tiny_llama_checkpoint, tmp_path):
    out = tmp_path / "cla"
    assert run_cli(tiny_llama_checkpoint, out, "--kv-source-layers", "0,0,0,3", "-q") == 0
    names = set()
    for path in safetensors_files(out):
        with safe_open(str(path), "pt") as f:
            names |= set(f.keys())
    for layer in range(4):
        assert (KEY_TEMPLATES["k_proj"].format(layer) in names) == (layer in (0, 3))
        assert (KEY_TEMPLATES["v_proj"].format(layer) in names) == (layer in (0, 3))
    reference = cla_model_from(load(tiny_llama_checkpoint), [0, 0, 0, 3], "mean")
    torch.testing.assert_close(logits(load(out)), logits(reference), rtol=0, atol=0)
    record = read_json(out / "clakit_convert.json")
    assert record["settings"]["kv_source_layers"] == [0, 0, 0, 3] and record["settings"]["layout"] == "explicit"
    assert record["settings"]["kv_saving"] == 0.5


def test_factor_1_reproduces_the_source_exactly(tiny_checkpoint, tmp_path):
    out = tmp_path / "cla1"
    assert run_cli(tiny_checkpoint, out, "--factor", "1", "-q") == 0
    converted = load(out)
    assert converted.config.kv_source_layers == [0, 1, 2, 3]
    assert torch.equal(logits(converted), logits(load(tiny_checkpoint)))


def test_mistral_config_with_attention_bias_converts_as_stock_mistral_runs(tokenizer, tmp_path):
    """Stock Mistral has no attention biases whatever its config says; a stray `attention_bias: true` must not make
    the CLA model expect (and the converter demand) bias tensors."""
    from conftest import save_checkpoint, tiny_model

    src = save_checkpoint(tiny_model("mistral", attention_bias=True), tokenizer, tmp_path / "src")
    assert json.loads((src / "config.json").read_text())["attention_bias"] is True
    assert run_cli(src, tmp_path / "cla1", "--factor", "1", "-q") == 0
    assert torch.equal(logits(load(tmp_path / "cla1")), logits(load(src)))


def test_converting_twice_gives_byte_identical_weights(tiny_llama_checkpoint, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        assert run_cli(tiny_llama_checkpoint, out, "--factor", "3", "--max-shard-size", "50KB", "-q") == 0
    files_a, files_b = safetensors_files(a), safetensors_files(b)
    assert [f.name for f in files_a] == [f.name for f in files_b] and len(files_a) > 1
    for fa, fb in zip(files_a, files_b, strict=True):
        assert fa.read_bytes() == fb.read_bytes()
    for name in ("model.safetensors.index.json", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()


def test_output_folder_contents(tiny_llama_checkpoint, tmp_path):
    out = tmp_path / "cla"
    assert run_cli(tiny_llama_checkpoint, out, "-q") == 0
    config = read_json(out / "config.json")
    assert config["model_type"] == "llama_cla" and config["kv_source_layers"] == [0, 0, 2, 2]
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_cla.LlamaCLAForCausalLM"
    for name in ("configuration_cla.py", "modeling_cla.py", "tokenizer.json", "generation_config.json"):
        assert (out / name).is_file(), name
    assert (out / "generation_config.json").read_bytes() == (
        tiny_llama_checkpoint / "generation_config.json"
    ).read_bytes()
    record = read_json(out / "clakit_convert.json")
    assert record["settings"]["source"] == str(tiny_llama_checkpoint) and record["settings"]["init"] == "mean"
    assert record["provenance"]["transformers"] and record["provenance"]["clakit"]
    card = (out / "README.md").read_text()
    assert str(tiny_llama_checkpoint) in card and "[0, 0, 2, 2]" in card and "2.00x smaller, saving 50.0%" in card
    assert not [p for p in tmp_path.iterdir() if p.name != "cla"]  # no staging folder left behind


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_output_files_get_the_umask_mode(tiny_llama_checkpoint, tmp_path, umask):
    """Every file, weight shards included (safetensors creates them 0600), reads like any new file: 0666 less the
    umask; the folder 0777 less the umask, so a team sharing the output folder can read the model."""
    out = tmp_path / "cla"
    old = os.umask(umask)
    try:
        assert run_cli(tiny_llama_checkpoint, out, "--max-shard-size", "60KB", "-q") == 0
    finally:
        os.umask(old)
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(safetensors_files(out)) > 1
    assert {p.name: p.stat().st_mode & 0o777 for p in files} == {p.name: 0o666 & ~umask for p in files}
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask


def test_remote_code_loads_without_clakit(tiny_llama_checkpoint, tmp_path):
    """The copied modeling files alone load the folder (trust_remote_code), in a process that never imports clakit."""
    out = tmp_path / "cla"
    assert run_cli(tiny_llama_checkpoint, out, "-q") == 0
    expected = logits(load(out))
    script = (
        "import sys, torch\nfrom transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True, dtype=torch.float32)\n"
        "assert 'clakit' not in sys.modules, 'clakit was imported'\n"
        f"torch.save(m(input_ids=torch.tensor({TOKENS.tolist()})).logits, {str(tmp_path / 'l.pt')!r})\n"
    )
    env = {**os.environ, "PYTHONPATH": "", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=tmp_path)
    torch.testing.assert_close(torch.load(tmp_path / "l.pt"), expected, rtol=0, atol=0)


def test_dtype_cast_and_library_call(tiny_llama_checkpoint, tmp_path):
    out = convert(tiny_llama_checkpoint, tmp_path / "bf16", output_dtype="bfloat16", factor=4, quiet=True)
    with safe_open(str(safetensors_files(out)[0]), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert read_json(out / "config.json")["dtype"] == "bfloat16"
    assert read_json(out / "clakit_convert.json")["settings"]["kv_source_layers"] == [0, 0, 0, 0]


def test_overwrite_replaces_the_output(tiny_llama_checkpoint, tmp_path):
    out = tmp_path / "cla"
    assert run_cli(tiny_llama_checkpoint, out, "--factor", "4", "-q") == 0
    assert run_cli(tiny_llama_checkpoint, out, "--factor", "2", "--overwrite", "-q") == 0
    assert read_json(out / "config.json")["kv_source_layers"] == [0, 0, 2, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cla"]


def test_pickle_source_needs_allow_pickle(tiny_llama_checkpoint, tmp_path, capsys):
    src = tmp_path / "bin_src"
    model = load(tiny_llama_checkpoint)
    model.config.save_pretrained(src)
    torch.save(model.state_dict(), src / "pytorch_model.bin")
    assert run_cli(src, tmp_path / "refused", "-q") == 2
    assert "--allow-pickle" in capsys.readouterr().err and not (tmp_path / "refused").exists()
    assert run_cli(src, tmp_path / "cla", "--allow-pickle", "-q") == 0
    torch.testing.assert_close(logits(load(tmp_path / "cla")), logits(cla_model_from(model, [0, 0, 2, 2])))


def test_eval_data_prints_perplexity_before_and_after(tiny_llama_checkpoint, corpus_dir, tmp_path, capsys, tokenizer):
    from clakit.eval.perplexity import perplexity

    heldout = tmp_path / "heldout.txt"  # ~1,000 tokens keeps the four evaluations quick
    heldout.write_text((corpus_dir / "heldout.txt").read_text()[:4000])
    out = tmp_path / "cla"
    assert run_cli(tiny_llama_checkpoint, out, "--eval-data", heldout, "-q") == 0
    printed = capsys.readouterr().out
    record = read_json(out / "clakit_convert.json")["eval"]
    assert record["data"] == [str(heldout)] and record["seq_len"] == 256  # the tiny models' context caps it

    def ppl(model):
        return perplexity(model, tokenizer, heldout.read_text(), seq_len=256, max_tokens=8192)["perplexity"]

    assert record["perplexity_before"] == pytest.approx(ppl(load(tiny_llama_checkpoint)), rel=1e-5)
    assert record["perplexity_after"] == pytest.approx(ppl(load(out)), rel=1e-5)
    assert record["perplexity_before"] != pytest.approx(record["perplexity_after"])
    assert f"{record['perplexity_before']:.2f} -> {record['perplexity_after']:.2f}" in printed


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size("100KB") == 100_000
    assert parse_size("1.5MB") == 1_500_000 and parse_size(1234) == 1234


@torch.no_grad()
def kl_from(source, model, ids: torch.Tensor) -> float:
    """Reconstruction error: mean KL(source || model) of next-token distributions over the tokens of `ids`."""
    total = 0.0
    for row in ids:
        p = source(input_ids=row[None]).logits.log_softmax(-1)  # (1, seq, vocab)
        q = model(input_ids=row[None]).logits.log_softmax(-1)
        total += float((p.exp() * (p - q)).sum(-1).mean())
    return total / len(ids)


def test_calibrated_init_is_the_fitted_model_and_beats_mean(tiny_llama_checkpoint, corpus_dir, tokenizer, tmp_path):
    from clakit.convert.calibrate import calib_input_ids, fit_kv
    from clakit.corpus import load_texts

    calib = corpus_dir / "calib.txt"
    out = tmp_path / "cal"
    args = ("--factor", "2", "--init", "calibrated", "--calib-data", calib, "--calib-tokens", "2048", "-q")
    assert run_cli(tiny_llama_checkpoint, out, *args, "--distill-steps", "0") == 0  # the fit alone
    record = read_json(out / "clakit_convert.json")["settings"]
    assert record["init"] == "calibrated" and record["calib_tokens"] == 2048
    source = load(tiny_llama_checkpoint)
    ids = calib_input_ids(tokenizer, load_texts([str(calib)]), 2048, 256)  # 256: the tiny model's context
    overrides = fit_kv(source, [0, 0, 2, 2], ids, "calibrated", progress=False)
    reference = cla_model_from(source, [0, 0, 2, 2], "mean", overrides=overrides)
    torch.testing.assert_close(logits(load(out)), logits(reference), rtol=1e-5, atol=1e-5)
    mean = cla_model_from(source, [0, 0, 2, 2], "mean")
    assert kl_from(source, load(out), ids) < 0.9 * kl_from(source, mean, ids)  # measured: 0.28 vs 0.35


def test_calibration_data_alone_chooses_the_layout_and_reconstructs(tiny_llama_checkpoint, corpus_dir, tmp_path):
    """With --calib-data alone: the best measured combination (auto layout at half the cache + reconstruct)."""
    out = tmp_path / "default"
    args = ("--calib-data", corpus_dir / "calib.txt", "--calib-tokens", "1024", "-q")
    assert run_cli(tiny_llama_checkpoint, out, *args) == 0
    record = read_json(out / "clakit_convert.json")
    settings = record["settings"]
    assert (settings["init"], settings["layout"]) == ("reconstruct", "auto")
    assert settings["kv_saving"] >= 0.5 and record["auto_layout"]["kv_saving_requested"] == 0.5
    assert read_json(out / "config.json")["kv_source_layers"] == settings["kv_source_layers"]
    # an explicit --factor still means uniform CLA-K, with the data-aware init
    assert settings["reconstruct_steps"] == default_steps(settings["kv_source_layers"])  # the default, recorded
    assert run_cli(tiny_llama_checkpoint, tmp_path / "f2", "--factor", "2", "--reconstruct-steps", "5", *args) == 0
    settings = read_json(tmp_path / "f2" / "clakit_convert.json")["settings"]
    assert settings["kv_source_layers"] == [0, 0, 2, 2] and settings["init"] == "reconstruct"
    assert settings["reconstruct_steps"] == 5


@pytest.mark.parametrize(
    ("layout", "steps"),
    [
        ([0, 0, 2, 2], BASE_STEPS),  # half the layers consume: the half-cache default
        ([0, 0, 0, 0], BASE_STEPS),  # more consumers: never fewer steps
        ([0, 0, 0, 3, 3, 3], BASE_STEPS),
        ([0, 1, 2, 3, 3, 5, 6, 6], MAX_DEFAULT_STEPS),  # 2 of 8 consume: 400 wanted, capped
        ([0, 1, 1, 3, 3, 5, 5, 7, 7, 9], round(BASE_STEPS * 5 / 4)),  # 4 of 10: as many more as the fit's time allows
        ([0, 1, 2, 3], BASE_STEPS),  # nothing shared (nothing is fitted either)
    ],
)
def test_the_default_reconstruct_steps_grow_as_fewer_layers_share(layout, steps):
    assert default_steps(layout) == steps


def test_a_layout_sharing_few_layers_records_the_steps_it_fitted_with(tiny_llama_checkpoint, corpus_dir, tmp_path):
    args = ("--calib-data", corpus_dir / "calib.txt", "--calib-tokens", "128", "--seq-len", "64", "--distill-steps")
    assert run_cli(tiny_llama_checkpoint, tmp_path / "one", "--kv-source-layers", "0,1,2,2", *args, "0", "-q") == 0
    record = read_json(tmp_path / "one" / "clakit_convert.json")
    assert record["settings"]["reconstruct_steps"] == MAX_DEFAULT_STEPS > BASE_STEPS


def test_fitted_kv_keep_the_checkpoint_dtype(tiny_llama_checkpoint, corpus_dir, tmp_path):
    """The fit runs in fp32; a bf16 source still gives an all-bf16 checkpoint."""
    src = tmp_path / "bf16_src"
    load(tiny_llama_checkpoint).to(torch.bfloat16).save_pretrained(src)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (src / name).write_bytes((tiny_llama_checkpoint / name).read_bytes())
    out = tmp_path / "cla"
    args = ("--init", "calibrated", "--calib-data", corpus_dir / "calib.txt", "--calib-tokens", "512", "-q")
    assert run_cli(src, out, *args) == 0
    with safe_open(str(safetensors_files(out)[0]), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert read_json(out / "config.json")["dtype"] == "bfloat16"


def test_layout_auto_writes_the_chosen_layout_and_fit(tiny_llama_checkpoint, corpus_dir, tmp_path, monkeypatch):
    """--layout auto picks a layout meeting --kv-saving (scores recorded) and writes fit_kv's tensors for it.

    The real fitting functions run; wrappers keep what they returned, to rebuild the model in memory from it.
    """
    import clakit.convert.autolayout
    import clakit.convert.calibrate
    from clakit.convert.layout import kv_saving

    seen = {}

    def keep(module, name, copy=lambda result: result):
        real = getattr(module, name)

        def spy(*a, **k):
            result = real(*a, **k)
            seen.setdefault(name, copy(result))  # fit_kv's tensors wait on disk, in a folder removed at the end
            return result

        monkeypatch.setattr(module, name, spy)

    keep(clakit.convert.autolayout, "auto_layout")
    keep(clakit.convert.calibrate, "fit_kv", copy=dict)
    out = tmp_path / "auto"
    args = (
        "--layout",
        "auto",
        "--kv-saving",
        "0.5",
        "--init",
        "calibrated",
        "--calib-tokens",
        "512",
        "-q",
        "--distill-steps",
        "0",
    )
    assert run_cli(tiny_llama_checkpoint, out, "--calib-data", corpus_dir / "calib.txt", *args) == 0
    record = read_json(out / "clakit_convert.json")
    layout = record["settings"]["kv_source_layers"]
    assert record["settings"]["layout"] == "auto" and kv_saving(layout) >= 0.5
    assert read_json(out / "config.json")["kv_source_layers"] == layout == seen["auto_layout"][0]
    assert record["auto_layout"] == json.loads(json.dumps(seen["auto_layout"][1]))
    assert any(name.endswith("k_proj.weight") for name in seen["fit_kv"])
    reference = cla_model_from(load(tiny_llama_checkpoint), layout, "mean", overrides=seen["fit_kv"])
    torch.testing.assert_close(logits(load(out)), logits(reference), rtol=0, atol=0)


def test_the_layout_search_says_how_many_calibration_tokens_it_scores(tiny_llama_checkpoint, corpus_dir, tmp_path,
                                                                      capsys, monkeypatch):  # fmt: skip
    """Every candidate layout is scored on the first SCORE_TOKENS of the calibration windows: the line said "on 512
    tokens" (all of them) where it scored 128, and the record's score_tokens is that same count."""
    import clakit.convert.autolayout

    monkeypatch.setattr(clakit.convert.autolayout, "SCORE_TOKENS", 128)
    out = tmp_path / "auto"
    args = ("--layout", "auto", "--init", "mean", "--calib-tokens", "512", "--seq-len", "64", "--distill-steps", "0")
    assert run_cli(tiny_llama_checkpoint, out, "--calib-data", corpus_dir / "calib.txt", *args) == 0
    assert "scored on 128 of the 512 calibration tokens" in capsys.readouterr().err
    assert read_json(out / "clakit_convert.json")["auto_layout"]["score_tokens"] == 128


def test_record_names_the_source_for_uptrain_and_eval(tiny_llama_checkpoint, tmp_path):
    """uptrain finds the stock model through the record's `source`; eval labels reports with settings.source."""
    from types import SimpleNamespace

    from clakit.uptrain.student import original_spec

    out = convert(tiny_llama_checkpoint, tmp_path / "cla", quiet=True)
    record = read_json(out / "clakit_convert.json")
    assert record["source"]["path"] == str(tiny_llama_checkpoint.resolve())
    section = SimpleNamespace(original=None, source=None, path=str(out), revision=None)
    assert original_spec(section) == str(tiny_llama_checkpoint)


def test_calibration_text_shorter_than_asked_is_said(tiny_llama_checkpoint, tmp_path, capsys):
    """Text that gives fewer windows than --calib-tokens / --distill-tokens ask: the fit uses what there is (as
    before), and now says so, naming the flag; text enough for both says nothing."""
    from conftest import make_text

    short = tmp_path / "short.txt"
    short.write_text(make_text(300, seed=5))
    common = ("--init", "calibrated", "--seq-len", "64", "--distill-steps", "1", "--calib-data", short)
    asked = ("--calib-tokens", "1024", "--distill-tokens", "2048")
    assert run_cli(tiny_llama_checkpoint, tmp_path / "out", *common, *asked) == 0
    err = capsys.readouterr().err
    assert "not the 16 --calib-tokens 1024 asks for" in err and "not the 32 --distill-tokens 2048 asks for" in err
    enough = ("--calib-tokens", "64", "--distill-tokens", "64")
    assert run_cli(tiny_llama_checkpoint, tmp_path / "out2", *common, *enough) == 0
    assert "asks for" not in capsys.readouterr().err
