"""Model shapes at the edges, end to end: the Llama/Mistral config knobs users bring (depth, heads, head_dim,
RoPE variants, windows, biases, dtypes) through the CLA classes, the converter's in-memory tools and the vLLM plugin,
against the stock model where a layout with every layer its own producer must equal it."""

import tempfile

import pytest
import torch
from conftest import tiny_model
from transformers import AutoModelForCausalLM

from clakit.convert.kvheads import merge_kv_heads


def ids(length: int = 40, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, 300, (batch, length), generator=torch.Generator().manual_seed(seed))


def saved_and_loaded(model, dtype: torch.dtype):
    """`model` in `dtype` as from_pretrained gives it back (inv_freq kept fp32 in a 16-bit model)."""
    with tempfile.TemporaryDirectory() as folder:
        model.to(dtype).save_pretrained(folder)
        return AutoModelForCausalLM.from_pretrained(folder, dtype="auto").eval()


# --- KV-head merging ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "mistral"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_merging_kv_heads_into_as_many_heads_is_the_model(kind, dtype):
    """merge_kv_heads to the model's own KV-head count merges nothing (mean of one head): the model, bit for bit.
    It built the merged model then `.to(dtype)`, which rounded a bf16 model's fp32 RoPE inv_freq: 0.047 off."""
    model = saved_and_loaded(tiny_model(kind, head_dim=8, num_attention_heads=6, num_key_value_heads=3), dtype)
    merged = merge_kv_heads(model, 3, "mean")
    x = ids()
    torch.testing.assert_close(merged(x).logits, model(x).logits, rtol=0, atol=0)
    assert merged.model.rotary_emb.inv_freq.dtype == model.model.rotary_emb.inv_freq.dtype == torch.float32
