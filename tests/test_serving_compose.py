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
import torch
from conftest import make_text, save_checkpoint, tiny_model
from serving_vllm_fixtures import (  # noqa: F401  (fixture)
    FP8_NEEDS,
    cpu_runs_fp8_kv,
    hf_greedy,
    run_engines,
    vllm_env,
    vllm_python,
)

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
    engine died with `key_cache must be uint8 for FP8 path`.) Skipping some producers only is refused."""
    prompts = text_prompts(tokenizer, [20, 150])
    base = dict(model=str(nonadjacent_llama), prompts=prompts, max_tokens=8, dtype="bfloat16")
    producers = [str(layer) for layer, source in enumerate(LAYOUT) if source == layer]
    consumers = [str(layer) for layer, source in enumerate(LAYOUT) if source != layer]
    engines = {
        "auto": {},
        "fp8": dict(kv_cache_dtype="fp8"),
        "fp8, consumers skipped": dict(kv_cache_dtype="fp8", kv_cache_dtype_skip_layers=consumers),
        "fp8, producers skipped": dict(kv_cache_dtype="fp8", kv_cache_dtype_skip_layers=producers),
        "fp8, one producer skipped": dict(kv_cache_dtype="fp8", kv_cache_dtype_skip_layers=["0"]),
        # a bf16 cache with a producer "skipped" (auto: the model's bf16) is one cache dtype, not a mixed one
        "bfloat16, one producer skipped": dict(kv_cache_dtype="bfloat16", kv_cache_dtype_skip_layers=["0"]),
    }
    runs = [{**base, "engine": dict(kv_cache_memory_bytes=16 * MIB, **e)} for e in engines.values()]
    results = dict(zip(engines, run_engines(vllm_python, runs, tmp_path), strict=True))
    if not cpu_runs_fp8_kv():  # vLLM's CPU fp8 cache needs AVX-512 or AMX: an AVX2-only host refuses every fp8 one
        fp8 = {name: r.get("error", "") for name, r in results.items() if name.startswith("fp8")}
        assert all(FP8_NEEDS in e or "clakit_vllm: cannot serve this CLA checkpoint" in e for e in fp8.values()), fp8
        assert results["bfloat16, one producer skipped"]["tokens"] == results["auto"]["tokens"], results
        return
    # producers with caches of different dtypes: vLLM's runner cannot share them (before: KeyError on layer 3's
    # attention after the weights loaded); refused in one line while the model is built
    mixed = results.pop("fp8, one producer skipped").get("error", "")
    assert "clakit_vllm: cannot serve this CLA checkpoint: --kv-cache-dtype-skip-layers gives" in mixed, mixed
    assert "auto for layers [0]; fp8 for layers [1, 2, 5]" in mixed, mixed
    errors = {name: r["error"] for name, r in results.items() if "error" in r}
    assert not errors, errors
    tokens = {name: r["tokens"][0] for name, r in results.items()}
    assert tokens["fp8, producers skipped"] == tokens["auto"], tokens
    assert tokens["fp8, consumers skipped"] == tokens["fp8"], tokens
    assert tokens["bfloat16, one producer skipped"] == tokens["auto"], tokens
    # and the capacity follows the producers' caches: an fp8 cache holds twice the blocks of a bf16 one
    blocks = {name: r["kv_cache_blocks"] for name, r in results.items()}
    assert blocks["fp8, producers skipped"] == blocks["auto"], blocks
    assert blocks["fp8, consumers skipped"] == blocks["fp8"] == 2 * blocks["auto"], blocks


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


@pytest.fixture(scope="module")
def windowed_mistral(tokenizer, tmp_path_factory) -> Path:
    """A tiny Mistral with tied embeddings and a sliding window of 8 (far shorter than the prompts), converted to a
    layout whose consumers are not next to their producers: layer 5 reads layer 1, layer 3 reads layer 0."""
    root = tmp_path_factory.mktemp("vllm_compose_mistral")
    model = tiny_model("mistral", **TINY, sliding_window=8, tie_word_embeddings=True, max_position_embeddings=1024)
    stock = save_checkpoint(model, tokenizer, root / "stock")
    return convert(stock, root / "cla", kv_source_layers=[0, 1, 1, 0, 4, 1], init="mean", quiet=True)


@pytest.mark.slow
def test_engine_features_serve_transformers_tokens(
    vllm_python,  # noqa: F811
    nonadjacent_llama,
    windowed_mistral,
    tokenizer,
    tmp_path,
):
    """Greedy tokens equal transformers' (fp32) under vLLM's engine features that move K/V around: prompts of 1-3
    cache blocks (128 tokens) batched with short ones, prefix caching off and on (every run's second pass hits it),
    chunked prefill in 32-token
    steps, Mistral's window of 8 shorter than every prompt but one, a cache so small that requests are preempted and
    recomputed (vllm:num_preemptions > 0), and a prompt filling the context to its last token."""
    mixed = text_prompts(tokenizer, [5, 40, 150, 300])
    crossing = text_prompts(tokenizer, [120 + i for i in range(8)])  # each needs a second block while decoding
    edge = text_prompts(tokenizer, [1024 - 4])  # + 4 new tokens = max_position_embeddings
    small = dict(kv_cache_memory_bytes=16 * MIB)
    cases = {
        "mistral": (windowed_mistral, mixed, 8, dict(**small, enable_prefix_caching=False)),
        "mistral, prefix cache": (windowed_mistral, mixed, 8, dict(**small, enable_prefix_caching=True)),
        "mistral, chunked": (
            windowed_mistral,
            mixed,
            8,
            dict(**small, max_num_batched_tokens=32, enable_chunked_prefill=True, max_model_len=512),
        ),
        "llama, chunked": (
            nonadjacent_llama,
            mixed,
            8,
            dict(**small, max_num_batched_tokens=32, enable_chunked_prefill=True, max_model_len=512),
        ),
        # 8 blocks of 128 tokens (4 producers x 2 KV heads x 32 x 2 x fp32 = 2 KiB per token)
        "llama, preempted": (
            nonadjacent_llama,
            crossing,
            12,
            dict(kv_cache_memory_bytes=8 * 128 * 2048, max_model_len=256, disable_log_stats=False),
        ),
        "llama, full context": (nonadjacent_llama, edge, 4, dict(**small)),
    }
    runs = [dict(model=str(m), prompts=p, max_tokens=n, engine=e, passes=2) for m, p, n, e in cases.values()]
    results = dict(zip(cases, run_engines(vllm_python, runs, tmp_path), strict=True))
    errors = {name: r["error"] for name, r in results.items() if "error" in r}
    assert not errors, errors
    assert results["llama, preempted"]["kv_cache_blocks"] == 8, results["llama, preempted"]
    assert results["llama, preempted"]["metrics"]["vllm:num_preemptions"] > 0, results["llama, preempted"]
    references = {}
    for name, (model, prompts, max_tokens, _) in cases.items():
        key = (model, id(prompts), max_tokens)
        references[key] = references.get(key) or hf_greedy(model, prompts, max_tokens)
        assert results[name]["tokens"] == [references[key]] * 2, name


@pytest.mark.slow
def test_kv_capacity_scales_with_producers_and_kv_heads(vllm_python, tokenizer, tmp_path):  # noqa: F811
    """At the same cache bytes vLLM's block count is the stock model's times layers / producers for a non-uniform
    layout (6 / 4 = 1.5 for [0, 1, 2, 0, 0, 5]; 6 for one producer), and KV heads merged 2 -> 1 double it again;
    clakit_vllm's report (kv_cache_tokens) is blocks x block_size for these full-attention models."""
    from clakit.convert import kvheads

    stock = tiny_model("llama", **TINY)
    folders = {"stock": save_checkpoint(stock, tokenizer, tmp_path / "stock")}
    folders["merged"] = save_checkpoint(kvheads.merge_kv_heads(stock, 1), tokenizer, tmp_path / "merged")
    conversions = {"stock cla": ("stock", LAYOUT), "one producer cla": ("stock", [0] * 6)}
    conversions["merged cla"] = ("merged", LAYOUT)
    for name, (source, layout) in conversions.items():
        dest = tmp_path / name.replace(" ", "_")
        folders[name] = convert(folders[source], dest, kv_source_layers=layout, init="mean", quiet=True)
    engine = dict(kv_cache_memory_bytes=48 * MIB, max_model_len=256)
    runs = [dict(model=str(f), prompts=[[5, 6, 7]], max_tokens=1, engine=engine) for f in folders.values()]
    blocks = {}
    for name, result in zip(folders, run_engines(vllm_python, runs, tmp_path), strict=True):
        assert result["kv_cache_tokens"] == result["kv_cache_blocks"] * result["block_size"], (name, result)
        blocks[name] = result["kv_cache_blocks"]
    expected = {"stock cla": 1.5, "one producer cla": 6, "merged": 2, "merged cla": 3}
    ratios = {name: blocks[name] / blocks["stock"] for name in expected}
    assert all(abs(ratios[n] - expected[n]) < 0.02 for n in expected), (ratios, blocks)


@pytest.mark.slow
def test_clakit_vllm_runs_kv_cache_bytes_wins_over_the_environment(
    vllm_python,  # noqa: F811
    nonadjacent_llama,
    tmp_path,
):
    """--kv-cache-bytes is the cache size even where VLLM_CPU_KVCACHE_SPACE is set (vLLM's CPU platform lets the
    variable override the engine argument: before, 1 GiB, 4,096 blocks, was allocated and reported for 16 MiB)."""
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([[5, 6, 7]]))
    cmd = [str(vllm_python), "-m", "clakit_vllm.run", str(nonadjacent_llama), "--prompts-json", str(prompts)]
    cmd += ["--max-tokens", "2", "--kv-cache-bytes", str(16 * MIB), "--max-model-len", "256"]
    proc = subprocess.run(cmd, env=vllm_env(), capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert vllm_env()["VLLM_CPU_KVCACHE_SPACE"] == "1"
    lines = [line for line in proc.stdout.splitlines() if line.startswith("CLAKIT_VLLM_RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    result = json.loads(lines[-1].split(" ", 1)[1])
    # 4 producers x 2 KV heads x 32 x (K and V) x 4 bytes = 2 KiB per token, 128 tokens per block
    assert (result["kv_cache_blocks"], result["kv_cache_bytes"]) == (16 * MIB // (2048 * 128), 16 * MIB), result


@pytest.mark.slow
def test_a_peft_lora_adapter_on_a_cla_model_serves_peft_tokens(
    vllm_python,  # noqa: F811
    nonadjacent_llama,
    tokenizer,
    tmp_path,
):
    """vLLM's LoRA on a CLA model: an adapter on q/k/v/o_proj (PEFT gives consumers q/o only: they have no k/v_proj)
    serves the tokens of the adapter merged into the model in transformers, and the base model's without it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(nonadjacent_llama, dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets, lora_dropout=0.0))
    torch.manual_seed(1)
    with torch.no_grad():  # PEFT starts B at 0, a no-op adapter
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    peft_model.save_pretrained(tmp_path / "adapter")
    merged = save_checkpoint(peft_model.merge_and_unload(), tokenizer, tmp_path / "merged")
    prompts = text_prompts(tokenizer, [5, 40, 150])
    engine = dict(kv_cache_memory_bytes=16 * MIB, enable_lora=True, max_lora_rank=8, max_loras=1)
    base = dict(model=str(nonadjacent_llama), prompts=prompts, max_tokens=8, engine=engine)
    with_adapter, without = run_engines(vllm_python, [{**base, "lora": str(tmp_path / "adapter")}, base], tmp_path)
    assert with_adapter.get("tokens") == [hf_greedy(merged, prompts, 8)], with_adapter
    assert without.get("tokens") == [hf_greedy(nonadjacent_llama, prompts, 8)], without
    assert with_adapter["tokens"] != without["tokens"]
