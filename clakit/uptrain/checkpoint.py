"""Training checkpoints: everything a resumed run needs to continue bit-for-bit.

checkpoints/step-000050/
  trainable.safetensors   the trainable tensors only (LoRA adapters, full_train modules), whole, by clean name
                          (the peft model's parameter names, without DDP/FSDP/checkpointing wrapper parts)
  optimizer.pt            AdamW state, whole, keyed by the same names (torch.save of tensors and numbers; loaded
                          with weights_only=True), so a run saved on N processes resumes on M
  scheduler.pt            LR scheduler state
  rng-<rank>.pt           torch / CUDA / Python RNG states of each process (dropout draws continue unchanged)
  state.json              step, data position (micro-batches consumed), tokens, recipe fingerprint
Each checkpoint is written to `step-N.tmp` and renamed, so a run killed while saving leaves no torn `step-N`; only
folders named exactly `step-N` count.
The data position needs no iterator state: the batch order is a pure function of the seed and the position.

Saving and loading go through torch's distributed state-dict API (`torch.distributed.checkpoint.state_dict`), which
gathers and scatters the same way for a plain module, DDP, FSDP1 (`use_orig_params=True`) and FSDP2
(`fully_shard`). Every function here is collective: all processes call it (torch.distributed, when initialised,
tells the rank; no accelerate object is needed, so tests run it under torch's own FSDP).
"""

import functools
import json
import pickle
import random
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from clakit import outputs
from clakit.errors import ClakitError

CHECKPOINTS = "checkpoints"
STEP_DIR = re.compile(r"step-\d+")
# parts of a parameter name that wrappers insert: FSDP1, activation checkpointing, torch.compile
WRAPPER_PARTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
FILES = ("state.json", "trainable.safetensors", "optimizer.pt", "scheduler.pt")


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    if rank_and_world()[1] > 1:
        dist.barrier()


def clean_name(name: str, ddp: bool = False) -> str:
    """A parameter's name without wrapper parts (`_fsdp_wrapped_module.` anywhere, DDP's leading `module.`)."""
    for part in WRAPPER_PARTS:
        name = name.replace(part, "")
    return name.removeprefix("module.") if ddp else name


def trainable_names(model) -> list[str]:
    """Clean names of the trainable parameters of a plain, DDP-, FSDP1- or FSDP2-wrapped model."""
    ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    return [clean_name(n, ddp) for n, p in model.named_parameters() if p.requires_grad]


def _options(model, loading: bool = False, **kw):
    """Full (unsharded) state dicts. Saving from an accelerator offloads to rank 0's host (rank0_only); never from
    the CPU: FSDP1's offload_to_cpu of CPU parameters crashes (SIGSEGV, torch 2.13). Loading: every process passes
    the whole tensors, as tested under FSDP1 and FSDP2."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    return StateDictOptions(full_state_dict=True, cpu_offload=not (on_cpu or loading), **kw)


def _frozen_aliases(model) -> set[str]:
    """Clean names that are no trainable tensor of their own: frozen parameters and every tied alias (a second name
    of a parameter, which `named_parameters()` deduplicates), from `named_parameters(remove_duplicate=False)`."""
    ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    first = {n for n, _ in model.named_parameters()}
    named = model.named_parameters(remove_duplicate=False)
    return {clean_name(n, ddp) for n, p in named if not p.requires_grad or n not in first}


def trainable_state(model, everywhere: bool = False) -> dict[str, torch.Tensor]:
    """The whole trainable tensors by clean name, on CPU (collective; under FSDP gathered from the shards).

    Rank 0 always gets them; the other ranks too when the model is on CPU or `everywhere` (else {})."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    options = _options(model, ignore_frozen_params=True)
    state = {k: v.detach().cpu().contiguous() for k, v in get_model_state_dict(model, options=options).items()}
    rank, world = rank_and_world()
    if everywhere and options.cpu_offload and world > 1:  # offloaded to rank 0's host only: send to the others
        box = [state if rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        state = box[0]
    # torch drops frozen parameters by their deduplicated name only: a tied alias of a frozen tensor (lm_head.weight
    # of a model with tie_word_embeddings, SmolLM2's) would come back as if it were trainable
    aliases = _frozen_aliases(model)
    state = {k: v for k, v in state.items() if k not in aliases}
    expected = set(trainable_names(model))
    if state and set(state) != expected or not state and rank == 0:
        odd = sorted(set(state) ^ expected) or ["(none gathered)"]
        raise ClakitError(f"the gathered trainable tensors do not match the model's ({odd[0]}); nothing saved")
    return state


def load_trainable(model, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Copy `tensors` into the model's trainable parameters, strictly: the names must be exactly the trainable ones
    and the shapes equal (collective; every process passes the whole tensors)."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    expected = set(trainable_names(model))
    if set(tensors) != expected:
        odd = sorted(set(tensors) - expected) or sorted(expected - set(tensors))
        raise ClakitError(
            f"{where} does not hold this recipe's trainable tensors ({len(tensors)} saved, {len(expected)} "
            f"trainable; e.g. {odd[0]}); resume with the recipe that wrote it, or start over with --overwrite"
        )
    # strict=False only because the frozen tensors are absent by design (the names were matched exactly above);
    # a copy, since torch fills the dict it is given with the missing keys
    try:
        result = set_model_state_dict(model, dict(tensors), options=_options(model, True, strict=False))
    except RuntimeError as e:  # a shape that differs
        raise ClakitError(f"{where}: {str(e).strip().splitlines()[-1][:300]}") from None
    if result.unexpected_keys or set(result.missing_keys) & expected:
        raise ClakitError(f"{where}: tensors not loaded ({(result.unexpected_keys + result.missing_keys)[0]})")


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints (`step-N` holding state.json; not `step-N.tmp`, torn by a kill), oldest first."""
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if STEP_DIR.fullmatch(p.name) and (p / "state.json").is_file()]
    return sorted(done, key=lambda p: int(p.name.removeprefix("step-")))


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]), "python_v": random.getstate()[0]}
    if torch.cuda.is_available():
        # this process's GPU only (accelerate set it current): every visible GPU's state, restored by index, broke a
        # resume that sees fewer GPUs (IndexError), and the others are other processes' to save
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_v"], tuple(state["python"]), None))
    cuda = state.get("cuda")
    if isinstance(cuda, list | tuple):  # written before: one state per visible GPU, this process's at its index
        index = torch.cuda.current_device() if torch.cuda.is_available() else len(cuda)
        cuda = cuda[index] if index < len(cuda) else None
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda)


def sharded(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def fsdp_plugin(accelerator):
    """accelerate's FSDP settings (FullyShardedDataParallelPlugin) of a sharded run; None otherwise."""
    return getattr(accelerator.state, "fsdp_plugin", None) if sharded(accelerator) else None


def _optimizer_state(model, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, getattr(optimizer, "optimizer", optimizer), options=_options(model))


def save_checkpoint(run_dir: Path, step: int, model, optimizer, scheduler, state: dict) -> Path:
    """Write checkpoint `step` of the (possibly wrapped) model (collective; rank 0 writes the shared files)."""
    rank, _ = rank_and_world()
    final = run_dir / CHECKPOINTS / f"step-{step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    trainable = trainable_state(model)  # collective: every rank
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(trainable, tmp / "trainable.safetensors")
        outputs.usual_mode(tmp / "trainable.safetensors")
    # CLA: written and released before the optimizer's state is gathered: under FSDP both are whole on rank 0's host,
    # and at 70B with every attention projection trained in full that is 48 GB of tensors beside AdamW's 96 GB
    del trainable
    optim = _optimizer_state(model, optimizer)  # collective: every rank
    if rank == 0:
        torch.save(optim, tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    del optim
    barrier()
    torch.save(rng_state(), tmp / f"rng-{rank}.pt")
    barrier()
    if rank == 0:
        (tmp / "state.json").write_text(json.dumps(state, indent=1))  # last: marks the folder complete
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    barrier()
    return final


def prune(run_dir: Path, keep: int | None) -> None:
    """Drop all but the last `keep` checkpoints, and the `step-N.tmp` folders a killed save left (called by the main
    process right after a save completed, so no save is in progress)."""
    torn = [p for p in (run_dir / CHECKPOINTS).glob("step-*.tmp") if STEP_DIR.fullmatch(p.name.removesuffix(".tmp"))]
    old = checkpoint_dirs(run_dir)[:-keep] if keep is not None and keep > 0 else []
    for folder in torn + old:
        shutil.rmtree(folder, ignore_errors=True)


def _corrupt(path: Path, what: str, run_dir: Path) -> ClakitError:
    earlier = [p for p in checkpoint_dirs(run_dir) if p != path and int(p.name[5:]) < int(path.name[5:])]
    then = (
        f"move it aside (mv {path} {path}.corrupt) and --resume continues from {earlier[-1].name}"
        if earlier
        else "move it aside and --resume starts from step 0, or start over with --overwrite"
    )
    return ClakitError(f"checkpoint {path} is corrupt ({what}); {then}")


def _read(path: Path, name: str, reader):
    """reader(path / name), any failure to read or unpickle safely named as a corrupt checkpoint."""
    try:
        return reader(path / name)
    except FileNotFoundError:
        raise _corrupt(path, f"{name} is missing", path.parent.parent) from None
    except (OSError, ValueError, EOFError, RuntimeError, KeyError, SafetensorError, pickle.UnpicklingError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise _corrupt(path, f"{name} is unreadable: {first}", path.parent.parent) from None


def _load_pt(file: Path, mmap: bool = False):
    """A checkpoint's .pt file. `mmap` for optimizer.pt (torch.save's zip format allows it): every process of a
    resume reads the whole state (AdamW's two fp32 moments of every trained tensor: ~10 GB for a CLA2 Llama-3.1-8B
    with every attention projection trained in full), and read whole, N processes of a node held N private copies at
    once; mapped, they share the one in the page cache, and each keeps only what `set_optimizer_state_dict` copies
    out of it."""
    return torch.load(file, weights_only=True, map_location="cpu", mmap=mmap)


def _state_json(file: Path) -> dict:
    state = json.loads(file.read_text())
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or state["step"] < 0:
        raise ValueError("no step number")
    return state


def read_checkpoint(path: Path) -> dict:
    """Everything rank-independent in checkpoint `path`, read and checked before any of it is applied:
    {"state", "trainable", "optimizer", "scheduler"}. A file that is missing, truncated, not JSON, or a pickle that
    torch's weights_only loader refuses is one ClakitError naming the checkpoint."""
    return {
        "state": _read(path, "state.json", _state_json),
        "trainable": _read(path, "trainable.safetensors", load_file),
        "optimizer": _read(path, "optimizer.pt", functools.partial(_load_pt, mmap=True)),
        "scheduler": _read(path, "scheduler.pt", _load_pt),
    }


# how an optimizer computes its update, not what it computes: kept from this run's optimizer when a checkpoint's
# param_groups (saved by a run that looped, fused=None) are loaded over it
IMPLEMENTATION = ("fused", "foreach", "capturable", "differentiable")


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
    """Restore trainable tensors, optimizer, scheduler and this process's RNG (collective); returns state.json."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    saved = read_checkpoint(path)
    load_trainable(model, saved["trainable"], f"checkpoint {path}")
    inner = getattr(optimizer, "optimizer", optimizer)
    kernels = [{k: g[k] for k in IMPLEMENTATION if k in g} for g in inner.param_groups]
    try:
        set_optimizer_state_dict(model, inner, saved["optimizer"], options=_options(model, True))
        scheduler.load_state_dict(saved["scheduler"])
    except (KeyError, ValueError, RuntimeError, TypeError) as e:
        what = f"its optimizer state does not fit this model ({type(e).__name__})"
        raise _corrupt(path, what, path.parent.parent) from None
    for group, kernel in zip(inner.param_groups, kernels, strict=True):
        group.update(kernel)  # this run's kernel, not the saved one's: a checkpoint saved with fused=None stays fast
    rng = path / f"rng-{rank_and_world()[0]}.pt"
    if rng.is_file():  # absent when resuming on more processes than saved: data order still exact, dropout not
        set_rng_state(_read(path, rng.name, _load_pt))
    return saved["state"]
