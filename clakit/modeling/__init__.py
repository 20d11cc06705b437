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
    "validate_kv_source_layers",
]
