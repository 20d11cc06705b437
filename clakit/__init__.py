"""clakit: retrofit Cross-Layer Attention (CLA) onto pretrained Llama and Mistral checkpoints."""

__version__ = "0.1.0"

from clakit import modeling  # noqa: E402,F401  (registers the CLA classes with the Auto* factories)
