"""Inputs the demo, fetch-demo, report and text-reading tests never tried: a --max-tokens below the demo's window,
models whose paths end alike, concurrent or interrupted fetch-demo runs, odd files given as text or reports."""

import json

import pytest

from clakit.cli import main
from clakit.demo import fetch
from clakit.demo import pipeline as demo


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _no_fetch(*args, **kwargs):
    pytest.fail("a stage ran although the settings were refused")


@pytest.mark.parametrize("max_tokens", [1, 511])
def test_demo_refuses_max_tokens_below_one_window_before_any_stage(capsys, tmp_path, monkeypatch, max_tokens):
    monkeypatch.setattr(demo, "fetch_demo", _no_fetch)
    work = tmp_path / "work"
    code, _, err = run_cli(capsys, "demo", "--max-tokens", max_tokens, "--work-dir", work, "--cache-dir", tmp_path / "c")
    # before: fetched, converted and uptrained for minutes, then eval named a --seq-len the demo has no flag for
    assert code == 2 and err.count("\n") == 1, err
    assert f"--max-tokens {max_tokens} is less than one window" in err and str(demo.DemoSettings.seq_len) in err
    assert "--seq-len" not in err
    assert not work.exists() and not (tmp_path / "c").exists()
