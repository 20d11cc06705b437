"""Sharing layouts and the per-architecture tensor-name table (architecture as data, shared by Llama and Mistral)."""

from clakit.errors import ClakitError
from clakit.modeling import validate_kv_source_layers

# Source `architectures[0]` -> CLA family (a key of clakit.modeling.CLA_CLASSES).
SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral"}

# Per-layer tensor names; "{}" is the layer index. Identical for Llama and Mistral.
KEY_TEMPLATES = {
    "q_proj": "model.layers.{}.self_attn.q_proj.weight",
    "k_proj": "model.layers.{}.self_attn.k_proj.weight",
    "v_proj": "model.layers.{}.self_attn.v_proj.weight",
    "o_proj": "model.layers.{}.self_attn.o_proj.weight",
    "k_bias": "model.layers.{}.self_attn.k_proj.bias",
    "v_bias": "model.layers.{}.self_attn.v_proj.bias",
}
KV_KEYS = ("k_proj", "v_proj", "k_bias", "v_bias")  # what a consumer does not hold


def uniform_layout(num_layers: int, factor: int) -> list[int]:
    """CLA-`factor`: groups of `factor` adjacent layers led by their first; the last group may be shorter."""
    if not isinstance(factor, int) or factor <= 0 or factor > num_layers:
        raise ClakitError(f"--factor must be between 1 and the number of layers ({num_layers}), got {factor}")
    return [i - i % factor for i in range(num_layers)]


def check_shareable(num_layers: int) -> None:
    """CLA needs a second layer to read the first's K/V; named as the model's problem, not a flag's: the defaults
    (--factor 2, --kv-saving 0.5) ask for sharing without the user naming either."""
    if num_layers < 2:
        raise ClakitError(f"a {num_layers}-layer model has no other layer to share its K/V with: CLA needs 2 or more")


def check_layout(layout: list[int], num_layers: int) -> None:
    try:
        validate_kv_source_layers(layout, num_layers)
    except ValueError as e:
        raise ClakitError(f"invalid kv_source_layers: {e}") from None


def groups(layout: list[int]) -> dict[int, list[int]]:
    """Producer -> the layers reading its K/V (the producer first)."""
    out: dict[int, list[int]] = {}
    for layer, source in enumerate(layout):
        out.setdefault(source, []).append(layer)
    return out


def kv_saving(layout: list[int]) -> float:
    """Fraction of the KV cache saved: 1 - producers/layers."""
    return 1.0 - len(groups(layout)) / len(layout)
