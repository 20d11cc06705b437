"""Are `clakit eval`'s and `clakit report`'s numbers right in general: perplexity against a computation written
here from the docs, KV bytes against the cache tensors for many shapes, passkey decoding inside the window, and
`clakit report` on many models and on reports from older clakit versions."""

import copy
import itertools
import json
import math
import re

import matplotlib.figure
import matplotlib.image
import pytest
import torch
import torch.nn.functional as F
from conftest import build_tokenizer, make_text, save_checkpoint, tiny_kwargs, tiny_model

from clakit.cli import main
from clakit.convert.inmemory import cla_model_from
from clakit.errors import ClakitError
from clakit.eval import comparison, evaluate, kvcache, passkey


def hand_nll(model, ids: list[int], seq_len: int) -> tuple[float, int]:
    """docs/eval.md's disjoint windows, written out: targets s+1 .. s+seq_len are predicted from the seq_len inputs
    ending just before the last of them (the last window reaches back a full seq_len)."""
    nll, n, last = 0.0, 0, len(ids) - 1
    for s in range(0, last, seq_len):
        end = min(s + seq_len, last)
        start = max(0, end - seq_len)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids[start:end]])).logits[0]  # (end - start, V)
        k = end - s  # targets this window scores
        nll += F.cross_entropy(logits[-k:].float(), torch.tensor(ids[end - k + 1 : end + 1]), reduction="sum").item()
        n += k
    return nll, n


def test_a_report_equals_the_hand_computation_on_several_files_of_multibyte_text(tmp_path):
    """An EOS-only tokenizer (the prefix is EOS), two --data files with 2-4 byte characters joined by a blank line,
    a model whose window (48) is below the default --seq-len (1024): every number from the definitions."""
    tokenizer = build_tokenizer()
    tokenizer.bos_token = None
    ckpt = save_checkpoint(tiny_model("llama", max_position_embeddings=48), tokenizer, tmp_path / "ckpt")
    texts = [make_text(120, 5) + "\nnaïve café 日本語 🙂\n", "Ünïcödé " + make_text(90, 6)]
    files = [tmp_path / "a.txt", tmp_path / "b.txt"]
    for f, t in zip(files, texts, strict=True):
        f.write_text(t)
    argv = ["eval", ckpt, "-o", tmp_path / "r.json", "--data", *files, "--no-speed", "-q", "--batch-size", "3"]
    assert main([str(a) for a in argv]) == 0
    r = json.loads((tmp_path / "r.json").read_text())
    text = "\n\n".join(texts)
    ids = [tokenizer.eos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]
    nll, n = hand_nll(tiny_model("llama", max_position_embeddings=48), ids, 48)
    assert r["settings"]["seq_len"] == 48 and r["num_tokens"] == n == len(ids) - 1
    assert r["data"]["sources"] == [str(f) for f in files]
    assert r["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-6)
    assert r["bits_per_byte"] == pytest.approx(nll / (len(text.encode()) * math.log(2)), rel=1e-6)
    assert r["word_perplexity"] == pytest.approx(math.exp(nll / len(re.split(r"\s+", text))), rel=1e-6)


def test_without_a_prefix_token_max_tokens_still_scores_that_many_tokens():
    """No BOS and no EOS: the first token is context only. --max-tokens 32 --seq-len 32 was refused as "the text
    has 31 tokens, fewer than one window" (the text had thousands), and --max-tokens 64 scored 63."""
    tokenizer = build_tokenizer()
    tokenizer.bos_token, tokenizer.eos_token = None, None
    text = make_text(3000, 1)
    for max_tokens in (32, 64):
        r = evaluate(tiny_model(), tokenizer=tokenizer, text=text, seq_len=32, max_tokens=max_tokens, speed=False,
                     quiet=True)  # fmt: skip
        assert r["num_tokens"] == max_tokens
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][: max_tokens + 1]
        scored = tokenizer.decode(ids[1:])  # the bytes of the scored tokens, not of the context token
        assert r["data"]["num_bytes"] == len(scored.encode())


SHAPES = list(itertools.product([4, 2, 1], [None, 16]))  # KV heads (MHA, GQA, MQA) x head_dim (derived, explicit)
LAYOUTS = [None, [0, 0, 2, 2], [0, 1, 1, 3], [0, 0, 0, 3], [0, 1, 2, 3], [0, 0, 0, 0]]


@pytest.mark.parametrize(("kv_heads", "head_dim"), SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_computed_kv_bytes_equal_the_cache_tensors(kv_heads, head_dim, dtype):
    """Stock, uniform, non-adjacent, identity and single-producer layouts; what a DynamicCache holds after a prefill
    equals bytes_per_token x tokens, in the dtype the cache holds."""
    extra = {"head_dim": head_dim} if head_dim else {}
    stock = tiny_model("llama", num_key_value_heads=kv_heads, **extra)
    ids = torch.arange(1, 30).unsqueeze(0)  # (1, 29)
    for layout in LAYOUTS:
        model = (cla_model_from(stock, layout) if layout else stock).to(dtype)
        measured, held = kvcache.measured_cache(model, ids)
        producers = len(set(layout)) if layout else 4
        per_token = producers * 2 * kv_heads * (head_dim or 12) * held.itemsize  # written out, not the function
        assert held == dtype and kvcache.bytes_per_token(model.config, held) == per_token
        assert measured == per_token * 29 == kvcache.bytes_per_sequence(model.config, held, 29)


def test_the_longest_default_passkey_prompt_and_its_answer_stay_inside_the_window(tokenizer):
    """A 256-token window: the default length is the longest that fits, and decoding its answer feeds no position
    past the window."""
    model = tiny_model("llama", max_position_embeddings=256)
    prepared = passkey.prepare(tokenizer, make_text(3000, 7), passkey.PasskeySettings(depths=[1.0], samples=1), 256)
    seen = []
    model.register_forward_pre_hook(lambda _, args, kw: seen.append(kw["input_ids"].shape[1]), with_kwargs=True)
    passkey.run(model, tokenizer, prepared)
    assert prepared.lengths == [256 - 5 - passkey.EXTRA_TOKENS] and seen[0] == prepared.lengths[0]
    assert sum(seen) == prepared.lengths[0] + 5 + passkey.EXTRA_TOKENS - 1 <= 256  # every fed token has a position


def passkey_report(i: int, lengths=(256, 512, 1024), depths=(0.0, 0.5, 1.0)) -> dict:
    cells = [{"length": n, "depth": d, "accuracy": ((7 * i + 3 * j + k) % 11) / 10, "correct": 0, "samples": 10}
             for j, n in enumerate(lengths) for k, d in enumerate(depths)]  # fmt: skip
    settings = {"lengths": list(lengths), "depths": list(depths), "samples": 10, "seed": 0, "new_tokens": 8}
    name = "runs/m$\\foo{$" if i == 0 else f"runs/m{i}"  # mathtext in a tick label raised before (test_eval_breakit)
    return {"model": name, "passkey": {"accuracy": 0.5, "cells": cells, "settings": settings}}


def drawn_images(monkeypatch, reports, path) -> list:
    """The accuracy arrays heat_map draws, read from the figure as it is saved."""
    arrays = []

    def save(fig, *args, **kwargs):
        arrays.extend(im.get_array().tolist() for ax in fig.axes for im in ax.images)
        return original(fig, *args, **kwargs)

    original = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", save)
    comparison.heat_map(reports, path)
    return arrays


@pytest.mark.parametrize("models", [3, 9, 160])
def test_the_passkey_heat_map_of_many_models_stays_a_sane_size_and_shows_every_cell(tmp_path, monkeypatch, models):
    """One panel per model in one row made a 69,264-pixel-wide image at 160 models (1.2 MB inside report.html)."""
    reports = [passkey_report(i) for i in range(models)]
    arrays = drawn_images(monkeypatch, reports, tmp_path / "passkey.png")
    height, width = matplotlib.image.imread(tmp_path / "passkey.png").shape[:2]
    assert width <= 2000 and height <= 6500
    cells = [{(c["length"], c["depth"]): c["accuracy"] for c in r["passkey"]["cells"]} for r in reports]
    lengths, depths = (256, 512, 1024), (0.0, 0.5, 1.0)
    per_model = [[[cell[(n, d)] for n in lengths] for d in depths] for cell in cells]  # (depth, length) panels
    one_row_each = [[cell[(n, d)] for n in lengths for d in depths] for cell in cells]  # or a row per model
    assert arrays == per_model or arrays == [one_row_each]


def eval_report(tmp_path) -> dict:
    """A real report of a tiny model with speed and an lm-eval section, to copy into older and other versions."""
    r = evaluate(tiny_model(), tokenizer=build_tokenizer(), text=make_text(300, 8), seq_len=32, decode_steps=2,
                 quiet=True)  # fmt: skip
    r["lm_eval"] = {"tasks": {"t": {"acc": 0.5}}, "version": "0.4.13",
                    "settings": {"tasks": ["t"], "include": [], "limit": None, "num_fewshot": None, "batch_size": 4,
                                 "max_length": 32}}  # fmt: skip
    return r


def test_speeds_of_a_report_from_before_prefill_length_are_not_called_timed_differently(tmp_path):
    """clakit before 2026-12-04 wrote speed.prefill_tokens (batch x length) but no prefill_length: beside a new
    report of the same timing, report.md said "Speeds were timed differently (prefill None tokens x 4 ...)"."""
    new = eval_report(tmp_path)
    old = copy.deepcopy(new)
    del old["speed"]["prefill_length"]
    assert "timed differently" not in comparison.markdown([new, old])
    old["speed"]["prefill_tokens"] = new["speed"]["prefill_tokens"] // 2  # really another prefill: still said
    assert "timed differently (prefill 32 tokens x 4" in comparison.markdown([new, old])


def test_a_report_without_a_cache_dtype_is_not_called_another_dtype(tmp_path):
    new = eval_report(tmp_path)
    other = copy.deepcopy(new)
    del other["kv_cache"]["dtype"]  # a field records.FIELDS does not require
    assert "different dtypes" not in comparison.markdown([new, other])  # was: "(float32, None)"
    other["kv_cache"]["dtype"] = "bfloat16"
    assert "different dtypes (float32, bfloat16)" in comparison.markdown([new, other])


def test_lm_eval_scores_on_other_windows_are_refused(tmp_path):
    """Reports before lm_eval.settings.max_length ran lm-eval on the model's whole context (one window: 36.15
    against 51.45 on --seq-len 512 windows for one text); side by side they were shown as comparable."""
    new = eval_report(tmp_path)
    old = copy.deepcopy(new)
    del old["lm_eval"]["settings"]["max_length"]
    with pytest.raises(ClakitError, match=r"lm_eval\.settings\.max_length differs \(None vs 32\)"):
        comparison.check_comparable([new, old], ["new.json", "old.json"])
    comparison.check_comparable([new, copy.deepcopy(new)], ["new.json", "again.json"])  # same windows: fine


def test_the_evaluate_module_holds_seq_len_to_the_models_window(tokenizer):
    """`evaluate.load(METRIC_PATH).compute(...)` defaulted to seq_len 1024: on a 64-token-window model it scored
    positions 64-1023 the model never saw (a number, no warning), and a learned-position model raised IndexError.
    It now defaults as `clakit eval` does (the window, when shorter) and refuses a longer one in one line."""
    import evaluate as hf_evaluate

    from clakit.eval.metric import METRIC_PATH
    from clakit.eval.perplexity import perplexity

    model, text = tiny_model("llama", max_position_embeddings=64), make_text(3000, 2)
    scores = hf_evaluate.load(METRIC_PATH).compute(predictions=[text], model=model, tokenizer=tokenizer)
    assert scores == perplexity(model, tokenizer, text, seq_len=64)  # the window, not 1024
    with pytest.raises(ClakitError, match="seq_len 128 exceeds the model's context window .*64.*; use at most 64"):
        perplexity(model, tokenizer, text, seq_len=128)


def drawn_names(monkeypatch, reports, path) -> list[str]:
    names = []

    def save(fig, *args, **kwargs):
        names.extend(t.get_text() for ax in fig.axes for t in ax.texts)
        return original(fig, *args, **kwargs)

    original = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", save)
    comparison.plot(reports, path)
    return names


@pytest.mark.parametrize("models", [5, 160])
def test_the_perplexity_plot_of_many_models_names_the_frontier_not_every_point(tmp_path, monkeypatch, models):
    """160 names at 4 KV sizes were one unreadable block of overlapping text; past 20 models only the models no other
    beats on both KV bytes and perplexity are named (the table names them all)."""
    reports = [{"model": f"runs/lr{i % 8}/seed{i // 8}/model", "perplexity": 400.0 + (i * 37) % 160,
                "kv_cache": {"bytes_per_token": 768 - (i % 4) * 96}} for i in range(models)]  # fmt: skip
    # perplexities all differ (37 is prime to 160): the frontier has one model per KV size at most
    names = drawn_names(monkeypatch, reports, tmp_path / "ppl_vs_kv.png")
    points = [(r["kv_cache"]["bytes_per_token"], r["perplexity"]) for r in reports]
    best = [  # written out: the lowest perplexity at each KV size, where no smaller cache does as well
        i for i, (x, y) in enumerate(points) if y == min(b for a, b in points if a <= x)
    ]
    expected = range(models) if models <= comparison.LABELS_MAX else best
    assert sorted(names) == sorted(comparison.labels(reports)[i] for i in expected)
    assert 0 < len(names) <= comparison.LABELS_MAX


@pytest.mark.parametrize("layer_types", [None, ["sliding_attention"] * 4], ids=["window", "window-and-layer-types"])
def test_a_stock_llama_with_a_sliding_window_key_is_evaluated_as_the_model_it_is(tmp_path, tokenizer, layer_types):
    """Stock Llama's attention ignores a `sliding_window` key (a llamafied Qwen2's), but transformers' caches read it
    and kept only the last window: the original was reported at 5,376 KV bytes per sequence against 49,152 for its
    own all-producer conversion (the same model), and its cached decoding (passkeys, speed) read another model than
    its forward. Loaded by clakit, its cache now holds every token, as its attention reads them. With `layer_types`
    of "sliding_attention" too, the window was dropped and the types kept: every cache build failed (TypeError
    from a window-None sliding layer; eval a traceback, generate too), and convert wrote such a config."""
    from clakit.convert import convert
    from clakit.sources import load_model, resolve_source

    model = tiny_model("llama", sliding_window=8, **({"layer_types": layer_types} if layer_types else {}))
    stock = save_checkpoint(model, tokenizer, tmp_path / "stock")
    cla = convert(stock, tmp_path / "cla", kv_source_layers=[0, 1, 2, 3], init="mean", quiet=True)
    written = json.loads((cla / "config.json").read_text())
    assert written["sliding_window"] is None and set(written.get("layer_types") or ["full_attention"]) == {
        "full_attention"
    }, written
    (tmp_path / "t.txt").write_text(make_text(600, 3))
    reports = {}
    for name, folder in (("stock", stock), ("cla", cla)):
        argv = ["eval", folder, "-o", tmp_path / f"{name}.json", "--data", tmp_path / "t.txt", "--seq-len", "64",
                "--max-tokens", "256", "--no-speed", "-q"]  # fmt: skip
        assert main([str(a) for a in argv]) == 0
        reports[name] = json.loads((tmp_path / f"{name}.json").read_text())["kv_cache"]
    c = model.config  # every layer keeps K and V of (kv_heads, head_dim) in fp32 for all 64 tokens
    full = c.num_hidden_layers * 2 * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads) * 4 * 64
    assert reports["stock"]["measured_bytes"] == reports["stock"]["bytes_per_sequence"] == full, reports
    assert reports["cla"]["bytes_per_sequence"] == full, reports
    model = load_model(resolve_source(str(stock)))
    prompt = torch.randint(1, 300, (1, 12), generator=torch.Generator().manual_seed(0))
    cached = model.generate(prompt, max_new_tokens=12, do_sample=False, min_new_tokens=12)[0, 12:]
    ids = prompt
    for _ in range(12):  # no cache: the model's forward alone
        ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
    assert cached.tolist() == ids[0, 12:].tolist()
    cla_model = load_model(resolve_source(str(cla)))
    cached = cla_model.generate(prompt, max_new_tokens=12, do_sample=False, min_new_tokens=12)[0, 12:]
    assert cached.tolist() == ids[0, 12:].tolist()  # the all-producer conversion is the same model


@pytest.mark.parametrize("layer_types", [None, ["sliding_attention"] * 4], ids=["window", "window-and-layer-types"])
def test_an_in_memory_stock_llama_with_a_sliding_window_key_is_measured_and_decoded_as_it_computes(
    tokenizer, layer_types
):
    """The same model given to `evaluate` in memory (never through load_model, which drops the unused window): its
    measured cache kept the last 7 of 32 tokens (5,376 bytes against 24,576 computed, no note), and the passkey's
    and speed's cached decoding read another model than its forward. The caller's model is left as it was."""
    model = tiny_model("llama", sliding_window=8, **({"layer_types": layer_types} if layer_types else {})).eval()
    kv = evaluate(model, tokenizer=tokenizer, text=make_text(600, 3), seq_len=32, max_tokens=128, speed=False,
                  quiet=True)["kv_cache"]  # fmt: skip
    assert kv["measured_bytes"] == kv["bytes_per_sequence"] > 0, kv
    assert model.config.sliding_window == 8 and getattr(model.config, "layer_types", None) == layer_types
    prompt = torch.randint(1, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    ids = prompt
    for _ in range(10):  # no cache: the model's forward alone
        ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(passkey.greedy(model, prompt, 10), ids[:, 12:])


def test_a_sliding_window_model_other_than_llama_keeps_its_window(tmp_path, tokenizer):
    """`clakit eval` reads other causal LMs too, and their `sliding_window` is real (Qwen2's masks and layer_types
    apply it). e836313's rule was "Mistral's window only": load_model dropped a Qwen2's window (its forward then
    raised ValueError, and clakit eval died in a traceback) and the cache figures counted every token. Now only a
    Llama's key is no window: the Qwen2 loads with its window, computes its own logits, and eval counts window - 1
    tokens per layer, as transformers' cache holds them; the quantised cache refuses it."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from clakit.eval import kvquant
    from clakit.modeling import attention_window
    from clakit.sources import load_model, resolve_source

    torch.manual_seed(0)
    config = Qwen2Config(**tiny_kwargs(), use_sliding_window=True, sliding_window=8, max_window_layers=0)
    model = Qwen2ForCausalLM(config).eval()
    assert set(config.layer_types) == {"sliding_attention"}
    folder = save_checkpoint(model, tokenizer, tmp_path / "qwen2")
    loaded = load_model(resolve_source(str(folder)))
    assert loaded.config.sliding_window == 8
    ids = torch.randint(1, 300, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    with pytest.raises(ClakitError, match="full attention only"):
        kvquant.check(config, 8, 12)
    (tmp_path / "t.txt").write_text(make_text(600, 3))
    argv = ["eval", folder, "-o", tmp_path / "r.json", "--data", tmp_path / "t.txt", "--seq-len", "64",
            "--max-tokens", "256", "--no-speed", "-q"]  # fmt: skip
    assert main([str(a) for a in argv]) == 0
    kv = json.loads((tmp_path / "r.json").read_text())["kv_cache"]
    c = config  # after the prefill every layer holds all 64 tokens (a view of the last 7 keeps them); decoding, 8
    per_token = c.num_hidden_layers * 2 * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads) * 4
    assert kv["measured_bytes"] == kv["bytes_per_sequence"] == per_token * 64, kv
    assert kv["bytes_per_sequence_decoding"] == per_token * 8, kv
    assert attention_window(config) == 8
