"""vLLM serves clakit CLA checkpoints (serving/vllm, the clakit_vllm plugin) on vLLM's CPU build: tiny models.

A tiny Mistral (GQA, sliding window 16, untied embeddings) converted to a non-uniform, non-adjacent layout: vLLM's
greedy tokens equal transformers', its KV capacity grows by layers / producers over the stock model's, and layouts
the plugin cannot serve fail at load naming the problem. vLLM runs in its own venv (see serving_vllm_fixtures).
"""

import ast
import json
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import save_checkpoint, tiny_model
from serving_vllm_fixtures import (  # noqa: F401  (fixture)
    FP8_NEEDS,
    cpu_runs_fp8_kv,
    hf_greedy,
    run_vllm,
    vllm_env,
    vllm_python,
)

from clakit.convert import convert

# layers 2 and 3 read layers 0 and 1 (non-adjacent), layer 5 reads 4: 3 producers of 6 layers -> 2x capacity
LAYOUT = [0, 1, 0, 1, 4, 4]
MAX_TOKENS = 16
# head_dim 32: vLLM's CPU attention supports head sizes 32, 64, 80, ...
TINY = dict(num_hidden_layers=6, hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def tiny_mistral_pair(tokenizer, tmp_path_factory) -> tuple[Path, Path]:
    """(stock tiny Mistral folder, its CLA conversion with LAYOUT)."""
    root = tmp_path_factory.mktemp("vllm_tiny_mistral")
    stock = save_checkpoint(tiny_model("mistral", **TINY), tokenizer, root / "stock")
    cla = convert(stock, root / "cla", kv_source_layers=LAYOUT, init="mean", quiet=True)
    return stock, cla


def prompts(tokenizer) -> list[list[int]]:
    # the second is longer than the sliding window (16), so the window is exercised in prefill and decode
    texts = ["The king said unto", "He shall hack the system and the user file of the machine, and they said"]
    return [tokenizer(t).input_ids for t in texts]


@pytest.mark.slow
def test_tiny_mistral_cla_tokens_and_capacity(vllm_python, tiny_mistral_pair, tokenizer, tmp_path):  # noqa: F811
    stock, cla = tiny_mistral_pair
    ids = prompts(tokenizer)
    assert max(len(p) for p in ids) > 16
    served = run_vllm(vllm_python, cla, ids, tmp_path, max_tokens=MAX_TOKENS)
    assert served["architecture"] == "MistralCLAForCausalLM"
    assert served["tokens"] == hf_greedy(cla, ids, MAX_TOKENS)
    baseline = run_vllm(vllm_python, stock, ids, tmp_path, max_tokens=MAX_TOKENS)
    assert baseline["architecture"] == "MistralForCausalLM"
    ratio = served["kv_cache_tokens"] / baseline["kv_cache_tokens"]
    assert ratio >= 0.95 * len(LAYOUT) / len(set(LAYOUT)), (served, baseline)


@pytest.mark.slow
def test_cla_composes_with_an_fp8_kv_cache(vllm_python, tiny_mistral_pair, tokenizer, tmp_path):  # noqa: F811
    """KV quantisation and CLA multiply: with vLLM's fp8 cache the consumers still hold no cache, so the capacity is
    layers / producers times the stock model's fp8 capacity (each fp8 capacity twice the bf16 one)."""
    stock, cla = tiny_mistral_pair
    ids = prompts(tokenizer)
    if not cpu_runs_fp8_kv():  # vLLM's CPU fp8 cache needs AVX-512 or AMX: an AVX2-only host refuses it
        with pytest.raises(AssertionError, match=FP8_NEEDS):
            run_vllm(vllm_python, cla, ids, tmp_path, max_tokens=4, dtype="bfloat16", kv_cache_dtype="fp8")
        return
    runs = {
        (name, kv): run_vllm(vllm_python, folder, ids, tmp_path, max_tokens=4, dtype="bfloat16", kv_cache_dtype=kv)
        for name, folder, kv in (("stock", stock, "auto"), ("stock", stock, "fp8"), ("cla", cla, "fp8"))
    }
    served = runs["cla", "fp8"]
    assert (served["kv_cache_dtype"], served["architecture"]) == ("fp8", "MistralCLAForCausalLM")
    assert all(len(t) == 4 for run in runs.values() for t in run["tokens"])
    tokens = {key: run["kv_cache_tokens"] for key, run in runs.items()}
    assert tokens["cla", "fp8"] / tokens["stock", "fp8"] >= 0.95 * len(LAYOUT) / len(set(LAYOUT)), tokens
    assert tokens["stock", "fp8"] / tokens["stock", "auto"] >= 1.9, tokens
    assert tokens["cla", "fp8"] / tokens["stock", "auto"] >= 0.95 * 2 * len(LAYOUT) / len(set(LAYOUT)), tokens


@pytest.mark.slow
def test_tiny_llama_bf16_tied_cla3(vllm_python, tokenizer, tmp_path):  # noqa: F811
    """A bf16 checkpoint with tied embeddings and uniform CLA3, served in fp32: the tokens of transformers in fp32."""
    model = tiny_model("llama", **TINY, tie_word_embeddings=True).to(torch.bfloat16)
    stock = save_checkpoint(model, tokenizer, tmp_path / "stock")
    cla = convert(stock, tmp_path / "cla3", factor=3, init="mean", quiet=True)  # keeps the source's bf16
    config = json.loads((cla / "config.json").read_text())
    assert config["kv_source_layers"] == [0, 0, 0, 3, 3, 3] and config["dtype"] == "bfloat16"
    ids = prompts(tokenizer)
    served = run_vllm(vllm_python, cla, ids, tmp_path, max_tokens=MAX_TOKENS)
    assert served["architecture"] == "LlamaCLAForCausalLM"
    assert served["tokens"] == hf_greedy(cla, ids, MAX_TOKENS)


def bad_checkpoint(cla: Path, dest: Path, **config_changes) -> Path:
    """A copy of `cla` (weights linked, not copied) with config.json fields replaced."""
    dest.mkdir()
    for f in cla.iterdir():
        if f.name != "config.json":
            (dest / f.name).symlink_to(f)
    config = {**json.loads((cla / "config.json").read_text()), **config_changes}
    config = {k: v for k, v in config.items() if v is not None}  # a change to None removes the field
    (dest / "config.json").write_text(json.dumps(config))
    return dest


# name -> (config changes, trust_remote_code, what the one-line error must say)
BAD = {
    "later": (dict(kv_source_layers=[0, 1, 0, 5, 4, 4]), False, "layer 3 reads K/V from the later layer 5"),
    "consumer": (dict(kv_source_layers=[0, 0, 1, 1, 4, 4]), False, "layer 2 reads K/V from layer 1, which is itself"),
    "length": (dict(kv_source_layers=[0, 0, 2]), False, "kv_source_layers has 3 entries but the model has 6 layers"),
    "stock_type": (dict(model_type="mistral"), False, "model_type 'mistral' is not a CLA type"),
    # an unknown type is refused by vLLM's config loading (transformers' message, which names it) before the plugin
    "unknown_type": (dict(model_type="qwen2_cla", auto_map=None), False, "qwen2_cla"),
    # the checkpoint's own remote code needs a newer transformers than vLLM's: the plugin's config must win
    "remote_code_ok": ({}, True, None),
}

LOAD_ALL = """
import json, sys
from vllm import LLM
for folder, trust in json.loads(sys.argv[1]):
    try:
        LLM(model=folder, enforce_eager=True, dtype="float32", trust_remote_code=trust)
        print("LOADED", folder)
    except Exception as e:
        print("FAILED", folder, "|", str(e).replace("\\n", " / "))
"""


@pytest.mark.slow
def test_unservable_layouts_fail_at_load(vllm_python, tiny_mistral_pair, tmp_path):  # noqa: F811
    """Each bad checkpoint fails while vLLM reads its config, with a message naming the problem."""
    _, cla = tiny_mistral_pair
    folders = {name: bad_checkpoint(cla, tmp_path / name, **changes) for name, (changes, _, _) in BAD.items()}
    jobs = [(str(folders[name]), trust) for name, (_, trust, _) in BAD.items()]
    cmd = [str(vllm_python), "-c", LOAD_ALL, json.dumps(jobs)]
    proc = subprocess.run(cmd, env=vllm_env(), capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = {line.split()[1]: line for line in proc.stdout.splitlines() if line.startswith(("LOADED", "FAILED"))}
    for name, (_, _, message) in BAD.items():
        line = results[str(folders[name])]
        if message is None:
            assert line.startswith("LOADED"), (name, line)
        else:
            assert line.startswith("FAILED") and message in line, (name, line)


def test_plugin_source_does_not_import_clakit():
    """The plugin must not depend on clakit: vLLM's transformers range excludes clakit's."""
    plugin = Path(__file__).resolve().parents[1] / "serving" / "vllm" / "clakit_vllm"
    sources = sorted(plugin.glob("*.py"))
    assert sources
    for source in sources:
        for node in ast.walk(ast.parse(source.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            assert not any(n == "clakit" or n.startswith("clakit.") for n in names), (source, names)
