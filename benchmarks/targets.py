"""The benchmarks' targets, read from targets.json beside this file (the one place they are written down).

A benchmark reports `check("model_bench", {"cache_ratio": 0.5, ...})`: per target its value, bounds and whether it
was met (null: not measured in this run), and `all_met`.
"""

import json
import math
from pathlib import Path

TARGETS = Path(__file__).with_name("targets.json")


def load(bench: str) -> dict[str, dict]:
    """The targets of one benchmark: {value name: {"min"/"max": bound (inclusive, null: none), "why": text}}."""
    return json.loads(TARGETS.read_text())[bench]


def check(bench: str, values: dict[str, float | None]) -> dict:
    """Each target of `bench` against its measured value; a target whose value was not measured (absent or None)
    is reported as not measured rather than met, and `all_met` is true only when every target was measured and met."""
    out = {}
    for name, bound in load(bench).items():
        value = values.get(name)
        out[name] = {"value": value, "min": bound.get("min"), "max": bound.get("max"), "met": _met(value, bound)}
    unknown = set(values) - set(out)
    if unknown:  # a value measured under a name targets.json does not know: a typo would silently go unchecked
        raise KeyError(f"{bench}: no target named {sorted(unknown)} in {TARGETS.name}")
    out["all_met"] = all(t["met"] is True for t in out.values())
    return out


def _met(value: float | None, bound: dict) -> bool | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None  # not measured in this run
    low, high = bound.get("min"), bound.get("max")
    return (low is None or value >= low) and (high is None or value <= high)
