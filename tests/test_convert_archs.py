"""`clakit convert` and the CLA classes across the Llama/Mistral variants users bring, against the stock model:
explicit head_dim, MHA/GQA/MQA, biases, tied embeddings, RoPE scaling, odd depths, 16-bit checkpoints, a Llama
config carrying `sliding_window`, and the same weights given as safetensors, .bin or GGUF (F32/F16/Q8_0)."""

import pytest
import torch
from conftest import save_checkpoint, tiny_model
from convert_fixtures import load, run_cli

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
