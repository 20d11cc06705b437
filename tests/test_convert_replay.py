"""Break-it round 4, convert: reproducibility, provenance and replay of a conversion, and features that compose.

Each test names what it guards; those written for a fix say what the code before it did.
"""

import json

import torch
from conftest import save_checkpoint, tiny_model
from convert_fixtures import safetensors_files

from clakit.convert import ConvertConfig, convert

FAST = dict(calib_tokens=256, seq_len=64, reconstruct_steps=2, distill_tokens=256, device="cpu")  # tiny, seconds


def weights(folder) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in safetensors_files(folder)}


def record(folder) -> dict:
    return json.loads((folder / "clakit_convert.json").read_text())


def test_the_distillation_is_the_same_whatever_the_sources_attention_dropout(tokenizer, corpus_dir, tmp_path):
    """The distillation's student was built (and trained) in train mode, so a source whose config sets
    attention_dropout (0.3 here) trained with dropout drawn from the global RNG, which --seed does not set: the same
    convert() twice in one process wrote different tensors (sha256 91b5e58e... then 6fe9fbca...). The teacher has no
    dropout; the student now has none either, so the output is that of the same weights without the key."""
    settings = dict(calib_data=[str(corpus_dir / "calib.txt")], kv_source_layers=[0, 0, 2, 2], distill_steps=3, **FAST)
    written = []
    for name, dropout in (("a", 0.3), ("b", 0.3), ("none", 0.0)):
        src = save_checkpoint(tiny_model("llama", attention_dropout=dropout), tokenizer, tmp_path / f"src_{name}")
        torch.manual_seed(len(written))  # a caller's RNG state, different before each run
        convert(src, tmp_path / name, ConvertConfig(**settings), quiet=True)
        written.append(weights(tmp_path / name))
    assert written[0] == written[1] == written[2]
    assert record(tmp_path / "a")["distill"]["steps"] == 3
