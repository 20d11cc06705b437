"""The `evaluate` module script shipped with clakit: `evaluate.load(METRIC_PATH)`."""

from pathlib import Path

METRIC_PATH = str(Path(__file__).with_name("clakit_perplexity.py"))
