"""Resources at size (break-it round 5): what a 70B run needs of disk, memory and time is checked before the work,
and measured at 135M-scale here. Each test names what it guards; the measurements are in benchmarks/."""

from pathlib import Path

import pytest
from conftest import save_checkpoint, tiny_model
from convert_fixtures import copy_checkpoint, run_cli

from clakit import outputs
from clakit.convert import calibrate, checkpoint, pipeline
from clakit.convert.checkpoint import SafetensorsCheckpoint


@pytest.fixture
def src(tiny_llama_checkpoint, tmp_path) -> Path:
    return copy_checkpoint(tiny_llama_checkpoint, tmp_path / "src")


@pytest.fixture(scope="module")
def wide(tokenizer, tmp_path_factory) -> Path:
    """4 layers of hidden 256 (~8 MB fp32): wide enough that file headers are small beside the tensors."""
    model = tiny_model(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)
    return save_checkpoint(model, tokenizer, tmp_path_factory.mktemp("wide") / "src", max_shard_size="2MB")


def weight_bytes(folder: Path) -> int:
    """Bytes of every tensor in a checkpoint folder (its shards' headers aside)."""
    weights = SafetensorsCheckpoint(folder)
    return sum(t.numel() * t.element_size() for t in map(weights.get, weights.names))


def auto_args(corpus_dir: Path) -> list:
    return ["--layout", "auto", "--init", "calibrated", "--calib-data", corpus_dir / "calib.txt",
            "--calib-tokens", "256", "--seq-len", "64", "--distill-steps", "0"]  # fmt: skip


def test_a_full_disk_is_refused_before_the_layout_search(src, corpus_dir, tmp_path, capsys, monkeypatch):
    """--layout auto (the default with calibration text) chooses which layers produce K/V on the data, but not how
    many: the output's size is known before the search (every layer's K/V has one shape). A full disk was refused
    only at the write, after the search and the fits (hours at 70B)."""
    monkeypatch.setattr(outputs.shutil, "disk_usage", lambda path: type("U", (), {"free": 1000})())
    monkeypatch.setattr(pipeline._Conversion, "_data_phase", lambda *a: pytest.fail("search ran"))
    out = tmp_path / "out"
    assert run_cli(src, out, *auto_args(corpus_dir), "--quiet") == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "not enough disk space" in lines[0], lines
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def disk_used(folder: Path, skip: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and skip not in f.parents)


@pytest.mark.parametrize("init, distill", [("calibrated", "0"), ("reconstruct", "0"), ("reconstruct", "2")])
def test_the_space_checked_before_the_work_bounds_what_the_conversion_writes(
    wide, corpus_dir, tmp_path, monkeypatch, init, distill
):
    """The fits write their calibration streams, Grams and kept activations beside OUT, then the fitted tensors,
    which stay there while the output is written: at 70B ~170 GB of scratch files (`scratch_bytes`), more than the
    bf16 output, and only the output was checked, so a disk with room for the output failed in the fits. The peak
    on disk (sampled at every scratch file and shard written) must be within what was checked before the work, and
    the check not far above it."""
    checked, peak = [], [0]
    real_check, real_scratch, real_shard = outputs.check_free_space, calibrate.save_scratch, checkpoint.save_file

    def sampled(write):
        def wrapped(*args, **kwargs):
            write(*args, **kwargs)
            peak[0] = max(peak[0], disk_used(tmp_path, wide))

        return wrapped

    monkeypatch.setattr(outputs, "check_free_space", lambda out, n, *a: checked.append(n) or real_check(out, n, *a))
    monkeypatch.setattr(calibrate, "save_scratch", sampled(real_scratch))
    monkeypatch.setattr(checkpoint, "save_file", sampled(real_shard))
    out = tmp_path / "out"
    args = auto_args(corpus_dir)
    args[args.index("calibrated")] = init
    args[-1] = distill
    steps = ["--reconstruct-steps", "1"] if init == "reconstruct" else []  # refused with another init
    steps += ["--distill-tokens", "128"] if distill != "0" else []  # refused where nothing distils
    assert run_cli(wide, out, *args, *steps, "--quiet") == 0
    before_work, at_write = checked[:-1], checked[-1]  # before the search and before the fits; the write's
    assert before_work and peak[0] <= min(before_work) <= 2 * peak[0], (peak[0], checked)
    # the write's check is the output alone (its weights, shard headers, tokenizer files and text files: no scratch)
    # and bounds what is written
    written = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    assert len(checked) == 3 and weight_bytes(out) < written <= at_write <= written + 2 * pipeline.OUTPUT_TEXT_FILES


def test_a_70b_output_is_sharded_and_indexed_as_transformers_reads_it(tmp_path, monkeypatch):
    """The writer's plan at Llama-3-70B shapes (bf16, CLA2, 5 GB shards), tensors on the meta device and the shard
    files stubbed: shards of at most 5 GB in layer order, consecutive names, an index listing every tensor once, in
    sorted order, whose total_size is the sum of the tensors' bytes (what transformers reports as the model size)."""
    import json

    import torch
    from transformers import LlamaConfig

    from clakit.convert.checkpoint import ShardWriter, natural_key, parse_size
    from clakit.convert.inmemory import cla_config
    from clakit.convert.layout import uniform_layout
    from clakit.modeling import CLA_CLASSES

    config = LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)  # fmt: skip
    with torch.device("meta"):
        model = CLA_CLASSES["llama"][2](cla_config(config, uniform_layout(80, 2))).to(torch.bfloat16)
    written = {}
    monkeypatch.setattr(checkpoint, "save_file", lambda t, path, metadata=None: written.update({path.name: dict(t)}))
    monkeypatch.setattr(checkpoint.outputs, "usual_mode", lambda *files: None)
    monkeypatch.setattr(Path, "rename", lambda self, to: written.update({to.name: written.pop(self.name)}))
    writer, limit = ShardWriter(tmp_path, parse_size("5GB")), parse_size("5GB")
    state = model.state_dict()
    for name in sorted(state, key=natural_key):
        writer.add(name, state[name])
    files = writer.finish()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    total = sum(t.numel() * t.element_size() for t in state.values())
    assert 130e9 < total < 141e9 and index["metadata"]["total_size"] == total
    assert files == [f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)]
    assert set(written) == set(files)
    sizes = [sum(t.numel() * t.element_size() for t in written[file].values()) for file in files]
    firsts = [next(iter(written[file].values())) for file in files[1:]]
    assert max(sizes) <= limit  # no tensor of a 70B is over 5 GB (the embeddings: 2.1 GB)
    for size, first in zip(sizes, firsts, strict=False):  # a shard closes only when its next tensor would not fit
        assert size + first.numel() * first.element_size() > limit
    assert list(index["weight_map"]) == sorted(state) and set(index["weight_map"].values()) == set(files)
    order = [name for file in files for name in written[file]]
    assert order == sorted(state, key=natural_key)  # layer by layer: a shard holds neighbouring layers


@pytest.mark.parametrize("error", ["os", "safetensors"])
def test_a_disk_filling_up_during_the_write_says_how_much_the_output_takes(src, tmp_path, capsys, monkeypatch, error):
    """The space is checked before the work; another process may take it before the write. The one line said only
    "No space left on device; check free disk space and permissions", not how much the output needs."""
    import errno

    from safetensors import SafetensorError

    real, calls = checkpoint.save_file, []

    def full_at_the_second(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            if error == "os":
                raise OSError(errno.ENOSPC, "No space left on device")
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", full_at_the_second)
    out = tmp_path / "out"
    assert run_cli(src, out, "--max-shard-size", "50KB", "--quiet") == 2
    lines = capsys.readouterr().err.strip().splitlines()
    # the output (--init mean, CLA2): less than the source's weights, plus its tokenizer and text files (1 MB of room)
    need = weight_bytes(src) + pipeline.OUTPUT_TEXT_FILES + sum(f.stat().st_size for f in src.glob("tokenizer*"))
    assert len(lines) == 1 and lines[0].startswith(f"clakit: error: cannot write {out}: No space left on device")
    assert "the output takes " in lines[0], lines[0]
    number, unit = lines[0].split("the output takes ")[1].split(":")[0].split()
    assert unit == "MB" and pipeline.OUTPUT_TEXT_FILES < float(number) * 1e6 <= need
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
