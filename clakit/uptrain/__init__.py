"""Uptraining: recover a converted CLA model's quality with LoRA and self-distillation, driven by YAML recipes.

from clakit.uptrain import uptrain, load_recipe
result_dir = uptrain("recipes/smollm2/135m_cla2_cpu.yaml", ["train.max_steps=10"])
"""

from pathlib import Path

from clakit.uptrain.pipeline import uptrain
from clakit.uptrain.recipe import Recipe, load_recipe

# the CPU recipe on the demo assets of `clakit fetch-demo` (in a source checkout: recipes/ beside the package)
DEFAULT_RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "smollm2" / "135m_cla2_cpu.yaml"

__all__ = ["DEFAULT_RECIPE", "Recipe", "load_recipe", "uptrain"]
