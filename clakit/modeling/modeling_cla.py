"""Cross-Layer Attention for Llama and Mistral: stock classes, subclassed, changing only what CLA changes.

Each change is marked `# CLA:`. A producer layer computes K/V as usual, writes them to the cache, and publishes the
full (past + current) K/V in a per-forward `KVSharingDict` keyed by its layer index; its consumers attend with their
own queries (RoPE applied to the queries only: the producer's keys are already rotated) to those K/V. Keying by
producer index, not by layer type, keeps non-reentrant gradient checkpointing correct with several producers: a
consumer recomputed in the backward pass reads its own producer's K/V, not the last one written.

Each CLA model is built once: the constructors below are the stock ones (as transformers' modular files copy them)
with CLA's modules in place of the stock ones, so no stock decoder stack is built and thrown away, and the one
`post_init` sees the final modules (the legacy `config.gradient_checkpointing` then reaches the CLA layers).

This file is copied next to saved checkpoints (remote code): it imports only transformers, torch and its sibling.
"""

import copy
import functools
from collections.abc import Callable

import torch
from torch import nn
from transformers.cache_utils import DummyLayer, KVSharingDict, QuantizedCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaMLP,
    LlamaModel,
    LlamaPreTrainedModel,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
    rotate_half,
)
from transformers.models.mistral.modeling_mistral import (
    MistralAttention,
    MistralDecoderLayer,
    MistralForCausalLM,
    MistralMLP,
    MistralModel,
    MistralPreTrainedModel,
    MistralRMSNorm,
    MistralRotaryEmbedding,
)

from .configuration_cla import LlamaCLAConfig, MistralCLAConfig, validate_kv_source_layers


def _shared_key(layer_idx: int) -> str:
    return str(layer_idx)


class CLASharingDict(KVSharingDict):
    """The per-forward K/V sharing dict, plus `cache_kwargs`: producer index -> the attention kwargs its cache's
    `update` set. Continuous batching's PagedAttentionCache.update picks, in the kwargs, the producer's pages and its
    group's key lengths (`cu_seq_lens_k`, `max_length_k`: dicts by layer type until then; with a block table also
    `k_cache`, `v_cache`); a consumer calls no update, so it attends with its producer's."""

    def __init__(self, *args, **kwargs):  # UserDict's signature, as code that rebuilds a mapping by type calls it
        super().__init__(*args, **kwargs)
        self.cache_kwargs: dict[int, dict] = {}


def _producers_only(group_layers: Callable) -> Callable:
    """transformers' continuous batching sizes its paged cache from `group_layers_by_attn_type(config)`: one page per
    layer of each group, every layer. CLA: a consumer writes no K/V, so for a CLA config (one with kv_source_layers)
    the groups hold its producers only; a CLA2 paged cache was the stock model's size, half of it never written."""
    if getattr(group_layers, "_cla_producers_only", False):  # clakit's copy and a remote-code copy both imported
        return group_layers

    @functools.wraps(group_layers)
    def grouped(config) -> dict[str, list[int]]:
        groups = group_layers(config)
        sources = getattr(config, "kv_source_layers", None)
        if sources is None:
            return groups
        return {kind: [i for i in layers if sources[i] == i] for kind, layers in groups.items()}

    grouped._cla_producers_only = True
    return grouped


try:  # continuous batching's internals, as in transformers 5.24-5.25 (transformers>=5.24,<6 allows later ones)
    from transformers.generation.continuous_batching import PagedAttentionCache
    from transformers.generation.continuous_batching import cache as paged_cache

    paged_cache.group_layers_by_attn_type = _producers_only(paged_cache.group_layers_by_attn_type)
except (ImportError, AttributeError):  # moved in a later 5.x: the CLA model still loads and runs everything else

    class PagedAttentionCache:  # no cache is an instance of it: no paged kwargs to keep for consumers
        pass


class WeightsMismatch(ValueError):
    """A checkpoint's weights do not match its config (see loading_problem)."""


def loading_problem(
    info: dict, fix: str | None = None, settings: str = "config.json", num_layers: int | None = None
) -> str | None:
    """What is wrong with a load, from `from_pretrained(..., output_loading_info=True)`'s info, or None.

    transformers initialises a tensor the checkpoint lacks (or holds in another shape) at random and drops a decoder
    tensor the model has no place for, with only a log table. Either means config.json does not describe these
    weights (kv_source_layers or num_hidden_layers edited): the model would run, wrongly. (Known leftovers such as
    rotary inv_freq buffers are not in `unexpected_keys`.) `fix`, `settings`: the way out and
    where the settings live (a GGUF's: its metadata); `num_layers`: the model's, where known (a tensor of a layer
    past them is a layer count edited, not a layout)."""
    missing = sorted(info.get("missing_keys") or ())
    mismatched = sorted(info.get("mismatched_keys") or ())  # (name, checkpoint shape, model shape)
    # decoder tensors: "model.layers.N..." in a causal LM's checkpoint, "layers.N..." in a base model's (saved from
    # LlamaCLAModel), whose dropped K/V went unnoticed
    unexpected = sorted(k for k in info.get("unexpected_keys") or () if k.removeprefix("model.").startswith("layers."))
    fix = fix or "restore the config.json written with these weights, or convert again"
    if mismatched:
        name, theirs, ours = mismatched[0]
        return (
            f"{settings} does not match the weights: {name} is {list(theirs)} in the checkpoint but the config "
            f"makes it {list(ours)} ({len(mismatched)} tensors differ); {fix}"
        )
    if missing == ["lm_head.weight"]:  # a base model's save (`model.model.save_pretrained`): no head, not a bad config
        return (
            "the checkpoint has no lm_head.weight (a base model saved without its language-model head, which would be "
            "randomly initialised): load it with AutoModel, or give the causal LM's checkpoint"
        )
    if missing:
        return (
            f"the checkpoint lacks {len(missing)} tensors its {settings} needs (e.g. {missing[0]}), which would be "
            f"randomly initialised; {fix}"
        )
    if unexpected:
        kv = all(k.rsplit(".", 2)[-2] in ("k_proj", "v_proj") for k in unexpected)  # weights and biases
        if num_layers is not None and any(_layer_of(k) >= num_layers for k in unexpected):
            kv = False  # K/V of a layer the model does not have: its layer count, not its layout (a stock model's)
        what = "kv_source_layers" if kv else "num_hidden_layers"
        return (
            f"the checkpoint holds {len(unexpected)} tensors its {settings} has no place for (e.g. {unexpected[0]}), "
            f"which would be dropped: its {what} do not match the weights; {fix}"
        )
    return None


def _layer_of(key: str) -> int:
    """N of a decoder tensor's name: model.layers.N.* (a causal LM's) or layers.N.* (a base model's)."""
    index = key.removeprefix("model.").split(".")[1]
    return int(index) if index.isdigit() else -1


class CLAAttentionMixin:
    """Attention whose K/V come from `config.kv_source_layers[layer_idx]`; shared by the Llama and Mistral classes.
    `_bias_key`: the config key that gives the projections biases, as the stock attention reads it (None: never);
    `_sliding`: whether the stock attention passes config.sliding_window to the attention function (Mistral)."""

    _bias_key: str | None = "attention_bias"
    _sliding: bool = False

    def __init__(self, config, layer_idx: int):
        nn.Module.__init__(self)  # the stock attention's fields, as its __init__ sets them
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        self.kv_source = config.kv_source_layers[layer_idx]  # CLA
        self.is_producer = self.kv_source == layer_idx  # CLA
        bias = bool(getattr(config, self._bias_key, False)) if self._bias_key else False
        hidden, heads, kv_heads = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
        self.q_proj = nn.Linear(hidden, heads * self.head_dim, bias=bias)
        if self.is_producer:  # CLA: consumers hold no K/V projections (and no cache)
            self.k_proj = nn.Linear(hidden, kv_heads * self.head_dim, bias=bias)
            self.v_proj = nn.Linear(hidden, kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(heads * self.head_dim, hidden, bias=bias)

    def _own_kv(self, hidden_states, query_states, position_embeddings, cache, kwargs, shared_kv_states):
        """Producer: project, rotate, cache. Returns q, k, v; shapes (batch, heads|kv_heads, seq, head_dim)."""
        hidden_shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)
        if isinstance(cache, PagedAttentionCache):  # CLA: keep what its update sets in kwargs for the consumers
            before = dict(kwargs)
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx, kwargs=kwargs)
            changed = {k: v for k, v in kwargs.items() if k not in before or before[k] is not v}
            shared_kv_states.cache_kwargs[self.layer_idx] = changed
        elif cache is not None:
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx, kwargs=kwargs)
        return query_states, key_states, value_states

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        cache=None,
        shared_kv_states: KVSharingDict | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        kwargs.pop("past_key_values", None)
        input_shape = hidden_states.shape[:-1]
        query_states = self.q_proj(hidden_states).view(*input_shape, -1, self.head_dim).transpose(1, 2)
        if shared_kv_states is None:
            raise ValueError("CLA attention needs `shared_kv_states`; call it through a CLA model, not alone")

        if self.is_producer:
            query_states, key_states, value_states = self._own_kv(
                hidden_states, query_states, position_embeddings, cache, kwargs, shared_kv_states
            )
            shared_kv_states[_shared_key(self.layer_idx)] = (key_states, value_states)
        else:
            # CLA: rotate the queries only; the producer's keys were rotated (and cached) by the producer
            cos, sin = position_embeddings
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
            query_states = query_states * cos + rotate_half(query_states) * sin
            key_states, value_states = shared_kv_states[_shared_key(self.kv_source)]
            kwargs.update(getattr(shared_kv_states, "cache_kwargs", {}).get(self.kv_source, {}))  # CLA: paged cache

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        if self._sliding:  # Mistral, as its stock attention; stock Llama never passes a window, whatever its config
            kwargs["sliding_window"] = getattr(self.config, "sliding_window", None)
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights


class CLADecoderLayerMixin:
    """The stock decoder layer's constructor with the CLA attention; `_parts` = (attention, MLP, RMSNorm) classes."""

    _parts: tuple = ()

    def __init__(self, config, layer_idx: int):
        GradientCheckpointingLayer.__init__(self)
        attention_cls, mlp_cls, norm_cls = self._parts
        self.hidden_size = config.hidden_size
        self.self_attn = attention_cls(config=config, layer_idx=layer_idx)  # CLA
        self.mlp = mlp_cls(config)
        self.input_layernorm = norm_cls(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = norm_cls(config.hidden_size, eps=config.rms_norm_eps)


class CLAModelMixin:
    """The stock decoder model's constructor with CLA decoder layers; `_parts` = (layer, RMSNorm, rotary) classes."""

    _parts: tuple = ()

    def _init_model(self, config, stock_cls) -> None:
        # CLA: a layout assigned (or num_hidden_layers changed) after the config was made was never checked: the
        # model was built anyway, then failed at its first forward (KeyError) or saved a config that cannot load
        validate_kv_source_layers(config.kv_source_layers, config.num_hidden_layers)
        super(stock_cls, self).__init__(config)  # CLA: skip the stock constructor, which builds a stock stack
        layer_cls, norm_cls, rotary_cls = self._parts
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([layer_cls(config, i) for i in range(config.num_hidden_layers)])  # CLA
        self.norm = norm_cls(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = rotary_cls(config=config)
        self.gradient_checkpointing = False
        self.post_init()


def _sharing_forward(stock_forward):
    """The stock model forward, given a fresh K/V sharing dict per call (producers write, their consumers read);
    `functools.wraps` keeps its signature visible (`inspect.signature(model.forward)` shows input_ids, ...)."""

    @functools.wraps(stock_forward)
    def forward(self, *args, **kwargs):
        kwargs["shared_kv_states"] = CLASharingDict()  # CLA
        return stock_forward(self, *args, **kwargs)

    return forward


def _init_causal_lm(self, config, stock_cls, model_cls) -> None:
    """The stock causal-LM constructor around the CLA model (the stock one would build a stock model first)."""
    super(stock_cls, self).__init__(config)  # CLA: skip the stock constructor
    self.model = model_cls(config)  # CLA
    self.vocab_size = config.vocab_size
    self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
    self.post_init()


class CLAQuantizedCache(QuantizedCache):
    """transformers' QuantizedCache (its backends and settings) for a CLA model: producer layers quantise, consumer
    layers get a DummyLayer (no tensors) as in DynamicCache. The stock class refuses the consumers' "dummy" layer
    type ("only supported for models with only full attention layers"), so generate(cache_implementation=
    "quantized") failed on every CLA model; it is built here for the all-producer layout, consumers then emptied."""

    def __init__(self, backend: str, config, **kwargs):
        config = config.get_text_config(decoder=True)
        all_producers = copy.deepcopy(config)
        all_producers.kv_source_layers = list(range(config.num_hidden_layers))  # kv_sharing_modes: all None
        super().__init__(backend, all_producers, **kwargs)
        self.layers = [
            DummyLayer() if mode == "reuse" else layer
            for layer, mode in zip(self.layers, config.kv_sharing_modes, strict=True)
        ]


class CLAPreTrainedMixin:
    """Refuses re-entrant checkpointing, which silently drops the consumer -> producer gradient, and weights that do
    not match the config's layout; builds generate's quantized cache with no cache for consumers."""

    def _prepare_cache_for_generation(self, generation_config, model_kwargs: dict, *args, **kwargs):
        quantized = generation_config.cache_implementation == "quantized" and generation_config.use_cache is not False
        if not quantized or model_kwargs.get("cache") is not None:  # the stock rules (and its refusal of both)
            return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        # CLA: as the stock "quantized" branch, with CLAQuantizedCache; a copy, as generate may reuse cache_config
        cache_config = copy.deepcopy(generation_config.cache_config or {})
        cache_config.setdefault("config", self.config.get_text_config(decoder=True))
        model_kwargs["cache"] = CLAQuantizedCache(cache_config.pop("backend", "quanto"), **cache_config)
        if generation_config.is_assistant:  # as the stock method: an assistant's cache is rolled back
            model_kwargs["cache"].activate_past_recording(
                recurrent_states_to_keep=generation_config.num_assistant_tokens
            )

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        # CLA: never run with randomly initialised K/V (a config whose kv_source_layers were edited); mismatched
        # shapes are let through only when the caller asked for that (ignore_mismatched_sizes=True)
        return_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        checked = {**info, "mismatched_keys": ()} if kwargs.get("ignore_mismatched_sizes") else info
        problem = loading_problem(checked, num_layers=model.config.num_hidden_layers)
        if problem:
            raise WeightsMismatch(problem)
        return (model, info) if return_info else model

    def _activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, *args, **kwargs):
        activation_checkpointing_kwargs = dict(activation_checkpointing_kwargs or {})
        if activation_checkpointing_kwargs.get("use_reentrant", False):
            raise ValueError(
                "CLA models need non-reentrant gradient checkpointing (use_reentrant=False): re-entrant "
                "checkpointing drops the gradient from consumer layers into their producer's K/V"
            )
        activation_checkpointing_kwargs["use_reentrant"] = False
        return super()._activation_checkpointing_enable(activation_checkpointing_kwargs, *args, **kwargs)


# --- Llama ---------------------------------------------------------------------------------------------------


class LlamaCLAAttention(CLAAttentionMixin, LlamaAttention):
    pass


class LlamaCLADecoderLayer(CLADecoderLayerMixin, LlamaDecoderLayer):
    _parts = (LlamaCLAAttention, LlamaMLP, LlamaRMSNorm)


class LlamaCLAPreTrainedModel(CLAPreTrainedMixin, LlamaPreTrainedModel):
    config_class = LlamaCLAConfig
    config: LlamaCLAConfig
    _no_split_modules = ["LlamaCLADecoderLayer"]
    _can_record_outputs = {"hidden_states": LlamaCLADecoderLayer, "attentions": LlamaCLAAttention}


class LlamaCLAModel(CLAModelMixin, LlamaCLAPreTrainedModel, LlamaModel):
    _parts = (LlamaCLADecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding)
    forward = _sharing_forward(LlamaModel.forward)

    def __init__(self, config: LlamaCLAConfig):
        self._init_model(config, LlamaModel)


class LlamaCLAForCausalLM(LlamaCLAPreTrainedModel, LlamaForCausalLM):
    def __init__(self, config: LlamaCLAConfig):
        _init_causal_lm(self, config, LlamaForCausalLM, LlamaCLAModel)


# --- Mistral -----------------------------------------------------------------------------------------------------


class MistralCLAAttention(CLAAttentionMixin, MistralAttention):
    # CLA: as the stock Mistral, no attention biases whatever the config says (a stock Mistral checkpoint whose
    # config.json carries attention_bias: true was refused for lacking biases the stock class never reads)
    _bias_key = None
    _sliding = True


class MistralCLADecoderLayer(CLADecoderLayerMixin, MistralDecoderLayer):
    _parts = (MistralCLAAttention, MistralMLP, MistralRMSNorm)


class MistralCLAPreTrainedModel(CLAPreTrainedMixin, MistralPreTrainedModel):
    config_class = MistralCLAConfig
    config: MistralCLAConfig
    _no_split_modules = ["MistralCLADecoderLayer"]
    _can_record_outputs = {"hidden_states": MistralCLADecoderLayer, "attentions": MistralCLAAttention}


class MistralCLAModel(CLAModelMixin, MistralCLAPreTrainedModel, MistralModel):
    _parts = (MistralCLADecoderLayer, MistralRMSNorm, MistralRotaryEmbedding)
    forward = _sharing_forward(MistralModel.forward)

    def __init__(self, config: MistralCLAConfig):
        self._init_model(config, MistralModel)


class MistralCLAForCausalLM(MistralCLAPreTrainedModel, MistralForCausalLM):
    def __init__(self, config: MistralCLAConfig):
        _init_causal_lm(self, config, MistralForCausalLM, MistralCLAModel)


__all__ = [
    "LlamaCLAModel",
    "LlamaCLAForCausalLM",
    "LlamaCLAPreTrainedModel",
    "MistralCLAModel",
    "MistralCLAForCausalLM",
    "MistralCLAPreTrainedModel",
]
