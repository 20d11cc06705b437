"""Resources at size (break-it round 5): what a 70B run needs of disk, memory and time is checked before the work,
and measured at 135M-scale here. Each test names what it guards; the measurements are in benchmarks/."""

from pathlib import Path

import pytest
from convert_fixtures import copy_checkpoint, run_cli

import clakit.convert.pipeline
from clakit.convert.checkpoint import SafetensorsCheckpoint


@pytest.fixture
def src(tiny_llama_checkpoint, tmp_path) -> Path:
    return copy_checkpoint(tiny_llama_checkpoint, tmp_path / "src")


def weight_bytes(folder: Path) -> int:
    """Bytes of every tensor in a checkpoint folder (its shards' headers aside)."""
    checkpoint = SafetensorsCheckpoint(folder)
    return sum(t.numel() * t.element_size() for t in map(checkpoint.get, checkpoint.names))


def auto_args(corpus_dir: Path) -> list:
    return ["--layout", "auto", "--init", "calibrated", "--calib-data", corpus_dir / "calib.txt",
            "--calib-tokens", "256", "--seq-len", "64", "--distill-steps", "0"]  # fmt: skip


def test_a_full_disk_is_refused_before_the_layout_search(src, corpus_dir, tmp_path, capsys, monkeypatch):
    """--layout auto (the default with calibration text) chooses which layers produce K/V on the data, but not how
    many: the output's size is known before the search (every layer's K/V has one shape). A full disk was refused
    only at the write, after the search and the fits (hours at 70B)."""
    monkeypatch.setattr(clakit.convert.pipeline.shutil, "disk_usage", lambda path: type("U", (), {"free": 1000})())
    monkeypatch.setattr(clakit.convert.pipeline._Conversion, "_data_phase", lambda *a: pytest.fail("search ran"))
    out = tmp_path / "out"
    assert run_cli(src, out, *auto_args(corpus_dir), "--quiet") == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "not enough disk space" in lines[0], lines
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_the_space_checked_before_the_layout_search_bounds_the_output(src, corpus_dir, tmp_path, monkeypatch):
    """The bound checked up front is the largest output the search can choose: at least what it writes, and no
    more than its K/V with one producer more than the saving allows (so it never refuses a disk that would do)."""
    checked = []
    real = clakit.convert.pipeline._check_free_space
    monkeypatch.setattr(clakit.convert.pipeline, "_check_free_space", lambda out, n: checked.append(n) or real(out, n))
    out = tmp_path / "out"
    assert run_cli(src, out, *auto_args(corpus_dir), "--quiet") == 0
    written = weight_bytes(out)
    assert len(checked) == 2 and checked[1] == written  # before the search, then at the write (the exact size)
    source = SafetensorsCheckpoint(src)
    kv = sum(source.get(f"model.layers.0.self_attn.{k}_proj.weight").numel() * 4 for k in "kv")
    assert written <= checked[0] <= written + kv * 4  # 4 layers: at most the uniform CLA2's 2 producers vs 1
