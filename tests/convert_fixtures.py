"""Helpers for the converter tests: run the CLI, fingerprint folders, load models, compare logits."""

import hashlib
import json
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from clakit.cli import main

TOKENS = torch.tensor([[5, 17, 99, 3, 250, 41, 7, 8, 200, 13, 77, 1, 64, 128, 31, 2]])  # (1, 16)


def run_cli(*args) -> int:
    return main(["convert", *map(str, args)])


def fingerprint(folder: Path) -> dict[str, str]:
    """relative path -> sha256 of every file below `folder` (to prove a source is left untouched)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def copy_checkpoint(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def load(folder: Path):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model(input_ids=TOKENS).logits


def safetensors_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


@torch.no_grad()
def cached_logits(model, x: torch.Tensor, prefill: int) -> torch.Tensor:
    """(batch, seq, vocab) logits from a prefill of `prefill` tokens, then one token at a time through the cache."""
    out = model(x[:, :prefill], use_cache=True)
    steps = [out.logits]
    for t in range(prefill, x.shape[1]):
        steps.append(model(x[:, t : t + 1], cache=out.cache, use_cache=True).logits)
    return torch.cat(steps, 1)
