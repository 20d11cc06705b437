"""`ConvertConfig`: every setting of a conversion, defined once.

The `clakit convert` flags are built from these fields (`add_arguments`), a recipe's `model.convert` section is
parsed into it, and `clakit_convert.json` records it whole. Each field's `metadata["help"]` is its flag's help;
`metadata["flag"]` holds extra argparse options (choices, metavar, a mutually exclusive group).
"""

import dataclasses
import math
from dataclasses import dataclass, field

from clakit import settings
from clakit.devices import DEVICES_HELP
from clakit.errors import ClakitError
from clakit.settings import flag, opt

INITS = ("producer", "mean", "calibrated", "reconstruct")
FIT_DTYPES = ("float32", "bfloat16")  # bf16 fits only on a GPU; statistics always accumulate in fp64
OUTPUT_DTYPES = ("float32", "float16", "bfloat16")
LAYOUT_GROUP = "layout (one of)"
LAYOUT_SECTION = "layout chosen on data (--layout auto)"
DEFAULT_DISTILL_STEPS = 50  # SmolLM2 at half the cache, measured in docs/quality.md
DEFAULT_DISTILL_COPY_FRACTION = 1.0  # SmolLM2: passkeys 0.52 -> 0.87 (0.5: 0.61), perplexity -0.2% (docs/quality.md)
DEFAULT_DISTILL_COPY_SPAN = 32
DEFAULT_SEQ_LEN = 512  # tokens per calibration/distillation/eval window, unless the model's context is shorter
SEED_LIMIT = 2**32  # torch.Generator().manual_seed takes 64-bit seeds; recipes use the same range


@dataclass
class ConvertConfig:
    """Settings of one conversion. None means "the converter decides" as the help says."""

    # layout
    factor: int | None = field(
        default=None,
        metadata=opt(
            "uniform CLA-K: groups of K adjacent layers (default without --calib-data: 2)", group=LAYOUT_GROUP
        ),
    )
    kv_source_layers: list[int] | None = field(
        default=None,
        metadata=opt("explicit layout, e.g. 0,0,2,2 (one entry per layer)", group=LAYOUT_GROUP, metavar="LIST"),
    )
    layout: str | None = field(
        default=None,
        metadata=opt(
            "choose the layout on calibration data (default with --calib-data)", group=LAYOUT_GROUP, choices=["auto"]
        ),
    )
    kv_saving: float | None = field(
        default=None,
        metadata=opt("with --layout auto: fraction of the KV cache to save (default 0.5)", section=LAYOUT_SECTION),
    )
    refine: bool = field(
        default=True, metadata=opt("--layout auto: refine the chosen layout beyond runs of adjacent layers")
    )
    refine_max_group: int | None = field(
        default=None,
        metadata=opt("--layout auto: largest group the refinement may create (default: the scoring's largest group)"),
    )
    # K/V initialisation and fitting
    init: str | None = field(
        default=None,
        metadata=opt(
            "shared K/V initialisation (default: mean; reconstruct when --calib-data is given)",
            choices=list(INITS),
            section="K/V initialisation and fitting",
        ),
    )
    calib_data: list[str] | None = field(
        default=None,
        metadata=opt("calibration text: files, folders, NAME:CONFIG:SPLIT (several: all are used)", metavar="TEXT"),
    )
    calib_tokens: int = field(default=32768, metadata=opt("calibration tokens to use"))
    seq_len: int | None = field(
        default=None,
        metadata=opt(
            f"tokens per calibration/evaluation sequence (default {DEFAULT_SEQ_LEN}, or the model's context window "
            "if shorter; a longer one is refused)"
        ),
    )
    ridge: float = field(default=1e-3, metadata=opt("calibrated fit: ridge, relative to the mean Fisher weight"))
    reconstruct_steps: int | None = field(
        default=None,
        metadata=opt(
            "--init reconstruct: Adam steps per group (default: 200, and up to 300 for a layout whose consumers are "
            "fewer than half the layers, in about the same fitting time)"
        ),
    )
    reconstruct_lr: float = field(default=3e-3, metadata=opt("--init reconstruct: Adam learning rate"))
    train_o_proj: bool = field(default=True, metadata=opt("--init reconstruct: also fit each member's o_proj"))
    sequential: bool = field(
        default=True,
        metadata=opt("--init reconstruct: fit each group on inputs with the earlier groups already converted"),
    )
    distill_steps: int | None = field(
        default=None,
        metadata=opt(
            "data-aware inits: Adam steps training the whole converted model's attention projections to match the "
            "original's next-token distributions on the calibration tokens (0: off; default: "
            f"{DEFAULT_DISTILL_STEPS} when the model fits the device, else off)"
        ),
    )
    distill_tokens: int = field(
        default=16384,
        metadata=opt(
            "--distill-steps: calibration tokens it trains on (from --calib-data, spread like --calib-tokens)"
        ),
    )
    distill_lr: float = field(default=5e-4, metadata=opt("--distill-steps: Adam's peak learning rate (cosine decay)"))
    distill_copy_fraction: float | None = field(
        default=None,
        metadata=opt(
            "--distill-steps: share (0-1) of its windows that end with a repeat of an earlier span of the same "
            f"window, which keeps in-context retrieval (passkeys) (default: {DEFAULT_DISTILL_COPY_FRACTION})"
        ),
    )
    distill_copy_span: int | None = field(
        default=None,
        metadata=opt(
            f"--distill-copy-fraction: tokens per repeat, 1 to half of --seq-len (default: {DEFAULT_DISTILL_COPY_SPAN}"
            ", at most half of --seq-len)"
        ),
    )
    seed: int = field(default=0, metadata=opt("seed for data-aware fitting"))
    device: str = field(default="auto", metadata=opt(f"where the fits run: {DEVICES_HELP}"))
    dtype: str = field(
        default="float32",
        metadata=opt("dtype of the weights during the fits (bfloat16 only on a GPU)", choices=list(FIT_DTYPES)),
    )
    bf16: bool = field(
        default=False,
        metadata=opt(
            "compute the layout search, the fits and the distillation in bfloat16 (torch.autocast) over float32 "
            "weights; the fitted tensors and the quick check stay float32. Faster only on a GPU or a CPU with native "
            "bfloat16 kernels (AMX or AVX512-BF16; SmolLM2 on 2 such cores: 11 min 13 s -> 7 min 48 s)"
        ),
    )
    # quick check
    eval_data: list[str] | None = field(
        default=None,
        metadata=opt(
            "held-out text (several: all are used): print perplexity before/after",
            metavar="TEXT",
            section="quick check",
        ),
    )
    eval_tokens: int = field(default=8192, metadata=opt("--eval-data tokens scored before and after"))
    # source and output
    revision: str | None = field(
        default=None, metadata=opt("Hub revision (branch, tag or commit) of SRC", section="source and output")
    )
    allow_pickle: bool = field(default=False, metadata=opt("accept pickle (.bin) weights; they can run code"))
    trust_remote_code: bool = field(default=False, metadata=opt("allow SRC's own code (config/tokenizer)"))
    output_dtype: str | None = field(
        default=None,
        metadata=opt("dtype of the written weights (default: the source's)", choices=list(OUTPUT_DTYPES)),
    )
    max_shard_size: str = field(default="5GB", metadata=opt("largest output shard"))

    def __post_init__(self) -> None:
        settings.check_types(self, "convert")
        for f in dataclasses.fields(self):  # inf/nan pass the type check; no setting means anything by them
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ClakitError(f"--{flag(f.name)} must be a finite number, got {value}")
        if not 0 <= self.seed < SEED_LIMIT:
            raise ClakitError(f"--seed must be between 0 and 2**32 - 1, got {self.seed}")
        if self.init is not None and self.init not in INITS:
            raise ClakitError(f"--init must be one of {', '.join(INITS)}, got {self.init!r}")
        for name, unit in (("calib_tokens", "tokens"), ("seq_len", "tokens"), ("reconstruct_steps", "steps"),
                           ("eval_tokens", "tokens"), ("distill_tokens", "tokens")):  # fmt: skip
            if getattr(self, name) is not None and getattr(self, name) <= 0:  # seq_len None: the default
                raise ClakitError(f"--{flag(name)} must be a positive number of {unit}, got {getattr(self, name)}")
        for name in ("seq_len", "eval_tokens"):  # one token has no next token: every NLL, Fisher and KL is 0/0
            if getattr(self, name) == 1:
                raise ClakitError(f"--{flag(name)} 1 leaves no next token to predict; use 2 or more")
        if self.distill_steps is not None and self.distill_steps < 0:
            raise ClakitError(f"--distill-steps must be 0 (off) or a number of steps, got {self.distill_steps}")
        for name in ("ridge", "reconstruct_lr", "distill_lr"):
            if not getattr(self, name) > 0:
                raise ClakitError(f"--{flag(name)} must be > 0, got {getattr(self, name)}")
        if self.distill_copy_fraction is not None and not 0 <= self.distill_copy_fraction <= 1:
            raise ClakitError(f"--distill-copy-fraction must be between 0 and 1, got {self.distill_copy_fraction}")
        if self.distill_copy_span is not None and self.distill_copy_span < 1:
            raise ClakitError(f"--distill-copy-span must be a positive number of tokens, got {self.distill_copy_span}")
        if self.refine_max_group is not None and self.refine_max_group < 2:
            raise ClakitError(f"--refine-max-group must be at least 2, got {self.refine_max_group}")
        if self.dtype not in FIT_DTYPES:
            raise ClakitError(f"--dtype (of the fits) must be one of {', '.join(FIT_DTYPES)}, got {self.dtype!r}")
        if self.output_dtype is not None and self.output_dtype not in OUTPUT_DTYPES:
            raise ClakitError(f"--output-dtype must be one of {', '.join(OUTPUT_DTYPES)}, got {self.output_dtype!r}")
        from clakit.convert.checkpoint import parse_size  # here (torch) so that a recipe's --dry-run checks it too

        parse_size(self.max_shard_size)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def parse_layers(text: str) -> list[int]:
    """`"0,0,2,2"` -> [0, 0, 2, 2] (checked against the model's layer count later)."""
    try:
        return [int(x) for x in text.replace(" ", "").split(",")]
    except ValueError:
        raise ClakitError(f"--kv-source-layers must be comma-separated integers like 0,0,2,2; got {text!r}") from None


def add_arguments(parser) -> None:
    """One flag per ConvertConfig field (clakit.settings.add_arguments)."""
    settings.add_arguments(parser, ConvertConfig)


def config_from_args(args) -> ConvertConfig:
    """The ConvertConfig of parsed `clakit convert` arguments (flags not given keep the field defaults)."""
    given = settings.given(args, ConvertConfig)
    if isinstance(given.get("kv_source_layers"), str):
        given["kv_source_layers"] = parse_layers(given["kv_source_layers"])
    return ConvertConfig(**given)


def command_line(src: str, out: str, cfg: ConvertConfig, *, cwd: str | None = None, threads: int | None = None,
                 pinned: dict | None = None) -> str:
    """The `clakit convert` command that restores `cfg` whole: one flag per field whose value is not the field's
    default (a default that later changes would otherwise change the rerun), list items one `--flag=ITEM` each (an
    item starting with `-` is not read as a flag), local text paths made absolute from `cwd` (the command works from
    any folder), `pinned` fields (revision: the Hub commit read; distill_steps: the default as resolved on this
    machine) written over `cfg`'s, and the thread count the fits' reductions split by (`OMP_NUM_THREADS`)."""
    import shlex

    values = {**cfg.to_dict(), **(pinned or {})}
    args = ["clakit", "convert", src, out]
    for f in dataclasses.fields(ConvertConfig):
        value = values[f.name]
        if value == f.default or value is None:
            continue
        name = flag(f.name)
        if isinstance(value, bool):
            args.append(f"--{name}" if value else f"--no-{name}")
        elif f.name == "kv_source_layers":
            args.append(f"--{name}={','.join(map(str, value))}")
        elif isinstance(value, list):
            for item in value:
                args.append(f"--{name}={_absolute(item, cwd)}")
        else:
            args.append(f"--{name}={value!r}" if isinstance(value, float) else f"--{name}={value}")
    env = [f"OMP_NUM_THREADS={threads}"] if threads else []
    return shlex.join([*env, *args])


def _absolute(spec: str, cwd: str | None) -> str:
    """A text spec as an absolute path where it names a local file or folder (relative ones from `cwd`, `~` expanded);
    as typed otherwise (a datasets spec, a name this user cannot resolve)."""
    from pathlib import Path

    try:
        local = Path(cwd or ".", Path(spec).expanduser())
        return str(local.resolve()) if local.exists() else spec
    except (OSError, RuntimeError, ValueError):
        return spec
