"""`evaluate`: every metric of the eval suite on one model, returned as the report dict `clakit eval` writes."""

import contextlib
import dataclasses
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from clakit import devices, outputs
from clakit.corpus import DEFAULT_ONLINE_EVAL, Text, load_texts
from clakit.errors import ClakitError
from clakit.eval import harness, kvcache, lineage, perplexity
from clakit.eval import passkey as passkey_task
from clakit.eval.config import EvalConfig
from clakit.eval.records import FORMAT
from clakit.eval.speed import throughput
from clakit.paths import expand
from clakit.provenance import file_sha256, library_versions, provenance, text_sha256, windows_sha256
from clakit.sources import (
    check_revision,
    check_seq_len,
    context_window,
    default_seq_len,
    files_fingerprint,
    looks_like_hub_id,
    progress_bars_off,
    resolve_source,
)

MAX_LOSS = 700.0  # nats per token: exp() of more overflows a float; a uniform guess over 10^300 tokens scores less


@dataclass
class Loaded:
    model: object
    tokenizer: object
    name: str  # what the user gave (path, Hub id, .gguf) or the in-memory model's name
    revision: str | None = None
    model_dir: Path | None = None  # local checkpoint folder, for clakit_convert.json
    commit: str | None = None  # the Hub commit the files were read at (revision "main" moves), else None
    path: Path | None = None  # the folder or .gguf file read, absolute (`name` may be relative to the cwd)
    origin: dict | None = None  # provenance.origin, read with the weights (lineage.origin)
    files: dict | None = None  # provenance.model_files: what was read, by content (model_files)


def _resolve(model, tokenizer, revision, trust_remote_code: bool, allow_pickle: bool, windows=(None, None)):
    """(Source, config) of a model spec; (None, its config) for an in-memory model, which must come with its
    tokenizer. A Hub model's config.json is checked (a causal LM, `windows` = (seq_len, stride) within its context)
    before its weights are downloaded; with remote code, whose configuration code comes with the weights, after."""
    from clakit.sources import check_weights, resolve_source

    if not isinstance(model, str | Path):
        if tokenizer is None:
            raise ClakitError("evaluating an in-memory model needs its tokenizer (tokenizer=...)")
        return None, model.config

    def check_config(source):
        _windows(_check_causal_lm(source, trust_remote_code), *windows)

    _check_not_a_run(model)
    source = resolve_source(str(model), revision, allow_pickle, None if trust_remote_code else check_config)
    config = _check_causal_lm(source, trust_remote_code)  # what the folder is comes before what it lacks
    check_weights(source, allow_pickle)
    return source, config


def _check_not_a_run(model) -> None:
    """An uptrain run folder, one of its training checkpoints (a run in progress: its latest step-N) or its model/
    before the run wrote it, given as MODEL: named with the model folder to give and how to get it, not as a folder
    without config.json or a model that does not exist."""
    path = expand(model, "model")
    if path.is_dir() and not os.access(path, os.R_OK | os.X_OK):
        return  # resolve_source names it (a look inside raised PermissionError)
    if not (path / "config.json").is_file() and (path.is_dir() or not path.exists()):
        hint = outputs.run_model_hint(path, model)
        if hint:
            raise ClakitError(hint)


def _check_causal_lm(source, trust_remote_code: bool):
    """Refuse a checkpoint transformers cannot load as a causal LM, before its tokenizer or weights are read;
    returns its config."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    from clakit.sources import load_config

    config = load_config(source, trust_remote_code)
    remote = "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {}) and trust_remote_code
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING and not remote:  # CLA configs are registered there
        raise ClakitError(
            f"{source.spec} is not a causal language model (model_type {config.model_type!r}); "
            "give a Llama/Mistral (or other causal LM) checkpoint"
        )
    return config


def _windows(config, seq_len: int | None, stride: int | None) -> tuple[int, int]:
    """(seq_len, stride): --seq-len, default perplexity.DEFAULT_SEQ_LEN or the model's context window if smaller;
    windows longer than the positions the model was trained on would score extrapolation, not the model, and are
    refused. A given --seq-len had its --stride checked by EvalConfig; the default's is checked here."""
    if seq_len is not None:
        check_seq_len(seq_len, config, "--seq-len")
        return seq_len, seq_len if stride is None else stride
    seq_len = default_seq_len(config, perplexity.DEFAULT_SEQ_LEN)
    return seq_len, perplexity.check_window(seq_len, stride)


def _check_decode_steps(config, cfg: EvalConfig, seq_len: int) -> None:
    """The speed's prefill (a window of `seq_len` tokens) and decode share the model's window (speed.fit_window
    shortens the prefill where both do not fit): decode steps over half of it timed prefills of a few tokens
    (--decode-steps 300 in a 256-position window: 1), a speed the report showed as the model's without a word
    (helper 50e). A prefill that fits beside the steps is not shortened, and is not refused."""
    from clakit.eval.speed import fit_window

    window = context_window(config)
    prefill = fit_window(seq_len, cfg.decode_steps, window)[0]
    if cfg.speed and window and cfg.decode_steps > window // 2 and prefill < seq_len:
        raise ClakitError(
            f"--decode-steps {cfg.decode_steps} leaves the prefill timed beside it {prefill} of this model's "
            f"{window}-position window (the two share it): give at most {window // 2} decode steps, or --no-speed"
        )


def _placement(model, cfg: EvalConfig) -> dict:
    """load_model's device/dtype/device_map for a checkpoint, checked before anything is read ({} for an in-memory
    model, which stays where it is). --dtype None keeps the checkpoint's (GGUF: float32)."""
    if not isinstance(model, str | Path):
        _check_in_memory_placement(cfg)
        return {}
    dtype = getattr(torch, cfg.dtype) if cfg.dtype else None
    if cfg.device_map is not None:
        return {"dtype": dtype, "device_map": cfg.device_map}
    return {"dtype": dtype, "device": str(devices.resolve("auto" if cfg.device is None else cfg.device))}


def _check_in_memory_placement(cfg: EvalConfig) -> None:
    """An in-memory model is scored where and as it is: a device, device map or dtype asked for it was ignored while
    the report's provenance.config recorded it (dtype="bfloat16" beside an fp32 cache and fp32 numbers)."""
    asked = {k: v for k, v in (("device", cfg.device), ("device_map", cfg.device_map), ("dtype", cfg.dtype)) if v}
    if asked:
        wants = ", ".join(f"{k}={v!r}" for k, v in asked.items())
        raise ClakitError(
            f"{wants} applies to a checkpoint clakit loads; an in-memory model runs where and as it is: move or cast "
            "it first (model.to(...)) and leave these out, or give its checkpoint path"
        )


def _load(model, source, tokenizer, cfg: EvalConfig, placement: dict, name, identity=None) -> Loaded:
    """The model, loaded; `identity`: folder_identity(source) when its config and tokenizer were read."""
    from clakit.sources import load_model

    if source is None:
        label = name or getattr(model.config, "_name_or_path", "") or type(model).__name__
        return Loaded(model.eval(), tokenizer, label)
    model_dir = source.path if source.kind == "dir" else None
    # the record with the weights, not after scoring (hours at 70B), when a `convert --overwrite` of MODEL may
    # have published another model there: its record described numbers it never scored
    origin = lineage.origin(model_dir)
    files = model_files(source)
    try:
        loaded = load_model(source, trust_remote_code=cfg.trust_remote_code, allow_pickle=cfg.allow_pickle,
                            **placement)  # fmt: skip
    except ClakitError:  # a shard missing because another run replaced the folder mid-load: say that, not "damaged"
        _check_unchanged(source, identity)
        raise
    _check_unchanged(source, identity)
    return Loaded(loaded, tokenizer, name or source.spec, source.revision, model_dir, source.commit, source.path,
                  origin, files)  # fmt: skip


def model_files(source) -> dict | None:
    """The model read, by content where that costs little: a .gguf file's sha256 (it is read whole by the load
    anyway); a folder's config.json and tokenizer files by sha256 and each weight file by its size and (safetensors)
    its header's sha256, as convert's source.files names a source. The path alone named whatever is there later."""
    path = Path(source.path)
    try:
        if source.kind == "gguf":
            return {path.name: {"sha256": file_sha256(path)}}
        weights = sorted(p.name for p in path.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())
        found = files_fingerprint(path, weights)
    except OSError:  # a file it cannot read: the load that follows names it, with the fix
        return None
    return found


def folder_identity(source) -> tuple[int, int] | None:
    """(device, inode) of the folder or .gguf file `source` names: clakit publishes an output by renaming a new
    folder into place, so a model replaced after it was looked at (`clakit convert ... --overwrite`) has another."""
    try:
        found = os.stat(source.path)
    except OSError:
        return None
    return found.st_dev, found.st_ino


def _check_unchanged(source, identity) -> None:
    """Refuse a model replaced between its checks (config, tokenizer: read first) and the end of loading its weights:
    config, tokenizer and weights (shard by shard) may then come from two models."""
    if identity is not None and folder_identity(source) != identity:
        raise ClakitError(
            f"{source.spec} was replaced while it was read (another run published into {source.path}, such as "
            "`clakit convert ... --overwrite`): its config, tokenizer and weights may come from two models; "
            "evaluate it again once that run has finished"
        )


def _reference(source_model, model_dir, revision, trust_remote_code) -> tuple[str, object, str | None] | None:
    """(label, config, the Hub commit read or None) of the model the KV saving is measured against: `source_model`
    when given, else the converter's recorded source when it is still on this disk; read before the model is
    loaded, so a bad --source-model fails in seconds."""
    recorded, local = _recorded_source(model_dir)
    if not (source_model or local):
        return None
    config, commit = _source_config(source_model or local, revision if source_model else None, trust_remote_code)
    return (str(source_model) if source_model else recorded), config, commit


def _check_reference(config, reference) -> None:
    """The model the saving is measured against must be one MODEL could have been converted from: a conversion
    changes which layers hold K/V (and, merging heads, how many KV heads), never what kvcache.KEPT_BY_CONVERSION
    reads."""
    if reference is None:
        return
    label, ref_config, _ = reference
    kvcache.check_converted_from(
        config, ref_config, f"the source model {label}", "the evaluated model has",
        "it is not the model this one was converted from, so no KV saving against it means anything; give the right "
        "--source-model",
    )  # fmt: skip
    # KV heads: a conversion keeps them, or merges them (clakit.convert.kvheads: m dividing n), never adds any
    mine = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    theirs = getattr(ref_config, "num_key_value_heads", None) or ref_config.num_attention_heads
    if mine > theirs or theirs % mine:
        raise ClakitError(
            f"the source model {label} has {theirs} KV heads but the evaluated model has {mine}, which no merging of "
            "its heads gives: it is not the model this one was converted from; give the right --source-model"
        )


def _saving(config, dtype, model_dir, reference) -> dict:
    """Saving factor vs the reference model (see _reference), else vs the same config with every layer a producer
    (what the converter changes is the layout only, so this is exact for a stock source; a stock model is its own
    reference, 1.0)."""
    mine = kvcache.bytes_per_token(config, dtype)
    recorded, _ = _recorded_source(model_dir)
    if reference:
        label, src_config, commit = reference
        # source_commit: a Hub id's commit its config was read at (None for a local one)
        return {"saving_factor": kvcache.bytes_per_token(src_config, dtype) / mine, "source": label,
                "source_commit": commit}  # fmt: skip
    stock = len(kvcache.producer_layers(config)) / config.num_hidden_layers
    source = recorded or ("self" if stock == 1.0 else "stock layout")
    return {"saving_factor": 1.0 / stock, "source": source, "source_commit": None}


def _recorded_source(model_dir) -> tuple[str | None, str | None]:
    """(what the converter was given, a local path to it if one still exists) from clakit_convert.json."""
    record = kvcache.convert_record(model_dir)
    source, settings, prov = (
        record.get(k) if isinstance(record.get(k), dict) else {} for k in ("source", "settings", "provenance")
    )
    spec = next((s for s in (source.get("spec"), settings.get("source")) if isinstance(s, str) and s), None)
    # a relative spec is relative to the conversion's working directory, not this one's: read from here, a
    # moved source's `base` was another folder named base (the saving measured against another model)
    where = [source.get("path"), _as_converted(spec, prov.get("cwd"))]
    # only strings are paths: a hand-edited record's number or list would raise in Path()
    local = [p for p in where if isinstance(p, str) and p and expand(p, "model").exists()]
    return spec, (local[0] if local else None)


def _as_converted(spec: str | None, cwd) -> str | None:
    """`spec` as the converter read it: a relative path joined to the working directory it recorded (None when it
    recorded none: then where it was is unknown, and no folder here is taken for it)."""
    if spec is None or expand(spec, "model").is_absolute():
        return spec
    return str(Path(cwd) / expand(spec, "model")) if isinstance(cwd, str) and cwd else None


def _source_config(spec: str, revision: str | None, trust_remote_code: bool):
    from clakit.sources import load_config, resolve_source

    source = resolve_source(str(spec), revision, config_only=True)  # its shapes only: never its weights
    return load_config(source, trust_remote_code), source.commit


def _texts(data, text: str | None) -> list[Text]:
    if text is not None:
        if not text.strip():
            raise ClakitError("the text to evaluate on is empty")
        return [Text("<text>", text)]
    return load_texts(data or [DEFAULT_ONLINE_EVAL], "--data")


def _kv_cache(loaded: Loaded, ids, seq_len, kv_budget_gb, reference) -> dict:
    # the dtype the cache really holds (under FSDP's mixed precision: bf16 beside fp32 weights)
    measured, dtype = kvcache.measured_cache(loaded.model, ids[:seq_len].unsqueeze(0))
    config = loaded.model.config
    per_token = kvcache.bytes_per_token(config, dtype)
    per_sequence = kvcache.bytes_per_sequence(config, dtype, seq_len)  # after the prefill: every token, windowed too
    return {
        "bytes_per_token": per_token,
        "bytes_per_sequence": per_sequence,
        # decoding past a sliding window: a windowed layer then holds `window` tokens (below per_token * seq_len)
        "bytes_per_sequence_decoding": kvcache.bytes_per_sequence(config, dtype, seq_len, decoding=True),
        "measured_bytes": measured,
        "measured_bytes_per_token": measured / seq_len,
        "measured_seq_len": seq_len,
        **_saving(config, dtype, loaded.model_dir, reference),
        "producer_layers": len(kvcache.producer_layers(config)),
        "num_layers": config.num_hidden_layers,
        "dtype": str(dtype).removeprefix("torch."),
        "kv_budget_gb": kv_budget_gb,
        "max_batch_size": kvcache.max_batch(per_sequence, kv_budget_gb),
    }


def evaluate(
    model,
    config: EvalConfig | None = None,
    *,
    tokenizer=None,
    text: str | None = None,
    passkey=None,
    name: str | None = None,
    quiet: bool = False,
    **settings,
) -> dict:
    """Evaluate `model` (checkpoint folder, Hub id, .gguf path, or an in-memory causal LM with `tokenizer`).

    `config` and/or `settings` (EvalConfig's fields as keywords, which win): `data` = text files, folders of .txt or
    datasets specs (default wikitext-2 test; needs the Hub); `text`: raw text instead. `passkey`: a
    `clakit.eval.passkey.PasskeySettings` adds passkey retrieval (its filler: that text). Returns the report dict
    (see docs/eval.md); every input is checked before the model is loaded.
    """
    cfg = dataclasses.replace(config or EvalConfig(), **settings)  # every value checked here
    if passkey is not None:
        passkey.check()
    run = _prepare(model, cfg, tokenizer, text, passkey)
    _note_slow_dtype(run.placement, quiet)
    _note_cpu_map(run.placement, quiet)
    _note_fitted(run.fitted, quiet)
    for line in () if quiet else run.notes:
        print(f"clakit eval: {line}", file=sys.stderr, flush=True)
    with _modes_kept(model), progress_bars_off(quiet):
        loaded = _load(model, run.source, run.tokenizer, cfg, run.placement, name, run.identity)
        return _measure(loaded, cfg, run, quiet)


@contextlib.contextmanager
def _modes_kept(model):
    """An in-memory model is scored in eval mode and handed back in the modes it came in (each module's own: a
    model mid-finetune went on training with dropout off after a library call measured it)."""
    modes = [] if isinstance(model, str | Path) else [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _note_fitted(fitted: dict | None, quiet: bool) -> None:
    """Text the model was fitted on (its calibration or training text, as its records name it) is scored as asked
    (a training perplexity), but said, and recorded as data.fitted_on: its numbers are not held out."""
    if fitted and not quiet:
        print(f"clakit eval: note: {fitted['text']} is text this model was fitted on ({fitted['fitted']}, named in "
              "its records): its perplexity is not held out", file=sys.stderr, flush=True)  # fmt: skip


def _note_cpu_map(placement: dict, quiet: bool) -> None:
    """--device-map auto where no GPU is: every layer on the CPU, which the help's "spread over GPUs" did not lead
    one to expect; said, then run (the map is recorded as asked, layer_devices as none; helper 50e)."""
    if placement.get("device_map") is not None and devices.resolve("auto").type == "cpu" and not quiet:
        print("clakit eval: note: --device-map auto found no GPU here: every layer runs on the CPU", file=sys.stderr,
              flush=True)  # fmt: skip


def _note_slow_dtype(placement: dict, quiet: bool) -> None:
    """--dtype bfloat16/float16 on a CPU without native kernels for it: one line, as uptrain's train.bf16 gets (there
    a 16-bit matmul took 45x fp32's time: devices.slow_on_cpu), then the evaluation runs as asked."""
    dtype, device = placement.get("dtype"), placement.get("device")  # {}: in memory
    if placement.get("device_map") is not None:  # where no accelerator is, the map puts every layer on the CPU
        device = "cpu" if devices.resolve("auto").type == "cpu" else None
    line = device and devices.slow_on_cpu(dtype, f"--dtype {str(dtype).removeprefix('torch.')}", device)
    if line and not quiet:
        print(f"clakit eval: {line}", file=sys.stderr, flush=True)


@dataclass
class Prepared:
    """Everything checked and built before the model is loaded."""

    source: object  # clakit.sources.Source, None for an in-memory model
    seq_len: int
    stride: int
    placement: dict
    reference: tuple | None
    texts: list
    tokenizer: object
    tokens: perplexity.TokenizedText
    tasks: list
    prompts: object
    identity: tuple | None = None  # folder_identity of the model when its config was read
    fitted: dict | None = None  # lineage.fitted_text: text the model's records say it was fitted on
    notes: tuple[str, ...] = ()  # lines for stderr before the model is loaded (unless quiet)


def _prepare(model, cfg: EvalConfig, tokenizer, text, passkey) -> Prepared:
    """Resolve the model and its config, the windows, the reference, the texts, tokens, tasks and prompts: every
    input is refused here, in seconds, before any weights are read."""
    placement = _placement(model, cfg)
    if harness.parse_tasks(cfg.lm_eval_tasks):
        harness.require_lm_eval()  # before anything slow; the tasks themselves are loaded just before the model
    reference, notes = _given_reference(model, cfg)
    source, config = _resolve(model, tokenizer, cfg.revision, cfg.trust_remote_code, cfg.allow_pickle,
                              (cfg.seq_len, cfg.stride))  # fmt: skip
    identity = folder_identity(source) if source is not None else None
    seq_len, stride = _windows(config, cfg.seq_len, cfg.stride)
    _check_decode_steps(config, cfg, seq_len)
    model_dir = source.path if source is not None and source.kind == "dir" else None
    if not cfg.source_model:
        reference = _reference(None, model_dir, None, cfg.trust_remote_code)
    _check_reference(config, reference)
    texts = _texts(cfg.data, text)
    if tokenizer is None:  # before the model: a text too short is refused in seconds
        tokenizer = _tokenizer(source, cfg.trust_remote_code)
    tokens = _tokens(tokenizer, texts, seq_len, cfg.max_tokens)
    tasks = _tasks(cfg, tokenizer)
    prompts = _passkey_prompts(passkey, config, tokenizer, texts)
    _check_vocab(config, tokens, prompts)
    fitted = lineage.fitted_text(model_dir, texts)
    return Prepared(source, seq_len, stride, placement, reference, texts, tokenizer, tokens, tasks, prompts, identity,
                    fitted, notes)  # fmt: skip


def _given_reference(model, cfg: EvalConfig) -> tuple[tuple | None, tuple[str, ...]]:
    """(the --source-model reference or None, notes to print): resolved before MODEL, whose weights (a Hub MODEL's:
    downloaded) are not needed to refuse a bad one. --revision is MODEL's; it selects --source-model's only where
    MODEL is a local path (read as it is): a Hub MODEL's tag was looked up in the source repo ("org/base has no
    revision 'cla-v2'"), or read another commit."""
    if isinstance(model, str | Path):  # a revision read for nothing would be recorded as provenance
        check_revision(cfg.revision, model, cfg.source_model)
    local_model = not isinstance(model, str | Path) or expand(str(model), "model").exists()
    if isinstance(model, str | Path) and not local_model and not looks_like_hub_id(str(model)):
        _check_not_a_run(model)  # MODEL neither here nor a Hub id: named before --source-model is fetched (a typo
        resolve_source(str(model))  # of MODEL was reported as the source's offline miss); raises, no network
    if not cfg.source_model:
        return None, ()
    source_revision = cfg.revision if local_model else None
    notes = ()
    if source_revision is not None and isinstance(model, str | Path) and looks_like_hub_id(str(model)):
        notes = (  # `org/cla` typed as a Hub id, with a folder of that path here: the tag went to the source unsaid
            f"note: {model} is the local folder {expand(str(model), 'model').resolve()}, read as it is, so "
            f"--revision {cfg.revision} selects --source-model {cfg.source_model}'s revision; to evaluate the Hub "
            f"repo {model}, run from another directory",
        )
    return _reference(cfg.source_model, None, source_revision, cfg.trust_remote_code), notes


def _tasks(cfg: EvalConfig, tokenizer) -> list:
    """lm-eval's tasks, loaded (before the model) for a tokenizer that has the prefix token they need."""
    tasks = harness.prepare(cfg.lm_eval_tasks, cfg.lm_eval_include, cfg.lm_eval_limit, cfg.lm_eval_fewshot)
    if tasks and perplexity.prefix_token_id(tokenizer) is None:  # lm-eval's HFLM decodes it for every request
        raise ClakitError(
            "--lm-eval-tasks needs a tokenizer with a BOS or EOS token (lm-eval prefixes every text with one); this "
            "model's tokenizer has neither: set one in its tokenizer_config.json, or drop --lm-eval-tasks"
        )
    return tasks


def _measure(loaded: Loaded, cfg: EvalConfig, run: Prepared, quiet: bool) -> dict:
    """The report: perplexity, KV cache, speed, passkeys and lm-eval tasks as asked, and the provenance."""
    settings = dict(seq_len=run.seq_len, stride=run.stride, max_tokens=cfg.max_tokens, batch_size=cfg.batch_size)
    report = {"format": FORMAT, "model": loaded.name}
    report.update(_perplexity(loaded.model, run.tokens, run.texts, settings, quiet))
    report["data"]["fitted_on"] = run.fitted  # None: no record names this text as fitted on
    report["settings"] = settings
    report["kv_cache"] = _kv_cache(loaded, run.tokens.ids, run.seq_len, cfg.kv_budget_gb, run.reference)
    speed_ids = run.tokens.ids[: run.seq_len]
    report["speed"] = _speed(loaded.model, speed_ids, cfg.batch_size, cfg.decode_steps) if cfg.speed else None
    if run.prompts:
        report["passkey"] = passkey_task.run(loaded.model, loaded.tokenizer, run.prompts, quiet, cfg.batch_size)
    if run.tasks:
        # lm-eval sees the same windows as clakit's perplexity (HFLM's max_length = seq_len): one number per text
        report["lm_eval"] = harness.run_tasks(loaded.model, loaded.tokenizer, run.tasks, cfg.batch_size,
                                              max_length=run.seq_len)  # fmt: skip
    report["provenance"] = _provenance(loaded, report["data"], settings, cfg)
    return report


def _speed(model, ids: torch.Tensor, batch_size: int, decode_steps: int) -> dict:
    """Prefill and decode tokens/s, inside the model's context window (at --seq-len = the window, the prefill is
    shortened by the decode steps: `speed.fit_window`)."""
    return throughput(model, ids, batch_size, decode_steps, window=context_window(model.config))


def _check_vocab(config, tokens: perplexity.TokenizedText, prompts) -> None:
    """Refuse, before the model is loaded, token ids the model has no embedding for (a tokenizer from another model,
    or one with added tokens the embeddings were never resized for): the forward would fail with an IndexError."""
    vocab = getattr(config.get_text_config(), "vocab_size", None)
    ids = [tokens.ids] + ([p.ids for cell in prompts.cells for p in cell] if prompts else [])
    top = max(int(t.max()) for t in ids)
    if isinstance(vocab, int) and top >= vocab:
        raise ClakitError(
            f"the tokenizer gives token id {top} but the model has {vocab} embeddings (vocab_size): the tokenizer "
            "is not this model's; give the model's own tokenizer"
        )


def _passkey_prompts(settings, config, tokenizer, texts: list[Text]):
    """Every passkey prompt, built before the model is loaded (the window comes from the config)."""
    if settings is None:
        return None
    return passkey_task.prepare(tokenizer, texts, settings, context_window(config) or 0)


def _tokenizer(source, trust_remote_code: bool):
    from clakit.sources import load_tokenizer

    return load_tokenizer(source, trust_remote_code)


def _tokens(tokenizer, texts: list[Text], seq_len: int, max_tokens: int | None) -> perplexity.TokenizedText:
    if max_tokens is not None and max_tokens < seq_len:  # the text may be long: --max-tokens is what falls short
        raise ClakitError(
            f"--max-tokens {max_tokens} is less than one window of --seq-len {seq_len}; "
            f"give --max-tokens of at least {seq_len} or a smaller --seq-len"
        )
    tokens = perplexity.tokenize(tokenizer, texts, max_tokens)
    if len(tokens.ids) - 1 < seq_len:
        raise ClakitError(
            f"the text has {len(tokens.ids) - 1} tokens, fewer than one window of --seq-len {seq_len}; "
            "give more text or a smaller --seq-len"
        )
    return tokens


def _why_not_finite(model) -> str:
    """In float16 a healthy model's activations can pass 65504 (inf, then NaN logits), whatever its weights: named
    so, instead of calling the checkpoint damaged (sources.load_model refuses weights beyond float16's range)."""
    if next(model.parameters()).dtype == torch.float16:
        return (
            "in float16 its activations may pass 65504, float16's largest value; evaluate with --dtype bfloat16 or "
            "float32 (if it reads the same there, its weights are damaged); no report written"
        )
    damaged = "a diverged training run, or a damaged checkpoint"
    return f"its weights hold NaN/inf or absurd values ({damaged}); no report written"


def _perplexity(model, tokens, texts: list[Text], settings: dict, quiet: bool) -> dict:
    """Perplexity, word perplexity, bits per byte, token counts and what data they were measured on."""
    s = settings
    scored = perplexity.score(model, tokens.ids, s["seq_len"], s["stride"], s["batch_size"], quiet)
    loss = scored["nll_sum"] / scored["num_scored"]
    if not (math.isfinite(loss) and loss < MAX_LOSS):
        raise ClakitError(f"the model's loss on the data is {loss:.4g} nats per token: {_why_not_finite(model)}")
    measured = perplexity.metrics(scored["nll_sum"], scored["num_scored"], tokens.text)
    data = {
        "sources": [t.name for t in texts],
        "sha256": text_sha256(tokens.text),  # of the exact text scored
        # of the token ids scored (prefix token included): the same text tokenized otherwise (another tokenizers or
        # sentencepiece version, an edited tokenizer_config) is another measurement, which sha256 alone does not show
        "ids_sha256": windows_sha256([tokens.ids]),
        "num_words": measured.pop("num_words"),
        "num_bytes": measured.pop("num_bytes"),
    }
    return {**measured, "num_tokens": scored["num_scored"], "num_windows": scored["num_windows"], "data": data}


def _provenance(loaded: Loaded, data_info: dict, settings: dict, cfg: EvalConfig) -> dict:
    spanned = devices.spanned(loaded.model)  # several when a device map spread the layers
    names = [torch.cuda.get_device_name(d) if d.type == "cuda" else "cpu" for d in spanned if d.type != "meta"]
    return provenance(
        model=loaded.name,
        revision=loaded.revision,
        commit=loaded.commit,
        model_path=str(loaded.path) if loaded.path else None,
        model_files=loaded.files,  # None for an in-memory model
        origin=loaded.origin,  # CLA: the conversion / uptraining that made it, from its record
        data=data_info["sources"],
        data_sha256=data_info["sha256"],
        settings=settings,
        config=cfg.to_dict(),  # every setting as given (settings: the windows used)
        device=", ".join(devices.placement(loaded.model)),
        device_name=", ".join(dict.fromkeys(names)),
        device_map=cfg.device_map,  # as asked; where transformers put each module (none when all on one device):
        layer_devices=getattr(loaded.model, "hf_device_map", None),
        dtype=str(next(loaded.model.parameters()).dtype).removeprefix("torch."),
        torch_threads=torch.get_num_threads(),
        **library_versions(EVAL_LIBRARIES),
    )


# beside clakit.provenance's clakit/transformers/torch: what the token ids also depend on (a tokenizer.model-only
# folder is converted to a fast tokenizer with sentencepiece and protobuf when loaded); a .gguf model's weights are
# dequantised, and its tokenizer read, by the gguf package
EVAL_LIBRARIES = ("tokenizers", "sentencepiece", "protobuf", "gguf")
