"""Break-it round 4, convert: reproducibility, provenance and replay of a conversion, and features that compose.

Each test names what it guards; those written for a fix say what the code before it did.
"""

import hashlib
import json
import shlex

import pytest
import torch
from conftest import save_checkpoint, tiny_model
from convert_fixtures import load, safetensors_files
from transformers import AutoTokenizer

from clakit.cli import main as clakit_main
from clakit.convert import ConvertConfig, convert
from clakit.eval.perplexity import perplexity

FAST = dict(calib_tokens=256, seq_len=64, reconstruct_steps=2, distill_tokens=256, device="cpu")  # tiny, seconds


def weights(folder) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in safetensors_files(folder)}


def record(folder) -> dict:
    return json.loads((folder / "clakit_convert.json").read_text())


def test_the_distillation_is_the_same_whatever_the_sources_attention_dropout(tokenizer, corpus_dir, tmp_path):
    """The distillation's student was built (and trained) in train mode, so a source whose config sets
    attention_dropout (0.3 here) trained with dropout drawn from the global RNG, which --seed does not set: the same
    convert() twice in one process wrote different tensors (sha256 91b5e58e... then 6fe9fbca...). The teacher has no
    dropout; the student now has none either, so the output is that of the same weights without the key."""
    settings = dict(calib_data=[str(corpus_dir / "calib.txt")], kv_source_layers=[0, 0, 2, 2], distill_steps=3, **FAST)
    written = []
    for name, dropout in (("a", 0.3), ("b", 0.3), ("none", 0.0)):
        src = save_checkpoint(tiny_model("llama", attention_dropout=dropout), tokenizer, tmp_path / f"src_{name}")
        torch.manual_seed(len(written))  # a caller's RNG state, different before each run
        convert(src, tmp_path / name, ConvertConfig(**settings), quiet=True)
        written.append(weights(tmp_path / name))
    assert written[0] == written[1] == written[2]
    assert record(tmp_path / "a")["distill"]["steps"] == 3


def test_the_eval_record_names_the_tokens_and_window_scored_not_the_budget(tiny_llama_checkpoint, corpus_dir,
                                                                           tmp_path):  # fmt: skip
    """--eval-data on a text shorter than --eval-tokens (8192 by default) and than one window: the record said
    tokens 8192 and seq_len 256 (the budget and the model's window) where 146 tokens were scored in one window of
    146. It now records what `clakit eval`'s perplexity scores on the written model, and the budget apart."""
    heldout = tmp_path / "heldout.txt"
    heldout.write_text((corpus_dir / "heldout.txt").read_text()[:300])
    out = tmp_path / "cla"
    convert(tiny_llama_checkpoint, out, ConvertConfig(factor=2, eval_data=[str(heldout)], device="cpu"), quiet=True)
    evaluated = record(out)["eval"]
    assert evaluated["seq_len"] < 256 and evaluated["tokens"] < evaluated.get("max_tokens", 8192)
    text, tokenizer = heldout.read_text(), AutoTokenizer.from_pretrained(out)
    scored = perplexity(load(out), tokenizer, text, seq_len=evaluated["seq_len"])
    assert evaluated["tokens"] == scored["num_tokens"] < evaluated["max_tokens"] == 8192
    assert scored["num_windows"] == 1
    assert evaluated["perplexity_after"] == scored["perplexity"]
    assert f"({scored['num_tokens']} tokens of {heldout})" in (out / "README.md").read_text()


def test_the_layout_refinement_holds_one_cache_of_layer_inputs(monkeypatch):
    """refine_layout keeps every layer's input on the score tokens (at 70B: 80 x 1024 x 8192 fp32 = 2.7 GB) and
    rebuilds it after each accepted move; the old cache was still held while the new one was built, and
    layer_inputs copied each layer's tensor (torch.cat of one tensor) before returning: three caches at the peak,
    where one will do. Every move is accepted here (a measured NLL that keeps falling)."""
    import weakref

    from clakit.convert import autolayout

    model, x = tiny_model("llama", num_hidden_layers=6), torch.randint(0, 320, (2, 16))
    seen, returned, calls = [], [], []
    keep = lambda module, args: seen.append(args[0])  # noqa: E731 - what each layer received
    hooks = [layer.register_forward_pre_hook(keep) for layer in model.model.layers]
    real = autolayout.layer_inputs

    def tracked(*args, **kwargs):
        calls.append(sum(ref() is not None for ref in returned))  # earlier caches still alive at this call
        seen.clear()
        out = real(*args, **kwargs)
        assert [t.data_ptr() for t in out[0]] == [t.data_ptr() for t in seen]  # the tensors, not copies
        seen.clear()
        returned.extend(weakref.ref(t) for t in out[0])
        return out

    falling = iter(range(-1, -1000, -1))
    monkeypatch.setattr(autolayout, "layer_inputs", tracked)
    monkeypatch.setattr(autolayout, "layout_nll", lambda *args, **kwargs: float(next(falling)))
    layout, moves = autolayout.refine_layout(model, [0, 0, 2, 2, 4, 4], x, progress=False)
    for h in hooks:
        h.remove()
    assert len(moves) >= 2 and len(calls) == len(moves) + 1
    assert calls == [0] * len(calls)


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_a_conversion_replays_from_its_record_and_names_its_inputs_by_content(tokenizer, corpus_dir, tmp_path):
    """The data-aware default (auto layout, reconstruct, distillation) from a GGUF file, replayed from nothing but its
    clakit_convert.json (`config` less `device_used` and `bf16_used`, `source.path`): the same tensors, and a record
    equal to the first but for times and the command. A GGUF file has no revision: the record names it by its sha256
    (it was null), the calibration text by its sha256 and the held-out text by the sha256 `clakit eval` records
    (neither was recorded, so a replay could not tell it read the same files)."""
    import gguf
    from test_convert_archs import source_model, write_gguf

    from clakit.eval import evaluate

    path = write_gguf(source_model(), tokenizer, tmp_path / "m.gguf", gguf.GGMLQuantizationType.F32)
    heldout = tmp_path / "heldout.txt"
    heldout.write_text((corpus_dir / "heldout.txt").read_text()[:2000])
    settings = dict(calib_data=[str(corpus_dir / "calib.txt")], eval_data=[str(heldout)], distill_steps=2, **FAST)
    convert(path, tmp_path / "a", ConvertConfig(**settings), quiet=True)
    first = record(tmp_path / "a")
    config = ConvertConfig(**{k: v for k, v in first["config"].items() if k not in ("device_used", "bf16_used")})
    convert(first["source"]["path"], tmp_path / "b", config, quiet=True)
    again = record(tmp_path / "b")
    assert weights(tmp_path / "a") == weights(tmp_path / "b")
    for r in (first, again):
        del r["provenance"]["created"], r["provenance"]["command"], r["stage_seconds"]
    assert first == again
    assert first["settings"]["layout"] == "auto" and first["distill"]["steps"] == 2
    assert first["source"].get("sha256") == sha256_of(path.read_bytes())
    assert f"sha256 `{first['source']['sha256']}`" in (tmp_path / "a" / "README.md").read_text()
    assert first["settings"].get("calib_sha256") == sha256_of((corpus_dir / "calib.txt").read_bytes())
    report = evaluate(str(tmp_path / "a"), data=[str(heldout)], seq_len=first["eval"]["seq_len"],
                      max_tokens=first["eval"]["max_tokens"], device="cpu", speed=False, quiet=True)  # fmt: skip
    assert first["eval"].get("sha256") == report["data"]["sha256"]
    assert first["eval"]["tokens"] == report["num_tokens"]


def test_kv_head_merging_composes_with_a_non_adjacent_layout_and_a_cla_source_is_refused(tokenizer, tmp_path, capsys):
    """KV-head merging (`kvheads`, not a convert flag: merge the stock model, then convert it): to the current count
    it is the model (mean: exactly); merged to 1 head (fitted) and converted with a non-adjacent layout, the written
    Mistral (window 16, 40 tokens) loads through the Auto classes as the in-memory CLA model of the merged weights.
    The converted folder given back to convert, or to the merge, is refused in one line and nothing is written."""
    from transformers import AutoModelForCausalLM

    from clakit.cli import main
    from clakit.convert.inmemory import cla_model_from
    from clakit.convert.kvheads import merge_kv_heads
    from clakit.errors import ClakitError

    model, x = tiny_model("mistral", head_dim=16), torch.randint(0, 320, (2, 40))
    merged = merge_kv_heads(model, 1, "fitted", calib_ids=x)
    with torch.no_grad():
        assert torch.equal(merge_kv_heads(model, 2, "mean")(x).logits, model(x).logits)
        torch.testing.assert_close(merge_kv_heads(model, 2, "fitted", calib_ids=x)(x).logits, model(x).logits)
    src = save_checkpoint(merged, tokenizer, tmp_path / "merged")
    convert(src, tmp_path / "cla", kv_source_layers=[0, 1, 0, 1], quiet=True)
    written = AutoModelForCausalLM.from_pretrained(tmp_path / "cla").eval()
    assert written.config.num_key_value_heads == 1 and written.config.sliding_window == 16
    with torch.no_grad():
        assert torch.equal(written(x).logits, cla_model_from(merged, [0, 1, 0, 1])(x).logits)
    capsys.readouterr()  # save_pretrained's progress bars
    assert main(["convert", str(tmp_path / "cla"), str(tmp_path / "again"), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is already a CLA checkpoint (model_type mistral_cla)" in err, err
    assert not (tmp_path / "again").exists()
    with pytest.raises(ClakitError, match="merge KV heads on the stock model, then convert"):
        merge_kv_heads(written, 1)


def test_the_record_names_the_libraries_a_gguf_conversion_depends_on(tokenizer, tmp_path):
    """A GGUF source is dequantised by the `gguf` package and its tokenizer rebuilt by `tokenizers`; the written
    tensors and tokenizer.json depend on both (and on safetensors, the writer), but the record named only clakit,
    transformers, torch and python."""
    from importlib.metadata import version

    import gguf
    from test_convert_archs import source_model, write_gguf

    path = write_gguf(source_model(), tokenizer, tmp_path / "m.gguf", gguf.GGMLQuantizationType.Q8_0)
    convert(path, tmp_path / "cla", factor=2, quiet=True)
    recorded = record(tmp_path / "cla")["provenance"]
    assert {name: recorded.get(name) for name in ("gguf", "tokenizers", "safetensors")} == {
        name: version(name) for name in ("gguf", "tokenizers", "safetensors")
    }


def test_the_recorded_command_of_python_m_clakit_runs_again(tiny_llama_checkpoint, tmp_path):
    """`python -m clakit convert ...` recorded its command as `/…/clakit/__main__.py convert ...` (sys.argv[0] is the
    module's file), which does not run: the card's and the record's command could not be replayed. It is now the
    command as typed, and running it again (with --overwrite) writes the same tensors."""
    import shlex
    import subprocess
    import sys

    args = [sys.executable, "-m", "clakit", "convert", str(tiny_llama_checkpoint), "out", "--factor", "2", "-q"]
    subprocess.run(args, cwd=tmp_path, check=True)
    first = weights(tmp_path / "out")
    command = record(tmp_path / "out")["provenance"]["command"]
    assert shlex.split(command)[1:3] == ["-m", "clakit"]
    assert f"`{command}`" in (tmp_path / "out" / "README.md").read_text()
    subprocess.run([*shlex.split(command), "--overwrite"], cwd=tmp_path, check=True)
    assert weights(tmp_path / "out") == first


def test_a_card_keeps_its_table_whatever_the_paths_hold(tiny_llama_checkpoint, tmp_path):
    """An OUT or source path holding a newline, a `|` or a backtick ended the card's table row (or split a cell, or
    its code span) in the middle of the command: every table row is now one line of two cells, and the source and
    command are one code span each that reads back as the path and command given."""
    import re
    import shutil

    src = tmp_path / "we|ird `src`\nmodel"
    shutil.copytree(tiny_llama_checkpoint, src)
    out = tmp_path / "out|\n`x`"
    assert clakit_main(["convert", str(src), str(out), "--factor", "2", "--init", "mean", "-q"]) == 0
    card = (out / "README.md").read_text()
    table = card.split("|---|---|\n")[1].split("\n\n")[0].splitlines()
    assert [row.split(" | ")[0] for row in table][-3:] == ["| made with", "| command", "| rerun (any folder)"], table
    for row in table:  # two cells: the cell breaks are the only unescaped pipes
        assert len(re.findall(r"(?<!\\)\|", row)) == 3, row
    command = record(out)["provenance"]["command"]
    spans = {row.split(" | ")[0]: row.split(" | ", 1)[1].rsplit(" |", 1)[0] for row in table}
    for key, given in (("| command", command), ("| source", str(src))):
        fence = re.match(r"`+", spans[key]).group()
        body = spans[key][len(fence) :].split(fence)[0].strip(" ")
        assert body.replace("\\|", "|").replace("\\n", "\n") == given, (key, spans[key])


def test_a_folder_source_is_named_by_its_config_and_weight_headers(tiny_llama_checkpoint, tmp_path):
    """A local folder was recorded by its path alone (sha256 and revision null): nothing said which weights were
    converted. source.files now holds config.json's sha256 and each weight file's size and header sha256, which
    change when the weights' names, dtypes or shapes do."""
    import struct

    out = convert(str(tiny_llama_checkpoint), tmp_path / "out", factor=2, init="mean", quiet=True)
    files = record(out)["source"]["files"]
    shards = sorted(p.name for p in tiny_llama_checkpoint.glob("*.safetensors"))
    tokenizer = sorted(p.name for p in tiny_llama_checkpoint.glob("*.json") if p.name.startswith(("token", "spec")))
    assert "tokenizer.json" in tokenizer and sorted(files) == sorted(["config.json", *shards, *tokenizer])
    for name in tokenizer:  # the tokenizer by content (it was left out: an edited tokenizer.json, the same record)
        assert files[name] == {"sha256": hashlib.sha256((tiny_llama_checkpoint / name).read_bytes()).hexdigest()}
    config = (tiny_llama_checkpoint / "config.json").read_bytes()
    assert files["config.json"]["sha256"] == hashlib.sha256(config).hexdigest()
    for name in shards:
        raw = (tiny_llama_checkpoint / name).read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        assert files[name] == {"bytes": len(raw), "header_sha256": hashlib.sha256(raw[8 : 8 + n]).hexdigest()}


def test_the_record_names_the_token_windows_a_gz_copy_places_otherwise(tokenizer, tmp_path):
    """A .txt and its .txt.gz read as one text (one calib_sha256), but the windows are spread by byte in the plain
    file and by character in the .gz: with non-ASCII text they are other tokens, so other weights under the same
    record. calib_ids_sha256 names the windows fitted on."""
    import gzip

    src = save_checkpoint(tiny_model("llama"), tokenizer, tmp_path / "src")
    words = ["naïve café", "über straße", "garçon déjà", "smörgåsbord", "façade piñata", "crème brûlée"]
    text = " ".join(words[(i * 7) % len(words)] + f" {i}" for i in range(3000))  # one line, multi-byte characters
    (tmp_path / "u.txt").write_text(text)
    (tmp_path / "u.txt.gz").write_bytes(gzip.compress(text.encode()))
    settings = dict(init="calibrated", factor=2, calib_tokens=256, seq_len=64, distill_steps=0, device="cpu")
    for name in ("u.txt", "u.txt.gz"):
        config = ConvertConfig(calib_data=[str(tmp_path / name)], **settings)
        convert(src, tmp_path / f"out-{name}", config, quiet=True)
    plain, packed = (json.loads((tmp_path / f"out-{n}" / "clakit_convert.json").read_text())["settings"]
                     for n in ("u.txt", "u.txt.gz"))  # fmt: skip
    assert plain["calib_sha256"] == packed["calib_sha256"]
    assert len(plain["calib_ids_sha256"]) == 64
    same_weights = weights(tmp_path / "out-u.txt") == weights(tmp_path / "out-u.txt.gz")
    assert not same_weights  # the byte and character offsets differ here (what the record must tell apart)
    assert plain["calib_ids_sha256"] != packed["calib_ids_sha256"]


def test_the_rerun_command_restores_every_setting():
    """command_line writes one flag per non-default field; clakit's own parser reads back the same ConvertConfig
    (lists item by item, an item starting with `-`, odd characters, booleans turned off, floats exactly)."""
    import dataclasses

    from clakit.cli import build_parser
    from clakit.convert.config import ConvertConfig, command_line, config_from_args

    given = ConvertConfig(
        kv_source_layers=[0, 0, 2, 2], calib_data=["-odd name.txt", "b $x'.txt", "wikitext:wikitext-2-raw-v1:train"],
        refine=False, sequential=False, train_o_proj=False, ridge=0.1 + 0.2, seed=2**32 - 1, bf16=True,
        eval_data=["é.txt"], distill_copy_fraction=0.0, output_dtype="bfloat16", max_shard_size="100MB",
        revision="0123", device="cpu", distill_steps=0, reconstruct_lr=1e-7, refine_max_group=3, calib_tokens=7,
        seq_len=9, reconstruct_steps=4, distill_tokens=5, distill_lr=0.5, distill_copy_span=2, dtype="bfloat16",
        eval_tokens=3, allow_pickle=True, trust_remote_code=True,
    )  # fmt: skip
    argv = shlex.split(command_line("SRC", "OUT", given, threads=3))
    assert argv[:2] == ["OMP_NUM_THREADS=3", "clakit"]
    back = config_from_args(build_parser().parse_args(argv[2:]))
    assert dataclasses.asdict(back) == dataclasses.asdict(given)


def test_the_recorded_rerun_redoes_a_library_conversion_from_another_folder(tiny_llama_checkpoint, corpus_dir,
                                                                            tmp_path, monkeypatch):  # fmt: skip
    """convert() called from Python (or by uptrain) recorded `command` as the process's own command line ("-c",
    pytest's); provenance.rerun is built from the settings: run from another folder with its thread count it writes
    the same tensors, byte for byte, with the text given relative to the first run's folder."""
    import shutil

    first, other = tmp_path / "first", tmp_path / "other"
    first.mkdir(), other.mkdir()
    shutil.copy(corpus_dir / "calib.txt", first / "calib.txt")
    monkeypatch.chdir(first)
    config = ConvertConfig(factor=2, init="calibrated", calib_data=["calib.txt"], calib_tokens=256, seq_len=32,
                           distill_steps=1, distill_tokens=64, seed=7, ridge=0.01)  # fmt: skip
    convert(str(tiny_llama_checkpoint), tmp_path / "lib", config, quiet=True)
    rerun = record(tmp_path / "lib")["provenance"]["rerun"]
    threads, program, command, *args = shlex.split(rerun)
    assert (threads, program, command) == (f"OMP_NUM_THREADS={torch.get_num_threads()}", "clakit", "convert")
    assert f"--calib-data={first / 'calib.txt'}" in args and "--seed=7" in args and "--distill-steps=1" in args
    monkeypatch.chdir(other)
    assert clakit_main([command, *[str(tmp_path / "cli") if a == "NEW_OUT" else a for a in args], "-q"]) == 0
    assert weights(tmp_path / "cli") == weights(tmp_path / "lib")


def test_the_rerun_names_home_relative_text_by_its_absolute_path(tmp_path, monkeypatch):
    """`--calib-data ~/c.txt` was kept as typed (Path(cwd, "~/c.txt") never exists): a rerun by another user read
    their own home. A name that cannot be resolved, and a datasets spec, stay as typed."""
    from clakit.convert.config import command_line

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "c.txt").write_text("text")
    config = ConvertConfig(calib_data=["~/c.txt", "~nosuchuser/x.txt", "wikitext:wikitext-2-raw-v1:train"])
    argv = shlex.split(command_line("SRC", "OUT", config, cwd="/"))
    assert f"--calib-data={tmp_path / 'c.txt'}" in argv and "--calib-data=~nosuchuser/x.txt" in argv
    assert "--calib-data=wikitext:wikitext-2-raw-v1:train" in argv


def test_the_rerun_pins_the_defaults_the_converter_chose(tiny_llama_checkpoint, tmp_path):
    """A conversion given no layout and no init is CLA2 at mean init by this version's defaults: the rerun names
    both (a later clakit may choose others)."""
    convert(str(tiny_llama_checkpoint), tmp_path / "out", quiet=True)
    argv = shlex.split(record(tmp_path / "out")["provenance"]["rerun"])
    assert "--factor=2" in argv and "--init=mean" in argv, argv
