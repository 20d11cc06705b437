"""The student: a CLA checkpoint (given, or converted on the fly), LoRA adapters from peft, `full_train` modules
unfrozen; at the end LoRA is merged back and the result saved as a plain CLA checkpoint."""

import dataclasses
import fnmatch
import functools
import json
import re
import warnings
from pathlib import Path

import torch

from clakit import outputs
from clakit.convert.pipeline import check_source_config
from clakit.errors import ClakitError
from clakit.eval.lineage import FittedBefore, fitted_on
from clakit.paths import expand
from clakit.sources import check_seq_len, load_config, load_model, records_folder, resolve_source
from clakit.uptrain.recipe import MODEL_RUN_ONLY, section_refusal

LAYER_PREFIX = "model.layers."
PEFT_PREFIX = "base_model.model."  # clean names of a peft-wrapped student (lora.r > 0 and some LoRA target left)


# --- the CLA checkpoint to start from ---------------------------------------------------------------------------


def check_model_section(model_section, seq_len: int | None = None):
    """Refuse a model that is not a CLA checkpoint (model.path) or not convertible (model.source), or whose context
    window is shorter than data.seq_len (`seq_len`) or model.convert.seq_len, before any work; returns its config."""
    spec = model_section.path or model_section.source
    # a Hub repo's config.json is checked before its weights are downloaded (GBs for the wrong kind of model)
    check = functools.partial(_check_kind, model_section)
    source = resolve_source(spec, model_section.revision, model_section.allow_pickle, check_config=check)
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
    config = load_config(source, model_section.trust_remote_code)
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


def convert_source(model_section, out: Path, quiet: bool = False, shown: Path | None = None) -> Path:
    """Run the converter on `model.source` into `out` (a folder that must not exist yet) with `model.convert`;
    `shown`: the path its messages name (where `out` is published later)."""
    from clakit.convert import convert

    config = model_section.convert
    # model.revision is a Hub source's; with a local source it is model.original's (the conversion refused it)
    hub_source = not expand(model_section.source, "model.source").exists()
    if config.revision is None and model_section.revision is not None and hub_source:
        config = dataclasses.replace(config, revision=model_section.revision)
    # the run's settings (recipe.py refuses the conversion's alone)
    config = dataclasses.replace(config, **{k: True for k, v in code_settings(model_section).items() if v})
    try:
        return convert(model_section.source, out, config, quiet=quiet, shown=shown)
    except ClakitError as e:
        raise in_recipe(e, named=False) from None


def original_source(model_section, fetch: bool = True) -> tuple[str, str | None] | None:
    """The stock model a CLA student came from, as (spec, revision): model.original or model.source (with
    model.revision), else model.path's conversion record, resolved as convert resolved it: the absolute local path
    it read (never the spec as typed, which was relative to wherever convert ran), or the Hub id and the commit it
    downloaded; for a model.path uptrained by clakit before, the original its run resolved. None when unknown.
    A Hub id as model.path has its records read from the Hub (its small files only); `fetch` False (--dry-run,
    which fetches nothing): only a local model.path's."""
    if model_section.original or model_section.source:
        return model_section.original or model_section.source, model_section.revision
    from clakit.convert.output_folder import RECORD_FILE

    folder = expand(model_section.path, "model.path")
    if fetch:
        folder = records_folder(model_section.path, model_section.revision)
    try:
        data = json.loads((folder / RECORD_FILE).read_text())
    except (OSError, ValueError):
        return _uptrained_original(folder)
    if not isinstance(data, dict):
        return None
    source = data.get("source")
    if not isinstance(source, dict):  # an older record: a bare spec, usable only when it is absolute or a Hub id
        settings = data.get("settings") if isinstance(data.get("settings"), dict) else {}
        spec = settings.get("source") or source
        absolute = isinstance(spec, str) and (expand(spec, "model").is_absolute() or spec.count("/") == 1)
        return (spec, None) if absolute and not spec.startswith(".") else None
    if source.get("kind") == "hub":
        return source.get("spec"), source.get("revision")
    return (source["path"], None) if source.get("path") else None


def _uptrained_original(path: Path) -> tuple[str, str | None] | None:
    """The original an earlier `clakit uptrain` of the model in `path` resolved (its uptrain.json's `original`: the
    absolute path it read, or a Hub id's snapshot and commit), as (spec, revision); None when it recorded none."""
    from clakit.uptrain.card import PROVENANCE, read_record

    original = (read_record(path / PROVENANCE) or {}).get("original")
    if not isinstance(original, dict) or not isinstance(original.get("path"), str):
        return None
    if not expand(original["path"], "model.original").exists() and original.get("revision"):
        return original.get("spec"), original["revision"]  # a Hub snapshot no longer in this cache: download it
    return original["path"], None


def fitted_before(model_section) -> FittedBefore:
    """The local text files the CLA checkpoint in model.path was already fitted on, as its records name them
    (lineage.fitted_on). Held-out text must be none of them: the card's "held-out" numbers were measured on the
    conversion's calibration text, accepted as model.path where model.convert refused it."""
    folder = expand(model_section.path, "model.path") if model_section.path else None
    if folder is None or not folder.is_dir():  # none, or a Hub id (its records name another machine's files)
        return FittedBefore([], [])
    return fitted_on(folder)


def code_settings(model_section) -> dict[str, bool]:
    """What the run may execute when it reads a model other than its CLA student (load_model's keywords)."""
    return {key: getattr(model_section, key) for key in MODEL_RUN_ONLY}


def original_spec(model_section, fetch: bool = True) -> str | None:
    found = original_source(model_section, fetch)
    return found[0] if found else None


def load_cla(path: Path, dtype: torch.dtype, allow_pickle: bool = False):
    model = load_model(resolve_source(str(path)), dtype=dtype, allow_pickle=allow_pickle)
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


ALL_LINEAR = "all-linear"  # peft's shorthand: every linear module but the output layer (lm_head)


def select_linear(model, patterns: list[str], what: str) -> list[str]:
    """Names of the nn.Linear modules matching any pattern; a pattern matching nothing is an error."""
    layout = model.config.kv_source_layers
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    head = model.get_output_embeddings()
    chosen = []
    for pattern in patterns:
        if pattern == ALL_LINEAR:
            hits = [n for n in linear if model.get_submodule(n) is not head]
        else:
            hits = [n for n in linear if matches(pattern, n, layout)]
        if not hits:
            why = _no_consumer_match(pattern, linear, layout)
            raise ClakitError(
                f"{what} pattern {pattern!r} matches no linear module{why}; names look like "
                "model.layers.0.self_attn.k_proj (a suffix such as k_proj, a glob, or consumers.q_proj)"
            )
        chosen += [n for n in hits if n not in chosen]
    return chosen


def _no_consumer_match(pattern: str, linear: list[str], layout: list[int]) -> str:
    """CLA: why a `consumers.` pattern matched nothing, for the refusal: a consumer reads its producer's K/V and
    holds no k_proj/v_proj of its own, or the layout has no consumer at all (CLA-1: that reason would mislead)."""
    if not pattern.startswith("consumers.") or not layout:
        return ""
    if all(source == layer for layer, source in enumerate(layout)):
        return " (the layout has no consumers)"
    return " (only producers hold k_proj/v_proj)" if _names_only_kv(pattern, linear, layout) else ""


def _names_only_kv(pattern: str, linear: list[str], layout: list[int]) -> bool:
    """A `consumers.` pattern whose projection, read on every layer of `layout`, matches k_proj/v_proj modules and
    nothing else: no consumer holds one (the refusal's reason, and refused before a layout is chosen on data)."""
    hits = [n for n in linear if matches(pattern.removeprefix("consumers."), n, layout)]
    return bool(hits) and all(n.endswith(("k_proj", "v_proj")) for n in hits)


def meta_student(config, layout: list[int] | None = None):
    """The CLA model of `config` (a CLA config, or a stock one with `layout`, default every layer a producer) built
    on the meta device: its module names and classes without weights, in seconds even at 70B."""
    from clakit.convert.inmemory import cla_config, cla_family
    from clakit.modeling import CLA_CLASSES

    if not config.model_type.endswith("_cla"):  # the config as given otherwise: save_merged writes it
        config = cla_config(config, layout or range(config.num_hidden_layers))
    with torch.device("meta"):
        return CLA_CLASSES[cla_family(config)][2](config)


def check_patterns(config, lora, planned: list[int] | None = None) -> None:
    """Every lora.full_train / target_modules pattern matches a linear module of the student, checked on the model
    built on the meta device from `config` (no weights, seconds even at 70B) before anything slow runs, instead of
    after the conversion and the first evaluation. A stock config (model.source) is checked with the layout the
    conversion will write when its settings fix it (`planned`: planned_layout); when the converter chooses it on
    data, with every layer a producer, skipping the `producers.`/`consumers.` patterns that depend on the layout."""
    model = meta_student(config, planned)
    layout = getattr(model.config, "kv_source_layers", None) if planned or config.model_type.endswith("_cla") else None

    def known(patterns: list[str]) -> list[str]:
        return [p for p in patterns if layout or not p.startswith(LAYOUT_PREFIXES)]

    if not layout:  # a `consumers.` pattern naming only K/V matches nothing in any layout: refused now, not after
        _check_consumer_kv(model, lora)  # the conversion chose one on data (minutes to hours)
    full = select_linear(model, known(lora.full_train), "lora.full_train")
    targets = select_linear(model, known(lora.target_modules), "lora.target_modules") if lora.r > 0 else []
    _check_tied_head(model, [n for n in targets if n not in full])


LAYOUT_PREFIXES = ("producers.", "consumers.")  # patterns naming layers by their role in the layout


def _check_consumer_kv(model, lora) -> None:
    """`model`: every layer a producer. A `consumers.` pattern whose projection matches only k_proj/v_proj modules
    there: consumers hold none, whatever layout the data chooses."""
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    every = list(range(model.config.num_hidden_layers))
    targets = lora.target_modules if lora.r > 0 else []  # r 0: no adapter, its targets unused
    for what, patterns in (("lora.full_train", lora.full_train), ("lora.target_modules", targets)):
        for pattern in (p for p in patterns if p.startswith("consumers.")):
            if _names_only_kv(pattern, linear, every):
                raise ClakitError(
                    f"{what} pattern {pattern!r} matches no linear module (only producers hold k_proj/v_proj, "
                    "whatever layout the data chooses); name producers.k_proj, or drop it"
                )


def without_layout(lora):
    """`lora` for a layout not known yet (the converter chooses it on data): a `producers.`/`consumers.` pattern read
    as the projection it names on every layer, every layer a producer (the most it can select, as the size checks
    want: a `consumers.` pattern matched nothing there and was refused, "the layout has no consumers")."""

    def unprefixed(patterns: list[str]) -> list[str]:
        return list(dict.fromkeys(p.split(".", 1)[1] if p.startswith(LAYOUT_PREFIXES) else p for p in patterns))

    return dataclasses.replace(
        lora, full_train=unprefixed(lora.full_train), target_modules=unprefixed(lora.target_modules)
    )


def planned_layout(model_section, config) -> list[int] | None:
    """The layout model.convert will write for the stock `config` (convert's own rule: its kv_source_layers, uniform
    CLA-`factor`, 2 when no layout is named and no calibration text makes it `auto`); None for a layout chosen on
    data and for a CLA model.path (its config holds the layout). Settings the model cannot take are refused now, as
    the conversion would refuse them (--dry-run passed them)."""
    from clakit.convert.pipeline import check_plan, check_settings
    from clakit.convert.pipeline import planned_layout as conversion_layout

    c = model_section.convert
    if c is None or config.model_type.endswith("_cla"):
        return None
    try:
        # what the conversion refuses at once (kv_saving without layout auto), then from the model's config alone
        # (a copy span over half the window, token budgets below one): --dry-run too
        check_plan(check_settings(c), config, str(model_section.source))
        return conversion_layout(c, config.num_hidden_layers)[0]
    except ClakitError as e:
        raise in_recipe(e) from None


def in_recipe(error: ClakitError, named: bool = True) -> ClakitError:
    """A conversion's refusal as the recipe's model.convert section reads it ("add --layout auto (in the recipe:
    --layout is model.convert.layout)"); `named`: after "recipe section model.convert: "."""
    from clakit.convert.config import ConvertConfig

    return section_refusal(error, ConvertConfig, "model.convert", named)


def _check_tied_head(model, targets: list[str]) -> None:
    """LoRA on an lm_head tied to the input embeddings (SmolLM2's) trains a head apart from the embeddings, but the
    merge adds it to the one shared tensor: the saved model's embeddings change too, so it is not the model that
    was trained (and the streamed FSDP merge, which writes the embedding alone, refuses it after training)."""
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or embeddings is None or head.weight is not embeddings.weight:
        return
    name = next(n for n, m in model.named_modules() if m is head)
    if name in targets:
        raise ClakitError(
            f"lora.target_modules matches {name}, which this model ties to its input embeddings: merging LoRA into "
            f"it would change the embeddings too; train it in full (lora.full_train=[{name}]) or leave it out"
        )


def make_trainable(model, lora, gradient_checkpointing: bool = False):
    """Wrap `model` with LoRA on `target_modules` (minus the fully trained ones) and unfreeze `full_train`.

    Returns the model to train (a peft model when lora.r > 0). Trainable tensors are kept in fp32 so AdamW updates
    are not lost to bf16 rounding; frozen weights keep the load dtype.
    """
    full = select_linear(model, lora.full_train, "lora.full_train")
    full_modules = [model.get_submodule(n) for n in full]  # the same objects after peft wraps its targets
    if gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.requires_grad_(False)
    if lora.r > 0:
        from peft import LoraConfig, get_peft_model

        targets = [n for n in select_linear(model, lora.target_modules, "lora.target_modules") if n not in full]
        config = LoraConfig(
            r=lora.r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout, target_modules=targets, bias="none"
        )
        with warnings.catch_warnings():  # peft asks transformers' deprecated is_gradient_checkpointing: every run
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            model = get_peft_model(model, config) if targets else model
    for module in full_modules:
        module.to(torch.float32).requires_grad_(True)
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return model


def trainable_names(model) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def count_parameters(model) -> tuple[int, int, int]:
    """(trainable, total, adapters) parameter counts: total is the model's own, as saved once LoRA is merged; the
    adapters' A and B tensors, trained and then folded into the weights, are counted in trainable and adapters only
    (the card counted them in the model: 116,400 parameters for a saved model of 109,488, helper 50a)."""
    params = list(model.named_parameters())
    adapters = sum(p.numel() for name, p in params if ".lora_" in name)
    return sum(p.numel() for _, p in params if p.requires_grad), sum(p.numel() for _, p in params) - adapters, adapters


def merged(model, dtype: torch.dtype | None = None):
    """The plain CLA model with LoRA folded into the weights (in place: the adapters are gone afterwards), in
    `dtype`: the fp32 trainable tensors of a bf16 run go back to bf16, or the model would mix both (its forward
    fails outside autocast, and the checkpoint would hold two dtypes)."""
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    if dtype is not None:  # parameters only: model.to(bf16) would round RoPE's fp32 inv_freq buffer too, and the
        for p in model.parameters():  # run's "uptrained" score would come from a model unlike the saved one
            p.data = p.data.to(dtype) if p.is_floating_point() else p.data
    model.requires_grad_(False)
    if getattr(model, "is_activation_checkpointing", False):
        model.activation_checkpointing_disable()
    model.config.use_cache = True
    return model


def drop_gguf_quantizer(model) -> None:
    """A model loaded from GGUF (or from a folder whose config kept GGUF's `quantization_config`) holds dequantised
    fp32 weights but still carries transformers' gguf quantizer, which refuses `save_pretrained`: drop both."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and _is_gguf(getattr(quantizer, "quantization_config", None)):
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config


def _is_gguf(quantization) -> bool:
    """A quantization config (transformers' object, or the dict a config.json holds) of GGUF's dequantised weights."""
    method = (
        quantization.get("quant_method")
        if isinstance(quantization, dict)
        else getattr(quantization, "quant_method", None)
    )
    return getattr(method, "value", method) == "gguf"


def _check_modeling_files(out: Path) -> None:
    missing = [f for f in ("configuration_cla.py", "modeling_cla.py") if not (out / f).is_file()]
    if missing:  # a checkpoint without them would not load with trust_remote_code alone
        raise ClakitError(f"saving the CLA checkpoint did not copy {', '.join(missing)} to {out}")


def save_cla(model, tokenizer, out: Path, dtype: torch.dtype | None = None) -> None:
    """save_pretrained into `out` (safetensors, auto_map + modeling sources for trust_remote_code)."""
    if dtype is not None:
        model.to(dtype)
    drop_gguf_quantizer(model)
    model.save_pretrained(out, safe_serialization=True)
    outputs.usual_mode(*out.glob("*.safetensors"))
    save_tokenizer(tokenizer, out)
    _check_modeling_files(out)


def save_tokenizer(tokenizer, out: Path) -> None:
    """tokenizer.save_pretrained, plus a tokenizer's own code from the folder it was loaded from (its auto_map's
    modules, `tokenizer_code`): a tokenizer loaded without trust_remote_code is a generic class whose save writes
    the auto_map but not the files it names. A file `out` already holds (the CLA modeling code) is kept."""
    from clakit.convert.output_folder import tokenizer_code

    tokenizer.save_pretrained(out)
    source = Path(getattr(tokenizer, "name_or_path", "") or "")
    for name in tokenizer_code(source) if source.is_dir() else []:
        if not (out / name).exists():
            (out / name).write_bytes((source / name).read_bytes())


# --- the merged checkpoint, written one tensor at a time ----------------------------------------------------------

LORA_NAME = re.compile(r"(.+)\.lora_([AB])\.default\.weight")  # peft's one adapter, "default"
MERGED_SHARD_SIZE = "5GB"  # convert's default; the writer holds one shard's tensors at a time


def save_merged(
    start_path: Path,
    trained,
    lora,
    dtype: torch.dtype,
    out: Path,
    allow_pickle: bool = False,
    max_shard_size: str | int = MERGED_SHARD_SIZE,
) -> None:
    """Write into `out` (an existing empty folder) what `save_cla(merged(student, dtype), ...)` writes for the
    fp32 student of `start_path` holding the trained tensors, less the tokenizer, without the whole model in
    memory (uptrain's end under FSDP, on the main process): the start checkpoint's
    tensors are read one at a time (lazily), the trained ones (clean names, `trainable_state`) replace or merge into
    them, and each is cast to `dtype` and written to shards. A trained tensor the checkpoint has no place for, or of
    another shape, is refused before anything is written. `trained`: {clean name: tensor}, or a
    `checkpoint.GatheredTrainable` (its `shapes` checked first; each layer's tensors gathered when first read)."""
    from clakit.convert.checkpoint import ShardWriter, open_checkpoint, parse_size

    model = meta_student(load_config(resolve_source(str(start_path))))  # names, config, modeling sources; no weights
    names = _saved_names(model)
    checkpoint = open_checkpoint(Path(start_path), allow_pickle)
    shapes = getattr(trained, "shapes", None) or {name: tuple(t.shape) for name, t in trained.items()}
    full, adapters = _split_trained(shapes)
    _check_trained(checkpoint, names, full, adapters, lora, shapes)
    writer = ShardWriter(out, parse_size(max_shard_size))
    for name in names:  # one source tensor alive at a time (plus the shard being filled, in `dtype`)
        writer.add(name, _merged_tensor(name, checkpoint.get(name), full, adapters, lora, dtype, trained))
    writer.finish()
    outputs.usual_mode(*out.glob("*.safetensors"))
    _save_config_files(model, Path(start_path), dtype, out)


def _saved_names(model) -> list[str]:
    """The tensors save_pretrained writes for `model`, by transformers' own rule: its state dict less the tied
    aliases (lm_head.weight under tie_word_embeddings; only the embedding is written), in layer order."""
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    from clakit.convert.checkpoint import natural_key

    return sorted(remove_tied_weights_from_state_dict(model.state_dict(), model), key=natural_key)


def _split_trained(names) -> tuple[dict, dict]:
    """Where each trained tensor (by clean name) goes, by checkpoint name: ({name: clean name} of the full_train
    modules, {weight name: {"A": clean name of (r, in), "B": of (out, r)}} of the LoRA targets)."""
    full, adapters = {}, {}
    for clean in names:
        name = clean.removeprefix(PEFT_PREFIX)
        lora_part = LORA_NAME.fullmatch(name)
        if lora_part:
            adapters.setdefault(f"{lora_part[1]}.weight", {})[lora_part[2]] = clean
        else:
            full[name] = clean
    return full, adapters


def _check_trained(checkpoint, names: list[str], full: dict, adapters: dict, lora, shapes: dict) -> None:
    """Every tensor to write is in the start checkpoint, and every trained tensor has its place there, shape for
    shape: LoRA's A (r, in) and B (out, r) around the (out, in) weight it merges into. `shapes`: {clean name:
    shape} of the trained tensors."""
    present = set(checkpoint.names)
    missing = [n for n in names if n not in present]
    if missing:
        raise ClakitError(f"the start checkpoint {checkpoint.folder} lacks tensor {missing[0]}; nothing merged")
    for name, clean in full.items():
        if shapes[clean] != (shape := _start_shape(checkpoint, names, name, f"trained tensor {name}")):
            raise ClakitError(f"trained tensor {name} has shape {shapes[clean]}, the start checkpoint {shape}")
    for name, pair in adapters.items():
        out_features, in_features = _start_shape(checkpoint, names, name, f"the LoRA of {name}")
        for part, shape in (("A", (lora.r, in_features)), ("B", (out_features, lora.r))):
            got = shapes[pair[part]] if part in pair else "missing"
            if got != shape:
                raise ClakitError(f"trained lora_{part} of {name}: shape {got}, expected {shape} (r={lora.r})")


def _start_shape(checkpoint, names: list[str], name: str, what: str) -> tuple:
    if name not in names:  # e.g. a tied lm_head.weight (only the embedding is saved), or another recipe's module
        raise ClakitError(f"{what} matches no tensor of the start checkpoint {checkpoint.folder}; nothing merged")
    return tuple(checkpoint.get(name).shape)  # a lazy view: the header only


def _merged_tensor(name: str, start, full: dict, adapters: dict, lora, dtype, trained) -> torch.Tensor:
    """One tensor of the merged model in `dtype`: the trained whole tensor, the start's with LoRA merged in, or the
    start's as it is. LoRA as peft merges it into the fp32 student: W (out, in) + (B (out, r) @ A (r, in)) *
    (lora_alpha / r), in fp32 and in peft's order of operations (no fan_in_fan_out, rslora or DoRA here).
    `full`, `adapters`: _split_trained's; `trained`: the tensors by clean name."""
    tensor = trained[full[name]] if name in full else start
    if name in adapters:
        pair = adapters[name]
        lora_b, lora_a = trained[pair["B"]].float(), trained[pair["A"]].float()
        tensor = tensor.float() + (lora_b @ lora_a) * (lora.lora_alpha / lora.r)
    return tensor.to(dtype) if tensor.is_floating_point() else tensor  # from_pretrained casts floating ones only


def _save_config_files(model, start_path: Path, dtype: torch.dtype, out: Path) -> None:
    """config.json, generation_config.json and the modeling sources, as save_pretrained writes them for the merged
    model: the start's config with use_cache on (`merged`), the weights' dtype and the model's architecture."""
    from transformers.dynamic_module_utils import custom_object_save

    config = model.config
    config.use_cache = True
    config.dtype = str(dtype).split(".")[1]  # save_pretrained's spelling: "bfloat16"
    config.architectures = [type(model).__name__]
    _drop_gguf_quantization(config)
    custom_object_save(model, out, config=config)
    config.save_pretrained(out)
    if model.can_generate():
        _generation_config(start_path).save_pretrained(out)
    _check_modeling_files(out)


def _drop_gguf_quantization(config) -> None:
    """save_cla's drop_gguf_quantizer, on the config alone: the weights written here are never quantized."""
    if _is_gguf(getattr(config, "quantization_config", None)):
        del config.quantization_config


def _generation_config(start_path: Path):
    """What from_pretrained gives the loaded start model (transformers' adjust_generation_fn): its
    generation_config.json, else one made from its config.json."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(start_path)
    except OSError:
        return GenerationConfig.from_pretrained(start_path, config_file_name="config.json", _from_model_config=True)
