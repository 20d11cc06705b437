"""`clakit convert SRC OUT`: a Llama/Mistral checkpoint -> a CLA checkpoint folder, streamed tensor by tensor.

`producer`/`mean` read each source tensor lazily (memory-mapped) and write it into the output shards, so memory
stays near one output shard plus one group's K/V. The data-aware inits (`calibrated`, `reconstruct`),
`--layout auto` and `--eval-data` run the source model layer by layer (`layerwise.LayerwiseModel`): each decoder
layer is read from the checkpoint onto `--device` when a pass needs it and released after, so host and device
memory stay near one layer (plus the calibration activations) whatever the depth. GGUF sources are the exception:
transformers can only read them by dequantising the entire file, so they are held whole (fp32) in memory.
"""

import contextlib
import errno
import functools
import gc
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from tqdm.auto import tqdm

from clakit import devices, outputs
from clakit.convert.checkpoint import (
    SafetensorsCheckpoint,
    ShardWriter,
    StateDictCheckpoint,
    open_checkpoint,
    parse_size,
    with_tied_twins,
)
from clakit.convert.checks import check_shapes, check_tied, check_unused
from clakit.convert.config import (
    DEFAULT_DISTILL_COPY_FRACTION,
    DEFAULT_DISTILL_COPY_SPAN,
    DEFAULT_DISTILL_STEPS,
    DEFAULT_SEQ_LEN,
    ConvertConfig,
    command_line,
)
from clakit.convert.inmemory import cla_config, cla_family
from clakit.convert.layerwise import LayerwiseModel, autocast, fit_autocast, fresh_rotary, resolve_device
from clakit.convert.layout import SUPPORTED_ARCHITECTURES, check_layout, check_shareable, kv_saving, uniform_layout
from clakit.convert.output_folder import (
    check_tokenizer_json,
    copy_tokenizer_files,
    model_card,
    tokenizer_files,
    write_config,
    write_record,
)
from clakit.convert.streaming import (
    check_castable,
    check_overrides,
    converted_tensors,
    output_nbytes,
    plan_tensors,
)
from clakit.copies import add_copies
from clakit.corpus import load_texts, near_copy, shared_text, texts_sha256
from clakit.errors import ClakitError
from clakit.modeling import CLA_CLASSES
from clakit.paths import expand
from clakit.provenance import (
    CONVERT_RECORD,
    UPTRAIN_RECORD,
    file_sha256,
    library_versions,
    provenance,
    text_sha256,
    windows_sha256,
)
from clakit.sources import (
    Source,
    check_config_fits_weights,
    check_revision,
    check_seq_len,
    default_seq_len,
    files_fingerprint,
    load_config,
    load_model,
    load_tokenizer,
    progress_bars_off,
    read_config_json,
    resolve_source,
)

DATA_AWARE_INITS = ("calibrated", "reconstruct")
# With calibration data and no explicit choice, the converter uses its best measured combination (docs/quality.md):
# a layout chosen from the data at half the KV cache, then per-group reconstruction. SmolLM2-135M, in-domain held-out
# text: 43.99 -> 140.4 perplexity (3.2x), against ~18,500 for uniform CLA2 with the closed-form fit.
DEFAULT_DATA_INIT = "reconstruct"  # the init used when calibration data is given and --init is not
DEFAULT_KV_SAVING = 0.5  # --layout auto's saving when --kv-saving is not given (CLA2's)
# config.json, the modeling code, clakit_convert.json, README.md, the marker: 34 KB on a 4-layer tiny model
# (--init mean; a 30-layer auto layout's record is larger): 1 MB of room
OUTPUT_TEXT_FILES = 1 << 20
SHARD_HEADER = 256  # bytes per tensor in a shard's header (its name, dtype, shape and offsets as JSON), at most
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_ARCH_OF_TYPE = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}  # GGUF configs name no architecture


@dataclass(frozen=True)
class ConvertSettings:
    """The resolved settings of one conversion, as written to clakit_convert.json and the model card."""

    source: str  # what the user gave: folder, .gguf file or Hub id
    source_kind: str  # "dir" | "hub" | "gguf"
    revision: str | None  # Hub revision (the snapshot commit when known)
    architecture: str  # source architecture, e.g. LlamaForCausalLM
    kv_source_layers: list[int]
    layout: str  # how the layout was chosen: "factor K", "explicit" or "auto"
    kv_saving: float  # fraction of the KV cache saved, 1 - producers / layers
    init: str  # producer | mean | calibrated | reconstruct
    calib_data: list[str] | None  # calibration text specs (data-aware init or auto layout)
    calib_sha256: str | None  # of the calibration text as read (its files joined): the same files on a replay
    calib_tokens: int | None  # calibration tokens actually used
    dtype: str  # floating dtype of the written weights; "bfloat16+float32" when mixed (the most tensors' first)
    max_shard_size: str
    seed: int
    reconstruct_steps: int | None = None  # Adam steps per group (init reconstruct)
    distill_steps: int = 0  # end-to-end distillation steps after the fits (0: none)
    distill_copy_fraction: float = 0.0  # share of the distillation's windows ending with a copy (`add_copies`)
    distill_copy_span: int = 0  # tokens per copy (0: no copies)
    # sha256 of the token windows fitted on (the calibration's, then the distillation's): the same calib_sha256 can
    # place other windows (a .gz file spreads them by character, a plain one by byte), so other weights
    calib_ids_sha256: str | None = None
    seq_len: int | None = None  # tokens per calibration/distillation/eval window (--seq-len, or its default)

    def to_dict(self) -> dict:
        return asdict(self)


def convert(
    src,
    out,
    config: ConvertConfig | None = None,
    *,
    overwrite: bool = False,
    quiet: bool = False,
    shown: Path | None = None,
    **settings,
) -> Path:
    """Convert checkpoint `src` (folder, Hub id or .gguf file) to a CLA checkpoint folder `out`; returns `out`.

    `config` holds every setting (`ConvertConfig`); keyword `settings` build one instead (`factor=2, init="mean"`).
    Layout: `factor` (uniform CLA-K), `kv_source_layers` (a list) or `layout="auto"` with `kv_saving`; none of them
    means "auto" at `kv_saving` (default 0.5) with `calib_data`, uniform CLA2 without. `init` None means "mean"
    without `calib_data`, DEFAULT_DATA_INIT with it. Everything is checked before any file is read or written.
    `shown`: the path the last message names (a caller's staging folder, published later under that name).
    """
    if config is not None and settings:
        raise TypeError("give convert() a ConvertConfig or keyword settings, not both")
    config = config if config is not None else ConvertConfig(**settings)
    resolved = check_settings(config)
    device = resolve_device(config.device, config.dtype)
    parse_size(config.max_shard_size)
    check_revision(config.revision, src)
    # OUT before a Hub download (GBs): checked again with the downloaded snapshot's path once it is known
    inputs = [("source", src), ("calibration data", config.calib_data), ("eval data", config.eval_data)]
    outputs.check_not_inside_an_output(out)
    outputs.check_folder(out, "convert", overwrite=overwrite, inputs=inputs)
    job = _Conversion(
        out=expand(out, "OUT").absolute(),
        source=resolve_source(str(src), config.revision, config.allow_pickle, check_config=_hub_check(config.seq_len)),
        config=resolved,
        device=device,
        overwrite=overwrite,
        quiet=quiet,
    )
    job.shown = shown or job.out
    return job.run()


def check_settings(c: ConvertConfig) -> ConvertConfig:
    """The settings alone, before any file is read (convert, and uptrain's --dry-run of a recipe's model.convert):
    contradictions refused, and `c` with the layout, kv_saving and init it resolves to."""
    layout, kv_saving_ = _resolve_layout(c)
    _check_arguments(c, layout, kv_saving_)
    init = _resolve_init(c.init, c.calib_data)
    if c.reconstruct_steps is not None and init != "reconstruct":  # recorded as if it had run: as --distill-steps
        raise ClakitError(
            f"--reconstruct-steps sets the steps of --init reconstruct's fit; --init {init} runs none: drop it, or "
            "use --init reconstruct"
        )
    planned_distill_steps(replace(c, init=init))  # --distill-steps with an --init that fits nothing: named as such
    _check_inert(c, layout, init)
    return replace(c, layout=layout, kv_saving=kv_saving_, init=init)


DISTILL_SETTINGS = ("distill_tokens", "distill_lr", "distill_copy_span", "distill_copy_fraction")


def _check_inert(c: ConvertConfig, layout: str | None, init: str) -> None:
    """A setting given (other than its default) for a stage this conversion does not run: recorded in `config` and
    the card's rerun line as if it had acted (--ridge with --init mean, --distill-lr with --distill-steps 0, ...:
    accepted while their siblings --reconstruct-steps and --distill-copy-fraction were refused, helper 50e)."""
    default = ConvertConfig()
    fits, distils = init in DATA_AWARE_INITS, init in DATA_AWARE_INITS and c.distill_steps != 0
    stages = [  # (fields, whether their stage runs, the stage and how to run it)
        (("ridge",), fits, "a data-aware fit (--init calibrated or reconstruct, with --calib-data)"),
        (("reconstruct_lr", "train_o_proj", "sequential"), init == "reconstruct", "--init reconstruct's fit"),
        (DISTILL_SETTINGS[:3], distils,
         "the end-to-end distillation (a data-aware --init, --distill-steps not 0)"),
        (("refine", "refine_max_group"), layout == "auto" and c.refine, "--layout auto's refinement"),
        (("eval_tokens",), bool(c.eval_data), "the held-out check (--eval-data)"),
        # last: the text is inert where the stages above are, which name what was asked more closely
        (("calib_data", "calib_tokens"), bool(c.calib_data) and (fits or layout == "auto"),
         "calibration (--calib-data, read by --layout auto or a data-aware --init)"),
    ]  # fmt: skip
    for names, runs, stage in stages:
        given = [n for n in names if getattr(c, n) != getattr(default, n) and not (n == "refine" and layout == "auto")]
        if given and not runs:
            flag = _flag(given[0], getattr(c, given[0]))
            raise ClakitError(f"{flag} acts in {stage}, which this conversion does not run: drop it, or run that "
                              "stage")  # fmt: skip


def _flag(name: str, value) -> str:
    """The command-line flag that sets `name` to `value` (--no-train-o-proj for train_o_proj=False, a list's first
    item for a list)."""
    if isinstance(value, list):
        value = value[0] if value else ""
    return f"--no-{name.replace('_', '-')}" if value is False else f"--{name.replace('_', '-')} {value}"


def _resolve_layout(c: ConvertConfig) -> tuple[str | None, float | None]:
    """(layout, kv_saving): with calibration data and no layout asked for, choose it from the data."""
    layout, kv_saving_ = c.layout, c.kv_saving
    if c.factor is None and c.kv_source_layers is None and layout is None and c.calib_data:
        layout = "auto"
    if layout == "auto" and not c.calib_data:
        raise ClakitError("--layout auto chooses the layout on calibration text: pass --calib-data (a file or folder)")
    if layout == "auto" and kv_saving_ is None:
        kv_saving_ = DEFAULT_KV_SAVING
    return layout, kv_saving_


def planned_layout(c: ConvertConfig, num_layers: int) -> tuple[list[int] | None, str]:
    """The layout a conversion with settings `c` writes for a model of `num_layers` layers and its record's name
    ("factor K", "explicit"), or (None, "auto") when it is chosen on calibration data later. One rule for the
    conversion and for uptrain, which checks a recipe's LoRA patterns on it before converting; a layout the model
    cannot take is refused here, before any work."""
    layout, kv_saving_ = _resolve_layout(c)
    if layout == "auto":
        from clakit.convert.autolayout import producers_for

        producers_for(num_layers, kv_saving_)  # a saving no layout can reach, refused before any work
        return None, "auto"
    if c.kv_source_layers is not None:
        check_layout(list(c.kv_source_layers), num_layers)
        return list(c.kv_source_layers), "explicit"
    if c.factor is None:  # the default --factor 2
        check_shareable(num_layers)
    factor = 2 if c.factor is None else c.factor
    return uniform_layout(num_layers, factor), f"factor {factor}"


def _check_arguments(c: ConvertConfig, layout: str | None, kv_saving_: float | None) -> None:
    """Refuse contradictory or out-of-range settings before touching any file."""
    if layout not in (None, "auto"):
        raise ClakitError(f"--layout takes only 'auto' (or give --factor / --kv-source-layers), got {layout!r}")
    if layout == "auto" and c.kv_source_layers is not None:
        raise ClakitError("give either --layout auto or --kv-source-layers, not both")
    if (layout == "auto" or c.kv_source_layers is not None) and c.factor is not None:  # even 2, the CLI's default
        raise ClakitError("--factor cannot be combined with --kv-source-layers or --layout auto; give one of them")
    if layout == "auto" and not 0 < kv_saving_ < 1:
        raise ClakitError(
            f"--layout auto needs --kv-saving between 0 and 1 (0.5 halves the KV cache), got {kv_saving_}"
        )
    if layout != "auto" and kv_saving_ is not None:
        given = "--factor" if c.factor is not None else "--kv-source-layers" if c.kv_source_layers else None
        fix = f"drop {given} (it fixes the layout) or --kv-saving" if given else "add --layout auto"
        raise ClakitError(f"--kv-saving chooses how much KV cache --layout auto saves; {fix}")
    if c.bf16 and layout != "auto" and _resolve_init(c.init, c.calib_data) not in DATA_AWARE_INITS:
        # nothing runs on data (no layout search, no fit, no distillation; the quick check reads in float32)
        raise ClakitError(
            "--bf16 computes the layout search and the fits in bfloat16, which this conversion does not run (an "
            "--init that fits nothing, a layout not chosen on data): drop --bf16, or pass --calib-data"
        )


def _resolve_init(init: str | None, calib_data) -> str:
    if init is None:
        return DEFAULT_DATA_INIT if calib_data else "mean"
    if init in DATA_AWARE_INITS and not calib_data:
        raise ClakitError(
            f"--init {init} fits K/V on calibration text: pass --calib-data (a text file, folder or datasets spec)"
        )
    return init


def _source_config(source: Source, trust_remote_code: bool):
    """The source's config and architecture; anything but Llama/Mistral is refused before loading it."""
    check_source_config(source)  # the raw file first: an unknown model_type must not need its code to be refused
    try:
        config = load_config(source, trust_remote_code)
    except ClakitError:
        raise
    except Exception as e:  # transformers' GGUF reader fails on a damaged file with struct/EOF/index errors
        raise ClakitError(f"cannot read the config of {source.spec}; is it damaged? ({_first_line(e)})") from None
    return config, _check_architecture(source, config.architectures, config.model_type)


def check_not_calibrated(held: list, calib: list) -> None:
    """An --eval-data text that is also read as calibration text (the same file, one inside a calibration folder, or
    a copy under another name: compared by content) would be reported as held-out in the README and the record while
    the conversion was fitted on it; a near-copy too (`corpus.near_copy`: half of its long lines or more are in
    the calibration text). Refused before any work, as uptrain refuses a data.eval it trains on."""
    found = shared_text(held, calib)
    if found is not None:
        raise ClakitError(
            f"--eval-data {found[0].name} holds the same text as --calib-data {found[1]}: its numbers would not be "
            "held out; give --eval-data text the calibration does not read"
        )
    near = near_copy(held, {"--calib-data": calib})
    if near is not None:  # a half of the calibration file, or the file plus a line
        raise ClakitError(
            f"--eval-data is mostly calibration text ({near[1].text(near[0])}): its numbers would not be held out; "
            "give --eval-data text the calibration does not read"
        )


def check_source_config(source: Source) -> None:
    """Architecture and quantization from config.json alone: also run on a Hub repo's config before its weights
    are downloaded (`resolve_source`'s check_config)."""
    if source.kind != "dir":  # a .gguf file's metadata is read by transformers (load_config)
        return
    raw = read_config_json(source.path)
    _check_architecture(source, raw.get("architectures"), raw.get("model_type"))
    _check_not_quantized(source, raw.get("quantization_config"))


def _hub_check(seq_len: int | None):
    """A Hub repo's config.json, before its weights: check_source_config, and a given --seq-len against its window
    (the architecture checked first is Llama/Mistral, whose configs need no remote code)."""

    def check(source: Source) -> None:
        check_source_config(source)
        if seq_len is not None:
            check_seq_len(seq_len, load_config(source), "--seq-len", source.spec)

    return check


def _load_source_model(source: Source, trust_remote_code: bool, allow_pickle: bool):
    try:
        return load_model(source, torch.float32, trust_remote_code, allow_pickle=allow_pickle)
    except ClakitError:
        raise
    except Exception as e:  # transformers' GGUF reader fails on a damaged file with struct/EOF/index errors
        raise ClakitError(f"cannot load the weights of {source.spec}; is it damaged? ({_first_line(e)})") from None


def _first_line(error: Exception) -> str:
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:300]}"


def _check_not_quantized(source: Source, quantization) -> None:
    """Quantized weights (GPTQ, AWQ, bitsandbytes, FP8...) are packed codes and scales, not the matrices the K/V
    merge averages, and the written config would carry their quantization_config over plain tensors: the checks
    would otherwise refuse them as a damaged download, or a same-shaped FP8 checkpoint could convert into nonsense."""
    if quantization:
        method = quantization.get("quant_method", "unknown") if isinstance(quantization, dict) else "unknown"
        raise ClakitError(
            f"{source.spec} is a quantized checkpoint (quantization_config: {method}); clakit convert reads "
            "full-precision weights: convert the original, unquantized model"
        )


def _recorded_origin(source: Source) -> str:
    """Where a CLA checkpoint names its original: a conversion's clakit_convert.json (`source`), an uptrained model's
    uptrain.json (`original`; it has no conversion record of its own: it was named as if it had)."""
    uptrained = source.kind == "dir" and (source.path / UPTRAIN_RECORD).is_file()
    if uptrained and not (source.path / CONVERT_RECORD).is_file():
        return f"its {UPTRAIN_RECORD} names it as original"
    return f"its {CONVERT_RECORD} names it as source"


def _check_architecture(source: Source, architectures: list | None, model_type: str | None) -> str:
    if str(model_type).endswith("_cla"):  # whatever `architectures` says (edited by hand: a missing-k_proj error)
        raise ClakitError(
            f"{source.spec} is already a CLA checkpoint (model_type {model_type}); clakit convert reads the stock "
            f"model: convert the original it was made from ({_recorded_origin(source)})"
        )
    architecture = (architectures or [_ARCH_OF_TYPE.get(model_type, model_type)])[0]
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ClakitError(
            f"{source.spec} is a {architecture} model; clakit convert supports {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return architecture


def _check_source_loss(source: Source, perplexity: float) -> None:
    """A source whose held-out perplexity is NaN or inf (a NaN weight: a damaged file, a diverged run) is refused
    before the fits, which would only spread it (the writer's check would refuse it later, `_check_finite`)."""
    if not math.isfinite(perplexity):
        raise ClakitError(
            f"{source.spec} scores a held-out perplexity of {perplexity} on --eval-data: its weights hold NaN or inf "
            "(a damaged checkpoint or a diverged run); convert a healthy checkpoint"
        )


def check_plan(c: ConvertConfig, config, spec: str) -> None:
    """What a conversion with the resolved settings `c` (check_settings') refuses from the stock model's `config`
    alone, as its run does before reading any weights: the window, distillation where nothing is fitted, copies,
    token budgets below one window. One rule for convert and for uptrain's --dry-run and checks of a recipe's
    model.convert (which found these only after reading the text, ~50 s on SmolLM2). Memory is not probed here."""
    seq_len = conversion_seq_len(c, config, spec)
    steps = planned_distill_steps(c)
    resolve_copies(c, seq_len, steps)
    check_token_budgets(c, seq_len, steps)


def conversion_seq_len(c: ConvertConfig, config, spec: str) -> int:
    """--seq-len, default DEFAULT_SEQ_LEN or the model's context window if shorter; a longer one given is refused
    before any weights are read (calibrating on positions the model never saw would fit extrapolation)."""
    if c.seq_len is None:
        return default_seq_len(config, DEFAULT_SEQ_LEN)
    check_seq_len(c.seq_len, config, "--seq-len", spec)
    return c.seq_len


def planned_distill_steps(c: ConvertConfig) -> int:
    """The end-to-end distillation's steps the settings ask for (the default with a data-aware init), before the
    memory it needs is known; --distill-steps without a data-aware init is refused."""
    if c.init not in DATA_AWARE_INITS:
        if c.distill_steps:
            raise ClakitError(
                f"--distill-steps trains what --init calibrated/reconstruct fit; --init {c.init} fits nothing"
            )
        return 0
    return DEFAULT_DISTILL_STEPS if c.distill_steps is None else c.distill_steps


def needs_calibration(c: ConvertConfig) -> bool:
    """Whether a conversion with the resolved settings `c` reads calibration text: a data-aware init, or a layout
    chosen on data."""
    return c.init in DATA_AWARE_INITS or c.layout == "auto"


def check_token_budgets(c: ConvertConfig, seq_len: int, distill_steps: int) -> None:
    """--calib-tokens and --distill-tokens are read in windows of `seq_len` (known from the config): a budget below
    one window is refused before the source's evaluation, the layout and the fits, rather than when its stage
    starts (for the distillation, after all of them)."""
    budgets = [("--calib-tokens", c.calib_tokens)] if needs_calibration(c) else []
    if distill_steps:
        budgets.append(("--distill-tokens", c.distill_tokens))
    for flag, tokens in budgets:
        if tokens < seq_len:
            raise ClakitError(
                f"{flag} ({tokens}) must be at least the sequence length ({seq_len}): give {flag} {seq_len} or "
                "more, or a shorter --seq-len"
            )


def resolve_copies(c: ConvertConfig, seq_len: int, distill_steps: int) -> tuple[float, int]:
    """(fraction, span) of the distillation windows that end with a copy (`add_copies`); (0, 0) without one.
    Copies asked for where nothing distils, or a span that cannot fit twice in a window, are refused before any
    work; the default span shrinks to half of a short window."""
    if c.distill_copy_fraction and (c.distill_steps == 0 or c.init not in DATA_AWARE_INITS):
        raise ClakitError(
            "--distill-copy-fraction puts copies in the end-to-end distillation's windows, which this conversion "
            "does not run (--distill-steps 0, or an --init that fits nothing): drop it, or distill"
        )
    fraction = DEFAULT_DISTILL_COPY_FRACTION if c.distill_copy_fraction is None else c.distill_copy_fraction
    if not distill_steps or not fraction:
        return 0.0, 0
    if c.distill_copy_span is not None and c.distill_copy_span > seq_len // 2:
        raise ClakitError(
            f"--distill-copy-span ({c.distill_copy_span}) must be at most half the {seq_len}-token window: give "
            f"a span up to {seq_len // 2}, or a longer --seq-len"
        )
    span = c.distill_copy_span or min(DEFAULT_DISTILL_COPY_SPAN, seq_len // 2)
    return (fraction, span) if span else (0.0, 0)


class _Conversion:
    """One run of `convert`: the data phase (only when needed, layer by layer), then the streamed write."""

    def __init__(self, out: Path, source: Source, config: ConvertConfig, device, overwrite: bool, quiet: bool):
        self.out, self.source, self.cfg, self.device = out, source, config, device
        self.overwrite, self.quiet = overwrite, quiet
        self.init = config.init
        self.fit_dtype = DTYPES[config.dtype]
        self.bf16 = fit_autocast(config.bf16, config.dtype)  # the data stages' matmuls, over these weights
        self.compute_dtype = torch.bfloat16 if self.bf16 else None  # `autocast`'s: None opens no context
        self.results: dict = {}  # measured along the way: eval perplexities, auto-layout scores
        self.needs_calibration = needs_calibration(config)
        self.shown = out  # the path the last message names (convert's `shown`)

    def say(self, message: str) -> None:
        if not self.quiet:
            print(message, file=sys.stderr)

    @contextlib.contextmanager
    def _timed(self, stage: str):
        """Wall seconds of one stage, into clakit_convert.json's `stage_seconds` (where a conversion's time goes)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.stage_seconds[stage] = round(self.stage_seconds.get(stage, 0.0) + time.perf_counter() - start, 1)

    def run(self) -> Path:
        with progress_bars_off(self.quiet), outputs.new_parents_removed_on_failure(self.out):
            return self._run()  # quiet: transformers' own "Loading weights" bars off too

    def _run(self) -> Path:
        outputs.check_folder(self.out, "convert", overwrite=self.overwrite, inputs=self._inputs())
        slow = self.bf16 and devices.slow_on_cpu(torch.bfloat16, "--bf16", self.device)
        if slow and not self.quiet:  # a note, not a refusal (as uptrain's train.bf16): right, only slow
            print(f"clakit convert: {slow}", file=sys.stderr, flush=True)
        self.stage_seconds: dict[str, float] = {}
        self.started = time.perf_counter()
        self.config, self.architecture = _source_config(self.source, self.cfg.trust_remote_code)
        check_config_fits_weights(self.source, self.cfg.trust_remote_code)  # before anything is built at its size
        self.config_dtype = getattr(self.config, "dtype", None)  # before the fits' skeletons (from_config) set it
        self.seq_len = conversion_seq_len(self.cfg, self.config, self.source.spec)
        self.layout, self.layout_name = self._fixed_layout()  # None for --layout auto, chosen on data later
        self.distill_steps = self._resolve_distill()
        self.copies = resolve_copies(self.cfg, self.seq_len, self.distill_steps)
        check_token_budgets(self.cfg, self.seq_len, self.distill_steps)
        self.checkpoint = None
        if self.source.kind == "dir":  # every shard header and tensor is checked before any slow work
            self.checkpoint = open_checkpoint(self.source.path, self.cfg.allow_pickle)
            self.source_files = files_fingerprint(self.source.path, self.checkpoint.files)  # headers; Hub files whole
            self._check_source_tensors()
            check_tokenizer_json(self.source.path)  # copied unread when no text is read
        self._load_texts()  # after the weights' checks: a datasets spec can mean a download
        with self._scratch() as scratch:  # per-layer streams, Grams and fitted tensors: on disk, not in memory
            ids = self._tokenize()  # the calibration tokens the text gives: the fits' scratch files grow with them
            # the output's size (auto: at most) refused before the work; a GGUF's from its shapes, before it is read
            self._check_disk(self._first_layout(), ids.numel() if ids is not None else None, self._shapes())
            self._check_gguf_memory()
            overrides = self._data_phase(scratch, ids)
            with outputs.staged(self.out, "convert", overwrite=self.overwrite) as tmp:
                self._write(tmp, overrides)
        self.say(
            f"wrote {self.shown}: layout {self.layout_name}, init {self.init}, KV cache -{kv_saving(self.layout):.0%}"
        )
        return self.out

    def _resolve_distill(self) -> int:
        """--distill-steps: the default when the whole student fits the device, else 0 (said); an explicit number
        that cannot fit, or without a data-aware init, is refused before any work."""
        from clakit.convert.distill import distill_bytes

        asked = self.cfg.distill_steps
        steps = planned_distill_steps(self.cfg)
        if not steps:
            return 0
        every_layer = list(range(self.config.num_hidden_layers))  # the worst case: every layer's K/V trained
        seqs = self.cfg.distill_tokens // self.seq_len
        need = distill_bytes(self.config, every_layer, self.fit_dtype, self.seq_len, seqs)
        free = _free_memory(self.device)
        if free is None or need <= free:
            return steps
        if asked is not None:
            raise ClakitError(
                f"--distill-steps needs the whole model on {self.device} (~{need / 1e9:.1f} GB, {free / 1e9:.1f} GB "
                "free): use a bigger device, or --distill-steps 0 (layer-by-layer fits only; uptrain afterwards)"
            )
        why = (f"the whole student did not fit the device's free memory (~{need / 1e9:.1f} GB needed on "
               f"{self.device}, {free / 1e9:.1f} GB free)")  # fmt: skip
        self.say(f"note: the end-to-end distillation needs ~{need / 1e9:.1f} GB on {self.device} "
                 f"({free / 1e9:.1f} GB free): skipped (layer-by-layer fits only); uptrain the result")  # fmt: skip
        # recorded, not only said: the same command distils on a machine with more free memory
        self.results["distill"] = {"steps": 0, "skipped": why, "need_bytes": need, "free_bytes": free}
        return 0

    def _inputs(self) -> list[tuple[str, object]]:
        """What OUT must neither contain nor be inside (--overwrite would delete it)."""
        return [
            ("source", self.source.path),
            ("calibration data", self.cfg.calib_data),
            ("eval data", self.cfg.eval_data),
        ]

    def _load_texts(self) -> None:
        calib_data, eval_data = self.cfg.calib_data, self.cfg.eval_data
        self.calib_texts = load_texts(calib_data, "--calib-data") if self.needs_calibration else None
        self.eval_texts = load_texts(eval_data, "--eval-data") if eval_data else None
        check_not_calibrated(self.eval_texts or [], self.calib_texts or [])
        if calib_data and not self.needs_calibration:
            self.say(f"note: --calib-data is not used by --init {self.init} (it serves calibrated/reconstruct/auto)")

    @contextlib.contextmanager
    def _scratch(self):
        """A hidden folder beside OUT, removed at the end (also on failure), only when the data phase needs one."""
        if not self.needs_calibration:
            yield None
            return
        folder = outputs.make_staging(self.out, "scratch")  # stamped and locked: a kill -9's is reclaimed next run
        try:
            yield folder
        finally:
            outputs.discard(folder)

    def _reads_data(self) -> bool:
        """Whether the data phase runs: a GGUF is loaded (its tokenizer too) even without calibration or eval text."""
        return self.source.kind == "gguf" or self.needs_calibration or bool(self.eval_texts)

    def _tokenize(self) -> torch.Tensor | None:
        """The calibration windows (None without calibration), the held-out text's ids checked against the
        vocabulary: before any model runs, so too little text is refused before the slow stages, and the first disk
        check counts the tokens the text gives (it may hold fewer than --calib-tokens)."""
        if not self._reads_data():
            return None
        self.tokenizer = load_tokenizer(self.source, self.cfg.trust_remote_code)
        ids = self._calib_ids() if self.needs_calibration else None
        if self.eval_texts:
            self._check_vocab(self._eval_ids, "--eval-data")
        return ids

    def _data_phase(self, scratch: Path | None, ids: torch.Tensor | None) -> dict:
        """Everything that runs the source model: eval before, calibration, auto layout, K/V fitting. `ids`: the
        calibration windows (`_tokenize`)."""
        if not self._reads_data():
            return {}
        runner = self._gguf_runner() if self.source.kind == "gguf" else None
        if not (self.needs_calibration or self.eval_texts):
            return {}
        if runner is None:
            runner = LayerwiseModel.from_checkpoint(self.config, self.checkpoint, self.device, self.fit_dtype)
        if self.eval_texts:
            self.say("measuring held-out perplexity of the source...")
            with runner.offloaded() as model, self._timed("eval_before"):
                self.results["perplexity_before"] = self._perplexity(model)
            _check_source_loss(self.source, self.results["perplexity_before"])
        overrides = self._calibrate(runner, scratch, ids) if self.needs_calibration else {}
        del runner
        gc.collect()
        return overrides

    def _check_gguf_memory(self) -> None:
        """A GGUF source is dequantised whole to fp32 in host memory (and copied whole to --device for the fits):
        refused before its sha256 pass and the load (minutes at size) when that cannot fit, instead of an OOM kill
        after them. Priced from the meta skeleton (`_skeleton`), as the disk check is."""
        if self.source.kind != "gguf":
            return
        # parameters(): tied embeddings once (the state dict names lm_head too)
        weights = sum(p.numel() * 4 for p in self._skeleton.parameters())
        # the load peaks above the fp32 weights by about two copies of the largest tensor (the one being
        # dequantised, numpy then torch): the demo's 98 MB Q4_1 file peaked 769 MB above the imports for 538 MB of
        # weights, its 113 MB embedding twice (helper P, stop 48); the fp32 size alone passed files that then OOM'd
        need = weights + 2 * max(p.numel() * 4 for p in self._skeleton.parameters())
        free = _free_memory(torch.device("cpu"))
        if free is not None and need > free:
            raise ClakitError(
                f"{self.source.spec} is read whole and dequantised to float32 (~{outputs.size_text(need)} at the "
                "load's peak), but "
                f"{outputs.size_text(free)} of memory is free: convert the model's safetensors release (read layer by "
                "layer), or run on a machine with more memory"
            )
        if self.device.type == "cuda":  # _gguf_runner copies the whole model there, in the fits' dtype
            need = weights // 4 * self.fit_dtype.itemsize
            free = _free_memory(self.device)
            if free is not None and need > free:
                raise ClakitError(
                    f"{self.source.spec} is read whole (GGUF) and copied whole to {self.device} in "
                    f"{str(self.fit_dtype).removeprefix('torch.')} (~{outputs.size_text(need)}), but "
                    f"{outputs.size_text(free)} is free there: use --device cpu, or convert the model's safetensors "
                    "release (read layer by layer)"
                )

    def _gguf_runner(self) -> LayerwiseModel:
        """GGUF: transformers dequantises the whole file, so the model is whole in memory anyway; it is the checkpoint
        the writer streams from, and the fits use it whole (on the device, in the fits' dtype): no per-layer reads."""
        self.say(f"loading {self.source.spec} in memory (GGUF: dequantised whole, fp32)...")
        self.source_sha256 = file_sha256(self.source.path)  # a file has no revision: its content names it
        model = _load_source_model(self.source, self.cfg.trust_remote_code, self.cfg.allow_pickle)
        self.checkpoint = StateDictCheckpoint(model.state_dict())  # CPU fp32 tensors, kept for the writer
        self._check_source_tensors()  # before the model runs (evaluation, layout, fits): not when writing
        self.generation_config = model.generation_config
        model = model.to(self.device, self.fit_dtype).eval()
        fresh_rotary(model, self.device)  # `.to` cast RoPE's tables too; the layer-by-layer model's are fp32
        return LayerwiseModel.in_memory(model)

    def _check_source_tensors(self) -> None:
        """Every tensor the stock model needs: tied as its config says, castable to --output-dtype (a value beyond
        float16's range). A folder's before any slow work; a GGUF's once dequantised, before the model runs."""
        every_layer = list(range(self.config.num_hidden_layers))
        stock, lm_cls = cla_config(self.config, every_layer), CLA_CLASSES[cla_family(self.config)][2]
        self.checkpoint = with_tied_twins(self.checkpoint, _tied(stock, lm_cls))  # an lm_head-only tied save
        stock_plan = self._plan(stock, lm_cls, every_layer)
        check_tied(self.checkpoint, _tied(stock, lm_cls), self.source.spec)
        check_castable(self.checkpoint, stock_plan, DTYPES.get(self.cfg.output_dtype))

    def _first_layout(self) -> list[int]:
        """The layout the first disk check counts: the fixed one, or the largest `--layout auto` may choose."""
        return self.layout if self.layout is not None else self._largest_auto_layout()

    def _shapes(self):
        """The source's tensors as the disk check reads them (shapes and dtypes): the checkpoint's, or for a GGUF
        (read whole and dequantised later, in minutes at size) the stock model's on the meta device, in the float32
        transformers dequantises to."""
        if self.checkpoint is not None:
            return self.checkpoint
        return StateDictCheckpoint(self._skeleton.state_dict())

    @functools.cached_property
    def _skeleton(self):
        """The stock model on the meta device in float32 (what transformers dequantises a GGUF to): its shapes."""
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(self.config, dtype=torch.float32)

    def _fixed_layout(self) -> tuple[list[int] | None, str]:
        return planned_layout(self.cfg, self.config.num_hidden_layers)

    def _check_disk(self, layout: list[int], tokens: int | None = None, tensors=None) -> None:
        """Room beside OUT for the output of `layout`, and for the data-aware fits' scratch files (`scratch_bytes`:
        the calibration streams and Grams, then the fitted tensors, which stay until the output is written), before
        the work that writes them. `tokens`: calibration tokens (default: as many as --calib-tokens may give);
        `tensors`: what the output's size is read from (default: the checkpoint)."""
        from clakit.convert.calibrate import scratch_bytes

        lm_cls = CLA_CLASSES[cla_family(self.config)][2]
        tensors = tensors or self.checkpoint
        plan = self._plan(cla_config(self.config, layout), lm_cls, layout, tensors)
        output = self._output_bytes(tensors, plan)
        if self.init not in DATA_AWARE_INITS:
            return outputs.check_free_space(self.out, output)
        tokens = tokens or self.cfg.calib_tokens // self.seq_len * self.seq_len
        distill = bool(self.distill_steps)
        fits, fitted = scratch_bytes(self.config, layout, tokens, self.seq_len, self.init, self.fit_dtype, distill)
        what = (f"the output ({output / 1e9:.2f} GB) and the calibration's scratch files beside it (up to "
                f"{max(fits, fitted) / 1e9:.2f} GB)")  # fmt: skip
        outputs.check_free_space(self.out, max(fits, output + fitted), what)

    def _output_bytes(self, tensors, plan) -> int:
        """What OUT takes: the weights of `plan` read from `tensors`, their shard headers, the source's tokenizer
        files it copies (Llama 3's tokenizer.json: 9 MB; a disk checked for the weights alone filled while copying
        it, after all the work) and room for the config, code and card."""
        copied = tokenizer_files(self.source.path) if self.source.kind == "dir" else []
        weights = output_nbytes(tensors, plan, DTYPES.get(self.cfg.output_dtype))
        return weights + SHARD_HEADER * len(plan.names) + sum(p.stat().st_size for p in copied) + OUTPUT_TEXT_FILES

    def _largest_auto_layout(self) -> list[int]:
        """A layout with the most producers `--layout auto` may keep at this saving: every layer's K/V has one shape,
        so its output is as large as any the search can choose (it may keep fewer producers, never more). Its p
        groups are runs as even as can be, so that as many layers as may be share (the fits' scratch files grow with
        them): (num_layers,) kv_source_layers. The search's own layout is checked again before the fits."""
        from clakit.convert.autolayout import producers_for

        n = self.config.num_hidden_layers
        producers = producers_for(n, self.cfg.kv_saving)
        starts = sorted({round(k * n / producers) for k in range(producers)})  # p distinct starts: n / p >= 1
        return [max(s for s in starts if s <= layer) for layer in range(n)]

    def _calib_ids(self) -> torch.Tensor:
        """(n_seq, seq_len) calibration windows; too little text is a ClakitError. The distillation's windows (more
        tokens of the same text) are made here too: checked before any model runs, not after the fits."""
        from clakit.convert import calibrate

        ids = calibrate.calib_input_ids(self.tokenizer, self.calib_texts, self.cfg.calib_tokens, self.seq_len)
        self._check_vocab(ids, "--calib-data")
        self._note_shortfall(ids, self.cfg.calib_tokens, "--calib-tokens")
        # hashed now, with the windows it gave (streamed): read at the end, a file edited during hours of fitting
        # would be refused after all the work (the texts refuse a file that changed since load_texts)
        self.calib_sha256 = texts_sha256(self.calib_texts)
        if self.distill_steps:
            texts, tokens = self.calib_texts, self.cfg.distill_tokens
            self.distill_ids = calibrate.calib_input_ids(self.tokenizer, texts, tokens, self.seq_len)
            self._check_vocab(self.distill_ids, "--calib-data")
            self._note_shortfall(self.distill_ids, tokens, "--distill-tokens")
        self.calib_ids_sha256 = windows_sha256([ids, getattr(self, "distill_ids", None)])
        return ids

    def _note_shortfall(self, ids: torch.Tensor, asked: int, flag: str) -> None:
        """(n, seq_len) windows fewer than `asked` tokens allow: the text ran out. Fitted on what there is (the record
        says how many), and said, since more text fits better."""
        wanted = asked // self.seq_len
        if ids.shape[0] < wanted:
            self.say(f"note: --calib-data gives {ids.shape[0]} window(s) of {self.seq_len} tokens, not the {wanted} "
                     f"{flag} {asked} asks for: using those; more text gives a better fit")  # fmt: skip

    @functools.cached_property
    def _eval_tokens(self):
        """The --eval-data tokens `_perplexity` scores (the same tokenization) and the text they cover, tokenized once
        for the vocabulary check, both evaluations and the record's sha256."""
        from clakit.eval import perplexity

        return perplexity.tokenize(self.tokenizer, self.eval_texts, self.cfg.eval_tokens)

    @property
    def _eval_ids(self) -> torch.Tensor:
        return self._eval_tokens.ids

    def _check_vocab(self, ids: torch.Tensor, flag: str) -> None:
        """Token ids the embeddings hold: a tokenizer bigger than the model's vocabulary (another model's, copied in)
        failed deep in the first forward with an IndexError traceback."""
        vocab = self.config.vocab_size
        if ids.numel() and int(ids.max()) >= vocab:
            raise ClakitError(
                f"the tokenizer of {self.source.spec} turns the {flag} text into token id {int(ids.max())}, but the "
                f"model's vocab_size is {vocab}: the tokenizer files do not belong to these weights; restore them"
            )

    def _calibrate(self, runner: LayerwiseModel, scratch: Path, ids: torch.Tensor):
        """Calibration tokens `ids` -> auto layout (if asked) -> fitted K/V overrides (data-aware inits)."""
        from clakit.convert import calibrate
        from clakit.convert.autolayout import auto_layout, scored_rows

        c = self.cfg
        self.calib_tokens = ids.numel()
        ids = ids.to(self.device)
        if self.layout is None:
            scored = scored_rows(ids.shape) * ids.shape[1]  # every candidate is scored on the first windows only
            self.say(f"choosing a layout saving {c.kv_saving:.0%} of the KV cache, scored on {scored} of the "
                     f"{ids.numel()} calibration tokens...")  # fmt: skip
            with runner.offloaded() as model, self._timed("layout"), autocast(self.compute_dtype, self.device):
                self.layout, self.results["auto_layout"] = auto_layout(
                    model, ids, c.kv_saving, refine=c.refine, refine_max_group=c.refine_max_group,
                    progress=not self.quiet,
                )  # fmt: skip
            check_layout(self.layout, self.config.num_hidden_layers)
        if self.init not in DATA_AWARE_INITS:
            return {}
        self._check_disk(self.layout, ids.numel())  # the chosen layout's Grams, the tokens the text gave
        self.say(f"fitting shared K/V ({self.init}) on {ids.numel()} calibration tokens, layer by layer...")
        with self._timed("fit"), autocast(self.compute_dtype, self.device):
            overrides = calibrate.fit_kv(
                runner.model, self.layout, ids, self.init, seed=c.seed, steps=self._reconstruct_steps(),
                progress=not self.quiet, ridge=c.ridge, scratch=scratch, lr=c.reconstruct_lr,
                train_o=c.train_o_proj, sequential=c.sequential,
                store=calibrate.SpilledTensors(scratch / "fitted", self.device),
            )  # fmt: skip
        self._distill_if_shared(runner, overrides, ids)
        return overrides

    def _reconstruct_steps(self) -> int:
        """--reconstruct-steps, or its default for the layout (known only now when chosen on the data)."""
        from clakit.convert.reconstruct import default_steps

        given = self.cfg.reconstruct_steps
        return default_steps(self.layout) if given is None else given

    def _distill_if_shared(self, runner: LayerwiseModel, overrides, ids: torch.Tensor) -> None:
        """The end-to-end distillation, on its own (usually more) tokens: the layout and the fits keep --calib-tokens.
        Skipped (recorded as 0 steps) where no layer shares K/V: nothing was fitted, and training would only move the
        source's exact tensors."""
        if self.distill_steps and all(source == layer for layer, source in enumerate(self.layout)):
            self.say("note: no layer shares K/V in this layout: the source's tensors are written, not distilled")
            self.distill_steps = 0
            self.copies = (0.0, 0)  # no distillation ran: no copies in its windows either, and its windows (drawn
            self.distill_ids = None  # when it was planned) are not what the conversion was fitted on
            self.calib_ids_sha256 = windows_sha256([ids, None])
            self.results["distill"] = {"steps": 0, "skipped": "no layer shares K/V in this layout"}
        if self.distill_steps:
            tokens = self.distill_ids
            add_copies(tokens, *self.copies, seed=self.cfg.seed)  # the layout's and the fits' windows stay as read
            self._distill(runner, tokens.to(self.device), overrides)

    def _distill(self, runner: LayerwiseModel, ids: torch.Tensor, overrides) -> None:
        """The whole student on the device, its attention projections trained against the source's logits; the
        trained tensors join `overrides`."""
        from clakit.convert import distill

        self.say(f"distilling the converted model end to end ({self.distill_steps} steps on {ids.numel()} tokens)...")
        loaded = runner.loaded(*range(self.config.num_hidden_layers))
        with loaded, self._timed("distill"), autocast(self.compute_dtype, self.device):
            logits = distill.teacher_logits(runner.model, ids)
            student = distill.cla_student(runner.model, self.layout, overrides)
            trained, record = distill.distill(
                student, ids, logits, steps=self.distill_steps, lr=self.cfg.distill_lr, seed=self.cfg.seed,
                progress=not self.quiet,
            )  # fmt: skip
            del student, logits
        overrides.update(trained)
        self.results["distill"] = {"steps": self.distill_steps, "tokens": ids.numel(), **record}

    def _write(self, tmp: Path, overrides: dict) -> None:
        cla_cfg = cla_config(self.config, self.layout)
        lm_cls = CLA_CLASSES[cla_family(self.config)][2]
        cast = DTYPES.get(self.cfg.output_dtype)  # None: every tensor keeps its dtype
        plan = self._plan(cla_cfg, lm_cls, self.layout)
        check_overrides(self.checkpoint, plan, overrides)
        need = self._output_bytes(self.checkpoint, plan)
        outputs.check_free_space(tmp.parent, need)
        writer = ShardWriter(tmp, parse_size(self.cfg.max_shard_size))
        base_init = "mean" if self.init in DATA_AWARE_INITS else self.init  # what the fitted overrides start from
        tensors = converted_tensors(self.checkpoint, plan, base_init, overrides, cast)
        progress = tqdm(tensors, total=len(plan.names), desc="writing", unit="tensor", disable=self.quiet)
        with self._timed("write"), _space_named(self.out, need):
            written = _write_tensors(writer, progress)
        self.checkpoint = None  # release the source's memory maps before loading anything else
        cla_cfg.dtype = cast or _loaded_dtype(self.config_dtype, self.source_dtype)
        write_config(tmp, cla_cfg, lm_cls)
        self._write_tokenizer(tmp)
        if self.eval_texts:  # reads the output in the fits' dtype: sets cla_cfg.dtype to it
            self._eval_after(tmp, cla_cfg)
        record = self._record(plan, lm_cls.__name__, written)
        write_record(tmp, record)
        (tmp / "README.md").write_text(model_card(record))

    def _record(self, plan, cla_architecture: str, dtype: str) -> dict:
        """clakit_convert.json: settings, the whole ConvertConfig, source, provenance and what was measured."""
        settings = self._settings(dtype)
        return {
            "settings": settings.to_dict(),
            "config": {**self.cfg.to_dict(), "device_used": str(self.device), "bf16_used": self.bf16},
            "source": {  # where the weights came from, resolved (a Hub id's local snapshot, a .gguf file)
                "spec": settings.source, "kind": settings.source_kind, "revision": settings.revision,
                "path": str(self.source.path), "sha256": getattr(self, "source_sha256", None),
                "files": getattr(self, "source_files", None),  # a folder's: config.json and weight headers hashed
            },
            "cla_architecture": cla_architecture,
            # CLA: the fits' reductions split by thread: 1 and 2 threads wrote bf16 tensors one ulp apart
            "provenance": provenance(**library_versions(CONVERT_LIBRARIES), torch_threads=torch.get_num_threads(),
                                     rerun=self._rerun(settings)),
            "eval": self._eval_record(),
            "auto_layout": self.results.get("auto_layout"),
            "distill": self.results.get("distill"),
            "dropped_tensors": plan.dropped,
            "shard_size_bytes": parse_size(self.cfg.max_shard_size),
            "stage_seconds": {**self.stage_seconds, "total": round(time.perf_counter() - self.started, 1)},
        }  # fmt: skip

    def _rerun(self, settings: ConvertSettings) -> str:
        """The `clakit convert` command that redoes this conversion from any folder, whatever process called
        convert(): the source as read (a Hub id at the commit read, a local one by absolute path), every setting, the
        defaults as resolved here (the factor, distill_steps as this machine's memory decided it), and the thread
        count."""
        hub = settings.source_kind == "hub"
        src = settings.source if hub else str(self.source.path)
        # the defaults ("the converter decides") as they resolved here: a later clakit may resolve them otherwise
        pinned = {"revision": settings.revision if hub else None, "distill_steps": self.distill_steps,
                  "seq_len": settings.seq_len, "reconstruct_steps": settings.reconstruct_steps}  # fmt: skip
        if self.distill_steps:
            pinned |= {"distill_copy_fraction": self.copies[0], "distill_copy_span": self.copies[1] or None}
        if settings.layout.startswith("factor "):  # the default --factor 2 too (init, layout auto: in self.cfg)
            pinned["factor"] = int(settings.layout.split()[1])
        cfg = self.cfg
        if not self.distill_steps:  # none ran (skipped here: memory, a layout sharing nothing): its settings did not
            cfg = replace(cfg, **{k: getattr(ConvertConfig(), k) for k in DISTILL_SETTINGS})  # act, and with 0 steps
        return command_line(src, "NEW_OUT", cfg, cwd=os.getcwd(), threads=torch.get_num_threads(), pinned=pinned)

    def _plan(self, cla_cfg, lm_cls, layout: list[int], tensors=None):
        """Raises naming the first tensor the checkpoint (or `tensors`) lacks."""
        tensors = tensors or self.checkpoint
        with torch.device("meta"):  # tensor names and shapes only
            expected = {name: t.shape for name, t in lm_cls(cla_cfg).state_dict().items()}
        plan = plan_tensors(tensors.names, set(expected), set(_tied(cla_cfg, lm_cls)), layout)
        check_shapes(tensors, plan, expected, self.source.spec)
        check_unused(plan, self.source.spec)
        floating = (t.dtype for t in map(tensors.get, plan.names) if t.is_floating_point())  # lazy reads
        self.source_dtype = next(floating, torch.float32)
        return plan

    def _write_tokenizer(self, tmp: Path) -> None:
        if self.source.kind == "dir":
            copied = copy_tokenizer_files(self.source.path, tmp)
            if not any(name.startswith("tokenizer") or name.endswith(".model") for name in copied):
                # converted as given (weights alone convert); clakit eval and uptrain refuse it until they are added
                self.say(f"note: {self.source.spec} has no tokenizer files; none copied (copy them into {self.out})")
        else:  # GGUF: the tokenizer and generation defaults live inside the file
            self.tokenizer.save_pretrained(tmp)
            self.generation_config.save_pretrained(tmp)

    def _eval_after(self, tmp: Path, cla_cfg) -> None:
        """The written CLA model, read layer by layer like the source."""
        self.say("measuring held-out perplexity of the CLA model...")
        runner = LayerwiseModel.from_checkpoint(cla_cfg, SafetensorsCheckpoint(tmp), self.device, self.fit_dtype)
        with runner.offloaded() as model, self._timed("eval_after"):
            self.results["perplexity_after"] = self._perplexity(model)
        before, after = self.results["perplexity_before"], self.results["perplexity_after"]
        print(f"held-out perplexity: {before:.2f} -> {after:.2f} ({after / before:.2f}x)")

    def _perplexity(self, model) -> float:
        """The eval suite's perplexity (disjoint windows) on the first eval_tokens tokens of the --eval-data text."""
        from clakit.eval import perplexity

        text, max_tokens = self.eval_texts, self.cfg.eval_tokens
        available = len(self._eval_ids) - 1
        if available < 2:
            raise ClakitError("the --eval-data text is shorter than two tokens; give more held-out text")
        seq_len = min(self.seq_len, available)  # a short text still gets one window
        result = perplexity.perplexity(
            model, self.tokenizer, text, seq_len=seq_len, max_tokens=max_tokens, quiet=self.quiet
        )
        self.results["eval_scored"] = {"tokens": result["num_tokens"], "seq_len": seq_len}  # the same before/after
        return result["perplexity"]

    def _eval_record(self) -> dict | None:
        if not self.eval_texts:
            return None
        return {
            "data": [t.name for t in self.eval_texts],
            **self.results["eval_scored"],  # tokens scored and their window: less than asked of a short text
            "max_tokens": self.cfg.eval_tokens,
            "sha256": text_sha256(self._eval_tokens.text),  # of the text scored, as `clakit eval` records it
            "perplexity_before": self.results["perplexity_before"],
            "perplexity_after": self.results["perplexity_after"],
        }

    def _settings(self, dtype: str) -> ConvertSettings:
        source, revision = self.source, self.source.revision
        if source.kind == "dir" and source.path.parent.name == "snapshots":  # Hub cache: the folder is the commit
            revision = source.path.name
        local = source.kind == "gguf" or expand(source.spec, "model").exists()
        kind = source.kind if local else "hub"
        return ConvertSettings(
            source=source.spec, source_kind=kind, revision=revision, architecture=self.architecture,
            kv_source_layers=self.layout, layout=self.layout_name, kv_saving=kv_saving(self.layout), init=self.init,
            calib_data=[t.name for t in self.calib_texts] if self.calib_texts else None,
            calib_sha256=getattr(self, "calib_sha256", None) if self.calib_texts else None,
            calib_tokens=getattr(self, "calib_tokens", None), dtype=dtype,
            max_shard_size=str(self.cfg.max_shard_size), seed=self.cfg.seed,
            reconstruct_steps=self._reconstruct_steps() if self.init == "reconstruct" else None,
            distill_steps=self.distill_steps, distill_copy_fraction=self.copies[0], distill_copy_span=self.copies[1],
            seq_len=self.seq_len if self.calib_texts or self.eval_texts else None,  # no window read: none recorded
            calib_ids_sha256=getattr(self, "calib_ids_sha256", None) if self.calib_texts else None,
        )  # fmt: skip


# CLA: what the written tensors also depend on, beside clakit.provenance's clakit/transformers/torch: the reader of a
# GGUF file's (de)quantised blocks, the tokenizer library (calibration tokens, a GGUF's tokenizer), the writer
CONVERT_LIBRARIES = ("gguf", "tokenizers", "safetensors")


def _write_tensors(writer, tensors) -> str:
    """Write (name, tensor) pairs through `writer`; returns the written floating dtypes' names, the most tensors'
    first, joined by "+" ("bfloat16+float32": a source's bf16 weights with fp32 norms, written as they are; the
    first tensor's dtype alone was recorded for it). "float32" when none is floating."""
    counts: dict[str, int] = {}
    for name, tensor in tensors:
        writer.add(name, tensor)
        if tensor.is_floating_point():
            dtype = str(tensor.dtype).removeprefix("torch.")
            counts[dtype] = counts.get(dtype, 0) + 1
    writer.finish()
    return "+".join(sorted(counts, key=lambda d: -counts[d])) or "float32"


def _loaded_dtype(named, tensors: torch.dtype) -> torch.dtype:
    """The dtype `from_pretrained(dtype="auto")` loads the source in: its config's `dtype` (`named`) where it names
    one, else that of its tensors (`tensors`: the first floating one's). CLA: the converted config keeps it, so the
    CLA model loads as its source does: a config saying bfloat16 over fp32 tensors loaded the source in bf16 and the
    identity layout's conversion, whose config named the tensors' float32, in fp32 (other logits, twice the memory)."""
    named = getattr(torch, named, None) if isinstance(named, str) else named
    return named if isinstance(named, torch.dtype) and named.is_floating_point else tensors


def _tied(cla_cfg, lm_cls) -> dict[str, str]:
    """Tensor name -> the twin it is tied to (lm_head -> the embeddings), when the config ties them."""
    return dict(lm_cls._tied_weights_keys or {}) if cla_cfg.tie_word_embeddings else {}


def _free_memory(device: torch.device) -> int | None:
    """Bytes free on `device` (CUDA: the driver's count; CPU: MemAvailable), None when it cannot be told."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


@contextlib.contextmanager
def _space_named(out: Path, need: int):
    """The disk filling up during the write (space checked before, then taken by another process): the one line
    says how much the output takes, which the writer's own error ("No space left on device") does not."""
    try:
        yield
    except (OSError, SafetensorError) as e:
        if getattr(e, "errno", None) != errno.ENOSPC and "os error 28" not in str(e):
            raise
        reason = e.strerror if isinstance(e, OSError) else str(e).split("I/O error:", 1)[-1].strip()
        raise ClakitError(
            f"cannot write {out}: {reason}; the output takes {outputs.size_text(need)}: free that much beside it, or "
            "choose another output folder"
        ) from None
