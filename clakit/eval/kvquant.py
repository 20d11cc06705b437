"""KV-cache quantisation, the cheap alternative CLA is compared with at equal bytes: transformers' `QuantizedCache`
with the HQQ backend (`pip install "clakit[kv-quant]"`; quanto, the other group-wise backend, has no 8 bits).

Settings are the library's, as transformers documents them for HQQ: `axis_key = axis_value = 1` and groups of
`q_group_size` (default 64, which must divide `head_dim`) consecutive values, i.e. per token and head, with
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
    _check_group(kvcache.head_dim(config), group_size)
    if attention_window(config) is not None:  # Mistral's, Qwen2's...; a stock Llama's sliding_window key is none
        raise ClakitError("transformers' quantised cache serves full attention only; this model has a sliding window")


def _check_group(head_dim: int, group_size) -> None:
    """HQQ groups consecutive values of the [batch, heads, tokens, head_dim] store: a group not dividing head_dim
    spans two tokens (and heads), and each fold re-quantises the store on a grid shifted by the chunk (8 bits at
    chunk 1 and head_dim 48 had 14x the error of head_dim 64, measured), not "per token and head" as documented."""
    ok = isinstance(group_size, int) and not isinstance(group_size, bool) and group_size > 0
    if ok and head_dim % group_size == 0:
        return
    cap = group_size if ok else head_dim
    fit = max(d for d in range(1, min(cap, head_dim) + 1) if head_dim % d == 0)  # the largest divisor up to it
    raise ClakitError(
        f"the quantisation group size must divide head_dim = {head_dim} (a group is part of one token's head), got "
        f"{group_size}; use {fit} or another divisor of {head_dim}"
    )


class EvenRowsHQQLayer(HQQQuantizedLayer):
    """HQQQuantizedLayer whose 4-bit store takes any token count. HQQ groups the tensor into rows of `group` values
    and packs two rows into one byte row (`pack_4bit_u8` pairs the first half of the rows with the second), so an odd
    number of rows failed ("The size of tensor a (49) must match ... (50)"): SmolLM2's 3 KV heads x 64 / group 64
    give an odd row count at every odd token count (a prompt, chunk 1 as in decoding). The tensor is padded with the
    fewest zero tokens that make the rows even (a token's groups are its own rows where the group divides head_dim;
    HQQ's optimiser stops on the whole tensor's mean error, so the pad can shift the real rows' fit slightly, as any
    other row of the same fold does: 0.015 against a 4-bit quantisation error of 0.16, measured) and the padding is
    dropped when dequantised; `held_bytes` counts the real tokens only."""

    def _quantize(self, tensor, axis):
        pad = _pad_tokens(tensor, self.q_group_size) if self.nbits == 4 else 0
        if pad:  # [batch, heads, tokens, head_dim] -> tokens + pad
            tensor = torch.cat([tensor, tensor.new_zeros(*tensor.shape[:-2], pad, tensor.shape[-1])], dim=-2)
        qtensor, meta = super()._quantize(tensor, axis)
        meta["clakit_pad"] = (pad, tensor.shape[-2] - pad)  # (padding tokens, real tokens)
        return qtensor, meta

    def _dequantize(self, qtensor):
        tensor = super()._dequantize(qtensor)
        pad, tokens = qtensor[1].get("clakit_pad", (0, None))
        return tensor[..., :tokens, :] if pad else tensor


def _pad_tokens(tensor, group: int) -> int:
    """The fewest zero tokens that make `tensor`'s (batch x heads x tokens x head_dim) values an even number of
    `group`-value rows."""
    per_token = tensor.numel() // tensor.shape[-2]
    return next(p for p in range(2 * group + 1) if (per_token * (tensor.shape[-2] + p)) % (2 * group) == 0)


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
            DummyLayer() if kind == "dummy" else EvenRowsHQQLayer(residual_length=residual_length, **kwargs)
            for kind in layer_types
        ]
        Cache.__init__(self, layers=layers)


def _tensor_bytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def _quantized_bytes(packed) -> int:
    """Packed integers + scale + zero of one HQQ-quantised tensor (the `(tensor, meta)` pair the layer keeps); of
    the real tokens only where EvenRowsHQQLayer padded it (its bytes grow with the rows: exact in integers)."""
    if packed is None:
        return 0
    tensor, meta = packed
    held = _tensor_bytes(tensor) + _tensor_bytes(meta.get("scale")) + _tensor_bytes(meta.get("zero"))
    pad, tokens = meta.get("clakit_pad", (0, None))
    return held * tokens // (tokens + pad) if pad else held


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
