"""A CLA checkpoint in the stock tools users take it to (transformers' generate, caches and continuous batching, its
attention functions, Trainer, peft, lm-eval), against the stock model on the all-producer layout and against the CLA
model's own no-cache forward on CLA2 and a non-adjacent layout. docs/modeling.md says what works with which."""

import pytest
import torch
from conftest import tiny_model
from transformers import ContinuousBatchingConfig, GenerationConfig
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from clakit.convert.inmemory import cla_model_from

LAYOUTS = {"all-producers": [0, 1, 2, 3], "cla2": [0, 0, 2, 2], "non-adjacent": [0, 1, 0, 1]}


def cla(kind: str, layout: list[int]):
    return cla_model_from(tiny_model(kind, num_hidden_layers=len(layout)), layout, init="mean").eval()


def prompts() -> list[list[int]]:
    """Three prompts of 7, 12 and 30 tokens (30: past the tiny Mistral's sliding window of 16)."""
    return [torch.randint(1, 300, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (7, 12, 30)]


def batch_generate(model, persistent: bool = False) -> list[list[int]]:
    """transformers' continuous batching (paged cache), greedy; the tokens of each prompt, in order."""
    config = GenerationConfig(max_new_tokens=8, do_sample=False, eos_token_id=-1, pad_token_id=0)
    batching = ContinuousBatchingConfig(num_blocks=16, max_batch_tokens=64)
    with torch.no_grad():
        out = model.generate_batch(
            prompts(), config, batching, warmup=False, persistent_manager=persistent, progress_bar=False
        )
    return [o.generated_tokens for o in sorted(out.values(), key=lambda o: int(o.request_id.rsplit("_", 1)[-1]))]


def no_cache_tokens(model) -> list[list[int]]:
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None, use_cache=False)
    with torch.no_grad():
        return [model.generate(torch.tensor([p]), **kwargs)[0, len(p) :].tolist() for p in prompts()]


def paged_cache_bytes(model) -> int:
    """Bytes of the paged cache continuous batching allocated (a persistent manager keeps it), manager then freed."""
    batch_generate(model, persistent=True)
    manager = model._cached_continuous_batching_manager
    try:
        return manager.batch_processor.cache.cache_tensor.numel() * manager.batch_processor.cache.cache_tensor.itemsize
    finally:
        model.destroy_cached_continuous_batching_manager()


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_continuous_batching_pages_producers_only_and_generates_the_no_cache_tokens(kind):
    """generate_batch sized its paged cache from every layer (a page per layer per block, consumers' never
    written): a CLA2 paged cache of the same 16 blocks was the stock model's size, the KV saving lost. It now holds
    the producers' pages only; the tokens are the model's own no-cache greedy ones."""
    models = {name: cla(kind, layout) for name, layout in LAYOUTS.items()}
    for model in models.values():
        assert batch_generate(model) == no_cache_tokens(model)
    stock_bytes = paged_cache_bytes(models["all-producers"])
    for name, layout in LAYOUTS.items():
        producers = len(set(layout))
        assert paged_cache_bytes(models[name]) * len(layout) == stock_bytes * producers, name


def test_consumers_attend_with_their_producers_paged_kwargs(monkeypatch):
    """PagedAttentionCache.update picks, in the attention kwargs, the producer's group's key lengths
    (`cu_seq_lens_k`, `max_length_k`: dicts by layer type until then) and, for flash's block-table decode, its pages.
    A consumer calls no update: it got the dicts, which flash attention (continuous batching's choice on a GPU in
    half precision) cannot take. Recorded layer by layer under sdpa, which ignores them."""
    seen = {}
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def recording(module, query, key, value, attention_mask, **kwargs):
        seen.setdefault(module.layer_idx, []).append((kwargs.get("cu_seq_lens_k"), kwargs.get("max_length_k")))
        return sdpa(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, "sdpa", recording)
    model = cla("llama", LAYOUTS["non-adjacent"])
    batch_generate(model)
    for layer, source in enumerate(LAYOUTS["non-adjacent"]):
        assert len(seen[layer]) == len(seen[source]) > 0
        for (lengths, longest), (want_lengths, want_longest) in zip(seen[layer], seen[source], strict=True):
            assert isinstance(lengths, torch.Tensor), f"layer {layer} got {type(lengths).__name__}"
            assert torch.equal(lengths, want_lengths) and longest == want_longest
