"""Passkey retrieval: deterministic prompts of exact lengths with the key at the asked depth, exact-match scoring (a
model that copies scores 100%, a random one ~0%), the report's grid, `clakit report`'s heat map, bad settings."""

import json
import re
from types import SimpleNamespace

import pytest
import torch
from conftest import make_text, tiny_model

from clakit.cli import main
from clakit.convert.inmemory import cla_model_from
from clakit.errors import ClakitError
from clakit.eval import evaluate, passkey

FILLER = make_text(6000, 51)
LENGTHS = [300, 480]
WINDOW = 512


class Copier(torch.nn.Module):
    """A scripted model that provably retrieves: it reads the key from the needle in its own input and writes it."""

    def __init__(self, tokenizer, config):
        super().__init__()
        self.tokenizer, self.config = tokenizer, config
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # a device and dtype for the caller
        self.history = None

    def forward(self, input_ids, cache=None, use_cache=True, logits_to_keep=0):
        self.history = input_ids if input_ids.shape[1] > 1 else torch.cat([self.history, input_ids], 1)
        logits = torch.full((input_ids.shape[0], 1, len(self.tokenizer)), -1e4)
        for row, ids in enumerate(self.history):
            text = self.tokenizer.decode(ids)
            key = re.search(r"The pass key is (\d+)\.", text).group(1)
            written = self.tokenizer.decode(ids[self.prompt_len :]) if input_ids.shape[1] == 1 else ""
            target = self.tokenizer(" " + key + ".", add_special_tokens=False)["input_ids"]
            step = len(self.tokenizer(written, add_special_tokens=False)["input_ids"]) if written else 0
            logits[row, 0, target[min(step, len(target) - 1)]] = 0.0
        if input_ids.shape[1] > 1:
            self.prompt_len = input_ids.shape[1]
        return SimpleNamespace(logits=logits)


@pytest.fixture(scope="module")
def stock():
    return tiny_model("llama", max_position_embeddings=WINDOW)


def settings(**kw):
    return passkey.PasskeySettings(**{"lengths": LENGTHS, "depths": [0.0, 0.5, 1.0], "samples": 3, **kw})


def test_prompts_are_deterministic_exact_length_with_the_key_at_its_depth(tokenizer):
    a = passkey.prepare(tokenizer, FILLER, settings(), WINDOW)
    b = passkey.prepare(tokenizer, FILLER, settings(), WINDOW)
    pairs = [(p, q) for c, d in zip(a.cells, b.cells, strict=True) for p, q in zip(c, d, strict=True)]
    assert len(pairs) == 18 and all(torch.equal(p.ids, q.ids) and p.key == q.key for p, q in pairs)
    keys = {p.key for cell in a.cells for p in cell}
    assert len(keys) > len(a.cells)  # keys differ across samples and cells
    for cell in a.cells:
        for p in cell:
            assert len(p.ids) == p.length and p.ids[0] == tokenizer.bos_token_id
            text = tokenizer.decode(p.ids[1:])
            assert text.startswith(passkey.INSTRUCTION) and text.endswith(passkey.QUESTION)
            assert text.count(p.key) == 2
            needle = tokenizer(passkey.NEEDLE.format(key=p.key), add_special_tokens=False)["input_ids"]
            head = 1 + len(tokenizer(passkey.INSTRUCTION, add_special_tokens=False)["input_ids"])
            n_fill = p.length - head - len(needle) - len(tokenizer(passkey.QUESTION)["input_ids"])
            at = next(i for i in range(len(p.ids)) if p.ids[i : i + len(needle)].tolist() == needle)
            assert at - head == round(p.depth * n_fill)  # the needle after exactly depth x filler tokens
    other = passkey.prepare(tokenizer, FILLER, settings(seed=1), WINDOW)
    assert [p.key for p in other.cells[0]] != [p.key for p in a.cells[0]]


def sentencepiece_style_tokenizer():
    """Llama-2's and Mistral's kind: every encoded text starts with the word-boundary mark "▁", bytes fall back to
    <0x..> tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    special = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator([make_text(3000, 0)], trainer=trainers.BpeTrainer(vocab_size=700, special_tokens=special))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_the_needle_and_question_are_tokenized_as_inside_text_by_a_tokenizer_that_marks_each_start():
    sp = sentencepiece_style_tokenizer()
    alone = sp(passkey.QUESTION, add_special_tokens=False)["input_ids"]
    assert sp.convert_ids_to_tokens(alone)[0] == "▁"  # what the pieces would get encoded alone: a space before "\n"
    prepared = passkey.prepare(sp, FILLER, settings(), WINDOW)
    for p in [p for cell in prepared.cells for p in cell]:
        tokens = sp.convert_ids_to_tokens(p.ids.tolist())
        assert len(p.ids) == p.length and tokens[0] == "<s>" and tokens[1].startswith("▁")  # the first word's mark
        question = tokens[-len(alone) + 1 :]
        assert question == sp.convert_ids_to_tokens(alone[1:]) and question[0] != "▁"
        needle = sp(passkey.NEEDLE.format(key=p.key), add_special_tokens=False)["input_ids"][1:]  # without the mark
        at = next(i for i in range(len(p.ids)) if p.ids[i : i + len(needle)].tolist() == needle)
        assert tokens[at - 1] != "▁"  # filler, then the needle's newline: no space token between


def test_a_model_that_copies_scores_every_prompt(tokenizer, stock):
    prepared = passkey.prepare(tokenizer, FILLER, settings(), WINDOW)
    result = passkey.run(Copier(tokenizer, stock.config), tokenizer, prepared)
    assert result["accuracy"] == 1.0 and len(result["cells"]) == len(LENGTHS) * 3
    assert all(c["samples"] == 3 and c["correct"] == 3 for c in result["cells"])
    assert len(result["prompts"]) == 18 and all(r["output"].strip().startswith(r["key"]) for r in result["prompts"])


def test_a_random_model_scores_about_nothing_and_cla1_decodes_like_it(tokenizer, stock):
    prepared = passkey.prepare(tokenizer, FILLER, settings(), WINDOW)
    result = passkey.run(stock, tokenizer, prepared)
    assert result["accuracy"] <= 0.1
    cla1 = passkey.run(cla_model_from(stock, list(range(4))), tokenizer, prepared)  # every layer its own producer
    assert [r["output"] for r in cla1["prompts"]] == [r["output"] for r in result["prompts"]]


def test_answer_takes_the_first_number():
    assert passkey.answer(" 12345. Remember") == "12345"
    assert passkey.answer(" is 1234 5") == "1234" and passkey.answer(" none") is None


def test_report_holds_the_grid_and_report_draws_the_heat_map(tmp_path, capsys, tiny_llama_checkpoint):
    """`clakit eval --task passkey` on a checkpoint and its CLA2, then `clakit report`."""
    data = tmp_path / "filler.txt"
    data.write_text(FILLER)
    cla = tmp_path / "cla2"
    assert main(["convert", str(tiny_llama_checkpoint), str(cla), "--factor", "2", "--init", "mean", "-q"]) == 0
    for name, model in [("orig", tiny_llama_checkpoint), ("cla2", cla)]:
        argv = ["eval", model, "-o", tmp_path / f"{name}.json", "--data", data, "--seq-len", 64, "--max-tokens", 256]
        argv += ["--no-speed", "--quiet", "--task", "passkey", "--passkey-lengths", "200", "--passkey-depths", "0,1"]
        assert main([str(a) for a in argv]) == 0
    assert "passkey retrieval: accuracy" in capsys.readouterr().out
    r = json.loads((tmp_path / "orig.json").read_text())["passkey"]
    assert r["settings"] == {"lengths": [200], "depths": [0.0, 1.0], "samples": 2, "seed": 0, "new_tokens": 8}
    assert [(c["length"], c["depth"], c["samples"]) for c in r["cells"]] == [(200, 0.0, 2), (200, 1.0, 2)]
    out = tmp_path / "rep"
    assert main(["report", str(tmp_path / "orig.json"), str(tmp_path / "cla2.json"), "-o", str(out)]) == 0
    assert (out / "passkey.png").stat().st_size > 1000
    md = (out / "report.md").read_text()
    assert "## Passkey retrieval" in md and "| model | passkey accuracy | 200 tokens |" in md
    assert "<h2>Passkey retrieval</h2>" in (out / "report.html").read_text()

    other = json.loads((tmp_path / "cla2.json").read_text())
    other["passkey"]["settings"]["samples"] = 5
    (tmp_path / "other.json").write_text(json.dumps(other))
    assert main(["report", str(tmp_path / "orig.json"), str(tmp_path / "other.json"), "-o", str(tmp_path / "r2")]) == 2
    assert "passkey.settings differs" in capsys.readouterr().err


@pytest.mark.parametrize("section", ["passkey", "lm_eval"])
def test_report_compares_the_sections_among_the_reports_that_have_them(section):
    """The first report without passkey (or lm-eval) results, two later ones with different settings: they were
    compared with the first only, so passed, and the passkey table divided by zero (a traceback)."""
    from clakit.eval.comparison import check_comparable

    base = {"data": {"sha256": "x"}, "num_tokens": 64, "settings": {"seq_len": 32, "stride": 32, "batch_size": 2}}
    settings = {"passkey": lambda n: {"lengths": [n]}, "lm_eval": lambda n: {"limit": n}}[section]
    runs = [base] + [{**base, section: {"settings": settings(n), "tasks": {}}} for n in (200, 240)]
    with pytest.raises(ClakitError, match=rf"cannot compare c.json with b.json: {section}\.settings"):
        check_comparable(runs, ["a.json", "b.json", "c.json"])


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"lengths": [600]}, "exceeds the model's window of 512 tokens"),
        ({"lengths": [20]}, "shorter than the prompt without filler"),
        ({"depths": [1.5]}, "between 0 and 1"),
        ({"samples": 0}, "positive integer"),
        ({"lengths": [0]}, "positive token counts"),
    ],
)
def test_bad_passkey_settings_fail_before_the_model_is_loaded(tokenizer, stock, monkeypatch, kw, needle):
    monkeypatch.setattr("clakit.eval.suite._load", lambda *a: pytest.fail("the model was loaded"))
    with pytest.raises(ClakitError, match=needle) as e:
        evaluate(stock, tokenizer=tokenizer, text=FILLER, seq_len=64, quiet=True, passkey=settings(**kw))
    assert "\n" not in str(e.value)


def test_a_length_too_short_for_the_prompt_names_the_prompts_real_size(tokenizer):
    builder = passkey.PromptBuilder(tokenizer, FILLER, 300)
    fixed = builder.fixed("12345")  # this tokenizer's instruction + needle + question: under 256 tokens
    with pytest.raises(ClakitError, match=f"without filler \\({fixed} tokens with this tokenizer\\)"):
        builder.build(fixed - 1, 0.5, 0, seed=0)
    assert len(builder.build(fixed + 20, 0.5, 0, seed=0).ids) == fixed + 20  # the size named is the real limit


def test_too_little_filler_text_is_named(tokenizer, stock):
    with pytest.raises(ClakitError, match="too few to fill"):
        passkey.prepare(tokenizer, make_text(100, 1), settings(), WINDOW)


def test_passkey_flags_need_the_task(capsys, tiny_llama_checkpoint, tmp_path):
    argv = ["eval", str(tiny_llama_checkpoint), "-o", str(tmp_path / "r.json"), "--passkey-samples", "3"]
    assert main(argv) == 2 and "need --task passkey" in capsys.readouterr().err
    argv = ["eval", str(tiny_llama_checkpoint), "-o", str(tmp_path / "r.json"), "--task", "passkey"]
    assert main(argv + ["--passkey-depths", "half"]) == 2 and "comma-separated numbers" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_depth_minus_zero_is_depth_zero(tokenizer):
    """-0.0 passes the 0-1 check; kept as is, its seed string "-0.0" asked other prompts than 0, and `clakit report`
    refused the two reports as of different settings."""
    zero = passkey.prepare(tokenizer, FILLER, settings(depths=[0]), WINDOW)
    minus = passkey.prepare(tokenizer, FILLER, settings(depths=[-0.0]), WINDOW)
    assert minus.settings.depths == [0.0] and str(minus.settings.depths[0]) == "0.0"
    pairs = [(p, q) for c, d in zip(zero.cells, minus.cells, strict=True) for p, q in zip(c, d, strict=True)]
    assert pairs and all(torch.equal(p.ids, q.ids) for p, q in pairs)


def test_filler_of_long_whitespace_runs_is_read_further_not_called_too_few_tokens():
    """The filler was the text's first 16 x length + 4096 characters, whatever their tokens: a text of 205
    characters a token (SmolLM2 merges runs of spaces; here a word-level tokenizer drops them) was refused as
    "the evaluation text has 99 tokens, too few" for a 1024-token prompt while it holds 3,000. Now read 4x further
    while too few tokens came; a text really too short is still named."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from clakit.corpus import Text

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "word": 1}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    words = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    text = ("word" + " " * 200 + "\n") * 3000
    assert len(passkey._filler_ids(words, [Text("<f>", text)], 1024)) >= 1024  # before: 99
    assert len(passkey._filler_ids(words, [Text("<f>", text[: 205 * 500])], 1024)) == 500  # all there is


def test_a_cells_prompts_go_through_the_model_batch_size_at_a_time(tokenizer, stock):
    """passkey.run put a cell's samples into one forward whatever --batch-size said (10 samples at 32k tokens: one
    10 x 32k prefill). Now batch_size prompts at a time, with the same answers."""
    prepared = passkey.prepare(tokenizer, FILLER, settings(lengths=[200], depths=[0.5], samples=3), WINDOW)
    batches = []
    hook = stock.register_forward_pre_hook(lambda m, args, kw: batches.append(kw["input_ids"].shape), with_kwargs=True)
    try:
        whole = passkey.run(stock, tokenizer, prepared)
        prefills = [s for s in batches if s[1] > 1]
        batches.clear()
        split = passkey.run(stock, tokenizer, prepared, batch_size=2)
    finally:
        hook.remove()
    assert prefills == [(3, 200)] and [s for s in batches if s[1] > 1] == [(2, 200), (1, 200)]
    assert [r["output"] for r in split["prompts"]] == [r["output"] for r in whole["prompts"]]
    assert split["prompts_sha256"] == whole["prompts_sha256"]


def test_reports_whose_passkey_prompts_differ_are_not_compared(tokenizer, stock):
    """Equal settings and scored text, other filler past the scored tokens: other prompts, which `clakit report`
    said were "the same prompts for every model". Refused by the prompts' digest; reports without one (older
    clakit) are compared by their settings as before."""
    from clakit.eval.comparison import check_comparable

    kw = dict(lengths=[200], depths=[0.5], samples=2)
    digests = [passkey.prompts_sha256(passkey.prepare(tokenizer, text, settings(**kw), WINDOW))
               for text in (FILLER, FILLER[:1500] + make_text(3000, 77), FILLER)]  # fmt: skip
    assert digests[0] == digests[2] != digests[1]
    base = {"data": {"sha256": "x"}, "num_tokens": 64, "settings": {"seq_len": 32, "stride": 32, "batch_size": 2}}
    runs = [{**base, "passkey": {"settings": kw, "prompts_sha256": d}} for d in digests]
    with pytest.raises(ClakitError, match="b.json with a.json: their passkey prompts differ"):
        check_comparable(runs[:2], ["a.json", "b.json"])
    check_comparable([runs[0], runs[2]], ["a.json", "c.json"])
    check_comparable([runs[1], {**base, "passkey": {"settings": kw}}], ["b.json", "old.json"])


@pytest.mark.parametrize(
    "decoy", ["The pass key is 12345.", "the PASSKEY was 4", "a pass-key: 4", "pass_keys", "pass_key_1=7", "passkey2"]
)
def test_filler_that_speaks_of_a_pass_key_is_refused(tokenizer, decoy):
    """Filler text repeating "The pass key is 12345. ... What is the pass key?" passed: a model that retrieves
    would often answer the filler's key, and the accuracy was reported as retrieval's."""
    filler = make_text(3000, 1)
    middle = len(filler) // 2
    settings = passkey.PasskeySettings([256], [0.5], samples=1)
    found = r"the passkey filler \(from the --data text\) contains '[pP].*[kK][eE][yY]s?'"
    with pytest.raises(ClakitError, match=found):
        passkey.prepare(tokenizer, filler[:middle] + f" {decoy} " + filler[middle:], settings, 2048)
    assert passkey.prepare(tokenizer, filler, settings, 2048).cells  # the same text without it
    other_words = " pass keyboards to the bypass keys, a compass keystone "
    keyboard = filler[:middle] + other_words + filler[middle:]
    assert passkey.prepare(tokenizer, keyboard, settings, 2048).cells


def test_an_answer_ends_at_its_first_stop_token():
    """Digits a model writes after its EOS are not its answer: with 8 tokens always decoded and special tokens
    skipped in the decode, `EOS 12345` was scored as the key (helper Y)."""
    from types import SimpleNamespace

    from clakit.eval.passkey import stop_ids, until_stop

    tokenizer = SimpleNamespace(eos_token_id=2)
    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[2, 7]))
    stops = stop_ids(model, tokenizer)
    assert stops == {2, 7}
    assert until_stop(torch.tensor([5, 6, 7, 9, 9]), stops) == [5, 6]
    assert until_stop(torch.tensor([2, 9, 9]), stops) == []
    assert until_stop(torch.tensor([5, 6]), stops) == [5, 6]
    assert stop_ids(SimpleNamespace(), SimpleNamespace(eos_token_id=None)) == set()
