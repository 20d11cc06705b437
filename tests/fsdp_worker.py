"""Run clakit's save / resume / merge / held-out-eval code under torch's own FSDP on 2 CPU processes (gloo).

accelerate refuses FSDP on CPU, so the test wraps the student the way accelerate would (each decoder layer its own
unit, then the root), with FSDP1 (`use_orig_params=True`, `device_id=cpu`) or FSDP2 (`fully_shard`), and calls the
same functions the trainer calls. Usage: python fsdp_worker.py CLA_CHECKPOINT OUT_DIR (port in FSDP_TEST_PORT)
Both modes run in one pair of processes; rank 0 writes OUT_DIR/MODE/result.json; any failure exits non-zero (a hang
ends at the process group's 60 s timeout).
"""

import datetime
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

from clakit.errors import ClakitError
from clakit.uptrain import checkpoint, student
from clakit.uptrain.distill import causal_lm_loss
from clakit.uptrain.trainer import heldout_loss

LORA = SimpleNamespace(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "o_proj"], full_train=["k_proj"])
HELDOUT_BLOCKS, EVAL_BATCH, SEQ = 9, 4, 16  # 9 blocks on 2 processes at batch 4: 5 and 4 blocks, 2 batches each


def blocks(n: int, seed: int, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (n, SEQ), generator=torch.Generator().manual_seed(seed))


def student_model(path: Path):
    torch.manual_seed(0)  # LoRA's A matrices: the same on every process and in the parent test
    return student.make_trainable(student.load_cla(path, torch.float32), LORA)


def wrap(model, mode: str):
    layer_cls = type(model.base_model.model.model.layers[0])
    if mode == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        policy = ModuleWrapPolicy({layer_cls})
        return FullyShardedDataParallel(
            model, auto_wrap_policy=policy, device_id=torch.device("cpu"), use_orig_params=True
        )
    from torch.distributed.fsdp import fully_shard

    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    return fully_shard(model)


def trainer_parts(model):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    return optimizer, scheduler


def train_step(model, optimizer, scheduler, ids: torch.Tensor) -> None:
    causal_lm_loss(model(input_ids=ids).logits, ids).backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def run(rank: int, mode: str, path: Path, out: Path) -> None:
    vocab = student.load_cla(path, torch.float32).config.vocab_size
    train = blocks(8, 1, vocab)[rank::2]  # each process its own micro-batch of 4
    result = {}
    model = wrap(student_model(path), mode)
    optimizer, scheduler = trainer_parts(model)
    result["heldout_before"] = heldout_loss(model, blocks(HELDOUT_BLOCKS, 2, vocab), EVAL_BATCH)
    train_step(model, optimizer, scheduler, train)
    saved = checkpoint.save_checkpoint(out / "run", 1, model, optimizer, scheduler, {"step": 1})
    result["names"] = checkpoint.trainable_names(model)
    # resume: a fresh wrapped student loads the checkpoint, then both take the same second step
    resumed = wrap(student_model(path), mode)
    r_optimizer, r_scheduler = trainer_parts(resumed)
    checkpoint.load_checkpoint(saved, resumed, r_optimizer, r_scheduler)
    train_step(model, optimizer, scheduler, train)
    train_step(resumed, r_optimizer, r_scheduler, train)
    a, b = checkpoint.trainable_state(model), checkpoint.trainable_state(resumed)
    result["resume_max_diff"] = max((a[k] - b[k]).abs().max().item() for k in a)
    # a disk full on rank 0 mid-stream: every rank ends in one ClakitError, none waits in a gather
    result["failed_save"] = failed_save(rank, mode, model, optimizer, scheduler, out)
    # strict loading: one tensor short is refused on every process, before any collective
    try:
        checkpoint.load_trainable(resumed, dict(list(a.items())[1:]), "a short state")
        result["short_state"] = "loaded"
    except ClakitError as e:
        result["short_state"] = str(e)
    # merge: the trained tensors gathered to rank 0, which streams them into the start checkpoint (what uptrain
    # saves under FSDP); the saved model computes what the sharded one does
    trained = checkpoint.trainable_state(model)
    ids = blocks(2, 3, vocab)
    with torch.no_grad():
        sharded_logits = model(input_ids=ids).logits  # every process: FSDP gathers in step
    if rank == 0:
        (out / "merged").mkdir()
        student.save_merged(path, trained, LORA, torch.float32, out / "merged")
        with torch.no_grad():
            merged_logits = student.load_cla(out / "merged", torch.float32)(input_ids=ids).logits
        result["merge_max_diff"] = (sharded_logits - merged_logits).abs().max().item()
        (out / "result.json").write_text(json.dumps(result))


def failed_save(rank: int, mode: str, model, optimizer, scheduler, out: Path) -> str:
    """Save step 2 with rank 0's disk full from the second write into one file on: trainable.safetensors (opened
    "wb") under fsdp1, optimizer.pt (reopened "r+b" for the moments) under fsdp2. Rank 1's message goes to
    failed_save1.json (rank 0's into result.json)."""
    failing_mode = "wb" if mode == "fsdp1" else "r+b"

    class FullDisk:
        def __init__(self, f):
            self.f, self.writes = f, 0

        def write(self, data):
            self.writes += 1
            if self.writes >= 2:
                raise OSError(28, "No space left on device")
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

    def opener(path, how="r", *args):
        f = open(path, how, *args)
        return FullDisk(f) if how == failing_mode else f

    if rank == 0:
        checkpoint.open = opener  # the module's name for the builtin
    try:
        checkpoint.save_checkpoint(out / "run", 2, model, optimizer, scheduler, {"step": 2})
        said = "saved"
    except ClakitError as e:
        said = str(e)
    finally:
        vars(checkpoint).pop("open", None)
    if rank == 1:
        (out / "failed_save1.json").write_text(json.dumps(said))
    return said


def teacher_run(rank: int, path: Path, out: Path) -> None:
    """The teacher as uptrain shards it: read by rank 0 only (rank 1 builds it empty from the config), FSDP2 over
    both processes, weights broadcast from rank 0."""
    from clakit.sources import load_model, resolve_source
    from clakit.uptrain import sharding

    acc = SimpleNamespace(is_main_process=rank == 0, device=torch.device("cpu"), num_processes=2)
    source = resolve_source(str(path))
    model = sharding.load_on_main(source, torch.float32, acc)
    sharding.shard_frozen(model, acc)
    local = sum(p.to_local().numel() for p in model.parameters())
    ids = blocks(2, 4, model.config.vocab_size)
    with torch.no_grad():
        for _ in range(3):
            logits = model(input_ids=ids).logits
        whole = load_model(source, dtype=torch.float32)(input_ids=ids).logits
    result = {"max_diff": (logits - whole).abs().max().item(), "local": local}
    # after its forwards a frozen model is sharded again, root included, and FSDP2 keeps no record of them
    result["root_sharded"] = type(model.get_input_embeddings().weight).__name__ == "DTensor"
    result["forward_records"] = len(model._get_fsdp_state()._comm_ctx.post_forward_order)
    result["total"] = sum(p.numel() for p in load_model(source).parameters())
    (out / f"rank{rank}.json").write_text(json.dumps(result))


def main(rank: int, path: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("FSDP_TEST_PORT", "29541"))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    try:
        for mode in ("fsdp1", "fsdp2"):
            (Path(out) / mode).mkdir(parents=True, exist_ok=True)
            run(rank, mode, Path(path), Path(out) / mode)
        (Path(out) / "teacher").mkdir(parents=True, exist_ok=True)
        teacher_run(rank, Path(path), Path(out) / "teacher")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    import torch.multiprocessing as mp

    torch.set_num_threads(1)
    mp.spawn(main, args=tuple(sys.argv[1:3]), nprocs=2)
