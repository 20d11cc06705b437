"""The student: a CLA checkpoint (given, or converted on the fly), LoRA adapters from peft, `full_train` modules
unfrozen; at the end LoRA is merged back and the result saved as a plain CLA checkpoint."""

import dataclasses
import fnmatch
import json
from pathlib import Path

import torch

from clakit import outputs
from clakit.convert.pipeline import check_source_config
from clakit.errors import ClakitError
from clakit.sources import check_seq_len, load_config, load_model, resolve_source

LAYER_PREFIX = "model.layers."


# --- the CLA checkpoint to start from ---------------------------------------------------------------------------


def check_model_section(model_section, seq_len: int | None = None):
    """Refuse a model that is not a CLA checkpoint (model.path) or not convertible (model.source), or whose context
    window is shorter than data.seq_len (`seq_len`) or model.convert.seq_len, before any work; returns its config."""
    spec = model_section.path or model_section.source
    # a Hub repo's config.json is checked before its weights are downloaded (GBs for the wrong kind of model)
    source = resolve_source(spec, model_section.revision, check_config=lambda s: _check_kind(model_section, s))
    config = _check_kind(model_section, source)
    # the same window rule as convert's and eval's (clakit.sources.context_window); convert would refuse its own
    # seq_len too, but only once the pipeline reaches it
    if seq_len is not None:
        check_seq_len(seq_len, config, "data.seq_len", spec)
    if model_section.source and model_section.convert.seq_len is not None:
        check_seq_len(model_section.convert.seq_len, config, "model.convert.seq_len", spec)
    return config


def _check_kind(model_section, source):
    """model.path must be a CLA checkpoint, model.source a convertible stock one (with model.convert settings);
    returns the config."""
    spec = model_section.path or model_section.source
    config = load_config(source)
    is_cla = config.model_type.endswith("_cla")
    if model_section.path and not is_cla:
        raise ClakitError(
            f"model.path {spec} is not a CLA checkpoint (model_type {config.model_type!r}); convert it first with "
            "`clakit convert`, or give it as model.source with model.convert settings"
        )
    if model_section.source and is_cla:
        raise ClakitError(f"model.source {spec} is already a CLA checkpoint; give it as model.path instead")
    if model_section.source and model_section.convert is None:
        raise ClakitError(
            f"model.source {spec} is not a CLA checkpoint and the recipe has no model.convert settings; "
            "add e.g. `convert: {factor: 2, init: mean}` or give a converted checkpoint as model.path"
        )
    if model_section.source:  # an architecture or quantized weights convert refuses
        check_source_config(source)
    return config


def convert_source(model_section, out: Path, quiet: bool = False) -> Path:
    """Run the converter on `model.source` into `out` (a folder that must not exist yet) with `model.convert`."""
    from clakit.convert import convert

    config = model_section.convert
    if config.revision is None and model_section.revision is not None:
        config = dataclasses.replace(config, revision=model_section.revision)
    return convert(model_section.source, out, config, quiet=quiet)


def original_source(model_section) -> tuple[str, str | None] | None:
    """The stock model a CLA student came from, as (spec, revision): model.original or model.source (with
    model.revision), else model.path's conversion record, resolved as convert resolved it: the absolute local path
    it read (never the spec as typed, which was relative to wherever convert ran), or the Hub id and the commit it
    downloaded. None when unknown."""
    if model_section.original or model_section.source:
        return model_section.original or model_section.source, model_section.revision
    from clakit.convert.output_folder import RECORD_FILE

    record = Path(model_section.path).expanduser() / RECORD_FILE
    try:
        data = json.loads(record.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    source = data.get("source")
    if not isinstance(source, dict):  # an older record: a bare spec, usable only when it is absolute or a Hub id
        settings = data.get("settings") if isinstance(data.get("settings"), dict) else {}
        spec = settings.get("source") or source
        absolute = isinstance(spec, str) and (Path(spec).expanduser().is_absolute() or spec.count("/") == 1)
        return (spec, None) if absolute and not spec.startswith(".") else None
    if source.get("kind") == "hub":
        return source.get("spec"), source.get("revision")
    return (source["path"], None) if source.get("path") else None


def original_spec(model_section) -> str | None:
    found = original_source(model_section)
    return found[0] if found else None


def rebuilt(start_path: Path, lora, dtype: torch.dtype, trainable: dict):
    """A fresh whole copy of the student with the trained tensors `trainable` (clean names) loaded strictly: what
    an FSDP run merges and saves, since its own model is sharded over the processes."""
    from clakit.uptrain.checkpoint import load_trainable

    fresh = make_trainable(load_cla(start_path, dtype), lora)
    load_trainable(fresh, trainable, "the trained tensors gathered from the processes")
    return fresh


def load_cla(path: Path, dtype: torch.dtype):
    model = load_model(resolve_source(str(path)), dtype=dtype)
    model.config.use_cache = False  # training: no KV cache
    return model


# --- what trains ----------------------------------------------------------------------------------------------------


def _layer_of(name: str) -> int | None:
    if not name.startswith(LAYER_PREFIX):
        return None
    return int(name[len(LAYER_PREFIX) :].split(".", 1)[0])


def matches(pattern: str, name: str, layout: list[int]) -> bool:
    """`k_proj` (a name's last parts, as peft matches), a glob `model.layers.1*.mlp.*`, optionally prefixed
    `producers.` / `consumers.` to restrict to the layers that compute / borrow K/V."""
    for role in ("producers.", "consumers."):
        if pattern.startswith(role):
            layer = _layer_of(name)
            if layer is None or (layout[layer] == layer) != (role == "producers."):
                return False
            pattern = pattern[len(role) :]
    return name == pattern or name.endswith("." + pattern) or fnmatch.fnmatchcase(name, pattern)


def select_linear(model, patterns: list[str], what: str) -> list[str]:
    """Names of the nn.Linear modules matching any pattern; a pattern matching nothing is an error."""
    layout = model.config.kv_source_layers
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    chosen = []
    for pattern in patterns:
        hits = [n for n in linear if matches(pattern, n, layout)]
        if not hits:
            raise ClakitError(
                f"{what} pattern {pattern!r} matches no linear module; names look like "
                f"model.layers.0.self_attn.k_proj (a suffix such as k_proj, a glob, or consumers.q_proj)"
            )
        chosen += [n for n in hits if n not in chosen]
    return chosen


def check_patterns(config, lora) -> None:
    """Every lora.full_train / target_modules pattern matches a linear module of the student, checked on the model
    built on the meta device from `config` (no weights, seconds even at 70B) before anything slow runs, instead of
    after the conversion and the first evaluation. A stock config (model.source, layout chosen by the converter) is
    checked with every layer a producer, skipping the `producers.`/`consumers.` patterns that depend on the layout."""
    from clakit.convert.inmemory import cla_config, cla_family
    from clakit.modeling import CLA_CLASSES

    layout = getattr(config, "kv_source_layers", None)
    with torch.device("meta"):
        model = CLA_CLASSES[cla_family(config)][2](cla_config(config, layout or range(config.num_hidden_layers)))
    for patterns, what in ((lora.full_train, "lora.full_train"), (lora.target_modules if lora.r > 0 else [], "")):
        known = [p for p in patterns if layout or not p.startswith(("producers.", "consumers."))]
        select_linear(model, known, what or "lora.target_modules")


def make_trainable(model, lora, gradient_checkpointing: bool = False):
    """Wrap `model` with LoRA on `target_modules` (minus the fully trained ones) and unfreeze `full_train`.

    Returns the model to train (a peft model when lora.r > 0). Trainable tensors are kept in fp32 so AdamW updates
    are not lost to bf16 rounding; frozen weights keep the load dtype.
    """
    full = select_linear(model, lora.full_train, "lora.full_train")
    full_modules = [model.get_submodule(n) for n in full]  # the same objects after peft wraps its targets
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.requires_grad_(False)
    if lora.r > 0:
        from peft import LoraConfig, get_peft_model

        targets = [n for n in select_linear(model, lora.target_modules, "lora.target_modules") if n not in full]
        config = LoraConfig(
            r=lora.r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout, target_modules=targets, bias="none"
        )
        model = get_peft_model(model, config) if targets else model
    for module in full_modules:
        module.to(torch.float32).requires_grad_(True)
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return model


def trainable_names(model) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def merged(model, dtype: torch.dtype | None = None):
    """The plain CLA model with LoRA folded into the weights (in place: the adapters are gone afterwards), in
    `dtype`: the fp32 trainable tensors of a bf16 run go back to bf16, or the model would mix both (its forward
    fails outside autocast, and the checkpoint would hold two dtypes)."""
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    if dtype is not None:
        model.to(dtype)
    model.requires_grad_(False)
    if getattr(model, "is_activation_checkpointing", False):
        model.gradient_checkpointing_disable()
    model.config.use_cache = True
    return model


def drop_gguf_quantizer(model) -> None:
    """A model loaded from GGUF (or from a folder whose config kept GGUF's `quantization_config`) holds dequantised
    fp32 weights but still carries transformers' gguf quantizer, which refuses `save_pretrained`: drop both."""
    quantizer = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    if quantizer is not None and getattr(method, "value", method) == "gguf":
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config


def save_cla(model, tokenizer, out: Path, dtype: torch.dtype | None = None) -> None:
    """save_pretrained into `out` (safetensors, auto_map + modeling sources for trust_remote_code)."""
    if dtype is not None:
        model.to(dtype)
    drop_gguf_quantizer(model)
    model.save_pretrained(out, safe_serialization=True)
    outputs.usual_mode(*out.glob("*.safetensors"))
    tokenizer.save_pretrained(out)
    missing = [f for f in ("configuration_cla.py", "modeling_cla.py") if not (out / f).is_file()]
    if missing:  # a checkpoint without them would not load with trust_remote_code alone
        raise ClakitError(f"saving the CLA checkpoint did not copy {', '.join(missing)} to {out}")
