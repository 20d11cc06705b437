"""Inputs the demo, fetch-demo, report and text-reading tests never tried: a --max-tokens below the demo's window,
models whose paths end alike, concurrent or interrupted fetch-demo runs, odd files given as text or reports."""

import pytest
from conftest import build_tokenizer, make_text, tiny_model

from clakit.cli import main
from clakit.demo import pipeline as demo
from clakit.eval import evaluate, report, write_json


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _no_fetch(*args, **kwargs):
    pytest.fail("a stage ran although the settings were refused")


@pytest.mark.parametrize("max_tokens", [1, 511])
def test_demo_refuses_max_tokens_below_one_window_before_any_stage(capsys, tmp_path, monkeypatch, max_tokens):
    monkeypatch.setattr(demo, "fetch_demo", _no_fetch)
    work, cache = tmp_path / "work", tmp_path / "c"
    code, _, err = run_cli(capsys, "demo", "--max-tokens", max_tokens, "--work-dir", work, "--cache-dir", cache)
    # before: fetched, converted and uptrained for minutes, then eval named a --seq-len the demo has no flag for
    assert code == 2 and err.count("\n") == 1, err
    assert f"--max-tokens {max_tokens} is less than one window" in err and str(demo.DemoSettings.seq_len) in err
    assert "--seq-len" not in err
    assert not work.exists() and not cache.exists()


@pytest.fixture(scope="module")
def base_report() -> dict:
    return evaluate(tiny_model(), tokenizer=build_tokenizer(), text=make_text(300, 71), seq_len=32, decode_steps=2)


def _write_reports(folder, base: dict, models: list[str], **fields) -> list:
    paths = []
    for i, model in enumerate(models):
        paths.append(write_json({**base, "model": model, **fields}, folder / f"{i}.json"))
    return paths


def _first_column(markdown: str) -> list[str]:
    rows = [line for line in markdown.split("\n\n")[1].splitlines() if line.startswith("| ")][1:]
    return [row.split(" | ")[0][2:] for row in rows]


def test_models_whose_paths_end_alike_are_told_apart_in_the_report(tmp_path, base_report):
    models = ["runs/lr1e-4/model", "runs/lr3e-4/model", "hub-org/model", "runs/lr1e-4/model"]
    out = report(_write_reports(tmp_path, base_report, models), tmp_path / "rep")
    # before: "model (1)" ... "model (4)", with nothing in the report saying which run each row is
    expected = ["lr1e-4/model (1)", "lr3e-4/model", "hub-org/model", "lr1e-4/model (4)"]
    assert _first_column((out / "report.md").read_text()) == expected
    page = (out / "report.html").read_text()
    assert all(f"<td>{label}</td>" in page for label in expected)
