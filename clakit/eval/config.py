"""`EvalConfig`: every setting of one evaluation, defined once.

The `clakit eval` flags are built from these fields (`clakit.settings.add_arguments`), `evaluate()` takes them as
keywords (or a whole EvalConfig), and the report's provenance records them. Passkey retrieval has its own settings
(`clakit.eval.passkey.PasskeySettings`, the `--passkey-*` flags). Every value is checked when the config is made,
before anything is read.
"""

import dataclasses
import math
from dataclasses import dataclass, field

from clakit import settings
from clakit.devices import DEVICES_HELP
from clakit.errors import ClakitError
from clakit.eval.perplexity import DEFAULT_SEQ_LEN, check_window
from clakit.provenance import settings_from_record
from clakit.settings import opt

DEFAULT_KV_BUDGET_GB = 16.0
EVAL_DTYPES = ("float32", "bfloat16", "float16")
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")  # transformers' placement strategies
PLACEMENT_GROUP = "placement (one of)"


@dataclass
class EvalConfig:
    """Settings of one evaluation. None means "the evaluation decides" as the help says."""

    data: list[str] | None = field(
        default=None,
        metadata=opt("text files, folders of .txt, or NAME:CONFIG:SPLIT (default wikitext:wikitext-2-raw-v1:test, "
                     "needs the Hub)", metavar="DATA", section="text and windows"),
    )  # fmt: skip
    seq_len: int | None = field(
        default=None,
        metadata=opt(f"tokens per window (default {DEFAULT_SEQ_LEN}, or the model's context window if shorter)"),
    )
    stride: int | None = field(
        default=None, metadata=opt("tokens between window starts (default: --seq-len, disjoint)")
    )
    max_tokens: int | None = field(
        default=None, metadata=opt("score at most this many tokens of the data (default: all)")
    )
    batch_size: int = field(default=4, metadata=opt("windows per forward, and the speed batch"))
    kv_budget_gb: float = field(default=DEFAULT_KV_BUDGET_GB, metadata=opt("KV-cache budget for the max-batch figure"))
    revision: str | None = field(
        default=None,
        metadata=opt("Hub revision of MODEL (of --source-model when MODEL is a local path)", section="model"),
    )
    source_model: str | None = field(
        default=None, metadata=opt("the model MODEL was converted from, for the KV saving factor")
    )
    trust_remote_code: bool = field(default=False, metadata=opt("allow MODEL's own modeling code"))
    allow_pickle: bool = field(default=False, metadata=opt("accept pickle (.bin) weights; they can run code"))
    lm_eval_tasks: str | list[str] | None = field(
        default=None,
        metadata=opt("comma-separated lm-eval task names or task YAML files (needs clakit[lm-eval]; stock tasks need "
                     "the Hub)", section="lm-eval tasks"),
    )  # fmt: skip
    lm_eval_include: list[str] | str | None = field(
        default=None, metadata=opt("folders of extra lm-eval task YAML files", metavar="DIR")
    )
    lm_eval_limit: int | None = field(default=None, metadata=opt("score at most N documents per lm-eval task"))
    lm_eval_fewshot: int | None = field(
        default=None, metadata=opt("few-shot examples per lm-eval prompt (default: the task's)")
    )
    speed: bool = field(default=True, metadata=opt("time prefill and decode", section="speed and weights"))
    decode_steps: int = field(default=16, metadata=opt("greedy decoding steps the decode speed is timed over"))
    device: str | None = field(
        default=None, metadata=opt(f"where the model runs: {DEVICES_HELP} (default auto)", group=PLACEMENT_GROUP)
    )
    device_map: str | None = field(
        default=None,
        metadata=opt("spread the layers over every visible GPU (then CPU memory) with transformers' device map, for "
                     "a model no single GPU holds", group=PLACEMENT_GROUP, choices=list(DEVICE_MAPS)),
    )  # fmt: skip
    dtype: str | None = field(
        default=None,
        metadata=opt("weights' dtype (default: the checkpoint's; GGUF: float32)", choices=list(EVAL_DTYPES)),
    )

    def __post_init__(self) -> None:
        settings.check_types(self, "eval")
        self._check_windows()
        if self.max_tokens is not None and self.max_tokens <= 0:
            raise ClakitError(f"--max-tokens must be a positive number of tokens, got {self.max_tokens}")
        if self.batch_size <= 0:
            raise ClakitError(f"--batch-size must be a positive integer, got {self.batch_size}")
        if self.decode_steps <= 0:  # 0 wrote decode_tokens_per_s 0.0, a report `clakit report` refuses
            raise ClakitError(f"--decode-steps must be a positive integer (decoding speed is timed over them), got "
                              f"{self.decode_steps}")  # fmt: skip
        if not self.speed and self.decode_steps != EvalConfig.decode_steps:  # recorded as if it had been timed
            raise ClakitError(f"--decode-steps {self.decode_steps} sets the decode speed's steps, which --no-speed "
                              "does not measure: drop one of them")  # fmt: skip
        if not (math.isfinite(self.kv_budget_gb) and self.kv_budget_gb > 0):
            raise ClakitError(f"--kv-budget-gb must be a positive number of GB, e.g. 16, got {self.kv_budget_gb}")
        self._check_placement()

    def _check_windows(self) -> None:
        """--stride against the windows it steps through: here when --seq-len is given, else against the model's
        default window once the config is read (suite._windows): a guessed default is not the window a
        shorter-context model gets."""
        if self.seq_len is not None:
            check_window(self.seq_len, self.stride)
        elif self.stride is not None and self.stride <= 0:
            raise ClakitError(f"--stride must be a positive number of tokens, got {self.stride}")

    def _check_placement(self) -> None:
        if self.dtype is not None and self.dtype not in EVAL_DTYPES:
            raise ClakitError(f"--dtype must be one of {', '.join(EVAL_DTYPES)}, got {self.dtype!r}")
        if self.device_map is not None and self.device is not None:
            raise ClakitError("give --device or --device-map, not both: --device-map places the layers itself")
        if self.device_map is not None and self.device_map not in DEVICE_MAPS:
            raise ClakitError(
                f"--device-map must be one of {', '.join(DEVICE_MAPS)} (transformers'), got {self.device_map!r}"
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_record(cls, record: dict) -> "EvalConfig":
        """The config a report's provenance.config recorded (to_dict's), every value checked again."""
        return settings_from_record(cls, record, "provenance.config")


def config_from_args(args) -> EvalConfig:
    """The EvalConfig of parsed `clakit eval` arguments (flags not given keep the field defaults)."""
    return EvalConfig(**settings.given(args, EvalConfig))
