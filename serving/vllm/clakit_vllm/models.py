"""vLLM's Llama and Mistral, subclassed, changing only what Cross-Layer Attention changes (marked `# CLA:`).

A producer layer is the stock layer. A consumer layer (config.kv_source_layers[i] != i) projects queries only
(`q_proj`, no `qkv_proj`), rotates them, and attends through an `Attention` built with
`kv_sharing_target_layer_name` = its producer's attention: vLLM allocates it no cache and hands it the producer's
(as vLLM's gemma3n.py does for its shared layers). So the KV cache, and vLLM's reported capacity, shrink by the
fraction of consumers. Tensor parallelism follows the stock layers (the consumer's `q_proj` is column-parallel over
heads like the q part of `qkv_proj`); pipeline parallelism needs stage boundaries between CLA groups, since a
consumer must find its producer's attention on its own rank.
"""

import copy
import dataclasses
from collections.abc import Iterable, Iterator

import torch
import vllm

from . import CLA_MODEL_TYPES, untested_vllm

try:  # vLLM internals this module subclasses: where a release moved them, the error names the tested releases
    from vllm.config import CacheConfig, VllmConfig, get_current_vllm_config
    from vllm.distributed.utils import get_pp_indices
    from vllm.model_executor.layers.attention import Attention
    from vllm.model_executor.layers.linear import ColumnParallelLinear
    from vllm.model_executor.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaModel
    from vllm.model_executor.models.mistral import MistralAttention, MistralDecoderLayer, MistralForCausalLM
    from vllm.model_executor.models.utils import WeightsMapper, extract_layer_index
except ImportError as e:
    raise ImportError(f"{untested_vllm(vllm.__version__) or 'clakit_vllm cannot load its vLLM classes'}: {e}") from e

from .configs import layout_problem, missing_attention_tensors, shared_kv_scales, unexpected_kv_tensor


def kv_sharing_target(config, prefix: str) -> str | None:
    """`model.layers.3.self_attn` -> `model.layers.2.self_attn.attn` when layer 3 reads layer 2's K/V; None for
    a producer."""
    layer = extract_layer_index(prefix)
    source = config.kv_source_layers[layer]
    if source == layer:
        return None
    return f"{prefix.rsplit('.layers.', 1)[0]}.layers.{source}.self_attn.attn"


def check_config(config) -> None:
    """Fail at load with one line when the config is not a servable clakit CLA config."""
    model_type = getattr(config, "model_type", None)
    if model_type not in CLA_MODEL_TYPES:
        raise ValueError(
            f"clakit_vllm: model_type {model_type!r} is not a CLA type ({', '.join(CLA_MODEL_TYPES)}); "
            "serve CLA checkpoints written by `clakit convert`"
        )
    if problem := layout_problem(getattr(config, "kv_source_layers", None), config.num_hidden_layers):
        raise ValueError(f"clakit_vllm: cannot serve this CLA checkpoint: {problem}")


def group_starts(kv_source_layers: list[int]) -> list[int]:
    """The layers where a pipeline stage may start: none at or after them reads K/V from before them.
    [0, 1, 2, 0, 0, 5] -> [0, 5]; CLA2 over 6 layers -> [0, 2, 4]."""
    layers = range(len(kv_source_layers))
    return [start for start in layers if all(source >= start for source in kv_source_layers[start:])]


def pipeline_problem(kv_source_layers: list[int], pp_size: int) -> str | None:
    """Why vLLM's split of the layers over `pp_size` pipeline stages cannot serve the layout, as one line; else None.

    A consumer must find its producer's attention on its own stage (vLLM builds only the stage's layers), so every
    stage must start at a group start. vLLM's own check fails in the worker naming neither the split nor the fix.
    """
    stages = [get_pp_indices(len(kv_source_layers), rank, pp_size) for rank in range(pp_size)]
    starts = group_starts(kv_source_layers)
    if all(start in starts for start, _ in stages):
        return None
    split = ", ".join(f"[{start}, {end})" for start, end in stages)
    problem = (
        f"pipeline_parallel_size {pp_size} splits the layers as {split}, and a stage that starts inside a CLA group "
        f"cannot reach its producer; stages may start at layers {starts}"
    )
    if len(starts) < pp_size:
        return f"{problem}: use no more pipeline stages than that ({len(starts)})"
    partition = balanced_partition(starts, pp_size, len(kv_source_layers))
    return f"{problem}: set VLLM_PP_LAYER_PARTITION={','.join(map(str, partition))}"


def balanced_partition(starts: list[int], pp_size: int, num_layers: int) -> list[int]:
    """Layers per stage (VLLM_PP_LAYER_PARTITION), stages starting at `starts` and as even as they allow.
    ([0, 5], 2, 6) -> [5, 1]; ([0, 2, 4], 2, 6) -> [2, 4]. Needs len(starts) >= pp_size."""
    cuts: list[int] = []
    for stage in range(1, pp_size):
        # the start after the previous cut nearest the even split, leaving a start for each later cut
        later, even = pp_size - 1 - stage, stage * num_layers / pp_size
        options = [s for s in starts if s > (cuts[-1] if cuts else 0) and sum(o > s for o in starts) >= later]
        cuts.append(min(options, key=lambda s, even=even: abs(s - even)))
    bounds = [0, *cuts, num_layers]
    return [end - start for start, end in zip(bounds[:-1], bounds[1:], strict=True)]


def fast_prefill_problem(config, model: LlamaModel) -> str | None:
    """Why vLLM's kv_sharing_fast_prefill would give wrong tokens here, as one line; else None.

    vLLM gives the trailing run of KV-sharing layers (of this pipeline stage) attention metadata for the sampled
    tokens only, as for a YOCO/Gemma-3n model that skips its other prefill tokens there; a CLA model runs every token
    through every layer, so those layers would attend with the wrong queries.
    """
    layout, trailing = config.kv_source_layers, []
    for layer in reversed(range(model.start_layer, model.end_layer)):
        if layout[layer] == layer:
            break
        trailing.insert(0, layer)
    if not trailing:
        return None
    return (
        f"kv_sharing_fast_prefill (--kv-sharing-fast-prefill) skips the prefill tokens of the trailing consumer "
        f"layers {trailing}, which a CLA model computes: its tokens would be wrong; serve without it"
    )


def mixed_cache_dtypes_problem(model: LlamaModel) -> str | None:
    """Why the producers' caches cannot be shared, as one line, when --kv-cache-dtype-skip-layers gives them
    different dtypes; else None.

    vLLM then keeps per-layer cache specs (UniformTypeKVCacheSpecs) that list no KV-sharing layer, and its model
    runner fails on the first consumer (KeyError: 'model.layers.3.self_attn.attn') after the weights have loaded.
    """
    producers: dict[tuple, list[int]] = {}
    for layer in range(model.start_layer, model.end_layer):
        attn = model.layers[layer].self_attn.attn
        if model.layers[layer].self_attn.is_producer:
            # by what the cache holds: "auto" (skipped) on a bf16 model and --kv-cache-dtype bfloat16 are one cache
            producers.setdefault((attn.kv_cache_torch_dtype, attn.kv_cache_dtype), []).append(layer)
    if len({torch_dtype for torch_dtype, _ in producers}) < 2:
        return None
    dtypes = "; ".join(f"{dtype} for layers {layers}" for (_, dtype), layers in producers.items())
    return (
        f"--kv-cache-dtype-skip-layers gives the producers' caches different dtypes ({dtypes}), which vLLM cannot "
        "combine with shared caches; skip every producer's layer or none (a consumer follows its producer)"
    )


def cla_weights_mapper(stock: WeightsMapper, kv_source_layers: list[int]) -> WeightsMapper:
    """The stock mapper, with q/k/v stacked into `qkv_proj` on producers only; a consumer's `q_proj` keeps its name."""
    stacked = {k: v for k, v in stock.orig_to_new_stacked.items() if k not in (".q_proj", ".k_proj", ".v_proj")}
    for layer, source in enumerate(kv_source_layers):
        if source == layer:
            for shard in ("q", "k", "v"):
                stacked[f"layers.{layer}.self_attn.{shard}_proj."] = (f"layers.{layer}.self_attn.qkv_proj.", shard)
    return dataclasses.replace(stock, orig_to_new_stacked=stacked)


def producers_cache_config(cache_config: CacheConfig | None, producer: Attention, prefix: str) -> CacheConfig | None:
    """The cache settings of consumer `prefix`'s Attention: `cache_config`, with the layer skipped from KV-cache
    quantisation exactly when its producer is. vLLM picks a layer's cache dtype by the layer's own index
    (--kv-cache-dtype-skip-layers), but a consumer reads its producer's cache: listed apart from its producer it
    would read an fp8 cache as bf16 or a bf16 one as fp8."""
    if cache_config is None or not cache_config.kv_cache_dtype_skip_layers:
        return cache_config
    layer = str(extract_layer_index(prefix))
    skip = [entry for entry in cache_config.kv_cache_dtype_skip_layers if entry != layer]
    if producer.kv_cache_dtype == "auto":  # skipped (or no quantised cache at all: skipping changes nothing)
        skip.append(layer)
    shared = copy.copy(cache_config)  # CLA: vLLM's own config is left as it is
    shared.kv_cache_dtype_skip_layers = skip
    return shared


class CLAAttentionMixin:
    """Turns the stock attention of a consumer layer into a query-only layer reading its producer's cache."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        target = kv_sharing_target(kwargs["config"], kwargs["prefix"])
        self.is_producer = target is None
        if not self.is_producer:
            self._become_consumer(target, **kwargs)

    def _become_consumer(self, target: str, *, hidden_size, prefix, quant_config=None, bias=False, **kwargs):
        # CLA: queries only: (tokens, hidden) -> (tokens, heads_per_rank * head_dim), split over heads as in qkv_proj
        del self.qkv_proj
        self.q_proj = ColumnParallelLinear(
            hidden_size,
            self.total_num_heads * self.head_dim,
            bias=bias,
            quant_config=quant_config,
            prefix=f"{prefix}.q_proj",
        )
        # CLA: rebuild the stock Attention with the same settings plus the sharing target: vLLM gives it no cache.
        # The stock one registered its name in the forward context; drop it so the name can be reused.
        stock = self.attn
        layers = get_current_vllm_config().compilation_config.static_forward_context
        del layers[stock.layer_name]
        self.attn = Attention(
            self.num_heads,
            self.head_dim,
            self.scaling,
            num_kv_heads=self.num_kv_heads,
            cache_config=producers_cache_config(kwargs.get("cache_config"), layers[target], prefix),
            quant_config=quant_config,
            per_layer_sliding_window=stock.sliding_window,
            attn_type=stock.attn_type,
            prefix=stock.layer_name,
            kv_sharing_target_layer_name=target,
        )

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.is_producer:
            return super().forward(positions, hidden_states)
        q, _ = self.q_proj(hidden_states)
        q, _ = self.rotary_emb(positions, q, None)  # CLA: rotate queries only; the producer cached rotated keys
        if getattr(self, "do_llama_4_scaling", False):  # Mistral's optional query scaling, as its stock forward
            q = (q * self._get_llama_4_attn_scale(positions)).to(q.dtype)
        attn_output = self.attn(q, None, None)  # CLA: K/V come from the producer's cache
        output, _ = self.o_proj(attn_output)
        return output


class LlamaCLAAttention(CLAAttentionMixin, LlamaAttention):
    pass


class MistralCLAAttention(CLAAttentionMixin, MistralAttention):
    pass


CLA_ATTENTION = {LlamaAttention: LlamaCLAAttention, MistralAttention: MistralCLAAttention}


class CLADecoderLayerMixin:
    """Swaps the attention class a stock decoder layer asks for for its CLA subclass.

    Sits between MistralDecoderLayer and LlamaDecoderLayer in the MRO, so Mistral's layer (which names its attention
    class itself) keeps its own __init__ unchanged.
    """

    def __init__(self, vllm_config: VllmConfig, prefix: str = "", config=None, attn_layer_type=LlamaAttention):
        super().__init__(
            vllm_config=vllm_config, prefix=prefix, config=config, attn_layer_type=CLA_ATTENTION[attn_layer_type]
        )  # CLA


class LlamaCLADecoderLayer(CLADecoderLayerMixin, LlamaDecoderLayer):
    pass


class MistralCLADecoderLayer(MistralDecoderLayer, CLADecoderLayerMixin, LlamaDecoderLayer):
    pass


class CLAForCausalLMMixin:
    """Checks the config before building, and loads consumers' `q_proj` unstacked."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", **kwargs):
        config = vllm_config.model_config.hf_config
        check_config(config)  # CLA: one line naming the problem, before any work
        pp_size = vllm_config.parallel_config.pipeline_parallel_size
        if pp_size > 1 and (problem := pipeline_problem(config.kv_source_layers, pp_size)):  # CLA
            raise ValueError(f"clakit_vllm: cannot serve this CLA checkpoint: {problem}")
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        model: LlamaModel = self.model
        if vllm_config.cache_config.kv_sharing_fast_prefill and (problem := fast_prefill_problem(config, model)):
            raise ValueError(f"clakit_vllm: cannot serve this CLA checkpoint: {problem}")  # CLA
        if vllm_config.cache_config.kv_cache_dtype_skip_layers and (problem := mixed_cache_dtypes_problem(model)):
            raise ValueError(f"clakit_vllm: cannot serve this CLA checkpoint: {problem}")  # CLA
        model.hf_to_vllm_mapper = cla_weights_mapper(model.hf_to_vllm_mapper, self.config.kv_source_layers)  # CLA

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        # CLA: the checkpoint's attention tensors must match kv_source_layers; vLLM would drop a consumer's K/V
        # with a long message and serve uninitialised memory for a missing projection (its own missing-weight check
        # exempts unquantized layers).
        names: list[str] = []
        loaded = super().load_weights(self._checked(weights, names))
        # only the first call loads the whole checkpoint; later ones (weight syncs, reload_weights) may pass a subset
        first_load, self._cla_weights_loaded = not getattr(self, "_cla_weights_loaded", False), True
        layers = range(self.model.start_layer, self.model.end_layer)  # this pipeline stage's layers
        if first_load and (problem := missing_attention_tensors(names, self.config.kv_source_layers, layers)):
            raise ValueError(f"clakit_vllm: cannot serve this CLA checkpoint: {problem}")
        return loaded

    def _checked(self, weights: Iterable[tuple[str, torch.Tensor]], names: list[str]) -> Iterator:
        """The (name, tensor) pairs, recording names; stops at a consumer's K/V projection. A producer's KV-cache
        scale also goes to its consumers, in place of theirs (shared_kv_scales)."""
        for name, tensor in weights:
            if problem := unexpected_kv_tensor(name, self.config.kv_source_layers):
                raise ValueError(f"clakit_vllm: cannot serve this CLA checkpoint: {problem}")
            names.append(name)
            for loaded_as in shared_kv_scales(name, self.config.kv_source_layers):  # CLA
                yield loaded_as, tensor


class LlamaCLAForCausalLM(CLAForCausalLMMixin, LlamaForCausalLM):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=LlamaCLADecoderLayer)  # CLA


class MistralCLAForCausalLM(CLAForCausalLMMixin, MistralForCausalLM):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=MistralCLADecoderLayer)  # CLA
