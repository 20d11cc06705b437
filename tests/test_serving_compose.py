"""vLLM serving (serving/vllm, the clakit_vllm plugin) of CLA checkpoints under composed features: layouts whose
consumers sit far from their producers, engine features (prefix caching, chunked prefill, preemption, KV-cache
quantisation with per-layer exceptions), and the KV capacity vLLM allocates for non-uniform layouts.

Each test runs its engines in one vLLM process (serving_vllm_fixtures.run_engines) on tiny models built in code and
compares vLLM's greedy tokens with transformers' (fp32) on the same checkpoint, or with another engine's where the
feature has no transformers counterpart.
"""

import json
import subprocess
from pathlib import Path

import pytest
from conftest import make_text, save_checkpoint, tiny_model
from serving_vllm_fixtures import hf_greedy, run_engines, vllm_env, vllm_python  # noqa: F401  (fixture)

from clakit.convert import convert

# 6 layers, head_dim 32 (vLLM's CPU attention supports 32, 64, 80, ...)
TINY = dict(num_hidden_layers=6, hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)
# producers 0, 1, 2, 5; layers 3 and 4 read layer 0 (3 and 4 layers back), not next to it
LAYOUT = [0, 1, 2, 0, 0, 5]
MIB = 2**20


@pytest.fixture(scope="module")
def nonadjacent_llama(tokenizer, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vllm_compose")
    stock = save_checkpoint(tiny_model("llama", **TINY, max_position_embeddings=1024), tokenizer, root / "stock")
    return convert(stock, root / "cla", kv_source_layers=LAYOUT, init="mean", quiet=True)


def text_prompts(tokenizer, lengths: list[int]) -> list[list[int]]:
    """Prompts of the given token counts, cut from different places of one generated text."""
    ids = tokenizer(make_text(3000, 7)).input_ids
    return [ids[7 * i : 7 * i + n] for i, n in enumerate(lengths)]


@pytest.mark.slow
def test_a_consumer_reads_its_producers_cache_dtype_when_layers_skip_kv_quantisation(
    vllm_python,  # noqa: F811
    nonadjacent_llama,
    tokenizer,
    tmp_path,
):
    """vLLM's --kv-cache-dtype-skip-layers keeps the named layers' caches unquantised. A consumer has no cache of its
    own: it reads its producer's, so it must take the producer's cache dtype whatever the list says of it. Skipping
    every producer is then an unquantised cache (tokens of kv_cache_dtype auto), and skipping only consumers changes
    nothing (tokens of plain fp8). (Before: the consumers kept fp8 and read the producers' bf16 cache as fp8: the
    engine died with `key_cache must be uint8 for FP8 path`.)"""
    prompts = text_prompts(tokenizer, [20, 150])
    base = dict(model=str(nonadjacent_llama), prompts=prompts, max_tokens=8, dtype="bfloat16")
    producers = [str(layer) for layer, source in enumerate(LAYOUT) if source == layer]
    consumers = [str(layer) for layer, source in enumerate(LAYOUT) if source != layer]
    engines = {
        "auto": {},
        "fp8": dict(kv_cache_dtype="fp8"),
        "fp8, consumers skipped": dict(kv_cache_dtype="fp8", kv_cache_dtype_skip_layers=consumers),
        "fp8, producers skipped": dict(kv_cache_dtype="fp8", kv_cache_dtype_skip_layers=producers),
    }
    runs = [{**base, "engine": dict(kv_cache_memory_bytes=16 * MIB, **e)} for e in engines.values()]
    results = dict(zip(engines, run_engines(vllm_python, runs, tmp_path), strict=True))
    errors = {name: r["error"] for name, r in results.items() if "error" in r}
    assert not errors, errors
    tokens = {name: r["tokens"][0] for name, r in results.items()}
    assert tokens["fp8, producers skipped"] == tokens["auto"], tokens
    assert tokens["fp8, consumers skipped"] == tokens["fp8"], tokens


@pytest.mark.slow
def test_clakit_vllm_run_refuses_a_max_model_len_beyond_the_models_context(
    vllm_python,  # noqa: F811
    nonadjacent_llama,
    tmp_path,
):
    """vLLM refuses a max_model_len above max_position_embeddings (1024 here) in a pydantic traceback after its
    start-up; clakit_vllm.run now says so in one line before it (before: exit 1, `1 validation error for
    ModelConfig`)."""
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([[5, 6, 7]]))
    base = [str(vllm_python), "-m", "clakit_vllm.run", str(nonadjacent_llama), "--prompts-json", str(prompts)]
    proc = subprocess.run(
        [*base, "--max-model-len", "1025"], env=vllm_env(), capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, (proc.returncode, proc.stderr[-3000:])
    assert "--max-model-len 1025 exceeds the model's context of 1024 tokens" in lines[0], lines


@pytest.fixture(scope="module")
def cla2_llama(nonadjacent_llama) -> Path:
    """CLA2 of the same stock model: [0, 0, 2, 2, 4, 4], whose last layer is a consumer."""
    root = nonadjacent_llama.parent
    return convert(root / "stock", root / "cla2", factor=2, init="mean", quiet=True)


@pytest.mark.slow
def test_kv_sharing_fast_prefill_is_refused_where_the_last_layers_are_consumers(
    vllm_python,  # noqa: F811
    nonadjacent_llama,
    cla2_llama,
    tokenizer,
    tmp_path,
):
    """vLLM's kv_sharing_fast_prefill (for YOCO-style models such as Gemma-3n) gives the trailing KV-sharing layers
    attention metadata for the sampled tokens only, while a CLA model runs every prompt token through them. Where
    the last layer is a consumer (every CLA2) it is refused in one line at load (before: served, greedy tokens
    unlike transformers' from the first); where it is a producer nothing is skipped and the tokens are right."""
    prompts = text_prompts(tokenizer, [5, 40, 150])
    engine = dict(kv_cache_memory_bytes=16 * MIB, kv_sharing_fast_prefill=True)
    runs = [dict(model=str(m), prompts=prompts, max_tokens=6, engine=engine) for m in (nonadjacent_llama, cla2_llama)]
    producer_last, consumer_last = run_engines(vllm_python, runs, tmp_path)
    assert producer_last.get("tokens") == [hf_greedy(nonadjacent_llama, prompts, 6)], producer_last
    refusal = "clakit_vllm: cannot serve this CLA checkpoint: kv_sharing_fast_prefill"
    assert refusal in consumer_last.get("error", ""), (consumer_last, hf_greedy(cla2_llama, prompts, 6))
    assert "trailing consumer layers [5]" in consumer_last["error"], consumer_last
