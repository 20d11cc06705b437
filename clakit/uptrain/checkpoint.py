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

Saving streams: the state dicts are taken sharded (each process its part, nothing gathered), then gathered to the
main process one decoder layer's tensors at a time (`layer_groups`, `gather`: every process in the same order), written
as they arrive into files whose layout was fixed beforehand from the global shapes: `trainable.safetensors` (its
header first, then each tensor's bytes) and `optimizer.pt` (torch.save of a placeholder state dict under
`torch.serialization.skip_data`, then each storage's bytes written at its record's offset and the zip's CRCs set).
The files are those torch.save / safetensors' save_file write for the whole dicts, so loading is unchanged and a
checkpoint written before this loads as it did; the main process holds one layer's tensors (or their moments), not
all of them (at 70B with every attention projection trained: ~0.6 GB, ~1.2 GB, instead of 48 GB, 96 GB).
"""

import contextlib
import functools
import json
import math
import pickle
import random
import re
import shutil
import struct
import zipfile
import zlib
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from clakit import outputs
from clakit.errors import ClakitError

CHECKPOINTS = outputs.RUN_CHECKPOINTS  # one name: outputs.run_model_hint names it for commands below uptrain
STEP_DIR = re.compile(r"step-\d+")
# parts of a parameter name that wrappers insert: FSDP1, activation checkpointing, torch.compile
WRAPPER_PARTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    if rank_and_world()[1] > 1:
        dist.barrier()


class HeldWrites:
    """One process's file writes during a collective save. A write failing on one rank (a full disk) and raised at
    once left the other ranks waiting in the next gather or barrier, for ever under gloo: the first error is held
    instead, the writes after it are skipped while every rank goes through the same collectives, and `agree` then
    raises it on every rank. torch.save reports a failed write as a RuntimeError, so that is held too."""

    def __init__(self):
        self.error: str | None = None

    def __call__(self, fn, *args, default=None):
        """fn(*args), unless a write failed already (then `default`, as when this one fails)."""
        if self.error is None:
            try:
                return fn(*args)
            except (OSError, RuntimeError, SafetensorError) as e:  # save_file: "I/O error: No space left ..."
                self.error = str(e) or type(e).__name__
        return default

    def agree(self) -> str | None:
        """The first held error of any rank, on every rank (collective), else None."""
        if rank_and_world()[1] == 1:
            return self.error
        errors = [None] * rank_and_world()[1]
        dist.all_gather_object(errors, self.error)
        return next((e for e in errors if e is not None), None)


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


# CLA: what one gather brings to the main process: one decoder layer's tensors (`....layers.12.`); any other
# trainable tensor (none in the shipped recipes) alone
LAYER_PART = re.compile(r"\.layers\.(\d+)\.")
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}


def local_trainable(model) -> dict[str, torch.Tensor]:
    """The trainable tensors as this process holds them, by clean name in the model's order, none gathered: DTensor
    parts (FSDP2), ShardedTensor parts (FSDP1, which unshards each unit in turn to cut them), else whole
    (collective under FSDP)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=False, ignore_frozen_params=True)
    state = get_model_state_dict(model, options=options)
    aliases = _frozen_aliases(model)  # as in trainable_state: a tied alias of a frozen tensor is not trainable
    state = {k: v for k, v in state.items() if k not in aliases}
    expected = trainable_names(model)
    if set(state) != set(expected):
        odd = sorted(set(state) ^ set(expected))
        raise ClakitError(f"the trainable tensors do not match the model's ({odd[0]}); nothing saved")
    return {name: state[name] for name in expected}


def layer_groups(names: list[str]) -> list[list[str]]:
    """`names` by decoder layer, in order of first appearance; a name outside the layers is a group alone."""
    groups: dict = {}
    for name in names:
        layer = LAYER_PART.search(name)
        groups.setdefault(int(layer[1]) if layer else name, []).append(name)
    return list(groups.values())


def gather(tensors: dict) -> dict:
    """`tensors` (this process's parts: DTensor, ShardedTensor or whole) whole on the main process's CPU, by the
    same keys; {} on the others (collective: every process calls it with the same keys in the same order)."""
    if not (dist.is_available() and dist.is_initialized()):
        return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    # what get_model_state_dict gathers a full state dict with, here on part of one
    from torch.distributed._state_dict_utils import _gather_state_dict

    whole = _gather_state_dict(tensors, cpu_offload=True, ranks_only=(0,))
    return {k: v.detach().contiguous() for k, v in whole.items()} if dist.get_rank() == 0 else {}


def _global_size(tensor) -> tuple[int, ...]:
    return tuple(tensor.size())  # DTensor and ShardedTensor: the whole tensor's


def _raw(tensor: torch.Tensor) -> memoryview:
    """A CPU tensor's bytes as stored (little-endian, C order), without a copy where it is contiguous."""
    return memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())


def _safetensors_header(specs: list[tuple[str, torch.dtype, tuple]]) -> bytes:
    """The header safetensors' save_file writes for tensors (name, dtype, shape), their bytes in this order:
    u64 length, JSON, spaces to a multiple of 8."""
    header, offset = {}, 0
    for name, dtype, shape in specs:
        if dtype not in SAFETENSORS_DTYPES:
            raise ClakitError(f"trainable tensor {name} is {dtype}: not a floating dtype safetensors stores")
        end = offset + math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def write_trainable(model, path: Path, held: HeldWrites | None = None) -> None:
    """Write the whole trainable tensors to `path` (safetensors; the main process) one layer at a time: the header
    from the global shapes first, then each layer's tensors as they are gathered (collective). `held`: the save's,
    whose failed writes wait for its `agree` (None: they raise here)."""
    local = local_trainable(model)
    groups = layer_groups(list(local))
    order = [name for group in groups for name in group]
    main = rank_and_world()[0] == 0
    write = held or _call
    with _MainFile(path, "wb", write) if main else contextlib.nullcontext() as f:
        if main:
            f.write(_safetensors_header([(n, local[n].dtype, _global_size(local[n])) for n in order]))
        for group in groups:
            whole = gather({name: local[name] for name in group})  # {} off the main process
            for name in group if main else ():
                f.write(_raw(whole[name]))
            del whole  # released before the next layer arrives
    if main:
        write(outputs.usual_mode, path)


def _call(fn, *args, default=None):
    """The writes of a save without `HeldWrites`: each raises at once."""
    return fn(*args)


class _MainFile:
    """The main process's file in a streamed save, each operation through `write` (`HeldWrites`: after a failed
    one, the rest are skipped while the gathers go on)."""

    def __init__(self, path: Path, mode: str, write):
        self.write_through, self.f = write, write(open, path, mode)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.f is not None:
            self.write_through(self.f.close)  # a failing close (the last buffered bytes) is a failed write
            with contextlib.suppress(OSError):
                self.f.close()  # skipped above after an earlier failure: released all the same (again: a no-op)

    def write(self, data) -> None:
        if self.f is not None:
            self.write_through(self.f.write, data)

    def seek(self, offset: int) -> None:
        if self.f is not None:
            self.write_through(self.f.seek, offset)


def _leaves(tree, path: tuple = ()):
    """(path, tensor) of every tensor in a state dict, in the order pickle meets them (dicts in insertion order,
    then lists): torch.save numbers the storages in that order."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _leaves(value, (*path, key))
    elif isinstance(tree, list | tuple):
        for i, value in enumerate(tree):
            yield from _leaves(value, (*path, i))
    elif isinstance(tree, torch.Tensor) or type(tree).__name__ == "ShardedTensor":
        yield path, tree


def _placeholders(tree):
    """`tree` with every tensor replaced by a CPU tensor of its global shape and dtype, for torch.save under
    skip_data (which writes each record's size and location, none of its bytes); called under FakeTensorMode, so
    they have no storage."""
    if isinstance(tree, dict):
        return {key: _placeholders(value) for key, value in tree.items()}
    if isinstance(tree, list | tuple):
        return type(tree)(_placeholders(value) for value in tree)
    if isinstance(tree, torch.Tensor) or type(tree).__name__ == "ShardedTensor":
        return torch.empty(_global_size(tree), dtype=tree.dtype, device="cpu")
    return tree


def _set_zip_crcs(path: Path, records: dict[str, tuple[int, int, int]]) -> None:
    """Set the CRC-32 of the zip records in `records` ({name after the archive's folder, `data/3`: (offset of its
    bytes, their length, CRC)}) where torch.save keeps it (the data descriptor after the bytes, else the local
    header) and in the central directory: skip_data wrote the records' space, not their CRCs."""
    with zipfile.ZipFile(path) as archive:
        infos = {info.filename.partition("/")[2]: info for info in archive.infolist()}
        central = archive.start_dir
    with open(path, "r+b") as f:
        for name, (offset, length, crc) in records.items():
            if infos[name].flag_bits & 0x08:  # a data descriptor: [signature PK\7\8] CRC-32, sizes
                f.seek(offset + length)
                f.seek(offset + length + 4 * (f.read(4) == b"PK\x07\x08"))
            else:
                f.seek(infos[name].header_offset + 14)  # the local file header's CRC-32
            f.write(struct.pack("<I", crc))
        position = central
        for _ in infos:  # central directory entries: 46 bytes, the name, extra and comment; CRC-32 at byte 16
            f.seek(position)
            lengths = struct.unpack("<HHH", f.read(46)[28:34])
            name = f.read(lengths[0]).decode().partition("/")[2]
            if name in records:
                f.seek(position + 16)
                f.write(struct.pack("<I", records[name][2]))
            position += 46 + sum(lengths)


def _local_optimizer(model, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    inner = getattr(optimizer, "optimizer", optimizer)
    return get_optimizer_state_dict(model, inner, options=StateDictOptions(full_state_dict=False))


def write_optimizer(model, optimizer, path: Path, held: HeldWrites | None = None) -> None:
    """Write the optimizer's whole state to `path` (the main process) as torch.save writes it, one layer's state at
    a time (collective): the file is saved first with placeholders and no tensor bytes (skip_data), then each
    layer's moments are gathered and written at their records' offsets. `held`: as `write_trainable`'s."""
    local = _local_optimizer(model, optimizer)
    leaves = list(_leaves(local))
    main, crcs, offsets, write = rank_and_world()[0] == 0, {}, [], held or _call
    if main:
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode():  # at 70B 96 GB of placeholders: none allocated
            placeholders = _placeholders(local)
        offsets = write(_skeleton, placeholders, path, len(leaves), default=[])  # []: it failed, nothing to write
    by_param = {}  # AdamW's state of each trained tensor: {"step", "exp_avg", "exp_avg_sq"}
    for key, (where, _) in enumerate(leaves):
        by_param.setdefault(where[1] if where[0] == "state" and len(where) > 2 else "", []).append(key)
    chunks = [[k for n in group for k in by_param.pop(n, [])] for group in layer_groups(list(by_param))]
    with _MainFile(path, "r+b", write) if main and offsets else contextlib.nullcontext() as f:
        for chunk in chunks:
            whole = gather({key: leaves[key][1] for key in chunk})  # {} off the main process
            crcs |= _write_at(f, whole, offsets) if f is not None else {}
            del whole  # released before the next layer arrives
    if main and offsets:
        write(_set_zip_crcs, path, crcs)


def _skeleton(placeholders, path: Path, count: int) -> list[int]:
    """torch.save of the placeholder state dict without its tensors' bytes; the offsets of records data/0..count-1."""
    with torch.serialization.skip_data(materialize_fake_tensors=True):
        torch.save(placeholders, path)
    reader = torch._C.PyTorchFileReader(str(path))
    return [reader.get_record_offset(f"data/{key}") for key in range(count)]


def _write_at(f, tensors: dict, offsets: list[int]) -> dict[str, tuple[int, int, int]]:
    """Each tensor's bytes written at offsets[key]; returns {record name: (offset, length, CRC-32)}."""
    written = {}
    for key, tensor in tensors.items():
        data = _raw(tensor)
        f.seek(offsets[key])
        f.write(data)
        written[f"data/{key}"] = (offsets[key], data.nbytes, zlib.crc32(data))
    return written


class GatheredTrainable:
    """The whole trainable tensors on the main process, one layer gathered at a time as it asks for them
    (`trained[name]`, the layer before released), for `student.save_merged`. Collective: the main process asks
    (its group's index broadcast), the others `serve` the gathers until it `close`s. `shapes`: {clean name: global
    shape}, on every process."""

    def __init__(self, model):
        self.local = local_trainable(model)
        self.groups = layer_groups(list(self.local))
        self.group_of = {name: i for i, group in enumerate(self.groups) for name in group}
        self.shapes = {name: _global_size(t) for name, t in self.local.items()}
        self.held, self.index, self.closed = {}, None, False

    def __getitem__(self, name: str) -> torch.Tensor:
        if self.group_of[name] != self.index:
            self.held = {}  # released before the next layer arrives
            self.index = self.group_of[name]
            self.held = self._gather(_from_main(self.index))
        return self.held[name]

    def _gather(self, index: int) -> dict:
        return gather({name: self.local[name] for name in self.groups[index]})

    def serve(self) -> None:
        """The other processes: take part in each gather the main process asks for, until it is done."""
        while (index := _from_main(None)) >= 0:
            self._gather(index)

    def close(self) -> None:
        """The main process, once (again is a no-op): release the others from `serve`."""
        if not self.closed:
            self.closed, self.held = True, {}
            _from_main(-1)


def _from_main(value):
    """The main process's `value` on every process (collective where there are several)."""
    if rank_and_world()[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


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


def _write_whole(model, optimizer, folder: Path, held: HeldWrites | None = None) -> None:
    """One process's trainable tensors and optimizer state, each written whole and released before the next. Only
    the writes go through `held`: the state dicts are taken outside it, so an error there is not called a write's."""
    write = held or _call
    write(save_file, trainable_state(model), folder / "trainable.safetensors")
    write(outputs.usual_mode, folder / "trainable.safetensors")
    write(torch.save, _optimizer_state(model, optimizer), folder / "optimizer.pt")


def save_checkpoint(run_dir: Path, step: int, model, optimizer, scheduler, state: dict) -> Path:
    """Write checkpoint `step` of the (possibly wrapped) model (collective; rank 0 writes the shared files)."""
    rank, world = rank_and_world()
    final = run_dir / CHECKPOINTS / f"step-{step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    try:
        _write_checkpoint(run_dir, tmp, final, model, optimizer, scheduler, state)
    except BaseException:  # Ctrl-C or SIGTERM mid-save: the torn step-N.tmp went only with a later save
        if rank == 0:
            aside = final.with_name(final.name + ".old")
            if aside.is_dir() and not final.exists():  # between _complete's renames: the step saved before, back
                aside.rename(final)
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _write_checkpoint(run_dir: Path, tmp: Path, final: Path, model, optimizer, scheduler, state: dict) -> None:
    rank, world = rank_and_world()
    held = HeldWrites()  # a failed write is raised on every rank once all have passed the same collectives
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        held(tmp.mkdir, 0o777, True)
    if world > 1:
        # CLA: streamed, one layer's tensors then one layer's moments on rank 0 at a time (the module's docstring):
        # at 70B with every attention projection trained in full, gathered whole they were 48 GB, then 96 GB
        write_trainable(model, tmp / "trainable.safetensors", held)  # collective: every rank
        write_optimizer(model, optimizer, tmp / "optimizer.pt", held)  # collective: every rank
    else:  # one process gathers nothing: the tensors and moments are its own, written whole (the same files)
        _write_whole(model, optimizer, tmp, held)
    if rank == 0:
        held(torch.save, scheduler.state_dict(), tmp / "scheduler.pt")
    barrier()
    held(torch.save, rng_state(), tmp / f"rng-{rank}.pt")
    _settle(held, tmp, run_dir)  # collective, as a barrier
    if rank == 0:
        held(_complete, tmp, final, state)
    _settle(held, tmp, run_dir)


def _complete(tmp: Path, final: Path, state: dict) -> None:
    """Mark `tmp` complete and rename it to `final`. A step saved again (after a resume) keeps its earlier folder
    until the new one is in place: moved aside to `step-N.old`, put back if the rename fails, removed after."""
    (tmp / "state.json").write_text(json.dumps(state, indent=1))  # last: marks the folder complete
    aside = final.with_name(final.name + ".old")
    if final.exists():
        shutil.rmtree(aside, ignore_errors=True)
        final.rename(aside)
    try:
        tmp.rename(final)
    except OSError:
        if aside.exists():
            aside.rename(final)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _settle(held: HeldWrites, tmp: Path, run_dir: Path) -> None:
    """After a failed write on any rank: rank 0 removes the unfinished `tmp`, and every rank stops in one line
    naming the problem and how to go on (the checkpoints before stay as they were)."""
    error = held.agree()
    if error is None:
        return
    if rank_and_world()[0] == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    last = checkpoint_dirs(run_dir)
    then = f"add --resume to the same command to continue from {last[-1].name}" if last else "run it again"
    raise ClakitError(
        f"could not write checkpoint {tmp.name.removesuffix('.tmp')} in {tmp.parent}: {error}; make room there (or "
        f"raise train.save_steps; 0 saves none), then {then}"
    )


def prune(run_dir: Path, keep: int | None) -> None:
    """Drop all but the last `keep` checkpoints, and the `step-N.tmp` folders a killed save left (called by the main
    process right after a save completed, so no save is in progress). A `step-N.old` is removed where its step is
    in place again, put back where a kill came between `_complete`'s two renames (then it is the step's only copy)."""
    for aside in _step_folders(run_dir, ".old"):
        if aside.with_suffix("").exists():
            shutil.rmtree(aside, ignore_errors=True)
        else:
            aside.rename(aside.with_suffix(""))
    torn = _step_folders(run_dir, ".tmp")
    old = checkpoint_dirs(run_dir)[:-keep] if keep is not None and keep > 0 else []
    for folder in torn + old:
        shutil.rmtree(folder, ignore_errors=True)


def _step_folders(run_dir: Path, suffix: str) -> list[Path]:
    """The `step-N<suffix>` folders of a run: `.tmp` (a save in progress or killed), `.old` (`_complete`'s)."""
    root = run_dir / CHECKPOINTS
    return [p for p in root.glob(f"step-*{suffix}") if STEP_DIR.fullmatch(p.name.removesuffix(suffix))]


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


def _named_positional(state: dict, model) -> dict:
    """An optimizer.pt of clakit before 2026-12-02 (d999762): torch's own `optimizer.state_dict()`, its tensors
    numbered in the order the optimizer was given them (`make_optimizer`: the trainable parameters in
    `model.parameters()` order, one group, as today) rather than named. Renamed to the clean names the distributed
    state-dict API loads by (the resume of such a run was refused as 'corrupt ... (KeyError)'). Any other state is
    returned as it is."""
    groups = state.get("param_groups") if isinstance(state, dict) else None
    ids = [i for g in groups or () if isinstance(g, dict) for i in g.get("params", ())]
    if not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        return state
    wrapped = ("module.", "_orig_mod.")  # DDP / torch.compile prefixes, which clean names do not have
    names, shapes = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            while name.startswith(wrapped):
                name = name.split(".", 1)[1]
            names.append(name)
            shapes.append(tuple(p.shape))
    if sorted(ids) != list(range(len(names))):
        return state  # another model's state: the load below refuses it
    # torch loads moments of another shape without a word (the first step fails, or, for two square projections
    # swapped, trains on the other's moments): each numbered tensor's moments must have its parameter's shape
    for i, v in state.get("state", {}).items():
        moments = [t for t in (v.values() if isinstance(v, dict) else ()) if torch.is_tensor(t) and t.dim() > 0]
        if not isinstance(i, int) or not 0 <= i < len(names) or any(tuple(t.shape) != shapes[i] for t in moments):
            raise ValueError(f"optimizer state {i} does not fit this model's trainable tensor of that number")
    name = dict(enumerate(names))
    return {
        "state": {name[i]: v for i, v in state.get("state", {}).items() if i in name},
        "param_groups": [{**g, "params": [name[i] for i in g["params"]]} for g in groups],
    }


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
    """Restore trainable tensors, optimizer, scheduler and this process's RNG (collective); returns state.json."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    saved = read_checkpoint(path)
    load_trainable(model, saved["trainable"], f"checkpoint {path}")
    inner = getattr(optimizer, "optimizer", optimizer)
    kernels = [{k: g[k] for k in IMPLEMENTATION if k in g} for g in inner.param_groups]
    try:
        optimizer_state = _named_positional(saved["optimizer"], model)
        set_optimizer_state_dict(model, inner, optimizer_state, options=_options(model, True))
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
