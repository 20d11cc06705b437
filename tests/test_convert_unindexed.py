"""Which weight files of a source folder `clakit convert` reads: exactly the ones transformers' from_pretrained loads
(model.safetensors, else its index's shards; pytorch_model.bin, else its index), nothing else; a folder transformers
cannot load is refused in one line before any work."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import save_checkpoint, tiny_model
from convert_fixtures import load, logits, run_cli
from safetensors.torch import load_file, save_file

import clakit.convert.checkpoint
from clakit.convert.inmemory import cla_model_from

Q0 = "model.layers.0.self_attn.q_proj.weight"
HF_TO_MISTRAL = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "mlp.gate_proj": "feed_forward.w1",
}


def single_file_checkpoint(folder: Path, tokenizer, seed: int = 0) -> Path:
    """A stock tiny Mistral saved as one model.safetensors (no index), as save_pretrained writes a small model."""
    return save_checkpoint(tiny_model("mistral", seed=seed), tokenizer, folder, max_shard_size="50MB")


def mistral_native(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Some tensors under Mistral's native names (consolidated.safetensors: layers.0.attention.wq.weight, ...)."""
    native = {}
    for name, tensor in state.items():
        for hf, ms in HF_TO_MISTRAL.items():
            if name.startswith("model.layers.") and hf in name:
                native[name.removeprefix("model.").replace(hf, ms)] = tensor.clone()
    return native


def converts_what_transformers_loads(src: Path, out: Path, *args) -> None:
    """The conversion succeeds and equals the CLA model made from the source as transformers loads it."""
    assert run_cli(src, out, *args, "--quiet") == 0
    expected = cla_model_from(load(src), [0, 0, 2, 2], "mean")
    torch.testing.assert_close(logits(load(out)), logits(expected), rtol=0, atol=0)


def assert_refused(capsys, src: Path, out: Path, *matches: str) -> None:
    """Exit 2, one stderr line holding every `matches`, nothing written (no OUT, no staging folder beside it)."""
    capsys.readouterr()  # what building the source printed (save_pretrained's progress bars)
    code = run_cli(src, out, "--quiet")
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("clakit: error: "), lines
    assert all(m in lines[0] for m in matches), lines[0]
    assert not [p for p in out.parent.iterdir() if p.name.startswith((out.name, f".{out.name}."))]


def stray_garbage(folder: Path) -> None:
    (folder / "consolidated.safetensors").write_bytes(b"\x00\x01not a safetensors file" * 64)


def stray_mistral_native(folder: Path) -> None:
    native = mistral_native(load_file(folder / "model.safetensors"))
    save_file(native, folder / "consolidated.safetensors")


def stray_zeroed_copy(folder: Path) -> None:
    save_file({Q0: torch.zeros_like(load_file(folder / "model.safetensors")[Q0])}, folder / "z-stray.safetensors")


@pytest.mark.parametrize("add_stray", [stray_garbage, stray_mistral_native, stray_zeroed_copy])
def test_files_transformers_does_not_load_are_never_opened(tmp_path, tokenizer, monkeypatch, add_stray):
    """A Mistral repo's consolidated.safetensors (the same weights again, 14 GB for a 7B) beside model.safetensors
    was opened and read too (garbage there refused the conversion, an HF-named copy in a stray file refused it as a
    duplicate); transformers loads model.safetensors alone, so the converter does too."""
    src = single_file_checkpoint(tmp_path / "src", tokenizer)
    add_stray(src)
    opened, real_open = [], clakit.convert.checkpoint.safe_open
    monkeypatch.setattr(
        clakit.convert.checkpoint, "safe_open", lambda p, **kw: opened.append(Path(p).name) or real_open(p, **kw)
    )
    converts_what_transformers_loads(src, tmp_path / "out")
    assert set(opened) == {"model.safetensors"}, sorted(set(opened))


def test_model_safetensors_wins_over_an_index(tmp_path, tokenizer):
    """transformers loads model.safetensors whenever it is there, and then ignores an index beside it: the converter
    followed the index, converting other weights than `clakit eval` of the source computes with."""
    src = save_checkpoint(tiny_model("mistral", seed=1), tokenizer, tmp_path / "src")  # sharded, with an index
    single = single_file_checkpoint(tmp_path / "single", tokenizer, seed=0)
    shutil.copyfile(single / "model.safetensors", src / "model.safetensors")
    converts_what_transformers_loads(src, tmp_path / "out")


def test_pickle_file_wins_over_its_index(tmp_path, tokenizer):
    """Likewise pytorch_model.bin before pytorch_model.bin.index.json (here naming shards that are not there)."""
    src = single_file_checkpoint(tmp_path / "src", tokenizer)
    torch.save(load_file(src / "model.safetensors"), src / "pytorch_model.bin")
    (src / "model.safetensors").unlink()
    index = {"weight_map": {Q0: "pytorch_model-00001-of-00002.bin"}}
    (src / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    converts_what_transformers_loads(src, tmp_path / "out", "--allow-pickle")


@pytest.mark.parametrize(
    "files",
    [
        ["part1.safetensors", "part2.safetensors"],
        ["weights.safetensors"],
        ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"],
    ],
)
def test_safetensors_files_transformers_cannot_load_are_refused(tmp_path, tokenizer, capsys, files):
    """Weights in *.safetensors files with neither model.safetensors nor an index converted, but transformers loads
    none of them (so `clakit eval` of the source, or the uptrain teacher, failed later): refused up front."""
    src = single_file_checkpoint(tmp_path / "src", tokenizer)
    state = load_file(src / "model.safetensors")
    (src / "model.safetensors").unlink()
    names = sorted(state)
    for i, file in enumerate(files):
        save_file({n: state[n] for n in names[i :: len(files)]}, src / file, metadata={"format": "pt"})
    with pytest.raises(OSError, match="no file named model.safetensors"):
        load(src)  # what transformers 5 does with this folder
    assert_refused(
        capsys, src, tmp_path / "out", files[0], "but no model.safetensors or model.safetensors.index.json",
        "write a model.safetensors.index.json", "model-0000X-of-0000N.safetensors",
    )  # fmt: skip


def test_mistral_native_weights_alone_are_refused(tmp_path, tokenizer, capsys):
    """A folder whose only weights are consolidated.safetensors (Mistral's native names) ended in 'tensor
    lm_head.weight is missing from the checkpoint; it is incomplete, re-download it': it says what the file is."""
    src = single_file_checkpoint(tmp_path / "src", tokenizer)
    stray_mistral_native(src)
    (src / "model.safetensors").unlink()
    assert_refused(
        capsys, src, tmp_path / "out", "consolidated.safetensors, Mistral's native format",
        "which transformers does not load", "convert_mistral_weights_to_hf.py",
    )  # fmt: skip


def test_duplicate_tensor_across_indexed_shards_is_still_refused(tmp_path, tokenizer, capsys):
    """check_unique_tensors still guards the shards an index lists (transformers takes the later shard's copy)."""
    src = save_checkpoint(tiny_model("mistral"), tokenizer, tmp_path / "src")
    shards = sorted(src.glob("model-*.safetensors"))
    home = next(p for p in shards if Q0 in load_file(p))
    other = next(p for p in reversed(shards) if p != home)
    save_file({**load_file(other), Q0: torch.zeros_like(load_file(home)[Q0])}, other, metadata={"format": "pt"})
    assert_refused(capsys, src, tmp_path / "out", f"holds {Q0} in both", "transformers loads the later file's copy")


def test_unloadable_weights_are_refused_before_the_calibration_text_is_read(tmp_path, tokenizer, capsys, monkeypatch):
    """The weights' checks come before the calibration text, which may be a datasets download (GBs, minutes)."""
    import clakit.convert.pipeline

    src = single_file_checkpoint(tmp_path / "src", tokenizer)
    stray_mistral_native(src)
    (src / "model.safetensors").unlink()

    def no_download(*_args, **_kwargs):
        raise AssertionError("the calibration text was read before the weights were checked")

    monkeypatch.setattr(clakit.convert.pipeline, "load_texts", no_download)
    code = run_cli(src, tmp_path / "out", "--calib-data", "wikitext:wikitext-2-raw-v1:train", "--factor", "2")
    assert code == 2 and "Mistral's native format" in capsys.readouterr().err


def pickle_shards(src: Path, state: dict[str, torch.Tensor]) -> None:
    """`state` as two pytorch_model-0000X-of-00002.bin shards and their index, in place of the safetensors."""
    for f in list(src.glob("model*.safetensors*")):
        f.unlink()
    names = sorted(state)
    halves = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    for file, part in halves.items():
        torch.save({n: state[n].clone() for n in part}, src / file)
    weight_map = {n: file for file, part in halves.items() for n in part}
    (src / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_indexed_pickle_shards_convert_and_a_duplicate_tensor_is_refused(tmp_path, tokenizer, capsys):
    """The shards an index lists were not checked for a tensor held twice when they are pickle (safetensors were):
    the converter took the index's copy, transformers the later shard's."""
    src = single_file_checkpoint(tmp_path / "src", tokenizer)
    state = load_file(src / "model.safetensors")
    pickle_shards(src, state)
    converts_what_transformers_loads(src, tmp_path / "out", "--factor", "2", "--init", "mean", "--allow-pickle")
    home = json.loads((src / "pytorch_model.bin.index.json").read_text())["weight_map"][Q0]
    other = next(f.name for f in src.glob("pytorch_model-*.bin") if f.name != home)
    torch.save({**torch.load(src / other), Q0: torch.zeros_like(state[Q0])}, src / other)
    capsys.readouterr()
    code = run_cli(src, tmp_path / "out2", "--allow-pickle", "--quiet")
    line = capsys.readouterr().err.strip()
    assert code == 2 and len(line.splitlines()) == 1 and f"holds {Q0} in both" in line, line
