"""clakit's uptraining recipes, installed as package data `clakit.recipes` (see pyproject.toml): read them with
`importlib.resources.files("clakit.recipes")` or `clakit.uptrain.shipped_recipes()`. Nothing to import here."""
