"""Training checkpoints: everything a resumed run needs to continue bit-for-bit.

checkpoints/step-000050/
  trainable.safetensors   the trainable tensors only (LoRA adapters, full_train modules), by parameter name
  optimizer.pt            AdamW state        (torch.save of tensors and numbers; loaded with weights_only=True);
                          optimizer-<rank>.pt under FSDP, where each process holds its shard of the state
  scheduler.pt            LR scheduler state
  rng-<rank>.pt           torch / CUDA / Python RNG states of each process (dropout draws continue unchanged)
  state.json              step, data position (micro-batches consumed), tokens, recipe fingerprint
Each checkpoint is written to a temporary folder and renamed, so a run killed while saving leaves no torn one.
The data position needs no iterator state: the batch order is a pure function of the seed and the position.
"""

import json
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from clakit.errors import ClakitError

CHECKPOINTS = "checkpoints"


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / "state.json").is_file())


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]), "python_v": random.getstate()[0]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_v"], tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def sharded(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def save_checkpoint(run_dir: Path, step: int, trainable: dict, optimizer, scheduler, state: dict, accelerator):
    """Write checkpoint `step` (all processes call this; the main one writes the shared files)."""
    final = run_dir / CHECKPOINTS / f"step-{step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in trainable.items()}, tmp / "trainable.safetensors")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        if not sharded(accelerator):
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    accelerator.wait_for_everyone()
    if sharded(accelerator):
        torch.save(optimizer.state_dict(), tmp / f"optimizer-{accelerator.process_index}.pt")
    torch.save(rng_state(), tmp / f"rng-{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    accelerator.wait_for_everyone()
    return final


def prune(run_dir: Path, keep: int | None) -> None:
    if keep is None or keep <= 0:
        return
    for old in checkpoint_dirs(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: Path, model, optimizer, scheduler, process_index: int) -> dict:
    """Restore trainable tensors, optimizer, scheduler and this process's RNG; returns state.json."""
    tensors = load_file(path / "trainable.safetensors")
    params = dict(model.named_parameters())
    missing = [k for k in tensors if k not in params]
    if missing or len(tensors) != sum(p.requires_grad for p in params.values()):
        raise ClakitError(
            f"checkpoint {path} does not hold this recipe's trainable tensors (e.g. {(missing or ['?'])[0]}); "
            "resume with the recipe that wrote it, or start over with --overwrite"
        )
    with torch.no_grad():
        for k, v in tensors.items():
            params[k].copy_(v)
    optim = path / "optimizer.pt"
    optim = optim if optim.is_file() else path / f"optimizer-{process_index}.pt"
    optimizer.load_state_dict(torch.load(optim, weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng = path / f"rng-{process_index}.pt"
    if rng.is_file():  # absent when resuming on more processes than saved: data order still exact, dropout not
        set_rng_state(torch.load(rng, weights_only=True))
    return json.loads((path / "state.json").read_text())
