"""Reading a source checkpoint one tensor at a time, and writing a sharded safetensors checkpoint.

Readers give `names` and `get(name)`. safetensors and pickle tensors come back as memory-mapped views
(`safe_open(...).get_tensor`, `torch.load(mmap=True)`): shape and dtype cost nothing, and the data is read, and
held, only while something uses it.
`ShardWriter` buffers tensors up to `max_shard_size` and writes each shard with `safetensors.torch.save_file`
(which serialises straight from the tensors' memory), then names the shards and writes the index like
`save_pretrained` does.
"""

import json
import pickle
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from clakit import outputs
from clakit.errors import ClakitError
from clakit.sources import (  # the one name of each, also what a Hub download fetches
    DUPLICATE_FIX,
    PICKLE_INDEX,
    SAFE_INDEX,
    check_named_weights,
    check_unique_tensors,
    is_safetensors_name,
    loadable_weights,
    named_weights,
    pickle_refusal,
    read_index,
    unloadable,
)

# a shard an index names, absent (a download cut short, a dangling Hub-cache link)
MISSING_SHARD_FIX = "download the checkpoint again (or restore the file)"
# Fixed header metadata: transformers wants format=pt; nothing time- or machine-dependent, so output is reproducible.
SHARD_METADATA = {"format": "pt"}
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_SIZE_UNITS |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: str | int) -> int:
    """`"5GB"` -> 5_000_000_000 (decimal units like transformers; KiB/MiB/GiB binary); an int is bytes."""
    if isinstance(size, int) and size > 0:
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(size))
    unit = match and match.group(2).upper()
    nbytes = int(float(match.group(1)) * _SIZE_UNITS[unit]) if match and unit in _SIZE_UNITS else 0
    if nbytes < 1:  # "0.4" or "0.0001KB" round to 0 bytes
        raise ClakitError(f"--max-shard-size must be a size like 5GB, 500MB or 2GiB, got {size!r}")
    return nbytes


def natural_key(name: str) -> list:
    """Sort key putting model.layers.2 before model.layers.10 (the order layers run in)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _single_or_index(folder: Path, name: str | None) -> tuple[str | None, str | None]:
    """(single file, index) to read: `name`, else the file transformers loads from `folder` (`loadable_weights`)."""
    name = name or loadable_weights(folder)
    if name is None:
        raise unloadable(folder)
    return (None, name) if name.endswith(".index.json") else (name, None)


def _holders(keys: dict[str, set[str]]) -> dict[str, str]:
    """tensor -> the listed file that holds it. transformers loads every tensor of the files an index lists,
    whatever its weight_map says of each: an entry no listed file holds is ignored, a stored tensor the map omits
    or places in another shard is read (convert refused such checkpoints as incomplete, "re-download", while
    transformers loaded them whole, with the same weights). `keys` holds no tensor twice (check_unique_tensors)."""
    return {tensor: file for file, names in keys.items() for tensor in names}


# a header's bytes beyond its tensors' entries (SmolLM2's: 26,984 bytes for 242 tensors, 111 each): every `get`
# parses it again (a fresh handle per tensor keeps pages from staying resident), so a 14 MB __metadata__ cost ~1.5 s
# a tensor (a 4-layer model's conversion: killed after 120 s against 9 s; helper M); real checkpoints' metadata is a
# few bytes ({"format": "pt"})
HEADER_ROOM = 64 * 1024
HEADER_PER_TENSOR = 1024


def _check_header_size(path: Path, tensors: int) -> None:
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
    if size > HEADER_ROOM + HEADER_PER_TENSOR * tensors:
        raise ClakitError(
            f"{path}'s header is {size:,} bytes for {tensors} tensors (a tensor's entry takes ~110 bytes): it "
            "holds bulky __metadata__, which this conversion would parse again for every tensor it reads; save the "
            "tensors again without it (safetensors' save_file(tensors, path, metadata=None))"
        )


class SafetensorsCheckpoint:
    """The safetensors weights transformers loads from a folder: the file config.json names, else
    `model.safetensors`, else the index's shards."""

    def __init__(self, folder: Path, named: str | None = None):
        self.folder = folder
        single, index = _single_or_index(folder, named)
        weight_map = read_index(folder / index) if index else None
        files = sorted(set(weight_map.values())) if weight_map else [single]
        self._keys = {file: self._read_keys(file) for file in files}
        check_unique_tensors(self._keys, folder, DUPLICATE_FIX)  # shards an index lists; one single file passes
        self._where = _holders(self._keys)
        self.names = sorted(self._where, key=natural_key)
        self.files = sorted(self._keys)  # the weight files read

    def _open(self, file: str):
        path = self.folder / file
        if not path.is_file():
            raise ClakitError(
                f"the checkpoint index names shard {file}, which is missing from {self.folder}; {MISSING_SHARD_FIX}"
            )
        try:
            return safe_open(str(path), framework="pt")
        except (SafetensorError, OSError) as e:
            raise ClakitError(f"corrupt or truncated safetensors file {path} ({e}); re-download it") from None

    def _read_keys(self, file: str) -> set[str]:
        keys = set(self._open(file).keys())  # header only; checks the file is whole
        _check_header_size(self.folder / file, len(keys))
        return keys


    def get(self, name: str) -> torch.Tensor:
        """A memory-mapped view; a fresh handle per tensor, so its pages leave memory as soon as it is dropped
        (tensors from one long-lived handle keep the whole file's touched pages resident)."""
        try:
            return self._open(self._where[name]).get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise ClakitError(f"cannot read tensor {name} from {self.folder / self._where[name]} ({e})") from None


class PickleCheckpoint:
    """`pytorch_model*.bin` weights (only with --allow-pickle), memory-mapped with `torch.load(weights_only=True)`.

    Nothing is cached: every `get` maps its file afresh and keeps only the one tensor, so the mapping, and the pages
    read through it, go when the tensor is dropped. A cached state dict per file kept every page ever read resident:
    a whole-checkpoint RSS (measured: 2.18 GB against 0.69 GB for the same 1.76 GB checkpoint as safetensors). The
    price is one unpickling per `get` (~3 ms for a 17-tensor shard, ~16 ms for 288 tensors)."""

    def __init__(self, folder: Path, named: str | None = None):
        self.folder = folder
        single, index = _single_or_index(folder, named)
        self._index = index or PICKLE_INDEX
        self._where = read_index(folder / index) if index else {t: single for t in self._load(single)}
        if index:  # the shards' names (memory-mapped: no tensor read), checked as the safetensors shards are
            keys = {file: set(self._load(file)) for file in sorted(set(self._where.values()))}
            check_unique_tensors(keys, folder, DUPLICATE_FIX)
            self._where = _holders(keys)
        self.names = sorted(self._where, key=natural_key)
        self.files = sorted(set(self._where.values()))

    def _load(self, file: str) -> dict:
        try:
            return torch.load(self.folder / file, map_location="cpu", mmap=True, weights_only=True)
        except FileNotFoundError:
            raise ClakitError(
                f"the checkpoint index names {file}, which is missing from {self.folder}; {MISSING_SHARD_FIX}"
            ) from None
        except pickle.UnpicklingError as e:  # objects beyond tensors: torch's advice would be to run their code
            raise pickle_refusal(str(self.folder / file), e) from None
        except Exception as e:  # a damaged pickle raises anything from UnpicklingError to RuntimeError
            raise ClakitError(f"cannot read {self.folder / file} ({str(e).splitlines()[0][:200]})") from None

    def get(self, name: str) -> torch.Tensor:
        state = self._load(self._where[name])
        if name not in state:
            raise ClakitError(f"{self._index} puts tensor {name} in {self._where[name]}, which does not hold it")
        return state.pop(name)  # the rest of the state dict (its views of the mapping) is dropped on return


class StateDictCheckpoint:
    """An in-memory model's tensors (GGUF sources, which transformers can only load whole and dequantised)."""

    def __init__(self, state: dict[str, torch.Tensor]):
        self._state = state
        self.names = sorted(state, key=natural_key)

    def get(self, name: str) -> torch.Tensor:
        return self._state[name]


class TiedTwins:
    """A checkpoint of a tied model that stores the tie under one name only, read under both: safetensors'
    `save_model` (what trainers that save through it write) keeps `lm_head.weight` and drops
    `model.embed_tokens.weight`, which transformers' tying fills from it; convert refused it as "missing ...
    re-download it"."""

    def __init__(self, checkpoint, aliases: dict[str, str]):
        self._inner, self._aliases = checkpoint, aliases  # missing name -> the stored twin it is read from
        self.names = sorted({*checkpoint.names, *aliases}, key=natural_key)

    def get(self, name: str) -> torch.Tensor:
        return self._inner.get(self._aliases.get(name, name))

    def __getattr__(self, attr):
        return getattr(self._inner, attr)


def with_tied_twins(checkpoint, tied: dict[str, str]):
    """`checkpoint`, reading each tied twin the config needs (the embeddings) from its stored partner (lm_head)
    where only that is stored; as it is otherwise. `tied`: name -> twin (lm_head.weight -> the embeddings)."""
    aliases = {twin: name for name, twin in tied.items() if twin not in checkpoint.names and name in checkpoint.names}
    return TiedTwins(checkpoint, aliases) if aliases else checkpoint


def open_checkpoint(folder: Path, allow_pickle: bool):
    """The weights transformers' from_pretrained loads from `folder` (`loadable_weights`: the file config.json names,
    model.safetensors, its index, pytorch_model.bin, its index; pickle only when allowed). No other file is opened:
    a Mistral repo's consolidated.safetensors holds the same weights again (14 GB for a 7B), under names no
    converter reads."""
    named = named_weights(folder)
    if named is not None:
        check_named_weights(folder, named, allow_pickle)
    name = loadable_weights(folder)
    if name is None:
        raise unloadable(folder)
    if is_safetensors_name(name):
        return SafetensorsCheckpoint(folder, name)
    if not allow_pickle:
        raise ClakitError(
            f"{folder} holds only pickle (.bin) weights that transformers can load, and those can run code when "
            "loaded; pass --allow-pickle if you trust the source"
        )
    return PickleCheckpoint(folder, name)


class ShardWriter:
    """Writes tensors into `model-0000i-of-0000n.safetensors` shards of at most `max_shard_size` bytes + index.

    Holds at most one shard's tensors. A tensor larger than the limit gets a shard of its own.
    """

    def __init__(self, folder: Path, max_shard_size: int):
        self.folder, self.max_shard_size = folder, max_shard_size
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []  # tensor names of each written shard
        self.total_size = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_size:
            self._flush()
        self._pending[name] = tensor.contiguous()
        self._pending_bytes += nbytes
        self.total_size += nbytes

    def _flush(self) -> None:
        path = self.folder / f"shard-{len(self._shards):05d}.tmp"
        save_file(self._pending, path, metadata=SHARD_METADATA)
        outputs.usual_mode(path)  # save_file creates 0600; give it the mode any new file gets
        self._shards.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def finish(self) -> list[str]:
        """Write the last shard, give the shards their final names and write the index; returns the file names."""
        if self._pending or not self._shards:
            self._flush()
        n = len(self._shards)
        files = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for i, file in enumerate(files):
            (self.folder / f"shard-{i:05d}.tmp").rename(self.folder / file)
        if n > 1:
            weight_map = {name: file for file, names in zip(files, self._shards, strict=True) for name in names}
            index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(weight_map.items()))}
            (self.folder / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return files
