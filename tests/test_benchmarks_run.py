"""The benchmarks reviewers run: each runs end to end on a tiny model (or refuses bad input with one line and exit 2,
before any work and without touching an existing output), documents every flag in --help, and reports its settings,
provenance and (where targets.json has them) the targets' check in the JSON it prints and writes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import build_tokenizer, make_text, save_checkpoint, tiny_model

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
SCRIPTS = sorted(p.name for p in BENCHMARKS.glob("*.py") if p.name not in {"targets.py", "common.py"})

# Runs many (script, argv) cases in one interpreter (imports paid once): each as `python SCRIPT ARGV...` would,
# recording its exit status, stdout, stderr and whether a traceback escaped. "audit" cases record the options
# that have no help text instead of parsing.
RUNNER = r"""
import argparse, contextlib, io, json, runpy, sys, traceback
cases = json.loads(sys.argv[1])
sys.path.insert(0, sys.argv[2])
parse = argparse.ArgumentParser.parse_args
results = []
for script, argv, audit in cases:
    out, err, code, tb, missing = io.StringIO(), io.StringIO(), 0, None, None
    if audit:
        def parse_args(self, *a, **k):
            global missing
            missing = [a.option_strings[0] if a.option_strings else a.dest for a in self._actions
                       if not a.help and not isinstance(a, argparse._HelpAction)]
            raise SystemExit(0)
        argparse.ArgumentParser.parse_args = parse_args
    sys.argv = [script, *argv]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            code, tb = 1, traceback.format_exc()
    argparse.ArgumentParser.parse_args = parse
    results.append({"code": code, "stdout": out.getvalue(), "stderr": err.getvalue(), "traceback": tb,
                    "missing_help": missing})
print(json.dumps(results))
"""


def run_cases(cases: list[tuple[str, list[str], bool]], cwd: Path) -> list[dict]:
    cases = [(str(BENCHMARKS / script), argv, audit) for script, argv, audit in cases]
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, json.dumps(cases), str(BENCHMARKS)],
        capture_output=True, text=True, timeout=300, cwd=cwd,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def assert_provenance(report: dict, settings: dict) -> None:
    prov = report["provenance"]
    assert {"clakit", "torch", "transformers", "python", "command", "created"} <= set(prov)
    for key, value in settings.items():
        assert prov["settings"][key] == value, key


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """A tiny Llama checkpoint, its CLA2 conversion (same shapes) and a held-out text."""
    from clakit.convert.inmemory import cla_model_from
    from clakit.convert.layout import uniform_layout

    work = tmp_path_factory.mktemp("bench")
    tok = build_tokenizer()
    save_checkpoint(tiny_model("llama"), tok, work / "src")
    save_checkpoint(cla_model_from(tiny_model("llama"), uniform_layout(4, 2)), tok, work / "cla2")
    (work / "heldout.txt").write_text(make_text(600, seed=3))
    (work / "calib.txt").write_text(make_text(600, seed=4))
    return {"work": work, "src": work / "src", "cla2": work / "cla2", "heldout": work / "heldout.txt",
            "calib": work / "calib.txt"}  # fmt: skip


def test_every_flag_of_every_benchmark_is_described_in_its_help(tmp_path):
    results = run_cases([(s, [], True) for s in SCRIPTS] + [(s, ["--help"], False) for s in SCRIPTS], tmp_path)
    audits, helps = results[: len(SCRIPTS)], results[len(SCRIPTS) :]
    for script, audit, shown in zip(SCRIPTS, audits, helps, strict=True):
        assert audit["traceback"] is None, f"{script}: {audit['traceback']}"
        assert audit["missing_help"] == [], f"{script}: flags without help: {audit['missing_help']}"
        assert shown["code"] == 0 and "usage:" in shown["stdout"], script
        # the description is the docstring, not its first line only: the examples and the output are described
        assert "python benchmarks/" in shown["stdout"] and "JSON" in shown["stdout"], script


def test_bad_input_is_one_line_and_exit_2_before_any_work(tmp_path):
    """Each refused before a model is loaded; an existing output file is never replaced without --force."""
    existing = tmp_path / "mine.json"
    existing.write_text("a file the user wrote\n")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("keep")
    missing = tmp_path / "nope.txt"
    cases = [
        ("model_bench.py", ["--layers", "3"]),  # CLA2 of 3 layers keeps 2 of 3 caches: not the target's 0.5
        ("model_bench.py", ["--layers", "0"]),
        ("model_bench.py", ["--layers", "2", "--out", existing]),
        ("eval_bench.py", ["--model", tmp_path, "--data", missing]),
        ("eval_bench.py", ["--model", tmp_path, "--data", existing, "--out", existing]),
        ("checkpoint_speed.py", [missing]),
        ("checkpoint_speed.py", [tmp_path, "--out", existing]),
        ("convert_bench.py", ["--inits", "calibrated"]),  # no calibration text in this benchmark
        ("convert_bench.py", ["--shard-size", "5XB"]),
        ("convert_bench.py", ["--workdir", missing]),
        ("convert_bench.py", ["--out", existing]),
        ("convert_scale.py", ["--calib", missing]),
        ("convert_scale.py", ["--layers", "0"]),
        ("convert_scale.py", ["--calib", existing, "--out", existing]),
        ("uptrain_bench.py", ["--no-speed"]),  # measures nothing
        ("uptrain_bench.py", ["--json", existing]),
        ("uptrain_bench.py", ["--no-speed", "--curve", "--out", run_dir]),  # a folder it did not write
        ("uptrain_scale.py", ["--steps", "0"]),
        ("uptrain_scale.py", ["--shape", "huge"]),
        ("uptrain_scale.py", ["--out", existing]),
        ("serve_bench.py", ["--cla", tmp_path]),  # --cla alone was ignored: the SmolLM2 pair ran instead
        ("serve_bench.py", ["--original", tmp_path]),
        ("serve_bench.py", ["-o", existing]),
        ("quality_bench.py", ["--savings", "x"]),
        ("quality_bench.py", ["--methods", "meen"]),
        ("quality_bench.py", ["--model", "no-label"]),
        ("quality_bench.py", ["--cla-kv-bits", "3"]),
        ("quality_bench.py", ["--chunk", "0"]),  # refused after the model loaded and the original was scored
        ("quality_bench.py", ["--out", tmp_path / "same.json", "--plot", tmp_path / "same.json"]),  # the plot won
        # refused by the first conversion, after the checkpoints were made, as a traceback naming a gone temp folder
        ("convert_scale.py", ["--layers", "2", "--max-shard-size", "bogus"]),
        ("convert_scale.py", ["--layers", "2", "--seq-len", "4096"]),
        ("convert_scale.py", ["--layers", "2", "--out", tmp_path / "plot.png"]),  # the JSON replaced its plot
        ("quality_bench.py", ["--out", existing]),
        ("gpu_check.py", ["--parts", "modelling"]),
        ("gpu_check.py", ["--out", existing]),
        ("reconstruct_variants.py", ["base", "--layout", "[0,0,"]),
        ("reconstruct_variants.py", ["bsae", "--layout", "[0,0]"]),
        ("reconstruct_variants.py", ["base", "--layout", "[0,0]", "--eval-tokens", "256"]),  # < one 512 window
        ("layout_refine.py", ["dp", "--out-dir", tmp_path, "--extra-eval", missing]),
        ("layout_refine.py", ["dp", "--out-dir", tmp_path, "--out", existing]),
        ("convert_quality.py", [tmp_path, "--calib-data", missing, "--eval-data", existing]),
        ("convert_quality.py", [tmp_path, "--calib-data", existing, "--eval-data", existing, "--inits", "x"]),
        ("convert_quality.py", [tmp_path, "--calib-data", existing, "--eval-data", existing, "--calib-tokens", "64"]),
        # the calibration text scored as held-out (exit 0, reported as held-out perplexity)
        ("convert_quality.py", [tmp_path, "--calib-data", existing, "--eval-data", existing]),
        ("distill_variants.py", [missing]),
        ("distill_variants.py", [tmp_path, "--train", "everything"]),
    ]
    results = run_cases([(s, [str(a) for a in argv], False) for s, argv in cases], tmp_path)
    for (script, argv), r in zip(cases, results, strict=True):
        what = f"{script} {' '.join(map(str, argv))}: {r['stderr'][-2000:]}{r['traceback'] or ''}"
        assert r["traceback"] is None and "Traceback" not in r["stderr"], what
        assert r["code"] == 2, what
        line = r["stderr"].strip()
        assert line and "\n" not in line and "error" in line, what
        assert r["stdout"] == "", what
    assert existing.read_text() == "a file the user wrote\n"
    assert (run_dir / "notes.txt").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.json", "run"]  # nothing staged was left behind


def test_the_benchmarks_run_end_to_end_on_tiny_models_and_report_settings_provenance_and_targets(tiny):
    """One interpreter runs them all (as `python benchmarks/X.py ...` would), so the imports are paid once."""
    work = tiny["work"]
    out = work / "model_bench.json"
    model_args = ["--shape", "tiny", "--layers", "2", "--prompt", "8", "--new-tokens", "2", "--train-seq", "8"]
    model_args += ["--repeats", "1", "--out", str(out)]
    cases = [
        ("model_bench.py", model_args),
        ("model_bench.py", [*model_args, "--force"]),
        ("eval_bench.py", ["--model", tiny["cla2"], "--data", tiny["heldout"], "--seq-len", "32", "--max-tokens",
                           "160", "--repeats", "1"]),
        # token ids were drawn from 100..40000: a model of a smaller vocabulary failed with an index error
        ("checkpoint_speed.py", [tiny["src"], tiny["cla2"], "--prompt", "16", "--repeats", "1"]),
        ("convert_bench.py", ["--shape", "tiny", "--size-gb", "0.001", "--shard-size", "100KB", "--inits", "producer",
                              "--repeats", "1"]),
        ("uptrain_bench.py", ["--source", tiny["src"], "--steps", "1", "--batch", "1", "--seq-len", "8"]),
        # the calibration sequence was the converter's default: a short --calib-tokens failed after the first inits
        ("convert_quality.py", [tiny["src"], "--calib-data", tiny["calib"], "--eval-data", tiny["heldout"],
                                "--inits", "mean,calibrated", "--eval-tokens", "96", "--seq-len", "32",
                                "--calib-tokens", "128", "--calib-seq-len", "32"]),
    ]  # fmt: skip
    results = run_cases([(s, [str(a) for a in argv], False) for s, argv in cases], work)
    reports = []
    for (script, _), r in zip(cases, results, strict=True):
        assert r["code"] == 0 and r["traceback"] is None, f"{script}: {r['stderr'][-2000:]}{r['traceback']}"
        reports.append(json.loads(r["stdout"][r["stdout"].index("{") :]))
    first, forced, evaluated, speed, converted, up, quality = reports

    assert_provenance(first, {"shape": "tiny", "layers": 2, "prompt": 8, "new_tokens": 2, "repeats": 1})
    assert first["targets"]["cache_ratio"]["met"] is True  # measured by clakit.eval.kvcache: exactly half
    assert first["cache_bytes_per_token"]["cla2"] * 2 == first["cache_bytes_per_token"]["original"]
    assert json.loads(out.read_text()) == forced != first  # --force replaced it with the second run's report
    assert not list(work.glob(".*partial"))  # staged, then renamed

    assert_provenance(evaluated, {"seq_len": 32, "max_tokens": 160, "repeats": 1})
    assert evaluated["data"] == str(tiny["heldout"])  # the text scored (the default's was not recorded)
    assert evaluated["targets"]["overhead_pct"]["value"] == evaluated["overhead_pct"]
    assert evaluated["targets"]["rss_over_weights"]["value"] == evaluated["rss_over_weights"] > 0
    assert set(evaluated["targets"]) == {"overhead_pct", "rss_over_weights", "all_met"}

    assert_provenance(speed, {"prompt": 16, "repeats": 1})
    models = speed["models"]
    assert models[str(tiny["src"])]["ratio_to_first"]["default"]["decode_tokens_per_s"] == 1.0
    cla = models[str(tiny["cla2"])]
    assert cla["ratio_to_first"]["default"]["decode_tokens_per_s"] > 0 and cla["subnormal_weights"] == 0

    assert_provenance(converted, {"shape": "tiny", "inits": "producer", "repeats": 1})
    assert set(converted["producer"]["targets"]) == {"convert_over_copytree", "rss_margin_mb", "all_met"}
    assert converted["producer"]["targets"]["rss_margin_mb"]["value"] is not None

    assert_provenance(up, {"steps": 1, "batch": 1, "seq_len": 8})
    ratio = up["targets"]["ratio_cla2_vs_original"]
    assert ratio["value"] == up["speed"]["ratio_cla2_vs_original"] and ratio["met"] is not None
    assert up["targets"]["wall_minutes"]["met"] is None  # the curve was not run

    assert_provenance(quality, {"inits": "mean,calibrated", "calib_seq_len": 32, "seq_len": 32})
    held = str(tiny["heldout"])
    assert quality["original"][held] > 0 and quality["mean"][held] > 0 and quality["calibrated"][held] > 0


def test_convert_scale_reports_its_targets_as_not_measured_when_24_layers_were_not_run():
    """It returned no check at all unless both 8 and 24 layers ran: a short run looked as if it had no targets."""
    sys.path.insert(0, str(BENCHMARKS))
    import convert_scale

    row = {"layers": 8, "model_fp32_mb": 100.0, "wall_s": 1.0, "wall_s_per_layer": 0.125}
    result = {"runs": {"reconstruct": [{**row, "peak_rss_above_import_mb": 40.0}]}}
    checked = convert_scale.targets(result)["reconstruct"]
    assert checked["rss_24_over_8"]["met"] is None and checked["all_met"] is False
    rows = [{**row, "peak_rss_above_import_mb": 40.0}, {**row, "layers": 24, "model_fp32_mb": 300.0,
                                                         "peak_rss_above_import_mb": 50.0}]  # fmt: skip
    checked = convert_scale.targets({"runs": {"auto": rows}})["auto"]
    assert checked["rss_24_over_8"]["value"] == 1.25 and checked["rss_24_over_fp32_model"]["value"] == 0.167
    assert checked["all_met"] is True


# quality_bench on the tiny model in place of the demo's SmolLM2 (its assets: clakit.demo.fetch_demo, patched)
TINY_QUALITY = r"""
import runpy, sys, types
from pathlib import Path
import clakit.demo
work = Path(sys.argv[1])
clakit.demo.fetch_demo = lambda quiet=True: types.SimpleNamespace(
    model=work / "src", calib=work / "calib.txt", heldout=work / "heldout.txt")
sys.argv = [sys.argv[2], *sys.argv[3:]]
sys.path.insert(0, str(Path(sys.argv[0]).parent))  # its `common`, as `python benchmarks/quality_bench.py` has
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_quality_bench_with_passkey_writes_its_report(tiny):
    """`--passkey-lengths` made the passkey settings replace the run's provenance in `settings`, and json.dumps
    failed at the very end (a traceback, exit 1): the whole sweep lost, only its .partial.jsonl left."""
    work, out = tiny["work"], tiny["work"] / "quality.json"
    argv = ["--savings", "", "--methods", "", "--baselines", "", "--cla-kv-bits", "", "--passkey-lengths", "224",
            "--eval-tokens", "64", "--calib-tokens", "64", "--seq-len", "32", "--chunk", "16", "--out", str(out)]
    script = str(BENCHMARKS / "quality_bench.py")
    proc = subprocess.run([sys.executable, "-c", TINY_QUALITY, str(work), script, *argv], capture_output=True,
                          text=True, timeout=600, cwd=work)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    settings = report["provenance"]["settings"]  # the run's, as given
    assert settings["passkey_lengths"] == "224" and settings["chunk"] == 16
    assert report["kv_quant"]["group"] == settings["kv_group"] == 64  # the group recorded is the one used
    (original,) = report["rows"]
    assert original["method"] == "original" and original["passkey"]["settings"]["lengths"] == [224]
    assert json.loads(proc.stdout[proc.stdout.index("{") :]) == report
    # a group not dividing head_dim (12 here), with a quantised run asked: refused before the first row
    argv = [*argv[:-2], "--baselines", "kv8", "--kv-group", "8", "--out", str(work / "refused.json")]
    proc = subprocess.run([sys.executable, "-c", TINY_QUALITY, str(work), script, *argv], capture_output=True,
                          text=True, timeout=600, cwd=work)  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "quality_bench.py: error: --kv-group: the quantisation group size must divide head_dim = 12 (a group is part "
        "of one token's head), got 8; use 6 or another divisor of 12"
    )
    assert not (work / "refused.json").exists() and not list(work.glob("refused.json*"))
