"""Where models come from: a local checkpoint folder, a Hub repo id, or a `.gguf` file.

`resolve_source` turns the user's string into a `Source` (a local folder or GGUF path, downloading a Hub repo when
online); `load_model` / `load_tokenizer` build the transformers objects from it. The converter reads tensors lazily
through `clakit.convert`; everything that needs a whole model in memory (eval, teacher, calibration) comes here.
"""

import contextlib
import copy
import fnmatch
import functools
import hashlib
import json
import math
import os
import pickle
import re
import struct
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from clakit.errors import ClakitError
from clakit.paths import expand
from clakit.provenance import file_version

# what a Hub download fetches besides the weights, which are named file by file (never "*.safetensors": Mistral's
# repos hold a consolidated.safetensors of the same weights too)
HUB_NON_WEIGHTS = ["*.json", "tokenizer*", "*.model", "*.txt", "*.py"]
SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"  # without an index, the one safetensors file transformers loads (no other name)
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
LOAD_ORDER = (SAFE_SINGLE, SAFE_INDEX, PICKLE_SINGLE, PICKLE_INDEX)  # transformers' (named file first)
# config.json keys a Llama/Mistral (and CLA) model needs to be built at its weights' shapes: transformers fills a
# missing one with a default (hidden_size 4096) that does not match them
CONFIG_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
CONFIG_KEYS_OF = ("llama", "mistral", "llama_cla", "mistral_cla")
# What transformers' and gguf's GGUF readers raise on a cut or garbled file (unpacking past the end, numpy reshapes).
GGUF_READ_ERRORS = (ValueError, OSError, KeyError, IndexError, EOFError, struct.error)


@dataclass(frozen=True)
class Source:
    spec: str  # what the user wrote
    kind: str  # "dir" | "gguf"
    path: Path  # the folder, or the .gguf file
    revision: str | None = None  # Hub revision (or commit) when downloaded

    @property
    def load_dir(self) -> str:
        return str(self.path.parent if self.kind == "gguf" else self.path)

    @property
    def gguf_file(self) -> str | None:
        return self.path.name if self.kind == "gguf" else None

    @property
    def commit(self) -> str | None:
        """The Hub commit the files were read at (huggingface_hub names each snapshot folder by it), for provenance:
        `revision` is what was asked ("main" moves); None for a local path."""
        downloaded = self.kind == "dir" and self.revision is not None and self.path.parent.name == "snapshots"
        return self.path.name if downloaded else None


def looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "/", "~"))


def _config_snapshot(spec: str, revision: str | None, patterns: tuple[str, ...] = ("*.py",)) -> Path:
    """The snapshot folder of a Hub repo holding its config.json (and `patterns`: its code files, or the index)."""
    folder = Path(_snapshot(spec, revision, ["config.json", *patterns]))
    if not (folder / "config.json").is_file():
        raise ClakitError(
            f"Hub repo {spec} has no config.json, so it is not a transformers checkpoint (a GGUF-only repo?); "
            "download its .gguf file and give that path"
        )
    return folder


def records_folder(spec: str, revision: str | None) -> Path:
    """Where a model's own files beside its weights are read (config.json, code, clakit's records): its local path,
    or a Hub id's snapshot of those files alone (never its weights). A CLA checkpoint on the Hub given as
    model.path lost its conversion record, and so its original (the teacher), which was looked for as a local path."""
    path = expand(spec, "model")
    if path.exists() or not looks_like_hub_id(spec) or (hub_offline() and not _in_hub_cache(spec, revision)):
        return path
    from clakit.provenance import CONVERT_RECORD, UPTRAIN_RECORD

    return _config_snapshot(spec, revision, ("*.py", CONVERT_RECORD, UPTRAIN_RECORD))


def _download(spec: str, revision: str | None, allow_pickle: bool, check_config) -> Source:
    """A Hub repo's snapshot: config.json first (one small file), checked by `check_config(source)` before the
    weights (GBs to 100s of GB) are fetched, then the rest at the same commit. clakit's own records come with the
    config: a CLA checkpoint is refused naming the record that names its original (an uptrained one's is
    uptrain.json, which the first fetch lacked, so the refusal named clakit_convert.json)."""
    from clakit.provenance import CONVERT_RECORD, UPTRAIN_RECORD

    config_only = _config_snapshot(spec, revision, (SAFE_INDEX, CONVERT_RECORD, UPTRAIN_RECORD))
    if check_config is not None:
        check_config(Source(spec, "dir", config_only, revision or "main"))
    commit = config_only.name if config_only.parent.name == "snapshots" else revision  # the same files' commit
    named = named_weights(config_only)
    if named is not None:  # what transformers loads first: that file (and its index's shards), nothing else
        return _download_named(spec, revision, commit, named, allow_pickle)
    # model.safetensors first, as transformers loads it even beside an index (whose shards a repo with both may hold
    # other weights in: those were read, other logits than from_pretrained's); the index's shards where it is absent
    patterns = HUB_NON_WEIGHTS + [SAFE_SINGLE]
    folder = Path(_snapshot(spec, commit, patterns))
    if not (folder / SAFE_SINGLE).is_file():
        patterns = _weight_patterns(config_only / SAFE_INDEX)
        folder = Path(_snapshot(spec, commit, patterns))
    if allow_pickle and not any((folder / name).is_file() for name in (SAFE_INDEX, SAFE_SINGLE)):
        # pickle only where there are no safetensors (transformers loads those first): --allow-pickle on a repo with
        # both fetched both, a 7B's pytorch_model*.bin being 14 GB more that nothing reads
        folder = Path(_snapshot(spec, commit, patterns + ["*.bin"]))
    return Source(spec, "dir", folder, revision or "main")


def _download_named(spec: str, revision: str | None, commit: str | None, named: str, allow_pickle: bool) -> Source:
    """A Hub repo whose config.json names its weights file (`transformers_weights`): that file, and an index's
    shards (the index fetched first for their names); pickle is refused before any weight is fetched."""
    check_named_kind(f"Hub repo {spec}'s config.json", named, allow_pickle)  # before anything else is fetched
    if named.endswith(".index.json"):
        patterns = _weight_patterns(Path(_snapshot(spec, commit, [named])) / named)
    else:
        patterns = HUB_NON_WEIGHTS
    return Source(spec, "dir", Path(_snapshot(spec, commit, patterns + [named])), revision or "main")


def _weight_patterns(index: Path) -> list[str]:
    """What to download: what transformers loads, the shards the index lists or else model.safetensors; never every
    *.safetensors (Mistral's repos also hold a consolidated.safetensors of the same weights: 14 GB more for a 7B)."""
    try:
        shards = sorted(set(read_index(index).values()))
    except ClakitError:  # none, or malformed: convert reads it again and says which
        return HUB_NON_WEIGHTS + [SAFE_SINGLE]
    return HUB_NON_WEIGHTS + shards


def _snapshot(spec: str, revision: str | None, patterns: list[str]) -> str:
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(spec, revision=revision, allow_patterns=patterns)
    except Exception as e:
        raise _hub_error(spec, revision, e, patterns) from None
    weights = [  # the weights fetched now or before, checked before any work
        path for path in sorted(Path(folder).iterdir())
        if path.suffix in WEIGHT_SUFFIXES and any(fnmatch.fnmatchcase(path.name, p) for p in patterns)
    ]
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(weights), os.cpu_count() or 1))) as pool:
        list(pool.map(functools.partial(check_hub_blob, spec), weights))  # hashlib hashes without the GIL
    return folder


WEIGHT_SUFFIXES = (".safetensors", ".bin")
SHA256_NAME = re.compile(r"[0-9a-f]{64}")


def hub_blob_sha256(path: Path) -> str | None:
    """The sha256 a Hub-cache file is stored under, None for any other file: huggingface_hub links each snapshot's
    file to blobs/<etag>, and a git-lfs file's etag (every weight file's) is its sha256. The links are followed one
    at a time: huggingface_hub >= 2 makes blobs/<etag> of a Xet file a link itself, into the cache-wide store
    blobs/<2 hex>/<xet hash> (a hash of its chunks, not the file's sha256), where realpath ends."""
    link = Path(os.path.abspath(path))
    for _ in range(40):  # the kernel's own limit on a chain of links
        if link.parent.name == "blobs" and SHA256_NAME.fullmatch(link.name):
            return link.name
        if not link.is_symlink():
            return None
        link = Path(os.path.normpath(Path(os.path.realpath(link.parent)) / os.readlink(link)))
    return None


def check_hub_blob(spec: str, path: Path) -> None:
    """A Hub-cache weight file hashes to the sha256 it is stored under. huggingface_hub checks sizes only: a shard
    corrupted in transit or on disk, of the right size, was converted and recorded like a clean one. Hashed once per
    command and version of the file (file_sha256): a 70B's 140 GB cost a read of it at the disk's speed."""
    from clakit.provenance import file_sha256

    expected = hub_blob_sha256(path)
    if expected is not None and file_sha256(path) != expected:
        raise ClakitError(
            f"{spec}'s {path.name} in the Hub cache ({os.path.realpath(path)}) does not hash to the sha256 it was "
            f"published with ({expected[:16]}...): the copy is damaged; delete that file and download the model again "
            "(huggingface_hub fetches a deleted file anew)"
        )


def _missing_in_cache(spec: str, revision: str | None, patterns: list[str]) -> list[str]:
    """The files `patterns` selects that the cached tree listing of `spec` at `revision` names and its snapshot
    lacks (none known: an empty list). No network is touched."""
    try:
        from huggingface_hub import get_cached_repo_tree
        from huggingface_hub.utils import filter_repo_objects

        names = [f.path for f in get_cached_repo_tree(spec, revision=revision)]
        snapshot = _cached_snapshot_folder(spec, revision)
        wanted = filter_repo_objects(names, allow_patterns=patterns)
        return [n for n in wanted if snapshot is None or not (snapshot / n).is_file()]
    except Exception:  # an older huggingface_hub, or no listing cached
        return []


def _cached_snapshot_folder(spec: str, revision: str | None) -> Path | None:
    from huggingface_hub import constants

    entry = Path(constants.HF_HUB_CACHE) / f"models--{spec.replace('/', '--')}"
    commit = revision if revision and re.fullmatch(r"[0-9a-f]{40}", revision) else None
    if commit is None:
        try:
            commit = (entry / "refs" / (revision or "main")).read_text().strip()
        except OSError:
            return None
    return entry / "snapshots" / commit


def _cache_error(spec: str, revision: str | None, e: Exception, patterns: list[str]) -> ClakitError:
    """The Hub not asked (offline) or not reached, for a repo the cache holds nothing of or only part of
    (huggingface_hub's LocalEntryNotFoundError for both, and for a refused connection: every machine without
    network, which was named "the Hub cache holds only part of")."""
    from huggingface_hub import constants

    at = f" at revision {revision}" if revision else ""
    snapshot = _cached_snapshot_folder(spec, revision)
    if snapshot is None or not snapshot.is_dir():
        return ClakitError(
            f"Hub repo {spec}{at} could not be downloaded: the Hub ({constants.ENDPOINT}) could not be reached "
            f"({_first_line(e.__cause__ or e)[:200]}) and the Hub cache holds nothing of it; check your connection "
            "(and HF_ENDPOINT), or give a local checkpoint folder or .gguf file"
        )
    missing = _missing_in_cache(spec, revision, patterns)
    lacks = f" (it lacks {', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})" if missing else ""
    why = "the Hub is not asked (offline: HF_HUB_OFFLINE)" if hub_offline() else (
        f"the Hub ({constants.ENDPOINT}) could not be reached")  # fmt: skip
    return ClakitError(
        f"the Hub cache holds only part of {spec}{at}{lacks} and {why}: download it where the Hub is "
        "reachable (the files already fetched are kept), or give a local checkpoint folder or .gguf file"
    )


def _hub_error(spec: str, revision: str | None, e: Exception, patterns: list[str] | None = None) -> ClakitError:
    """One line for a failed download. A gated repo (every meta-llama one), a missing revision or a missing/private
    repo each have their own fix; huggingface_hub's first line is only '401 Client Error. (Request ID: ...)', which
    was all the message said, with 'check the id and your connection'."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    login = "log in (`hf auth login`, or set HF_TOKEN)"
    page = f"{constants.ENDPOINT}/{spec}"  # HF_ENDPOINT's mirror, where one is set
    if isinstance(e, GatedRepoError):  # a RepositoryNotFoundError too: first
        if getattr(getattr(e, "response", None), "status_code", None) == 403:  # a token, without access (yet)
            return ClakitError(
                f"Hub repo {spec} is gated and the token in use has no access to it: request access at {page} "
                "(approval may be pending) or use a token of an account that has it, or give a local checkpoint folder"
            )
        return ClakitError(
            f"Hub repo {spec} is gated: accept its terms at {page} with your account and "
            f"{login}, or give a local checkpoint folder"
        )
    if isinstance(e, LocalEntryNotFoundError):
        if isinstance(e.__cause__, GatedRepoError | RepositoryNotFoundError):  # the Hub answered (401/403/404)
            return _hub_error(spec, revision, e.__cause__, patterns)
        return _cache_error(spec, revision, e, patterns or [])
    if isinstance(e, RevisionNotFoundError):
        return ClakitError(f"Hub repo {spec} has no revision {revision!r}; give a branch, tag or commit it has")
    if isinstance(e, RepositoryNotFoundError):
        return ClakitError(
            f"Hub repo {spec} does not exist, or is private (then {login}); check the id, or give a local checkpoint "
            "folder or .gguf file"
        )
    return ClakitError(
        f"{spec!r} is not a local path and could not be downloaded from the Hugging Face Hub "
        f"({_first_line(e)[:200]}); check the id and your connection, or give a local checkpoint folder or .gguf file"
    )


def _is_gguf(path: Path) -> bool:
    """A .gguf file in any case (`Model.GGUF`), or any file starting with the GGUF magic bytes."""
    if path.suffix.lower() == ".gguf":
        return True
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def check_revision(revision: str | None, *specs, option: str = "--revision") -> None:
    """A Hub revision picks what to download; when every model it could apply to is a local path (read as it is),
    it would only be recorded as a provenance that was never read: refused."""
    local = [str(s) for s in specs if s is not None and expand(str(s), "model").exists()]
    if revision is not None and local and len(local) == len([s for s in specs if s is not None]):
        shadow = next((s for s in local if looks_like_hub_id(s)), None)  # any of them, not only the first
        fix = (  # a Hub id typed may be shadowed by a folder of that name here: "give the Hub id" could not be done
            f"drop {option}; or, if {shadow} is meant as the Hub repo of that name, the folder "
            f"{expand(shadow, 'model').resolve()} here is read first: run from another directory or rename it"
            if shadow
            else f"drop {option}, or give the Hub id"
        )
        raise ClakitError(
            f"{option} {revision} selects a Hub revision, but {local[0]} is a local path read as it is: {fix}"
        )


def resolve_source(
    spec: str, revision: str | None = None, allow_pickle: bool = False, check_config=None, config_only: bool = False
) -> Source:
    """The Source of `spec`; a local path never carries `revision` (it was not what was read). A Hub id is downloaded;
    `check_config(source)`, given, sees its config.json before the weights are fetched (and may refuse it);
    `config_only`: its config (and code files) alone, for a model only its shapes are read of (eval's
    --source-model: a 70B's 140 GB of weights were fetched for its config.json)."""
    if not str(spec).strip():  # Path("") is ".": an unset $MODEL would read whatever checkpoint the shell is in
        raise ClakitError(
            f"the model is an empty string ({spec!r}): give a checkpoint folder, a .gguf file or a Hub id"
        )
    if revision is not None and not str(revision).strip():  # "" read as no revision: the default branch
        raise ClakitError(
            f"the revision is an empty string ({revision!r}): give a branch, tag or commit of the Hub repo, or none"
        )
    path = expand(spec, "model")
    if path.is_file():
        check_readable([path])
    if path.is_file() and _is_gguf(path):
        return Source(spec, "gguf", path.resolve())
    if path.is_dir():
        if not os.access(path, os.R_OK | os.X_OK):  # else a PermissionError traceback from the look for config.json
            raise ClakitError(
                f"cannot read the model folder {path}: permission denied; make it readable (chmod a+rX) or run as a "
                "user who may read it"
            )
        if not (path / "config.json").is_file():
            error = _not_a_checkpoint(spec, path)
            if looks_like_hub_id(spec) and not any(path.iterdir()):  # an empty folder named like the Hub id, here
                error = ClakitError(
                    f"{spec} is an empty folder here ({path.resolve()}), not a model checkpoint; if the Hub repo "
                    f"{spec} is meant, this folder is read first: remove it or run from another directory"
                )
            raise error
        check_readable(p for p in path.iterdir() if p.suffix in READ_SUFFIXES or p.name == CHAT_TEMPLATES_DIR)
        return Source(spec, "dir", path.resolve())
    if path.exists():
        raise ClakitError(f"{spec} is neither a checkpoint folder nor a .gguf file; {_file_fix(path)}")
    if looks_like_hub_id(spec) and (not hub_offline() or _in_hub_cache(spec, revision)):
        if config_only:  # offline: huggingface_hub reads its cache
            return Source(spec, "dir", _config_snapshot(spec, revision), revision or "main")
        return _download(spec, revision, allow_pickle, check_config)
    if looks_like_hub_id(spec):  # a Hub id, offline and not in the cache: the Hub was not asked
        snapshot = _cached_snapshot(spec, revision)
        if snapshot is not None:  # cached without config.json: what it holds instead (a GGUF repo's .gguf file)
            raise _not_a_checkpoint(spec, snapshot)
        at = f" at revision {revision}" if revision else ""
        raise ClakitError(
            f"model {spec!r} does not exist locally nor in the Hub cache{at}, and the Hub is not asked (offline: "
            "HF_HUB_OFFLINE): download it where the Hub is reachable, or give a local checkpoint folder or .gguf file"
        )
    raise ClakitError(f"model {spec!r} does not exist: give a checkpoint folder, a .gguf file or a Hub id (org/name)")


# what a checkpoint folder's readers open (weights, index, config, tokenizer, code, chat templates)
READ_SUFFIXES = {".json", ".safetensors", ".bin", ".model", ".txt", ".py", ".jinja", ".tiktoken"}
# transformers' folder of named chat templates beyond the default (tool_use.jinja, rag.jinja, ...)
CHAT_TEMPLATES_DIR = "additional_chat_templates"


def check_readable(paths) -> None:
    """Every file of `paths` (a folder: its files) can be opened for reading, checked before any work: an unreadable
    shard read as "corrupt or truncated ... (No such file or directory)" (safetensors' words for EACCES), an
    unreadable tokenizer file as "cannot write OUT: Permission denied" once the whole conversion was done."""
    for path in paths:
        for file in sorted(path.iterdir()) if path.is_dir() else [path]:
            if not file.is_file():
                continue
            try:
                open(file, "rb").close()
                if file.suffix == ".json":  # nested past Python's recursion limit: a RecursionError traceback
                    json.loads(file.read_bytes())  # wherever it was read (config, index, tokenizer, records)
            except RecursionError:
                raise ClakitError(
                    f"{file} nests its JSON deeper than can be read ({sys.getrecursionlimit()} levels): it is "
                    "damaged or hostile; restore it"
                ) from None
            except ValueError:
                pass  # not JSON: the reader of that file says so in its own words
            except OSError as e:
                raise ClakitError(
                    f"cannot read {file}: {e.strerror or e}; make it readable for this user (chmod a+r {file}) or "
                    "run as one who can read it"
                ) from None


def hub_offline() -> bool:
    """huggingface_hub's offline rule, read from the environment now (not at its import): HF_HUB_OFFLINE, else
    TRANSFORMERS_OFFLINE, set to 1/ON/YES/TRUE in any case. "0" or "false" means online, as huggingface_hub reads it
    (any non-empty value was taken as offline, and an id missing from the cache refused as "does not exist")."""
    from huggingface_hub.constants import ENV_VARS_TRUE_VALUES

    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    return value is not None and value.upper() in ENV_VARS_TRUE_VALUES


def _file_fix(path: Path) -> str:
    """A file given for a model: one of a checkpoint folder's (config.json, a weights shard) names its folder."""
    if (path.parent / "config.json").is_file():
        return f"it is one of a checkpoint's files: give its folder ({path.parent.resolve()})"
    return "give a checkpoint folder (config.json and weights), a .gguf file or a Hub id (org/name)"


def _not_a_checkpoint(spec: str, path: Path) -> ClakitError:
    """A folder without config.json, named with what it holds instead and what to give: a .gguf file inside it, a
    PEFT adapter, or a Hub cache entry (models--org--name, whose snapshots hold the files)."""
    if (path / "params.json").is_file():  # Meta's or Mistral's own release format: params.json + consolidated.*
        return _native_release(spec, path)
    from clakit.outputs import run_model_hint  # an uptrain run or its checkpoint: named with RUN/model, as eval does

    hint = run_model_hint(path, spec)
    if hint:
        return ClakitError(hint)
    ggufs = sorted(p.name for p in path.iterdir() if p.is_file() and p.suffix.lower() == ".gguf")
    snapshots = _cache_snapshots(path)
    if ggufs:
        fix = f"it holds {ggufs[0]}: give that file's path ({path / ggufs[0]})"
    elif (path / "adapter_config.json").is_file():
        base = _raw_config_file(path / "adapter_config.json").get("base_model_name_or_path")
        fix = f"it is a PEFT adapter (adapter_config.json): merge it into its base model ({base}) and give that"
    elif snapshots:
        fix = f"it is a Hub cache entry: give a snapshot folder ({snapshots[0]}) or the Hub id"
    else:
        fix = "give the folder that holds the checkpoint's config.json and weights"
    return ClakitError(f"{spec} is not a model checkpoint folder (no config.json); {fix}")


def _cache_snapshots(entry: Path) -> list[Path]:
    """A Hub cache entry's (models--org--name) snapshot folders that hold a config.json, the one refs/main names
    first (what the Hub id reads), then the newest: the hint named whichever commit hash sorted last."""
    found = [p.parent for p in (entry / "snapshots").glob("*/config.json")] if (entry / "snapshots").is_dir() else []
    try:
        main = (entry / "refs" / "main").read_text().strip()
    except (OSError, UnicodeDecodeError):
        main = None
    return sorted(found, key=lambda p: (p.name != main, -p.stat().st_mtime, p.name))


def _native_release(spec: str, path: Path) -> ClakitError:
    """params.json + consolidated.*: Meta's original Llama release (its params.json has `multiple_of`) or Mistral's,
    each with its own transformers converter (the Mistral one was named for both)."""
    meta = "multiple_of" in _raw_config_file(path / "params.json")
    who, script = (
        ("Meta's original Llama", "llama/convert_llama_weights_to_hf.py")
        if meta
        else ("Mistral's native", "mistral/convert_mistral_weights_to_hf.py")
    )
    return ClakitError(
        f"{spec} is in {who} format (params.json, no config.json), which transformers does not load: download the "
        f"repo's HF-format files, or convert it with transformers' models/{script}"
    )


def _in_hub_cache(spec: str, revision: str | None) -> bool:
    """Whether the local Hub cache holds this repo's config.json at `revision` (HF_HUB_OFFLINE clusters download
    ahead and read the cache; no network is touched)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(spec, "config.json", revision=revision), str)
    except Exception:  # a malformed id or cache: treated as not cached
        return False


def _cached_snapshot(spec: str, revision: str | None) -> Path | None:
    """The folder of this repo's snapshot at `revision` in the local Hub cache, whatever it holds; None when there is
    none (no network is touched)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(spec, revision=revision, local_files_only=True))
    except Exception:  # not cached, or a malformed id or cache
        return None


def read_config_json(folder: Path) -> dict:
    """A checkpoint folder's config.json as a dict, refused in one line when it is not a JSON object with the keys a
    causal LM needs (transformers fails on a list with an AttributeError, and fills missing keys with defaults that
    do not match the weights)."""
    path = folder / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ClakitError(f"cannot read {path} ({str(e)[:200]}); restore the checkpoint's config.json") from None
    if not isinstance(raw, dict):
        raise ClakitError(f"{path} must be a JSON object of settings, got a {type(raw).__name__}; restore it")
    if not isinstance(raw.get("model_type"), str) and not raw.get("auto_map"):
        raise ClakitError(f"{path} has no model_type (e.g. 'llama'); restore the checkpoint's config.json")
    _check_typed_fields(raw, path)
    if raw.get("model_type") not in CONFIG_KEYS_OF:
        return raw
    missing = [k for k in CONFIG_KEYS if k not in raw]
    if missing:
        raise ClakitError(f"{path} lacks {', '.join(missing)}; restore the checkpoint's config.json")
    for key in (*CONFIG_KEYS, "num_key_value_heads", "intermediate_size", "head_dim", "max_position_embeddings"):
        value = raw.get(key)
        if key in raw and value is not None and not (type(value) is int and value > 0):
            raise ClakitError(
                f"{path}: {key} must be a positive integer, got {value!r}; restore the checkpoint's config"
            )
    return raw


def _check_typed_fields(raw: dict, path: Path) -> None:
    """`architectures` (a list of class names) and `dtype`/`torch_dtype` (a floating dtype's name or null), which
    every command reads: `"dtype": 5` was an AttributeError traceback in eval, "float17" was "download it again",
    and `"architectures": "LlamaForCausalLM"` (a string) read as "a L model"."""
    import torch

    arch = raw.get("architectures")
    if arch is not None and not (isinstance(arch, list) and all(isinstance(a, str) and a for a in arch)):
        raise ClakitError(
            f"{path}: architectures must be a list of class names such as [\"LlamaForCausalLM\"], got "
            f"{json.dumps(arch)[:60]}; restore the checkpoint's config.json"
        )
    for key in ("dtype", "torch_dtype"):  # a torch floating dtype's name ("auto" is an argument, not a setting)
        value = raw.get(key)
        named = getattr(torch, value, None) if isinstance(value, str) and value.isidentifier() else None
        if value is not None and not (isinstance(named, torch.dtype) and named.is_floating_point):
            raise ClakitError(
                f"{path}: {key} must name a floating dtype such as bfloat16 or float16 (or be null), got "
                f"{json.dumps(value)[:40]}; restore the checkpoint's config.json"
            )


def context_window(config) -> int | None:
    """The model's context window in tokens: its config's max_position_embeddings, the one rule convert, eval and
    uptrain check sequence lengths against; None when its config has no such setting (another architecture's).

    A config.json without the key is read with transformers' class default (2048 for Llama, 131072 for Mistral), and
    that is the window the model then runs with: its rope scaling reads it, and save_pretrained writes it into every
    converted or uptrained checkpoint's config.json, so eval of the result holds it to that number. Mistral's
    sliding_window is not it: it limits how far back each token attends, not which positions the model knows."""
    window = getattr(config, "max_position_embeddings", None)
    return window if type(window) is int and window > 0 else None


def default_seq_len(config, default: int) -> int:
    """A command's default window (`default` tokens), shrunk to the model's context window when that is shorter."""
    return min(default, context_window(config) or default)


def check_seq_len(seq_len: int, config, flag: str, model: str | None = None) -> None:
    """Windows longer than the positions the model was trained on are refused in one line (`flag` names the setting,
    `model` the checkpoint): rotary positions past the window are ones it never saw, so they would measure or train
    extrapolation silently."""
    window = context_window(config)
    if window is not None and seq_len > window:
        where = f"the context window of {model}" if model else "the model's context window"
        raise ClakitError(f"{flag} {seq_len} exceeds {where} (max_position_embeddings {window}); use at most {window}")


FAMILIES = ("llama", "mistral")  # model types (less "_cla") whose configs load_config checks for a runnable model


def _auto_config(source: Source, trust_remote_code: bool = False):
    """transformers' config of a source; a GGUF's through a cache of its file version: transformers parses the whole
    GGUF header for it (5-8 s for SmolLM2-135M on the loaded 2-core machine), and one command reads it up to three
    times (load_config, check_config_fits_weights, the load). A copy each call: callers set fields on it."""
    from transformers import AutoConfig

    if source.kind != "gguf":
        return AutoConfig.from_pretrained(source.load_dir, trust_remote_code=trust_remote_code)
    return copy.deepcopy(_gguf_config(str(source.path.resolve()), file_version(source.path)))


@functools.lru_cache(maxsize=2)
def _gguf_config(path: str, version: tuple):
    from transformers import AutoConfig

    import clakit.modeling  # noqa: F401

    path = Path(path)
    return AutoConfig.from_pretrained(path.parent, gguf_file=path.name)


def load_config(source: Source, trust_remote_code: bool = False):
    import clakit.modeling  # noqa: F401  (registers llama_cla / mistral_cla)

    if source.kind == "dir":
        read_config_json(source.path)
    if source.kind == "gguf":
        check_gguf_whole(source)  # before transformers reads it: a split file's later parts have no architecture
    check_remote_code(source, trust_remote_code)
    try:
        config = _auto_config(source, trust_remote_code)
    except Exception as e:  # a config transformers refuses: validation, TypeError, ZeroDivisionError, AttributeError
        raise _read_error(source, "read the config of", e, _config_fix(source, e)) from None
    _check_rope_type(source, config)
    if config.model_type.removesuffix("_cla") in FAMILIES:  # the families clakit converts; others: transformers' own
        for check in (_check_kv_heads, _check_pad_id, _check_values):
            check(source, config)
    if source.kind == "gguf":
        check_gguf_unread(source)
    return config


def _check_kv_heads(source: Source, config) -> None:
    """Query heads that KV heads do not divide (6 over 4) pass transformers' config validation and build a model,
    whose every forward then fails (repeat_kv gives 4 x (6 // 4) heads for 6 queries): convert wrote a checkpoint of
    it and eval ended in a traceback. Refused here in one line."""
    heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", None)
    if kv_heads and heads % kv_heads:
        raise ClakitError(
            f"{source.spec}: its config's num_attention_heads {heads} is not a multiple of num_key_value_heads "
            f"{kv_heads} (each KV head serves an equal group of query heads), so the model cannot run; "
            f"{restore_config(source)}"
        )


def _check_values(source: Source, config) -> None:
    """An activation transformers lacks ("swiglu") passes its config validation and fails building the MLP with a
    KeyError: convert ended in a traceback and eval blamed the download. A rope_theta or rms_norm_eps below zero
    builds a model of NaN logits, which convert wrote (its held-out perplexity "nan -> nan", exit 0). Each refused
    in one line."""
    from transformers.activations import ACT2FN

    fix = restore_config(source)
    act = getattr(config, "hidden_act", None)
    if act not in ACT2FN:
        raise ClakitError(f"{source.spec}: its config's hidden_act {act!r} is no activation transformers has; {fix}")
    rope = getattr(config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta") if isinstance(rope, dict) else None
    eps = getattr(config, "rms_norm_eps", None)
    for key, value, least in (("rope_theta", theta, "above 0"), ("rms_norm_eps", eps, "0 or more")):
        if isinstance(value, int | float) and (value < 0 or (value == 0 and key == "rope_theta")):
            raise ClakitError(f"{source.spec}: its config's {key} {value} (not {least}) makes NaN outputs; {fix}")
        # Infinity / NaN (JSON's non-standard literals, which Python reads): no rotation at all, or NaN norms
        if isinstance(value, float) and not math.isfinite(value):
            raise ClakitError(f"{source.spec}: its config's {key} is {value}, not a finite number; {fix}")
    factor = rope.get("factor") if isinstance(rope, dict) else None
    if isinstance(factor, int | float) and not (math.isfinite(factor) and factor > 0):
        raise ClakitError(f"{source.spec}: its config's RoPE scaling factor is {factor}, not a positive number; {fix}")


def _check_pad_id(source: Source, config) -> None:
    """A pad_token_id outside the embeddings (32000 with vocab_size 32000: a pad token added to a tokenizer whose
    model was never resized) is the embedding's padding_idx, which torch asserts on when the model is built: convert
    and eval ended in an AssertionError's traceback. Refused in one line."""
    pad, vocab = getattr(config, "pad_token_id", None), config.vocab_size
    if type(pad) is int and not -vocab <= pad < vocab:
        raise ClakitError(
            f"{source.spec}: its config's pad_token_id {pad} is not a token of its {vocab}-token vocabulary "
            "(vocab_size), so transformers cannot build the model; "
            + (GGUF_METADATA_FIX if source.kind == "gguf" else f"set pad_token_id to null (or an id below {vocab}) "
               "in its config.json")
        )


# a GGUF's settings are its metadata, not a config.json the user could restore
GGUF_METADATA_FIX = "the GGUF file's metadata does not describe its tensors: download it again, or export it again"


def restore_config(source: Source) -> str:
    """The fix for settings that do not describe the weights: a folder's config.json, a GGUF file's metadata."""
    return GGUF_METADATA_FIX if source.kind == "gguf" else "restore the checkpoint's config.json"


def check_gguf_whole(source: Source) -> None:
    """A GGUF transformers cannot read whole, refused from its header before any work: one part of a split file
    (llama.cpp's `gguf-split`, as the Hub holds large models: transformers reads the one file it is given, and the
    tensors of the other parts were named as missing from "metadata that does not describe its tensors: download it
    again"), or an architecture transformers' GGUF reader names but cannot map to tensors (`mistral`, or a llama
    file whose general.name is "mistral": refused only after the sha256 pass, at the weights' load)."""
    problem = _header_problem(source, _gguf_whole)
    if problem:
        raise ClakitError(f"{source.spec} {problem}")


def _header_problem(source: Source, find) -> str | None:
    """`find(path, version)` on a GGUF's header (cached per file version), or None where the header cannot be read:
    a damaged file's read by transformers fails next, and _read_error names the damage."""
    try:
        return find(str(source.path), file_version(source.path))
    except Exception:
        return None


@functools.lru_cache(maxsize=2)
def _gguf_reader(path: str, version: tuple):
    """The gguf package's reader of one version of a file (it parses the whole header: ~2 s for SmolLM2-135M, more
    at size), shared by the checks that read its metadata; it maps the file, reading no tensor data."""
    from gguf import GGUFReader

    return GGUFReader(path)


@functools.lru_cache(maxsize=8)
def _gguf_facts(path: str, version: tuple) -> tuple[tuple[str, ...], int, bool]:
    """(tensor names, total elements, whether it holds tokenizer metadata): the little the later checks need, kept
    instead of the reader (its parsed vocabulary: ~150 MB for SmolLM2-135M, held for the whole run)."""
    reader = _gguf_reader(path, version)
    tensors = reader.tensors
    facts = (
        tuple(t.name for t in tensors),
        sum(int(t.n_elements) for t in tensors),
        reader.get_field("tokenizer.ggml.model") is not None,
    )
    return facts


@functools.lru_cache(maxsize=8)
def _gguf_whole(path: str, version: tuple) -> str | None:
    reader = _gguf_reader(path, version)

    def field(key):
        found = reader.get_field(key)
        return None if found is None else found.contents()

    count = field("split.count")
    if count is not None and int(count) > 1:
        part = int(field("split.no") or 0) + 1
        return (
            f"is part {part} of a GGUF split into {count} files, and transformers reads only the file it is given: "
            f"merge the parts first (llama.cpp: llama-gguf-split --merge FIRST-PART.gguf merged.gguf) and give the "
            "merged file"
        )
    arch, name = field("general.architecture"), field("general.name")
    if arch == "mistral" or (arch == "llama" and name == "mistral"):
        what = "general.architecture mistral" if arch == "mistral" else "general.name mistral under llama"
        return (
            f"declares {what}, which transformers' GGUF reader cannot map to its tensors; "
            "give the model's transformers checkpoint"
        )
    return None


def check_gguf_tokenizer(source: Source) -> None:
    """A GGUF without tokenizer metadata (exported without its vocabulary) was refused by transformers' words,
    "Cannot build a tokenizer from a GGUF file stating tokenizer None", with "download it again" as the fix."""
    try:
        found = _gguf_facts(str(source.path), file_version(source.path))[2]
    except Exception:  # a damaged file: the tokenizer's load fails next, and _read_error names the damage
        return
    if not found:
        raise ClakitError(
            f"{source.spec} holds no tokenizer (no tokenizer.ggml.model metadata), and text is tokenized with the "
            "model's own tokenizer: give a GGUF exported with its vocabulary, or the model's transformers checkpoint"
        )


def _first_sentence(e: BaseException) -> str:
    """An exception's first line, up to its first sentence's end, at most 200 characters (library errors run on)."""
    line = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return line.split(". ")[0].rstrip(".")[:200]


def check_gguf_unread(source: Source) -> None:
    """What transformers' GGUF reader silently drops from a llama GGUF, refused in one line: RoPE scaling
    (`llama.rope.scaling.type` linear/yarn, or the `rope_freqs.weight` factors llama.cpp writes for Llama 3.1+'s
    llama3 scaling: the model would run with plain RoPE, another model than the one released, and a conversion writes
    that into its config), or experts (a Mixtral GGUF: `llama.expert_count`, read as a dense Llama without MLPs)."""
    problem = _header_problem(source, _gguf_unread)
    if problem:
        raise ClakitError(f"{source.spec} {problem}; give the model's transformers checkpoint")


@functools.lru_cache(maxsize=8)
def _gguf_unread(path: str, version: tuple) -> str | None:
    """What of a llama GGUF transformers' reader ignores, or None; read once per file version (the reader parses
    the whole header)."""
    reader = _gguf_reader(path, version)
    arch = reader.get_field("general.architecture")
    if arch is None or arch.contents() not in ("llama", "mistral"):  # others' metadata is transformers' own matter
        return None
    arch = arch.contents()
    dropped = _blocks_beyond_count(reader, arch)
    if dropped:
        return dropped
    experts, kind = reader.get_field(f"{arch}.expert_count"), reader.get_field(f"{arch}.rope.scaling.type")
    if experts is not None and experts.contents() > 0:
        return (
            f"is a mixture of experts ({arch}.expert_count {experts.contents()}, Mixtral's layout), which "
            "transformers' GGUF reader reads as a dense Llama without its MLPs; clakit converts Llama and Mistral"
        )
    if kind is not None and kind.contents() not in ("", "none"):
        scaling = f"{arch}.rope.scaling.type {kind.contents()}"
    elif any(tensor.name == "rope_freqs.weight" for tensor in reader.tensors):
        scaling = "rope_freqs.weight, Llama 3.1+'s frequency factors"
    else:
        return None
    return (
        f"uses RoPE scaling ({scaling}) that transformers' GGUF reader ignores: read from this file the model would "
        "run with plain RoPE, not the released model"
    )


def _blocks_beyond_count(reader, arch: str) -> str | None:
    """Tensors of blocks past `{arch}.block_count`: transformers' reader builds that many layers and drops the later
    blocks' tensors without a word (a 4-block file saying 2 converted and evaluated as a 2-layer model, exit 0)."""
    count = reader.get_field(f"{arch}.block_count")
    blocks = {int(m[1]) for t in reader.tensors if (m := re.match(r"blk\.(\d+)\.", t.name))}
    if count is None or not blocks or max(blocks) + 1 == int(count.contents()):
        return None
    if max(blocks) + 1 < int(count.contents()) <= 2 * (max(blocks) + 1):
        return None  # a block or two missing: the load names the missing tensors
    if max(blocks) + 1 > int(count.contents()):
        return (
            f"holds tensors of blocks blk.0-blk.{max(blocks)} but its {arch}.block_count is {count.contents()}: "
            f"transformers' GGUF reader would build {count.contents()} layers and drop the later blocks without a word"
        )
    # fewer blocks than the count: the model would be built (and its missing layers allocated) at the count's size
    # before anything compared it with the tensors (block_count 10**6 over 4 blocks: GBs and minutes, then a refusal)
    return (
        f"holds tensors of blocks blk.0-blk.{max(blocks)} only but its {arch}.block_count is {count.contents()}: "
        "its metadata does not describe its tensors"
    )


def _config_fix(source: Source, e: Exception) -> str:
    """What to do about a config transformers refuses. A folder's: a value of the wrong type (huggingface_hub's
    strict validation) or one its checks refuse (a kv_source_layers of 3 entries for 4 layers) is config.json's own
    fault, not a download's (a config.json that is not JSON was refused by read_config_json before). A GGUF file's:
    an architecture transformers' GGUF reader lacks, or a damaged file (_read_error says which)."""
    from huggingface_hub.errors import StrictDataclassError

    if source.kind == "gguf":
        return _gguf_fix(e)
    return FIX_CONFIG if isinstance(e, StrictDataclassError | ValueError | TypeError) else DOWNLOAD_AGAIN


def _gguf_fix(e: Exception) -> str:
    """transformers' GGUF reader raises ValueError("GGUF model with architecture gemma is not supported yet."), and
    NotImplementedError("Unknown gguf model_type: mistral in gguf-py...") for a llama GGUF whose general.name is
    "mistral": it reads that as a Mistral, whose tensors it cannot map. Neither is a damaged download."""
    unsupported = isinstance(e, ValueError) and "not supported" in str(e)
    unmapped = isinstance(e, NotImplementedError) and "Unknown gguf model_type" in str(e)
    return GGUF_UNSUPPORTED if unsupported or unmapped else DOWNLOAD_AGAIN


def check_remote_code(source: Source, trust_remote_code: bool) -> None:
    """A config.json whose model_type transformers does not know, with an auto_map naming code shipped beside it, is
    read only by running that code: transformers refuses it ("contains custom code which must be executed") without
    naming clakit's flag, and _read_error's advice (download it again) was wrong. Refused here naming the flag."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    import clakit.modeling  # noqa: F401  (llama_cla / mistral_cla are known types: their auto_map is not needed)

    if trust_remote_code or source.kind != "dir":
        return
    raw = _raw_config(source.path)
    auto_map = raw.get("auto_map")
    if not isinstance(auto_map, dict) or "AutoConfig" not in auto_map:
        return
    model_type = raw.get("model_type")
    if isinstance(model_type, str) and model_type in CONFIG_MAPPING:  # transformers' own class: no code is run
        return
    raise ClakitError(
        f"{source.spec} is a model transformers does not know (model_type {model_type!r}) whose config.json loads "
        f"code shipped with it (auto_map AutoConfig: {auto_map['AutoConfig']}), which runs when loaded; pass "
        "--trust-remote-code if you trust the source"
    )


def _check_rope_type(source: Source, config) -> None:
    """A rope_type this transformers does not implement (a newer one, or a typo) passes its config validation with a
    warning, then fails with a KeyError when the model is built: refused here in one line."""
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = getattr(config, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", "default") if isinstance(rope, dict) else "default"
    if rope_type != "default" and rope_type not in ROPE_INIT_FUNCTIONS:
        known = ", ".join(["default", *ROPE_INIT_FUNCTIONS])
        raise ClakitError(
            f"{source.spec}: its config's rope_type {rope_type!r} is not one this transformers "
            f"({transformers.__version__}) implements ({known}); upgrade transformers or fix its config.json"
        )


NAMED_WEIGHTS = "transformers_weights"  # config.json's key naming the weights file transformers loads before any other


def _raw_config(folder: Path) -> dict:
    """config.json as a dict, {} when it is missing or not a JSON object (read_config_json says why elsewhere)."""
    return _raw_config_file(folder / "config.json")


def _raw_config_file(path: Path) -> dict:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return raw if isinstance(raw, dict) else {}


def named_weights(folder: Path) -> str | None:
    """The weights file a checkpoint's config.json names (`transformers_weights`: transformers loads it first,
    whatever model.safetensors holds), refused in one line unless it is a relative path inside the folder; None
    when there is no such key (or no readable config: read_config_json says why elsewhere)."""
    name = _raw_config(folder).get(NAMED_WEIGHTS)
    if name is None:
        return None
    inside = isinstance(name, str) and name and not Path(name).is_absolute() and ".." not in Path(name).parts
    if not inside:
        raise ClakitError(
            f"{folder}/config.json names its weights file {NAMED_WEIGHTS}={name!r}, which is not a file inside the "
            f"checkpoint folder; correct the key, or remove it to load {SAFE_SINGLE}"
        )
    return name


def read_index(path: Path) -> dict[str, str]:
    """A checkpoint index's weight_map {tensor: shard file}, refused in one line when unreadable, malformed (the
    shard names must be strings: numbers or nulls failed later as tracebacks) or naming a shard outside the folder
    (an absolute path or `..`: transformers refuses those, so clakit would otherwise read, and convert, files a
    loader of the same folder never opens). Names are checked, not resolved: Hub-cache shards are symlinks."""
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ClakitError(f"cannot read the checkpoint index {path} ({e}); re-download the checkpoint") from None
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(f, str) for f in weight_map.values()):
        raise ClakitError(f"checkpoint index {path} has an empty or malformed weight_map; re-download the checkpoint")
    outside = sorted({f for f in weight_map.values() if not f or Path(f).anchor or ".." in Path(f).parts})
    if outside:
        raise ClakitError(
            f"checkpoint index {path} names shard {outside[0]!r}, outside the checkpoint folder (transformers refuses "
            "it too); keep the shards in the folder and name them relative to it"
        )
    # a safetensors index naming itself, config.json or a name with a newline read as "corrupt or truncated
    # (header too large)" or printed a two-line message: every shard of one is a .safetensors file
    wrong = sorted({f for f in weight_map.values() if not _plain_shard_name(f, path.name)})
    if wrong:
        raise ClakitError(
            f"checkpoint index {path} names shard {wrong[0]!r}, which is not a weights file of this index's kind "
            f"(.safetensors, no control characters); restore the index written with the shards, or re-download"
        )
    return weight_map


def _plain_shard_name(name: str, index_name: str) -> bool:
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return False
    return not index_name.endswith(".safetensors.index.json") or name.endswith(".safetensors")


PICKLE_NAMED = "adapter_model.bin"  # the one pickle name transformers accepts as `transformers_weights`


def is_safetensors_name(name: str) -> bool:
    return name.endswith((".safetensors", ".safetensors.index.json"))


def files_fingerprint(folder: Path, files: list[str]) -> dict:
    """What names a folder checkpoint's content without reading its weights again: config.json's and the tokenizer
    files' sha256, and per weight file its size and the sha256 of its safetensors header (names, dtypes, shapes and
    offsets of every tensor; a pickle file: its size alone). A local folder was recorded by its path only, so
    nothing said which weights were read once they changed (convert's source.files, eval's model_files)."""
    from clakit.provenance import file_sha256

    out = {"config.json": {"sha256": file_sha256(folder / "config.json")}}
    for name in files:
        path, entry = folder / name, {}
        entry["bytes"] = path.stat().st_size
        published = hub_blob_sha256(path)
        if published is not None:  # a Hub-cache file: checked whole (once per command), so named whole
            check_hub_blob(str(folder), path)
            entry["sha256"] = published
        if is_safetensors_name(name):
            with open(path, "rb") as f:  # u64 header length, then the JSON header (checked whole when opened)
                entry["header_sha256"] = hashlib.sha256(f.read(int.from_bytes(f.read(8), "little"))).hexdigest()
        out[name] = entry
    # the tokenizer by content too (the conversion copies it; eval tokenizes with it): a tokenizer.json edited since
    # gives other ids under the same record
    out.update({n: {"sha256": file_sha256(folder / n)} for n in TOKENIZER_READS if (folder / n).is_file()})
    return out


def check_named_kind(where: str, name: str, allow_pickle: bool) -> None:
    """A weights name transformers accepts (safetensors, an index, or adapter_model.bin), pickle only when allowed;
    `where` names the config.json (a folder's, or a Hub repo's before its weights are fetched)."""
    if not is_safetensors_name(name) and name != PICKLE_NAMED:
        raise ClakitError(
            f"{where} names its weights file {NAMED_WEIGHTS}={name!r}, neither *.safetensors nor "
            f"*.safetensors.index.json, which transformers refuses to load; correct the key, or remove it to load "
            f"{SAFE_SINGLE}"
        )
    if not is_safetensors_name(name) and not allow_pickle:
        raise ClakitError(
            f"{where} names pickle weights ({NAMED_WEIGHTS}={name!r}), which transformers would load and which can "
            "run code when loaded; pass --allow-pickle if you trust the source, or re-save it as safetensors"
        )


def check_named_weights(path: Path, name: str, allow_pickle: bool) -> None:
    """The file a folder's config.json names is what transformers loads: an accepted kind, and present."""
    check_named_kind(f"{path}/config.json", name, allow_pickle)
    if not (path / name).is_file():
        raise ClakitError(
            f"{path}/config.json names its weights file {NAMED_WEIGHTS}={name!r}, which is missing; restore it, or "
            f"remove the key to load {SAFE_SINGLE}"
        )


WEIGHTS_ONLY_FIX = (
    "clakit unpickles tensors only, even with --allow-pickle (torch.load(weights_only=True)): re-save the weights as "
    "safetensors if you trust their source"
)


def pickle_refusal(what: str, e: Exception) -> ClakitError:
    """One line for pickle weights torch's weights-only unpickler refuses (an object other than tensors; torch's
    message starts by advising weights_only=False, which would run the file's code): its reason, and the fix."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    reason = next((line for line in lines if line.startswith("WeightsUnpickler error:")), lines[-1] if lines else "")
    reason = reason.removeprefix("WeightsUnpickler error:").strip().split(". ")[0]
    return ClakitError(f"cannot load {what} (torch's weights-only unpickler: {reason[:200]}); {WEIGHTS_ONLY_FIX}")


# a tensor in two of the shards an index lists: the converter would take the index's copy, transformers the later one
DUPLICATE_FIX = "transformers loads the later file's copy, whatever the index names: re-download the checkpoint"


def check_unique_tensors(keys: dict[str, set[str]], where, fix: str) -> None:
    """No tensor name is in two of the safetensors files read (`keys`: file -> its tensor names; the shards an index
    lists, or model.safetensors alone). The converter would take the copy the index names and transformers the last
    listed shard's: each silently, and not the same one."""
    seen: dict[str, str] = {}
    for file in sorted(keys):
        for name in sorted(keys[file] & seen.keys()):
            raise ClakitError(f"{where} holds {name} in both {seen[name]} and {file}; {fix}")
        seen.update(dict.fromkeys(keys[file], file))


def check_index(path: Path) -> None:
    """The index transformers will read, when there is one, checked before it reads it (`read_index`): a malformed
    one failed inside transformers as an AttributeError or TypeError traceback."""
    if not path.is_file():
        return
    weight_map = read_index(path)
    # the same tensor in two listed shards: convert refuses it, and the loaders must too, or eval scores (and uptrain
    # distils from) whichever copy transformers happens to keep
    if path.name.endswith(".safetensors.index.json"):
        from safetensors import SafetensorError, safe_open

        keys = {}
        for file in sorted(set(weight_map.values())):
            try:
                with safe_open(str(path.parent / file), framework="pt") as f:  # header only
                    keys[file] = set(f.keys())
            except (SafetensorError, OSError):
                continue  # a missing or damaged shard: the load names it
        check_unique_tensors(keys, path.parent, DUPLICATE_FIX)


def loadable_weights(folder: Path) -> str | None:
    """The weights file transformers' from_pretrained reads from `folder`, in its order: the file config.json names
    (`transformers_weights`), model.safetensors (even beside an index, which it then ignores), its index,
    pytorch_model.bin, its index; None when there is none of them. Other names are never loaded (a Mistral repo's
    consolidated.safetensors). The one rule for the loading checks (`check_weights`) and convert's reader."""
    named = named_weights(folder)
    if named is not None:
        return named
    return next((name for name in LOAD_ORDER if (folder / name).is_file()), None)


def unloadable(folder: Path) -> ClakitError:
    """A folder with no file `loadable_weights` finds, refused in one line: safetensors files under other names
    would convert, but transformers loads none of them; a Mistral repo's consolidated.safetensors needs converting."""
    for name in LOAD_ORDER:  # there, but not a file: a dangling link (a Hub-cache blob gone) or a folder
        if os.path.lexists(folder / name):
            what = "a link to a missing file" if (folder / name).is_symlink() else "not a file"
            return ClakitError(f"{folder / name} is {what}, so transformers loads no weights; {DOWNLOAD_AGAIN}")
    files = sorted(p.name for p in folder.glob("*.safetensors") if p.is_file())
    others = [f for f in files if not f.startswith("consolidated")]
    if others:
        return ClakitError(
            f"{folder} has {', '.join(others[:3])}{', ...' if len(others) > 3 else ''} but no {SAFE_SINGLE} or "
            f"{SAFE_INDEX}, so transformers loads none of it: write a {SAFE_INDEX} mapping each tensor to its file, "
            f"or name a single file {SAFE_SINGLE} (shards model-0000X-of-0000N.safetensors, with an index)"
        )
    if files:
        return ClakitError(
            f"{folder}'s only weights are {files[0]}, Mistral's native format (names like layers.0.attention.wq"
            ".weight), which transformers does not load: download the repo's HF-format model*.safetensors files "
            "too, or convert it with transformers' models/mistral/convert_mistral_weights_to_hf.py"
        )
    downloaded = folder.parent.name == "snapshots"  # a Hub download: pickle files are fetched only when allowed
    hint = f"; a Hub repo's {PICKLE_SINGLE} is fetched only with --allow-pickle (model.allow_pickle)"
    hint = hint if downloaded else ""
    return ClakitError(f"{folder} holds no model weights (no {SAFE_SINGLE}, {SAFE_INDEX} or {PICKLE_SINGLE}){hint}")


def check_weights(source: Source, allow_pickle: bool = False) -> None:
    """Safetensors by default: a folder whose loadable weights (`loadable_weights`) are pickle is refused unless
    `allow_pickle`; the index transformers will read is checked (`check_index`)."""
    if source.kind != "dir":
        return
    path, named = source.path, named_weights(source.path)
    if named is not None:
        check_named_weights(path, named, allow_pickle)
    name = loadable_weights(path)
    if name is None:
        raise unloadable(path)
    if not is_safetensors_name(name) and not allow_pickle:
        raise ClakitError(
            f"{source.spec}'s loadable weights are pickle ({name}; no {SAFE_SINGLE} or {SAFE_INDEX}), which can run "
            "code when loaded; pass --allow-pickle if you trust the source, or re-save it as safetensors"
        )
    if name.endswith(".index.json"):
        check_index(path / name)


def load_model(
    source: Source,
    dtype=None,
    trust_remote_code: bool = False,
    device: str | None = None,
    allow_pickle: bool = False,
    device_map: str | None = None,
):
    """The whole model in memory (GGUF is dequantised); dtype None keeps the checkpoint's dtype (GGUF: fp32).

    `device_map` (instead of `device`): transformers' placement, e.g. "auto" spreads the layers over every visible
    GPU (then CPU memory) as it reads them, for a model no single device holds (a 70B in bf16 is 140 GB).
    Weights that do not match the config (missing, unexpected K/V, other shapes) are refused, never initialised at
    random; pickle weights need `allow_pickle`."""
    from clakit.modeling.modeling_cla import loading_problem

    _check_before_load(source, trust_remote_code, allow_pickle)
    model, info = _from_pretrained(source, dtype, trust_remote_code, _load_kwargs(source, device_map))
    settings = ("GGUF metadata", GGUF_METADATA_FIX) if source.kind == "gguf" else ("config.json", None)
    problem = loading_problem(info, settings[1], settings[0], model.config.num_hidden_layers)
    if problem:
        raise ClakitError(f"cannot load {source.spec}: {problem}")
    _check_float16_range(source, model, dtype)
    drop_unused_window(model.config)
    if device:
        model.to(device)
    return model.eval()


def _check_before_load(source: Source, trust_remote_code: bool, allow_pickle: bool) -> None:
    """Everything refusable from the files' headers, before transformers allocates the model."""
    check_weights(source, allow_pickle)
    if source.kind == "gguf":
        check_gguf_whole(source)
        check_gguf_unread(source)
    check_remote_code(source, trust_remote_code)
    check_config_fits_weights(source, trust_remote_code)
    if source.kind == "gguf":
        with contextlib.suppress(Exception):
            _gguf_facts(str(source.path), file_version(source.path))  # for load_tokenizer's check
        _gguf_reader.cache_clear()  # the parsed header is not held beside the dequantised model


def _load_kwargs(source: Source, device_map: str | None) -> dict:
    """from_pretrained's keywords for this source: the GGUF file and its config read once, the device map."""
    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    if source.kind == "gguf":  # the config read before: transformers parsed the whole header for it again (~20 s
        with contextlib.suppress(Exception):  # of a 60 s load of the demo GGUF, loaded machine; same weights).
            kwargs["config"] = _auto_config(source)  # One it cannot read: from_pretrained's error is named below
    if device_map is not None:
        kwargs["device_map"] = device_map
    return kwargs


def _from_pretrained(source: Source, dtype, trust_remote_code: bool, kwargs: dict):
    """(model, loading info) from transformers, each way a load fails turned into one line naming the fix."""
    import torch
    from huggingface_hub.errors import StrictDataclassError
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    from clakit.modeling.modeling_cla import WeightsMismatch

    try:
        with _no_load_report():
            return AutoModelForCausalLM.from_pretrained(
                source.load_dir,
                dtype=dtype or ("auto" if not source.gguf_file else torch.float32),
                trust_remote_code=trust_remote_code,
                output_loading_info=True,
                ignore_mismatched_sizes=True,  # reported by load_model's loading_problem, in one line
                # transformers >= 5 kernelizes on load and again on model.train(): on a GPU that fetches compiled
                # kernels (liger's RMSNorm) from the Hub: code we did not ask for, numbers the CPU does not give, and
                # on an offline GPU machine `clakit uptrain` died ("not available in the local cache", H200)
                use_kernels=False,
                **kwargs,
            )
    except WeightsMismatch as e:  # a CLA model's own check (clakit/modeling)
        raise ClakitError(f"cannot load {source.spec}: {e}") from None
    except pickle.UnpicklingError as e:  # --allow-pickle weights holding more than tensors (or not a pickle at all)
        raise pickle_refusal(f"{source.spec}'s pickle weights", e) from None
    except StrictDataclassError as e:  # a config.json value of the wrong type (load_config says the same)
        raise _read_error(source, "load as a causal LM", e, FIX_CONFIG) from None
    except ImportError as e:  # config.json asks for a package clakit does not install (bitsandbytes, flash-attn)
        raise ClakitError(
            f"cannot load {source.spec}: {_first_sentence(e)}; "
            + ("its own modeling code (--trust-remote-code) imports it" if trust_remote_code else
               "its config.json asks for it (its quantization_config or attn_implementation)")
            + ": install it, or use a release of the model without that setting"
        ) from None
    except _errors(source, ValueError, OSError, KeyError, RuntimeError, SafetensorError) as e:  # torch: RuntimeError
        fix = _gguf_fix(e) if source.kind == "gguf" else DOWNLOAD_AGAIN
        raise _read_error(source, "load as a causal LM", e, fix) from None


def _check_float16_range(source: Source, model, dtype) -> None:
    """A bf16/fp32 checkpoint read in float16 (`clakit eval --dtype float16`): a weight beyond float16's 65504 is
    cast to inf and every logit turns NaN, which the eval then blamed on a damaged checkpoint. Refused naming the
    tensor and the dtypes that hold it. A float16 checkpoint's own inf is damage, left to the callers' checks."""
    import torch

    if dtype != torch.float16:
        return
    raw = _raw_config(source.path) if source.kind == "dir" else {}
    if (raw.get("dtype") or raw.get("torch_dtype")) == "float16":  # stored in float16: nothing was cast out of range
        return
    for name, tensor in model.named_parameters():
        if tensor.is_floating_point() and tensor.device.type != "meta" and torch.isinf(tensor).any():
            raise ClakitError(
                f"{source.spec} holds weights beyond float16's range (65504) in {name}: read in float16 they are inf "
                "and every logit NaN; use --dtype bfloat16 (same memory) or float32"
            )


def drop_unused_window(config) -> None:
    """Stock Llama's attention applies no window whatever its config carries (a llamafied Qwen2's `sliding_window`),
    but transformers' caches read the key and keep only the last window - 1 tokens: generate() and every cached
    decode of the loaded model would compute another model than its forward. Any other model's window (Mistral's,
    Qwen2's, Gemma's: their masks read it) is real and kept (the CLA Llama's config drops the key itself)."""
    from clakit.modeling import attention_window
    from clakit.modeling.configuration_cla import drop_sliding_layer_types

    if getattr(config, "sliding_window", None) is not None and attention_window(config) is None:
        config.sliding_window = None
    if getattr(config, "model_type", "").removesuffix("_cla") == "llama":
        drop_sliding_layer_types(config)  # its layer_types too: a window-None sliding cache layer fails


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "tekken.json")
# with the files beside them a tokenizer also reads: what names a folder's tokenizer by content (eval's model_files)
TOKENIZER_READS = (*TOKENIZER_FILES, "special_tokens_map.json", "added_tokens.json", "merges.txt")


def check_tokenizer_files(source: Source) -> None:
    """A folder without the model's tokenizer (transformers' own words: "Couldn't instantiate the backend tokenizer
    from one of ..."): no text can be read for it, and a conversion of it could not be evaluated or trained. A Hub
    snapshot lacking them was fetched in part: fetched again, not copied into the cache."""
    if source.kind == "dir" and not any((source.path / name).is_file() for name in TOKENIZER_FILES):
        fix = (
            f"download {source.spec} again (its snapshot lacks them)"
            if source.commit
            else "copy its tokenizer files from the original release into that folder"
        )
        raise ClakitError(
            f"{source.spec} has no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, ...); text is tokenized with "
            f"the model's own tokenizer: {fix}"
        )


def load_tokenizer(source: Source, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    check_tokenizer_files(source)
    if source.kind == "gguf":
        check_gguf_tokenizer(source)
    _check_sentencepiece_readable(source)
    try:
        return AutoTokenizer.from_pretrained(source.load_dir, trust_remote_code=trust_remote_code, **kwargs)
    except _errors(source, ValueError, OSError) as e:
        raise _read_error(source, "load the tokenizer of", e) from None


def _check_sentencepiece_readable(source: Source) -> None:
    """A folder whose tokenizer is only a SentencePiece model (tokenizer.model without tokenizer.json: Llama-2 and
    Mistral checkpoints saved by older tools, many fine-tunes) is converted by transformers with `sentencepiece` and
    `protobuf`, which clakit does not install; without them transformers falls back to reading it as a tiktoken file
    and says "`tiktoken` is required", which sent the user to install a package that cannot read it."""
    import importlib.util

    if source.kind != "dir" or (source.path / "tokenizer.json").is_file():
        return
    model = source.path / "tokenizer.model"
    if not model.is_file() or _tiktoken_file(model):  # Meta's original Llama-3 release: a tiktoken file of this name
        return
    missing = [m for m, mod in (("sentencepiece", "sentencepiece"), ("protobuf", "google.protobuf"))
               if importlib.util.find_spec(mod.split(".")[0]) is None or importlib.util.find_spec(mod) is None]
    if missing:
        raise ClakitError(
            f"{source.spec}'s tokenizer is a SentencePiece model only (tokenizer.model, no tokenizer.json); reading "
            f"it needs {' and '.join(missing)}: pip install {' '.join(missing)}"
        )


def _tiktoken_file(path: Path) -> bool:
    """Whether `path` reads as tiktoken's text format (lines of base64 and a rank), not a SentencePiece protobuf."""
    try:
        with open(path, "rb") as f:
            head = f.read(256)
    except OSError:
        return False
    return re.match(rb"[A-Za-z0-9+/=]+ \d+\n", head) is not None


@contextlib.contextmanager
def progress_bars_off(quiet: bool):
    """A library call's `quiet=True`: transformers' own bars ("Loading weights", "Writing model shards") off for the
    call, then as the caller had them (the CLI's -q also sends stderr to /dev/null, a library call does not)."""
    from transformers.utils import logging as hf_logging

    were_on = hf_logging.is_progress_bar_enabled()
    if quiet:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if were_on:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _no_load_report():
    """transformers logs a table of missing/mismatched tensors at warning level; load_model says it in one line."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)


def _errors(source: Source, *errors: type) -> tuple:
    """The exceptions that mean "this source cannot be read" (a GGUF file's reader fails in more ways)."""
    return GGUF_READ_ERRORS + errors if source.kind == "gguf" else errors


DOWNLOAD_AGAIN = "check that its files are complete (download it again)"
FIX_CONFIG = "correct or restore its config.json"
CUSTOM_CODE = "contains custom code which must be executed"  # transformers' words (dynamic_module_utils)
GGUF_UNSUPPORTED = "transformers cannot read GGUF files of this architecture: give the model's transformers checkpoint"


def _read_error(source: Source, doing: str, e: Exception, fix: str = DOWNLOAD_AGAIN) -> ClakitError:
    """One line: what failed, and for a .gguf file whether it is empty, not GGUF, truncated or damaged."""
    problem = gguf_problem(source.path) if source.kind == "gguf" else None
    if problem:
        return ClakitError(f"cannot read {source.spec}: {problem}; download or convert the .gguf file again")
    if CUSTOM_CODE in str(e):  # transformers' refusal without trust_remote_code (a tokenizer's auto_map, too)
        fix = "it loads code shipped with it, which runs when loaded: pass --trust-remote-code if you trust the source"
    return ClakitError(f"cannot {doing} {source.spec}: {_first_line(e)}; {fix}")


def _first_line(e: Exception) -> str:
    """The message's first line; with the next one when it ends in ':' (huggingface_hub's strict configs give the
    field there and the problem, e.g. "expected float, got str (value: '1e-05')", only on the line after)."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()] or [type(e).__name__]
    first = f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]
    return first[:300].rstrip(" :")


def gguf_problem(path: Path) -> str | None:
    """Why a .gguf file is unreadable (empty, not GGUF, truncated, damaged), or None when its structure is sound.

    Only called after a read failed: the gguf package's reader parses the whole header (~2 s for SmolLM2-135M)."""
    size = path.stat().st_size
    if size == 0:
        return "the file is empty"
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            return "it does not start with the GGUF magic bytes, so it is not a GGUF file"
    try:
        from gguf import GGUFReader

        tensors = GGUFReader(path).tensors
    except Exception:  # header, tensor table or data cut short: struct / numpy reshape errors
        return f"the GGUF file is truncated or damaged ({size:,} bytes that the gguf reader cannot parse)"
    need = max((t.data_offset + t.n_bytes for t in tensors), default=0)
    return f"the GGUF file is truncated ({size:,} bytes; its tensors need {need:,})" if need > size else None


LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.")


def layer_count_problem(names, layers: int, where: str) -> str | None:
    """Decoder layers in the weights (model.layers.N.*) against the config's num_hidden_layers: a config of 10**6
    layers over 4 was built (on the meta device too: ~43 KB of Python objects a layer) before any check compared it
    with the tensors, 43 GB and minutes for one edited number."""
    found = {int(m[1]) for n in names if (m := LAYER_NAME.match(n))}
    # gross only (twice the layers held and more): a layer or two off keeps the later, tensor-naming refusals
    if found and layers > 2 * (max(found) + 1):
        held = max(found) + 1
        return f"{where} makes {layers} decoder layers but the weights hold {held} (model.layers.0-{held - 1})"
    return None


def _header_elements(source: Source) -> tuple[list[str], int, dict[str, str]] | None:
    """(tensor names, total elements, {name: dtype} of the tensors not floating point) from the weights' headers
    alone; None where they cannot be read cheaply (pickle, remote code, a damaged file: the load names the damage)."""
    try:
        if source.kind == "gguf":  # dequantised to float by the reader
            names, elements, _ = _gguf_facts(str(source.path), file_version(source.path))
            return list(names), elements, {}
        name = loadable_weights(source.path)
        if name is None or not is_safetensors_name(name):
            return None
        files = sorted(set(read_index(source.path / name).values())) if name.endswith(".index.json") else [name]
        from safetensors import safe_open

        names, total, other = [], 0, {}
        for file in files:
            with safe_open(str(source.path / file), framework="pt") as f:
                for key in f.keys():
                    found = f.get_slice(key)
                    names.append(key)
                    total += functools.reduce(lambda a, b: a * b, found.get_shape(), 1)
                    if found.get_dtype().startswith(("I", "U", "C")) or found.get_dtype() == "BOOL":
                        other[key] = found.get_dtype()
        return names, total, other
    except Exception:
        return None


def check_config_fits_weights(source: Source, trust_remote_code: bool = False) -> None:
    """Before transformers builds the model: the config's layer count and parameter count against the weights'
    headers. from_pretrained allocates (and initialises) every tensor the config makes and the file lacks or shapes
    otherwise (ignore_mismatched_sizes), so vocab_size 10**7 over a 320-token file took 4.2 GB before the refusal,
    and a 660 KB GGUF whose feed_forward_length says 2*10**6 took 6.4 GB; larger numbers exhaust the machine."""
    if trust_remote_code:
        return
    found = _header_elements(source)
    if found is None:
        return
    names, elements, not_float = found
    import clakit.modeling  # noqa: F401

    try:
        config = _auto_config(source)
    except Exception:
        return  # load_config / from_pretrained say why
    where = "its GGUF metadata" if source.kind == "gguf" else "its config.json"
    fix = restore_config(source) if source.kind == "gguf" else "restore the config.json written with these weights"
    _check_layer_count(source, config, names, where, fix)
    if getattr(config, "quantization_config", None):  # packed weights hold fewer values than parameters
        return
    _check_parameters(source, config, elements, not_float, where, fix)


def _check_layer_count(source: Source, config, names, where: str, fix: str) -> None:
    """The config's num_hidden_layers against the layers the weights' tensor names hold."""
    layers = getattr(config, "num_hidden_layers", None)
    if source.kind == "dir" and type(layers) is int:
        problem = layer_count_problem(names, layers, where)
        if problem:
            raise ClakitError(f"cannot load {source.spec}: {problem}; {fix}")
    elif source.kind == "gguf" and type(layers) is int:
        blocks = {int(m[1]) for n in names if (m := re.match(r"blk\.(\d+)\.", n))}
        if blocks and layers > 2 * (max(blocks) + 1):
            raise ClakitError(f"cannot load {source.spec}: {where} makes {layers} layers but it holds "
                              f"{max(blocks) + 1}; {fix}")


def _check_parameters(source: Source, config, elements: int, not_float: dict, where: str, fix: str) -> None:
    """The parameters the config makes (a skeleton on the meta device) against the weights: every one a float,
    and not grossly more of them than the files hold values."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    except Exception:
        return
    # the model's parameters only: a buffer the load drops (GPT-NeoX's bool attention.bias masks) is no weight
    params = {name for name, _ in skeleton.named_parameters(remove_duplicate=False)}
    not_float = {name: dtype for name, dtype in not_float.items() if name in params}
    if not_float:  # cast to float by from_pretrained without a word (int8 weights read as ppl 3e84, bools as 0/1)
        name, dtype = next(iter(not_float.items()))
        raise ClakitError(
            f"cannot load {source.spec}: tensor {name} is stored as {dtype} (tensors not floating point: "
            f"{len(not_float)}), and a Llama's weights are (a quantized checkpoint says so in a quantization_config): "
            "restore the checkpoint's own weights"
        )
    wanted = sum(p.numel() for p in skeleton.parameters())
    if wanted > 2 * elements + (1 << 26):  # gross only: a few tensors off get their own, named refusals later
        raise ClakitError(
            f"cannot load {source.spec}: {where} makes a model of {wanted:,} parameters but its weights hold "
            f"{elements:,} values, so it does not describe them (building it would take {4 * wanted / 1e9:.1f} GB "
            f"in float32 before that was found); {fix}"
        )
