"""Uptraining: recover a converted CLA model's quality with LoRA and self-distillation, driven by YAML recipes.

from clakit.uptrain import uptrain, load_recipe
result_dir = uptrain("recipes/smollm2/135m_cla2_cpu.yaml", ["train.max_steps=10"])
"""

from clakit.uptrain.pipeline import uptrain
from clakit.uptrain.recipe import Recipe, load_recipe, resolve_recipe, shipped_recipes

# the CPU recipe on the demo assets of `clakit fetch-demo`: recipes/ in a checkout, package data when installed
DEFAULT_RECIPE = shipped_recipes() / "smollm2" / "135m_cla2_cpu.yaml"

__all__ = ["DEFAULT_RECIPE", "Recipe", "load_recipe", "resolve_recipe", "shipped_recipes", "uptrain"]
