"""Which stages a rerun of the demo may keep. A rerun converted and uptrained again whatever had changed (on 2 CPU
cores the real demo's 762 s of conversion and 677 s of uptraining, every time); now a stage's output is kept when
its key is the one demo.json recorded for it and the output is still the one that stage wrote (its marker's run_id)
and untouched since (every file below it as listed when the stage ended).

A key hashes everything the stage's output depends on: clakit's own source and the libraries' versions (a changed
default in the code is a changed key), the stage's settings, its input files (path, size and mtime of each file
below them) and, for a later stage, the run_id of the earlier output it reads. Anything else means the stage runs.
"""

import hashlib
import json
import os
from functools import cache
from pathlib import Path

from clakit import outputs
from clakit.provenance import library_versions, source_sha256, versions


@cache
def code_digest() -> str:
    """sha256 of every .py file of the clakit package (its path and bytes: source_sha256), with the versions of the
    libraries the stages use (a kept conversion made with another gguf or tokenizers read other weights or ids)."""
    libraries = library_versions(STAGE_LIBRARIES)
    return hashlib.sha256(json.dumps([versions(), libraries, source_sha256()], sort_keys=True).encode()).hexdigest()


# what the stages' outputs also depend on beside clakit/transformers/torch: the GGUF reader that dequantises the demo
# model, the tokenizer (calibration ids), the writer, the adapter and the trainer's launcher
STAGE_LIBRARIES = ("gguf", "tokenizers", "safetensors", "peft", "accelerate")


def files(path) -> list | None:
    """[(path, size, mtime_ns) of `path` and every file below it] (None for no path): a file rewritten since has
    another size or mtime."""
    if path is None:
        return None
    path = Path(path).absolute()
    found = [path, *sorted(path.rglob("*"))] if path.is_dir() else [path]
    return [(str(p), s.st_size, s.st_mtime_ns) for p in found if (s := _stat(p)) is not None]


def _stat(path: Path) -> os.stat_result | None:
    try:
        return path.stat()
    except OSError:
        return None


def key(stage: str, *parts) -> str:
    """The key of `stage` from what its output depends on (JSON-able parts)."""
    text = json.dumps([code_digest(), stage, *parts], default=str, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def run_id(folder: Path) -> str | None:
    """The run_id of the clakit output in `folder` (None without one): another run's output there has another."""
    marker = outputs.read_marker(Path(folder))
    return marker.get("run_id") if marker else None


def kept(earlier: dict, stage: str, stage_key: str, out: Path, complete: Path) -> bool:
    """Whether the output `out` of `stage` is the one the earlier demo recorded for the same key, and untouched since:
    its marker's run_id, and every file below it as `done` listed it (path, size, mtime: a weight edited, removed
    or added since is a stage to redo, not a damaged model to report on), with the file `complete` among them (an
    uptrain run kept for --resume has no model yet)."""
    record = earlier.get(stage)
    if not isinstance(record, dict) or record.get("key") != stage_key or not complete.is_file():
        return False
    if record.get("run_id") is None or record.get("run_id") != run_id(out):
        return False
    return record.get("files") == listing(out)


def listing(out: Path) -> list:
    """`files(out)` as demo.json holds it (JSON: lists, not tuples), the folder's own entry left out: its mtime
    moves with any entry made and removed beside the outputs (a lock), which changes no output."""
    return json.loads(json.dumps(files(out)[1:]))
