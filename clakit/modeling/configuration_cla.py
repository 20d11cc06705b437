"""CLA configs: Llama/Mistral configs plus one field, `kv_source_layers`.

Layer i attends to the keys/values of layer `kv_source_layers[i]` (<= i). A layer that is its own source is a
*producer* (has k_proj/v_proj, writes the KV cache); every other layer is a *consumer* (no k_proj/v_proj, no cache).
CLA2 over 6 layers is [0, 0, 2, 2, 4, 4]. This file is copied next to saved checkpoints (remote code), so it imports
nothing but transformers.
"""

import transformers
from huggingface_hub.dataclasses import strict
from packaging import version
from transformers import LlamaConfig, MistralConfig

MIN_TRANSFORMERS = "5.24.0"
if version.parse(transformers.__version__) < version.parse(MIN_TRANSFORMERS):
    raise ImportError(
        f"CLA models need transformers>={MIN_TRANSFORMERS} (found {transformers.__version__}): "
        f'pip install "transformers>={MIN_TRANSFORMERS},<6"'
    )


def validate_kv_source_layers(kv_source_layers: list[int], num_hidden_layers: int) -> None:
    """Raise ValueError naming the first problem: wrong length, layer 0 not a producer, forward or consumer source."""
    if len(kv_source_layers) != num_hidden_layers:
        raise ValueError(
            f"kv_source_layers has {len(kv_source_layers)} entries but the model has {num_hidden_layers} layers"
        )
    if kv_source_layers and kv_source_layers[0] != 0:
        raise ValueError(f"layer 0 must be a producer (kv_source_layers[0] == 0), got {kv_source_layers[0]}")
    for layer, source in enumerate(kv_source_layers):
        if not isinstance(source, int) or isinstance(source, bool) or source < 0:
            raise ValueError(f"kv_source_layers[{layer}] must be a layer index >= 0, got {source!r}")
        if source > layer:
            raise ValueError(f"layer {layer} takes K/V from a later layer {source}; sources must be <= their layer")
        if kv_source_layers[source] != source:
            raise ValueError(
                f"layer {layer} takes K/V from layer {source}, which is itself a consumer (of layer "
                f"{kv_source_layers[source]}); point it at a producer"
            )


class CLAConfigMixin:
    """What CLA adds to a config; the dataclass field `kv_source_layers` is declared on each concrete config."""

    def _init_kv_source_layers(self) -> None:
        if self.kv_source_layers is None:  # omitted: every layer is its own producer (the stock model)
            self.kv_source_layers = list(range(self.num_hidden_layers))
        self.kv_source_layers = list(self.kv_source_layers)
        validate_kv_source_layers(self.kv_source_layers, self.num_hidden_layers)

    def validate_layout(self) -> None:
        """A strict-dataclass class validator (run by `config.validate()`, hence by save_pretrained before it writes
        config.json): kv_source_layers assigned, or num_hidden_layers changed, after the config was made."""
        validate_kv_source_layers(self.kv_source_layers, self.num_hidden_layers)

    def to_dict(self) -> dict:
        """# CLA: `auto_map` names the base model for AutoModel beside the causal LM save_pretrained names (it
        writes only the saved class: AutoModel.from_pretrained(..., trust_remote_code=True) failed without clakit,
        "Unrecognized configuration class")."""
        out = super().to_dict()
        names = out.get("auto_map")
        if isinstance(names, dict) and "AutoModelForCausalLM" in names and "AutoModel" not in names:
            base = names["AutoModelForCausalLM"].replace("ForCausalLM", "Model")  # modeling_cla.LlamaCLAModel
            out["auto_map"] = {**names, "AutoModel": base}
        return out

    @property
    def producer_layers(self) -> list[int]:
        return [i for i, s in enumerate(self.kv_source_layers) if s == i]

    @property
    def kv_sharing_modes(self) -> list[str | None]:
        # Read by transformers' DynamicCache/StaticCache: "reuse" layers get a DummyLayer that holds no tensors.
        return [None if s == i else "reuse" for i, s in enumerate(self.kv_source_layers)]


@strict
class LlamaCLAConfig(CLAConfigMixin, LlamaConfig):
    model_type = "llama_cla"
    kv_source_layers: list[int] | None = None  # CLA: the one new field

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self._init_kv_source_layers()
        # CLA: stock Llama attends to the whole past whatever a `sliding_window` key says (a llamafied Qwen2's: its
        # attention passes no window, its mask is full causal), but transformers' caches read the key and kept only
        # the last window of K/V, so cached decoding past it differed from a full forward. A Llama has no window.
        if getattr(self, "sliding_window", None) is not None:
            self.sliding_window = None
        drop_sliding_layer_types(self)


def drop_sliding_layer_types(config) -> None:
    """A Llama's `layer_types` "sliding_attention" entries made full: with the window dropped, transformers' caches
    built a sliding layer of window None for them (generate and every cached decode: TypeError), and the Llama
    applies none anyway."""
    types = getattr(config, "layer_types", None)
    if types:
        config.layer_types = ["full_attention" if kind == "sliding_attention" else kind for kind in types]


@strict
class MistralCLAConfig(CLAConfigMixin, MistralConfig):
    model_type = "mistral_cla"
    kv_source_layers: list[int] | None = None  # CLA: the one new field

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self._init_kv_source_layers()


__all__ = ["LlamaCLAConfig", "MistralCLAConfig", "drop_sliding_layer_types", "validate_kv_source_layers"]
