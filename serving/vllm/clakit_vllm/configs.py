"""The config types clakit writes (`llama_cla`, `mistral_cla`): stock Llama/Mistral configs plus `kv_source_layers`.

Layer i reads the keys/values of layer `kv_source_layers[i]` (<= i). A layer that is its own source is a *producer*
(K/V projections, a KV cache); every other layer is a *consumer* (queries only, no cache). CLA2 over 6 layers is
[0, 0, 2, 2, 4, 4]. A checkpoint's own configuration_cla.py (remote code) needs a newer transformers than vLLM
pins, so these classes replace it: they are registered with transformers' AutoConfig and with vLLM's config registry,
which vLLM consults before remote code.
"""

import re
from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, LlamaConfig, MistralConfig

from . import ARCHITECTURES

CLA_ARCHITECTURE = {"llama_cla": "LlamaCLAForCausalLM", "mistral_cla": "MistralCLAForCausalLM"}


def layout_problem(kv_source_layers, num_hidden_layers: int) -> str | None:
    """The first reason vLLM cannot serve this layout, as one line; None when it can.

    vLLM shares a cache only with an earlier layer that owns one (its model runner maps
    kv_caches[consumer] = kv_caches[target]), so every source must be a producer at or before its layer.
    """
    if not isinstance(kv_source_layers, list | tuple):
        return f"kv_source_layers must be a list of layer indices, got {kv_source_layers!r}"
    if len(kv_source_layers) != num_hidden_layers:
        return f"kv_source_layers has {len(kv_source_layers)} entries but the model has {num_hidden_layers} layers"
    for layer, source in enumerate(kv_source_layers):
        if not isinstance(source, int) or isinstance(source, bool) or source < 0:
            return f"kv_source_layers[{layer}] must be a layer index >= 0, got {source!r}"
        if source > layer:
            return f"layer {layer} reads K/V from the later layer {source}; a source must come at or before its layer"
        if kv_source_layers[source] != source:
            return (
                f"layer {layer} reads K/V from layer {source}, which is itself a consumer (of layer "
                f"{kv_source_layers[source]}); a source must be a producer"
            )
    return None


# "model.layers.3.self_attn.k_proj.weight" -> layer "3", projection "k"; any tensor of the module (weight, bias, ...)
ATTENTION_TENSOR = re.compile(r"(?:^|\.)layers\.(\d+)\.self_attn\.([qkv])_proj\.")
# what to do when the weights and kv_source_layers disagree: a hand-edited config.json or a damaged folder
FIX_WEIGHTS = "give vLLM the folder `clakit convert` wrote, unedited (or convert the stock checkpoint again)"


def unexpected_kv_tensor(name: str, kv_source_layers: list[int]) -> str | None:
    """Why checkpoint tensor `name` does not fit the layout (a K/V projection of a consumer), as one line; else None.

    Such a checkpoint is usually a stock one given a kv_source_layers by hand: the consumer would attend to another
    layer's K/V while its own trained ones are dropped.
    """
    match = ATTENTION_TENSOR.search(name)
    if match is None or match[2] == "q" or int(match[1]) >= len(kv_source_layers) or KV_CACHE_SCALE.search(name):
        return None  # a consumer's own KV-cache scale, in any of its spellings, is dropped (`shared_kv_scales`)
    layer = int(match[1])
    if kv_source_layers[layer] == layer:
        return None
    return (
        f"the checkpoint has {name}, but kv_source_layers makes layer {layer} a consumer of layer "
        f"{kv_source_layers[layer]}, with no K/V projections: config.json does not match the weights; {FIX_WEIGHTS}"
    )


def attention_projections(names) -> set[tuple[int, str]]:
    """(layer, "q" | "k" | "v") of every attention projection some tensor in `names` belongs to."""
    return {(int(m[1]), m[2]) for m in map(ATTENTION_TENSOR.search, names) if m}


def missing_projections(present: set[tuple[int, str]], kv_source_layers: list[int], layers) -> list[str]:
    """The projections of `layers` the layout needs (a producer q/k/v_proj, a consumer q_proj) not in `present`."""
    needed = [(layer, p) for layer in layers for p in ("q", "k", "v") if p == "q" or kv_source_layers[layer] == layer]
    return [f"model.layers.{layer}.self_attn.{p}_proj" for layer, p in needed if (layer, p) not in present]


def missing_attention_tensors(names, kv_source_layers: list[int], layers) -> str | None:
    """The attention projections of `layers` that no tensor in `names` provides, as one line; else None.

    A producer needs q/k/v_proj, a consumer q_proj. vLLM checks for absent weights only in quantized models: an
    unquantized one would serve uninitialised memory in place of a missing projection.
    """
    missing = missing_projections(attention_projections(names), kv_source_layers, layers)
    if not missing:
        return None
    more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
    return (
        f"the checkpoint has no {', '.join(missing[:3])}{more}, which kv_source_layers {kv_source_layers} needs "
        f"(a producer has q/k/v_proj, a consumer q_proj); {FIX_WEIGHTS}"
    )


# a KV-cache quantisation scale (fp8 `k_scale`/`v_scale`, the fused `kv_scale`) as checkpoints name it:
# "model.layers.3.self_attn.k_scale", "...self_attn.attn.v_scale", ModelOpt's "...self_attn.k_proj.k_scale"
KV_CACHE_SCALE = re.compile(r"(?:^|\.)layers\.(\d+)\.self_attn\.(?:attn\.|[kv]_proj\.)?(?:k|v|kv)_scale$")


def shared_kv_scales(name: str, kv_source_layers: list[int]) -> list[str]:
    """The names under which a checkpoint tensor is loaded: [] drops a consumer's own KV-cache scale, a producer's
    is also given to each of its consumers, anything else loads as itself.

    A consumer reads the cache its producer wrote, quantised with the producer's scale; with a scale of its own
    (vLLM's default 1.0 where the checkpoint has none) it would dequantise that cache wrongly.
    "layers.0.self_attn.k_scale", [0, 0, 2, 0] -> [it, "layers.1.self_attn.k_scale", "layers.3.self_attn.k_scale"]
    """
    match = KV_CACHE_SCALE.search(name)
    if match is None or int(match[1]) >= len(kv_source_layers):
        return [name]
    layer = int(match[1])
    if kv_source_layers[layer] != layer:
        return []
    start, end = match.span(1)  # the layer index in the name
    consumers = [c for c, source in enumerate(kv_source_layers) if source == layer and c != layer]
    return [name, *(f"{name[:start]}{c}{name[end:]}" for c in consumers)]


class CLAConfigMixin:
    """Fills in and checks `kv_source_layers` (None: every layer is its own producer, i.e. the stock model)."""

    def _init_kv_source_layers(self) -> None:
        if self.kv_source_layers is None:
            self.kv_source_layers = list(range(self.num_hidden_layers))
        problem = layout_problem(self.kv_source_layers, self.num_hidden_layers) or self._architecture_problem()
        if problem:
            raise ValueError(f"clakit_vllm: cannot serve this CLA checkpoint: {problem}")
        self.kv_source_layers = list(self.kv_source_layers)

    def _architecture_problem(self) -> str | None:
        """vLLM picks the model class by `architectures`: a stock class would give every layer a cache and leave the
        consumers' K/V projections uninitialised, silently."""
        stock = [a for a in self.architectures or [] if a not in ARCHITECTURES]
        if not stock or all(source == layer for layer, source in enumerate(self.kv_source_layers)):
            return None
        return (
            f"architectures {stock} is a stock model class, which ignores kv_source_layers; set architectures to "
            f'["{CLA_ARCHITECTURE[self.model_type]}"] in config.json'
        )


@strict
class LlamaCLAConfig(CLAConfigMixin, LlamaConfig):
    model_type = "llama_cla"
    kv_source_layers: Any = None  # CLA: the one new field (list[int] | None), checked by layout_problem in one line

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self._init_kv_source_layers()  # CLA
        # CLA: as clakit's LlamaCLAConfig, a Llama has no window whatever a `sliding_window` key says (a llamafied
        # Qwen2's; config.json written before clakit wrote it as null): vLLM read the key as the model's window and
        # attended to the last 8 tokens where the transformers model attends to the whole past
        if getattr(self, "sliding_window", None) is not None:
            self.sliding_window = None


@strict
class MistralCLAConfig(CLAConfigMixin, MistralConfig):
    model_type = "mistral_cla"
    kv_source_layers: Any = None  # CLA: the one new field (list[int] | None), checked by layout_problem in one line

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self._init_kv_source_layers()  # CLA
        # CLA: as clakit's Mistral (and transformers'), no attention or MLP biases whatever the config says (a stray
        # key, which clakit wrote into mistral_cla configs): vLLM's Mistral layers read both keys and served the
        # biases no checkpoint holds, every greedy token 0
        for key in ("attention_bias", "mlp_bias"):
            if getattr(self, key, False):
                setattr(self, key, False)


def register_configs() -> None:
    """Register with AutoConfig, and with vLLM's registry so `--trust-remote-code` still uses these classes."""
    for config_class in (LlamaCLAConfig, MistralCLAConfig):
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    try:  # a private table: absent in other vLLM versions, where AutoConfig alone serves (without remote code)
        from vllm.transformers_utils.config import _CONFIG_REGISTRY
    except ImportError:
        return
    _CONFIG_REGISTRY.setdefault("llama_cla", LlamaCLAConfig)
    _CONFIG_REGISTRY.setdefault("mistral_cla", MistralCLAConfig)
