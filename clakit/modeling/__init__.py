"""CLA model classes for Llama and Mistral, registered with transformers' Auto* factories on import."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_cla import LlamaCLAConfig, MistralCLAConfig, validate_kv_source_layers
from .modeling_cla import (
    LlamaCLAForCausalLM,
    LlamaCLAModel,
    LlamaCLAPreTrainedModel,
    MistralCLAForCausalLM,
    MistralCLAModel,
    MistralCLAPreTrainedModel,
)

CLA_CLASSES = {  # source architecture -> (config, model, causal LM)
    "llama": (LlamaCLAConfig, LlamaCLAModel, LlamaCLAForCausalLM),
    "mistral": (MistralCLAConfig, MistralCLAModel, MistralCLAForCausalLM),
}


def attention_window(config) -> int | None:
    """How many past tokens (itself included) each token's attention reaches, or None for all of them: the config's
    `sliding_window` (Mistral's, a CLA Mistral's, and that of the other causal LMs `clakit eval` reads: Qwen2,
    Gemma, ... whose masks and `layer_types` apply it), except a Llama's. Stock Llama's attention applies no window
    whatever its config carries (a llamafied Qwen2's `sliding_window`), though transformers' caches read the key for
    it (stock Llama only: the CLA Llama config drops it)."""
    llama = getattr(config, "model_type", "").removesuffix("_cla") == "llama"
    return None if llama else getattr(config, "sliding_window", None)


def _register() -> None:
    for config_cls, model_cls, lm_cls in CLA_CLASSES.values():
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        AutoModel.register(config_cls, model_cls, exist_ok=True)
        AutoModelForCausalLM.register(config_cls, lm_cls, exist_ok=True)
        # save_pretrained then writes auto_map and copies the modeling sources next to the weights
        config_cls.register_for_auto_class()
        model_cls.register_for_auto_class("AutoModel")
        lm_cls.register_for_auto_class("AutoModelForCausalLM")


_register()

__all__ = [
    "CLA_CLASSES",
    "LlamaCLAConfig",
    "LlamaCLAForCausalLM",
    "LlamaCLAModel",
    "LlamaCLAPreTrainedModel",
    "MistralCLAConfig",
    "MistralCLAForCausalLM",
    "MistralCLAModel",
    "MistralCLAPreTrainedModel",
    "attention_window",
    "validate_kv_source_layers",
]
