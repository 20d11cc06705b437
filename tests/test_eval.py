"""The eval suite on tiny models: perplexity against a hand-written reference, window coverage, bits per byte,
KV-cache bytes, the `evaluate` module, reports, and every bad input through the CLI."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import make_text, tiny_model

from clakit.convert.inmemory import cla_model_from
from clakit.convert.layout import uniform_layout
from clakit.errors import ClakitError
from clakit.eval import EvalConfig, evaluate, kvcache, perplexity
from clakit.eval.perplexity import metrics, tokenize, windows


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def text():
    return make_text(600, seed=11)


def reference_ppl(model, ids: torch.Tensor, seq_len: int, stride: int) -> float:
    """Token by token: target i is predicted from the inputs of the window that scores it (module docstring)."""
    last = len(ids) - 1
    nll = []
    for i in range(1, last + 1):
        end = min(last, seq_len) if i <= seq_len else min(last, seq_len + stride * math.ceil((i - seq_len) / stride))
        start = max(0, end - seq_len)
        with torch.no_grad():
            logits = model(input_ids=ids[start:i].unsqueeze(0)).logits[0, -1]
        nll.append(F.cross_entropy(logits.float(), ids[i]).item())
    return math.exp(sum(nll) / len(nll))


@pytest.mark.parametrize(("seq_len", "stride"), [(16, 16), (16, 5), (16, 1)])
def test_perplexity_equals_hand_written_reference(model, tokenizer, text, seq_len, stride):
    ids = tokenize(tokenizer, text, max_tokens=60).ids
    ours = perplexity.perplexity(model, tokenizer, text, seq_len=seq_len, stride=stride, max_tokens=60, batch_size=3)
    assert ours["num_tokens"] == len(ids) - 1 == 60  # the prefix token makes every text token a target
    assert ours["perplexity"] == pytest.approx(reference_ppl(model, ids, seq_len, stride), rel=1e-5)


@pytest.mark.parametrize("n", [2, 17, 33, 64, 100])
@pytest.mark.parametrize(("seq_len", "stride"), [(16, 16), (16, 7), (16, 1), (32, 31), (1, 1)])
def test_windows_score_every_token_after_the_first_exactly_once(n, seq_len, stride):
    wins = windows(n, seq_len, stride)
    scored = [t for w in wins for t in range(w.end - w.scored + 1, w.end + 1)]
    assert scored == list(range(1, n))  # each once, in order
    for w in wins:
        assert 0 < w.scored <= w.end - w.start <= seq_len  # scored targets lie inside the window
    for w in wins[1:]:  # after the first window every scored target has >= seq_len - stride tokens of context
        assert w.end - w.scored + 1 - w.start >= min(seq_len - stride + 1, w.end - w.start)


def test_bits_per_byte_and_word_perplexity_on_a_known_text():
    text = "ab cd\n  ef é"  # 13 UTF-8 bytes (é is 2), 4 words by lm-eval's re.split(r"\s+")
    m = metrics(nll_sum=2 * 13 * math.log(2), num_scored=10, text=text)
    assert m["num_bytes"] == 13 and m["num_words"] == 4
    assert m["bits_per_byte"] == pytest.approx(2.0)
    assert m["word_perplexity"] == pytest.approx(math.exp(2 * 13 * math.log(2) / 4))
    assert m["perplexity"] == pytest.approx(math.exp(2 * 13 * math.log(2) / 10))


def test_uniform_model_has_perplexity_equal_to_vocab_size(tokenizer, text):
    model = tiny_model("llama")
    torch.nn.init.zeros_(model.lm_head.weight)  # every next-token distribution is uniform: NLL = ln V per token
    r = evaluate(model, tokenizer=tokenizer, text=text, seq_len=32, max_tokens=200, speed=False, quiet=True)
    vocab = model.config.vocab_size
    assert r["perplexity"] == pytest.approx(vocab, rel=1e-5)
    assert r["bits_per_byte"] == pytest.approx(200 * math.log2(vocab) / r["data"]["num_bytes"], rel=1e-5)
    assert r["data"]["num_bytes"] == len(tokenize(tokenizer, text, 200).text.encode())


def test_same_inputs_give_the_same_numbers(model, tokenizer, text):
    a, b = (
        evaluate(model, tokenizer=tokenizer, text=text, seq_len=32, stride=8, max_tokens=300, speed=False, quiet=True)
        for _ in range(2)
    )
    assert (a["perplexity"], a["bits_per_byte"]) == (b["perplexity"], b["bits_per_byte"])


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_cla2_measured_cache_is_half_the_original(kind):
    model = tiny_model(kind, sliding_window=None) if kind == "mistral" else tiny_model(kind)
    cla2 = cla_model_from(model, uniform_layout(4, 2))
    ids = torch.arange(40).unsqueeze(0)
    full, half = kvcache.measured_bytes(model, ids), kvcache.measured_bytes(cla2, ids)
    assert half * 2 == full
    assert full == kvcache.bytes_per_token(model.config, torch.float32) * 40  # computed matches measured
    assert half == kvcache.bytes_per_token(cla2.config, torch.float32) * 40


@pytest.mark.parametrize("seq_len", [10, 40])
@pytest.mark.parametrize("layout", [None, [0, 0, 2, 2]])
def test_sliding_window_cache_bytes_match_what_the_cache_holds(tokenizer, text, seq_len, layout):
    """Mistral's sliding window (16 here): right after a prefill every layer still holds all seq_len tokens (the
    cache keeps a view of the last 15, whose storage is the whole tensor), so the KV budget's batch is sized by all
    of them; once decoding is past the window a layer holds 16 tokens (bytes_per_sequence_decoding)."""
    model = tiny_model("mistral", sliding_window=16)
    model = cla_model_from(model, layout) if layout else model
    ids = torch.arange(seq_len).unsqueeze(0)
    computed = kvcache.bytes_per_sequence(model.config, torch.float32, seq_len)
    assert computed == kvcache.measured_bytes(model, ids)
    per_token = kvcache.bytes_per_token(model.config, torch.float32)
    assert computed == per_token * seq_len
    r = evaluate(model, tokenizer=tokenizer, text=text, seq_len=seq_len, speed=False, quiet=True, max_tokens=200)
    assert r["kv_cache"]["bytes_per_sequence"] == computed == r["kv_cache"]["measured_bytes"]
    assert r["kv_cache"]["bytes_per_sequence_decoding"] == per_token * min(seq_len, 16)
    assert r["kv_cache"]["max_batch_size"] == int(16 * 2**30 // computed)


def test_report_dict_keys_and_saving_factor(model, tokenizer, text):
    layout = [0, 1, 1, 3]  # non-uniform: 3 producers of 4
    r = evaluate(
        cla_model_from(model, layout),
        tokenizer=tokenizer,
        text=text,
        seq_len=32,
        batch_size=2,
        decode_steps=2,
        quiet=True,
        name="cla",
    )
    for key in ("perplexity", "word_perplexity", "bits_per_byte", "num_tokens", "settings", "provenance"):
        assert key in r
    kv = r["kv_cache"]
    assert kv["measured_bytes"] == kv["bytes_per_token"] * 32
    assert kv["saving_factor"] == pytest.approx(4 / 3)
    assert (
        kv["max_batch_size"] == int(16 * 2**30 // (kv["bytes_per_token"] * 32))
        and kv["bytes_per_sequence"] == 32 * kv["bytes_per_token"]
    )
    assert r["speed"]["prefill_tokens_per_s"] > 0 and r["speed"]["decode_tokens_per_s"] > 0
    assert r["speed"]["decode_steps"] == r["provenance"]["config"]["decode_steps"] == 2  # timed as recorded
    assert r["provenance"]["transformers"] and r["provenance"]["device"] == "cpu"


def test_evaluate_module_matches_clakit_perplexity(model, tokenizer):
    import evaluate as hf_evaluate

    from clakit.eval.metric import METRIC_PATH

    texts = [make_text(150, 3), make_text(150, 4)]
    scores = hf_evaluate.load(METRIC_PATH).compute(predictions=texts, model=model, tokenizer=tokenizer, seq_len=24)
    direct = perplexity.perplexity(model, tokenizer, "\n\n".join(texts), seq_len=24)
    assert scores["perplexity"] == pytest.approx(direct["perplexity"], rel=1e-9)
    assert scores["num_tokens"] == direct["num_tokens"] > 0


def test_lm_eval_missing_gives_install_message(model, tokenizer, text, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "lm_eval", None)  # import lm_eval -> ImportError
    with pytest.raises(ClakitError, match=r'pip install "clakit\[lm-eval\]"'):
        evaluate(model, tokenizer=tokenizer, text=text, seq_len=32, lm_eval_tasks="hellaswag", quiet=True)


def test_saving_factor_against_an_explicit_source_model(model, tokenizer, text, tiny_llama_checkpoint):
    cla4 = cla_model_from(model, [0, 0, 0, 0])  # one producer of 4 layers
    r = evaluate(
        cla4,
        tokenizer=tokenizer,
        text=text,
        seq_len=32,
        max_tokens=64,
        speed=False,
        quiet=True,
        source_model=str(tiny_llama_checkpoint),
    )
    assert r["kv_cache"]["saving_factor"] == 4.0 and r["kv_cache"]["source"] == str(tiny_llama_checkpoint)


@pytest.mark.parametrize("other", [dict(num_hidden_layers=6), dict(hidden_size=96, head_dim=12)])
def test_a_source_model_of_another_shape_is_refused_before_loading(tokenizer, text, tiny_llama_checkpoint, other):
    """A KV saving against a model this one cannot have been converted from (other layers or width) means nothing."""
    from conftest import tiny_model

    cla = cla_model_from(tiny_model("llama", **other), [0, 0, 2, 2, 4, 4][: other.get("num_hidden_layers", 4)])
    key = next(iter(other))
    with pytest.raises(ClakitError, match=f"has {key} .* but the evaluated model has {other[key]}"):
        evaluate(cla, tokenizer=tokenizer, text=text, seq_len=32, speed=False, quiet=True,
                 source_model=str(tiny_llama_checkpoint))  # fmt: skip


def test_recorded_source_prefers_the_resolved_local_path(tmp_path, tiny_llama_checkpoint):
    from clakit.eval.suite import _recorded_source

    record = {"settings": {"source": "org/name"}, "source": {"spec": "org/name", "path": str(tiny_llama_checkpoint)}}
    (tmp_path / "clakit_convert.json").write_text(json.dumps(record))
    assert _recorded_source(tmp_path) == ("org/name", str(tiny_llama_checkpoint))
    (tmp_path / "clakit_convert.json").write_text(json.dumps({"settings": {"source": "org/gone"}}))
    assert _recorded_source(tmp_path) == ("org/gone", None)  # not on disk: no download, stock-layout reference


class MixedPrecision(torch.nn.Module):
    """fp32 parameters computing in bf16, as under FSDP's mixed precision (uptrain's reports of a sharded student)."""

    def __init__(self, model):
        super().__init__()
        self.master, self.config = model, model.config
        self.compute = [copy.deepcopy(model).to(torch.bfloat16)]  # a list: not a submodule, so not a parameter

    def forward(self, **kwargs):
        return self.compute[0](**kwargs)


def test_computed_cache_bytes_use_the_dtype_the_cache_holds(tokenizer, text):
    """fp32 weights computing in bf16 keep a bf16 cache: the report computed fp32 bytes beside the measured bf16
    ones, twice the real cache and half the batch a KV budget holds."""
    model = MixedPrecision(cla_model_from(tiny_model("llama"), [0, 0, 2, 2]))
    assert next(model.parameters()).dtype == torch.float32
    r = evaluate(model, tokenizer=tokenizer, text=text, seq_len=32, speed=False, quiet=True, max_tokens=200)
    kv = r["kv_cache"]
    assert kv["dtype"] == "bfloat16" and kv["bytes_per_sequence"] == kv["measured_bytes"]
    assert kv["bytes_per_token"] == kvcache.bytes_per_token(model.config, torch.bfloat16)


@pytest.mark.parametrize("steps", [0, -3, 2.5, True])
def test_decode_steps_that_time_nothing_are_refused_before_any_work(steps):
    """evaluate(decode_steps=0) wrote decode_tokens_per_s 0.0, a report `clakit report` refuses; negatives were
    recorded as given. decode_steps is an EvalConfig field now (`--decode-steps`, recorded with the others)."""
    found = "decode-steps must be a positive integer" if type(steps) is int else "decode_steps must be int"
    with pytest.raises(ClakitError, match=found):
        evaluate("/nowhere", decode_steps=steps, quiet=True)
    with pytest.raises(ClakitError, match=found):
        EvalConfig(decode_steps=steps)
