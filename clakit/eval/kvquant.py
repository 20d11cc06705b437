"""KV-cache quantisation, the cheap alternative CLA is compared with at equal bytes: transformers' `QuantizedCache`
with the HQQ backend (`pip install "clakit[kv-quant]"`; quanto, the other group-wise backend, has no 8 bits).

Settings are the library's, as transformers documents them for HQQ: `axis_key = axis_value = 1` and groups of
`q_group_size` (default 64) consecutive values, i.e. per token and head when `head_dim` = 64 (SmolLM2, Llama), with
an affine scale and zero point per group in the model's dtype. Per token and sequence a producer layer then holds

    2 * kv_heads * head_dim * nbits / 8         packed integers (K and V)
    + 2 * 2 * kv_heads * head_dim / group * e   scale and zero per group, e bytes each (2 in a 16-bit model)

so 8 bits cost 8.5/16 of a 16-bit cache and 4 bits 4.5/16 at group 64. A CLA model's consumer layers get a
`DummyLayer` (no tensors) as in `DynamicCache`, so CLA composes with quantisation.
"""

import torch
from transformers import QuantizedCache
from transformers.cache_utils import Cache, DummyLayer, HQQQuantizedLayer, get_layer_types_and_kwargs

from clakit.errors import ClakitError
from clakit.eval import kvcache
from clakit.modeling import attention_window

INSTALL_HINT = 'pip install "clakit[kv-quant]"'
NBITS = (8, 4)
DEFAULT_GROUP = 64
AXIS = 1  # HQQ's axis 1: groups of consecutive values of one token (transformers' documented HQQ setting)


def require_hqq() -> None:
    try:
        import hqq  # noqa: F401
    except ImportError:
        raise ClakitError(f"KV-cache quantisation needs HQQ (not installed): {INSTALL_HINT}") from None


def check(config, nbits: int, group_size: int) -> None:
    """Refuse settings HQQ or the quantised cache cannot serve, before any model runs."""
    if nbits not in NBITS:
        raise ClakitError(f"KV-cache bits must be one of {', '.join(map(str, NBITS))}, got {nbits}")
    width = config.num_key_value_heads * kvcache.head_dim(config)  # values of one token's K (or V)
    if not isinstance(group_size, int) or group_size <= 0 or width % group_size:
        raise ClakitError(f"the quantisation group size must divide kv_heads x head_dim = {width}, got {group_size}")
    if attention_window(config) is not None:  # Mistral's, Qwen2's...; a stock Llama's sliding_window key is none
        raise ClakitError("transformers' quantised cache serves full attention only; this model has a sliding window")


class QuantizedKVCache(QuantizedCache):
    """`QuantizedCache(backend="hqq")` for stock and CLA models: producers quantise, consumers hold nothing.

    `residual_length`: how many recent tokens the cache keeps unquantised before folding them in (the library's
    default is 128; the perplexity loop uses its chunk length, so every chunk is folded in at once)."""

    def __init__(self, config, nbits: int, q_group_size: int = DEFAULT_GROUP, residual_length: int = 128):
        require_hqq()
        check(config, nbits, q_group_size)
        kwargs = dict(nbits=nbits, axis_key=AXIS, axis_value=AXIS, q_group_size=q_group_size)
        layer_types, _ = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
        # CLA: consumer layers ("dummy" from the config's kv_sharing_modes) hold no cache; QuantizedCache refuses them
        layers = [
            DummyLayer() if kind == "dummy" else HQQQuantizedLayer(residual_length=residual_length, **kwargs)
            for kind in layer_types
        ]
        Cache.__init__(self, layers=layers)


def _tensor_bytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def _quantized_bytes(packed) -> int:
    """Packed integers + scale + zero of one HQQ-quantised tensor (the `(tensor, meta)` pair the layer keeps)."""
    if packed is None:
        return 0
    tensor, meta = packed
    return _tensor_bytes(tensor) + _tensor_bytes(meta.get("scale")) + _tensor_bytes(meta.get("zero"))


def held_bytes(cache) -> int:
    """Bytes every tensor of the cache holds: quantised K/V with their scales and zeros, plus the unquantised
    residual tokens (consumer layers hold none)."""
    total = 0
    for layer in cache.layers:
        if isinstance(layer, HQQQuantizedLayer):
            total += _quantized_bytes(layer._quantized_keys) + _quantized_bytes(layer._quantized_values)
        total += sum(_tensor_bytes(t) for t in (getattr(layer, "keys", None), getattr(layer, "values", None)))
    return total


def bytes_per_token(config, nbits: int, dtype: torch.dtype, group_size: int = DEFAULT_GROUP) -> float:
    """KV bytes per token and sequence of the quantised cache once folded in (no residual), from the config."""
    width = config.num_key_value_heads * kvcache.head_dim(config)  # per K (or V) per layer
    element = torch.empty((), dtype=dtype).element_size()
    per_tensor = width * nbits / 8 + 2 * (width // group_size) * element  # integers + scale + zero
    return len(kvcache.producer_layers(config)) * 2 * per_tensor
