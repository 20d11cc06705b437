"""`clakit convert` and the CLA classes across the Llama/Mistral variants users bring, against the stock model:
explicit head_dim, MHA/GQA/MQA, biases, tied embeddings, RoPE scaling, odd depths, 16-bit checkpoints, a Llama
config carrying `sliding_window`, and the same weights given as safetensors, .bin or GGUF (F32/F16/Q8_0)."""

import json

import pytest
import torch
from conftest import save_checkpoint, tiny_model
from convert_fixtures import load, run_cli, safetensors_files
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from clakit.convert.inmemory import cla_model_from
from clakit.convert.reconstruct import attention_output

torch.set_num_threads(1)


def ids(length: int = 24, batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, 300, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def cached_logits(model, x: torch.Tensor, prefill: int) -> torch.Tensor:
    """(batch, seq, vocab) logits from a prefill of `prefill` tokens, then one token at a time through the cache."""
    out = model(x[:, :prefill], use_cache=True)
    steps = [out.logits]
    for t in range(prefill, x.shape[1]):
        steps.append(model(x[:, t : t + 1], cache=out.cache, use_cache=True).logits)
    return torch.cat(steps, 1)


# --- a Llama config carrying sliding_window (llamafied Qwen2 and others) ----------------------------------------


@pytest.mark.parametrize("kind", ["llama", "mistral"])
@torch.no_grad()
def test_reconstructs_attention_is_the_models_with_a_sliding_window_key(kind):
    """Stock Llama attends to the whole past whatever config.sliding_window says; reconstruct's attention applied the
    window to any model whose config had the key, so on a Llama with sliding_window < --seq-len it fitted K/V, q_proj
    and o_proj to an attention the model does not compute (the producer's own weights did not reproduce its output).
    Mistral's window still applies (24 tokens > 8)."""
    model = tiny_model(kind, sliding_window=8)
    attn, seen = model.model.layers[1].self_attn, {}
    hook = attn.register_forward_hook(lambda m, args, kwargs, out: seen.update(x=kwargs["hidden_states"], y=out[0]),
                                      with_kwargs=True)  # fmt: skip
    model(ids(24))
    hook.remove()
    cos, sin = model.model.rotary_emb(seen["x"], torch.arange(24)[None])
    params = {"q": attn.q_proj.weight, "k": attn.k_proj.weight, "v": attn.v_proj.weight}
    torch.testing.assert_close(attention_output(model, 1, seen["x"], seen["x"], params, cos, sin), seen["y"])


@pytest.mark.parametrize("layout", ["0,1,2,3", "0,0,2,2"])
def test_a_converted_llama_with_a_sliding_window_key_decodes_through_its_cache_as_its_full_forward(
    tokenizer, tmp_path, layout
):
    """The CLA Llama kept config.sliding_window: transformers' caches then held only the last 8 tokens' K/V while
    the full forward (and stock Llama's) attends to all of them, so generate() read another model than the one
    evaluated (logits off by ~3 past the window). Now its caches hold everything; the full forward is unchanged."""
    src = save_checkpoint(tiny_model("llama", sliding_window=8), tokenizer, tmp_path / "src")
    assert run_cli(src, tmp_path / "cla", "--kv-source-layers", layout, "-q") == 0
    cla, stock, x = load(tmp_path / "cla"), load(src), ids(24)
    with torch.no_grad():
        full = cla(x).logits
    torch.testing.assert_close(cached_logits(cla, x, prefill=4), full, rtol=1e-4, atol=1e-4)
    if layout == "0,1,2,3":
        with torch.no_grad():
            torch.testing.assert_close(full, stock(x).logits, rtol=0, atol=0)


# --- variants: the identity layout is the stock model, a sharing layout the in-memory CLA model --------------------

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}  # fmt: skip
YARN_ROPE = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64}
VARIANTS = {
    "head_dim_16": dict(head_dim=16),  # Mistral-Nemo style: heads x head_dim != hidden (48)
    "mha": dict(num_key_value_heads=4),
    "mqa": dict(num_key_value_heads=1),
    "biases_tied": dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=True),
    "llama3_rope": dict(rope_parameters=LLAMA3_ROPE),
    "yarn_rope": dict(rope_parameters=YARN_ROPE),
    "fp16": dict(dtype=torch.float16),
    "bf16": dict(dtype=torch.bfloat16, num_hidden_layers=3),
}


def variant_checkpoint(kind: str, variant: str, tokenizer, folder):
    """A stock checkpoint of `variant` (4 layers unless it says), saved in its dtype over several shards."""
    overrides = dict(VARIANTS[variant])
    dtype = overrides.pop("dtype", torch.float32)
    layers = overrides.pop("num_hidden_layers", 4)
    return save_checkpoint(tiny_model(kind, num_hidden_layers=layers, **overrides).to(dtype), tokenizer, folder)


def written_dtypes(folder) -> set:
    dtypes = set()
    for path in safetensors_files(folder):
        with safe_open(str(path), "pt") as f:
            dtypes |= {f.get_slice(name).get_dtype() for name in f.keys()}
    return dtypes


@pytest.mark.parametrize("kind", ["llama", "mistral"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variants_convert_to_the_stock_model_and_to_the_in_memory_cla_model(tokenizer, tmp_path, kind, variant):
    """Per variant: every layer its own producer reproduces the stock logits exactly; a non-adjacent layout (layer
    2 reads layer 0) is the in-memory CLA model of the same weights, keeps the checkpoint's dtype, and decodes
    through its cache as its full forward (Mistral: 40 tokens past its window of 16)."""
    src = variant_checkpoint(kind, variant, tokenizer, tmp_path / "src")
    layers = json.loads((src / "config.json").read_text())["num_hidden_layers"]
    shared = [0, 1, 0, 3][:layers]
    for name, layout in (("own", range(layers)), ("shared", shared)):
        assert run_cli(src, tmp_path / name, "--kv-source-layers", ",".join(map(str, layout)), "-q") == 0
    stock, x = load(src), ids(40, batch=2)
    with torch.no_grad():
        torch.testing.assert_close(load(tmp_path / "own")(x).logits, stock(x).logits, rtol=0, atol=0)
        native = AutoModelForCausalLM.from_pretrained(src, dtype="auto")  # the group mean rounded to its dtype
        cla, reference = load(tmp_path / "shared"), cla_model_from(native, shared, "mean").float()
        full = cla(x).logits
    torch.testing.assert_close(full, reference(x).logits, rtol=0, atol=0)
    torch.testing.assert_close(cached_logits(cla, x, prefill=7), full, rtol=1e-4, atol=1e-4)
    names = {torch.float16: "F16", torch.bfloat16: "BF16"}
    assert written_dtypes(tmp_path / "shared") == {names.get(VARIANTS[variant].get("dtype"), "F32")}


@pytest.mark.parametrize("kind", ["llama", "mistral"])
@torch.no_grad()
def test_the_in_memory_cla_model_of_a_16_bit_model_is_the_model(tmp_path, kind):
    """cla_model_from (the converter's in-memory reference, and the benchmarks' CLA model) cast the whole model to the
    source's dtype, RoPE's inv_freq included, which from_pretrained keeps fp32 in a bf16 model: with every layer its
    own producer the logits were 0.03 off the model's."""
    tiny_model(kind).to(torch.bfloat16).save_pretrained(tmp_path)
    model, x = AutoModelForCausalLM.from_pretrained(tmp_path, dtype="auto"), ids(40)
    torch.testing.assert_close(cla_model_from(model, [0, 1, 2, 3])(x).logits, model(x).logits, rtol=0, atol=0)
