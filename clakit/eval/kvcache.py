"""KV-cache size: computed from the config (producer layers only, for CLA) and measured from a real DynamicCache.

Per token and sequence, each producer layer caches keys and values of shape (kv_heads, head_dim) each:
    bytes_per_token = producers * 2 * num_key_value_heads * head_dim * bytes_per_element
A stock model is all producers; a CLA model's consumer layers hold a `DummyLayer` with no tensors.
"""

import json
from pathlib import Path

import torch

from clakit.errors import ClakitError
from clakit.modeling import attention_window
from clakit.provenance import CONVERT_RECORD, UPTRAIN_RECORD


def producer_layers(config) -> list[int]:
    """Layers that hold a cache: CLA producers, or every layer of a stock model."""
    layout = getattr(config, "kv_source_layers", None)
    return [i for i, s in enumerate(layout) if s == i] if layout else list(range(config.num_hidden_layers))


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


# what a conversion keeps, read from a config (it changes which layers hold K/V, and kvheads how many KV heads):
# a model differing in any is not the one a CLA model was converted from (a Mistral of a Llama's sizes taught a
# Llama student silently, and an --source-model of another head_dim gave a wrong KV saving)
KEPT_BY_CONVERSION = {
    "vocab_size": lambda c: getattr(c, "vocab_size", None),
    "num_hidden_layers": lambda c: getattr(c, "num_hidden_layers", None),
    "hidden_size": lambda c: getattr(c, "hidden_size", None),
    # the attention's reach, not the family's name: a Mistral without a window is a Llama (llama.cpp writes such
    # models as GGUF `llama`, so the HF original of a student converted from its GGUF is a `mistral`)
    "attention window": attention_window,
    "num_attention_heads": lambda c: getattr(c, "num_attention_heads", None),
    "head_dim": head_dim,
}


def check_converted_from(config, original, what: str, mine: str, fix: str) -> None:
    """Refuse `original` (named `what`) as the model `config`'s was converted from where anything a conversion keeps
    differs: "WHAT has KEY X but MINE Y: FIX"."""
    for key, read in KEPT_BY_CONVERSION.items():
        if read(original) != read(config):
            raise ClakitError(f"{what} has {key} {read(original)} but {mine} {read(config)}: {fix}")


def bytes_per_token(config, dtype: torch.dtype) -> int:
    """KV-cache bytes one token of one sequence costs, from the config alone."""
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    element = torch.empty((), dtype=dtype).element_size()
    return len(producer_layers(config)) * 2 * kv_heads * head_dim(config) * element


def cached_tokens(config, layer: int, seq_len: int, decoding: bool = False) -> int:
    """Tokens of storage layer `layer` holds after a one-forward prefill of `seq_len` tokens: all of them, sliding
    window or not. transformers' DynamicSlidingWindowLayer keeps a *view* of the last window - 1 tokens of the
    full (past + current) tensor, and a view keeps its whole storage alive: after the prefill a windowed layer still
    holds every token (measured: 153,600 bytes held where the view's size read 11,520, tiny Mistral, window 16, 200
    tokens). `decoding`: once decoding runs past the window a sliding layer holds `window` tokens (a view of window - 1
    on a tensor of window), the steady state; a full-attention layer holds all of them."""
    window = attention_window(config)  # a stock Llama's sliding_window key is no window: its attention ignores it
    types = getattr(config, "layer_types", None)
    sliding = bool(window) and (types is None or types[layer] == "sliding_attention")
    return min(seq_len, window) if sliding and decoding else seq_len


def bytes_per_sequence(config, dtype: torch.dtype, seq_len: int, decoding: bool = False) -> int:
    """KV-cache bytes one sequence of `seq_len` tokens holds right after its prefill (the peak a batch prefilled at
    `seq_len` needs), or with `decoding` once decoding is past a sliding window (fewer, for windowed layers)."""
    per_layer_token = bytes_per_token(config, dtype) // len(producer_layers(config))
    return sum(per_layer_token * cached_tokens(config, i, seq_len, decoding) for i in producer_layers(config))


def max_batch(bytes_per_seq: int, budget_gb: float) -> int:
    """Largest batch whose cache (`bytes_per_seq` per sequence) fits `budget_gb` GiB (computed, not measured)."""
    return int(budget_gb * 2**30 // bytes_per_seq)


def cache_bytes(cache) -> int:
    """Bytes of the storage the tensors of a transformers cache keep alive, each storage once (a sliding-window
    layer's keys are a view of a larger tensor: its size alone under-counted what the cache holds); never asks a
    DummyLayer (CLA consumers: keys = values = None) for its length: it has none."""
    held = {}
    for layer in cache.layers:
        for t in (layer.keys, layer.values):
            if isinstance(t, torch.Tensor) and t.numel():
                storage = t.untyped_storage()
                held[(t.device, storage.data_ptr())] = storage.nbytes()
    return sum(held.values())


def measured_bytes(model, ids: torch.Tensor) -> int:
    """Bytes held by a DynamicCache after prefilling `ids` (1, L): what the model really keeps per sequence."""
    return measured_cache(model, ids)[0]


def new_cache(model):
    """The DynamicCache the model's own forward computes with (consumer layers of a CLA config get a DummyLayer).
    Built from a copy of its config with a window the model never applies dropped (sources.drop_unused_window, as
    a loaded model's is): a stock Llama in memory with a `sliding_window` key got a cache keeping only the last
    window - 1 tokens, so eval measured 168 bytes a token for 768 computed, and decoding saw another model."""
    import copy

    from transformers import DynamicCache

    from clakit.sources import drop_unused_window

    config = copy.copy(model.config)  # shallow: drop_unused_window assigns attributes, it never edits them in place
    drop_unused_window(config)
    return DynamicCache(config=config)


def measured_cache(model, ids: torch.Tensor) -> tuple[int, torch.dtype]:
    """(bytes, dtype) of what a DynamicCache holds after prefilling `ids` (1, L). The dtype is the cache's own: a
    model under FSDP's mixed precision keeps fp32 weights and a bf16 cache."""
    from clakit.eval.perplexity import no_grad_for

    cache = new_cache(model)
    with no_grad_for(model):
        model(input_ids=ids.to(next(model.parameters()).device), cache=cache, use_cache=True, logits_to_keep=1)
    dtypes = [layer.keys.dtype for layer in cache.layers if isinstance(layer.keys, torch.Tensor)]
    return cache_bytes(cache), dtypes[0] if dtypes else next(model.parameters()).dtype


def convert_record(model_dir: Path | None) -> dict:
    """The conversion record of a CLA checkpoint ({} when it has none): the converter's `clakit_convert.json` beside
    it, or, for an uptrained model (whose folder has no convert record: it would look like a convert output), the
    conversion record its `uptrain.json` holds."""
    record = read_record(model_dir, CONVERT_RECORD, "a conversion record")
    if record:
        return record
    # uptrain.json holds the start's record under `conversion` (none in those written before 2026-12)
    conversion = read_record(model_dir, UPTRAIN_RECORD, "an uptrain record").get("conversion")
    return conversion if isinstance(conversion, dict) else {}


def read_record(model_dir: Path | None, name: str, what: str) -> dict:
    """The JSON object `name` beside a checkpoint ({} when absent); a damaged one is refused in one line."""
    path = Path(model_dir) / name if model_dir else None
    if not path or not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ClakitError(
            f"cannot read {path} ({str(e)[:200]}); restore it from the run that wrote it or move it aside"
        ) from None
    if not isinstance(record, dict):  # hand-edited or damaged: its fields are read with .get
        raise ClakitError(
            f"{path} is not {what} (not a JSON object); restore it from the run that wrote it or move it aside"
        )
    return record
