"""benchmarks/targets.json is the one place the speed, memory and quality targets are written; every benchmark
checks its numbers against it through benchmarks/targets.py."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import targets  # noqa: E402

ALL = json.loads((BENCHMARKS / "targets.json").read_text())


@pytest.mark.parametrize("bench", [b for b in ALL if not b.startswith("_")])
def test_every_target_is_bounded_explained_and_checked_by_its_benchmark(bench):
    script = (BENCHMARKS / f"{bench}.py").read_text()
    assert f'check("{bench}"' in script  # the benchmark reads its own targets
    for name, bound in ALL[bench].items():
        assert bound.get("min") is not None or bound.get("max") is not None, name
        assert bound["why"] and set(bound) <= {"min", "max", "why"}, name
        assert f'"{name}"' in script, f"{bench}.py never measures {name}"


def test_no_benchmark_writes_a_target_of_its_own():
    """Targets as literals in the scripts (`"target_ratio": 0.9`, `<= 1.3 and ...`) drift from targets.json."""
    for path in BENCHMARKS.glob("*.py"):
        text = path.read_text()
        assert not re.search(r'"target[s_]\w*":\s*[\d.]', text), path.name
        assert "targets_met" not in text, path.name


def test_check_reports_met_missed_and_not_measured():
    result = targets.check("model_bench", {"cache_ratio": 0.5, "decode_ratio_batch1": 0.94})
    assert result["cache_ratio"]["met"] is True and result["decode_ratio_batch1"]["met"] is False
    assert result["decode_ratio_batch8"] == {"value": None, "min": 0.95, "max": None, "met": None}
    assert result["all_met"] is False
    met = targets.check("model_bench", {"cache_ratio": 0.5, "decode_ratio_batch1": 1.0, "decode_ratio_batch8": 0.95})
    assert met["all_met"] is True
    assert targets.check("model_bench", {"cache_ratio": 0.51})["cache_ratio"]["met"] is False  # min = max = 0.5
    assert targets.check("eval_bench", {"overhead_pct": float("nan")})["overhead_pct"]["met"] is None


def test_a_value_under_a_name_without_a_target_is_an_error():
    with pytest.raises(KeyError, match="no target named"):
        targets.check("eval_bench", {"overhead_percent": 3.0})


def test_model_bench_reports_its_targets_from_the_json(tmp_path):
    """End to end on a 2-layer tiny model: the cache ratio is exact, so its target must be met."""
    out = subprocess.run(
        [sys.executable, str(BENCHMARKS / "model_bench.py"), "--shape", "tiny", "--layers", "2", "--prompt", "8",
         "--new-tokens", "2", "--train-seq", "8", "--repeats", "1"],
        capture_output=True, text=True, check=True, timeout=300,
    )  # fmt: skip
    result = json.loads(out.stdout)
    assert set(result["targets"]) == {*ALL["model_bench"], "all_met"}
    assert result["targets"]["cache_ratio"] == {"value": 0.5, "min": 0.5, "max": 0.5, "met": True}
    assert result["targets"]["decode_ratio_batch1"]["value"] == result["decode_tokens_per_s_batch1"]["ratio"]
