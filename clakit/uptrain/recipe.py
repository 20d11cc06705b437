"""Uptraining recipes: strict YAML -> dataclasses, with dotted `key=value` overrides from the command line.

Strict means: an unknown key is an error naming it and the valid keys; a value of the wrong type is an error naming
the key and the type wanted. Numbers written `3e-4` (which YAML 1.1 reads as a string) are accepted for float
fields. Section and field names follow upstream: `train` uses transformers' `TrainingArguments` names, `lora` uses
peft's `LoraConfig` names.
"""

import collections.abc
import dataclasses
import datetime
import difflib
import hashlib
import importlib.resources
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from clakit import settings
from clakit.convert.config import ConvertConfig
from clakit.corpus import (
    check_each_once,
    check_text_spec,
    datasets_spec,
    holds,
    is_datasets_spec,
    local_path,
    same_spec_text,
)
from clakit.errors import ClakitError
from clakit.paths import expand
from clakit.sources import check_revision

# train keys that do not change the trained weights: outside the fingerprint, so --resume may change them
RUN_ONLY = (  # where and how often it writes, and the held-out scoring batch: never what it trains
    "output_dir",
    "save_steps",
    "save_total_limit",
    "logging_steps",
    "report_to",
    "eval_steps",
    "per_device_eval_batch_size",
)
# model keys that say what may be read, not what is trained, and the flag that sets each (convert's, which `clakit
# uptrain` takes too: clakit.cli builds its flags from this table): outside the fingerprint too (a run recorded
# before they existed resumes, and a resume may add them)
MODEL_READ_FLAGS = {"trust_remote_code": "--trust-remote-code", "allow_pickle": "--allow-pickle"}
MODEL_RUN_ONLY = tuple(MODEL_READ_FLAGS)
LR_SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup", "cosine_with_min_lr")
REPORTERS = ("none", "tensorboard")
# a warmup starts at learning rate 0: refused here when max_steps says 1, by trainer.check_plan when the steps come
# from max_tokens or epochs
ONE_STEP_WARMUP = (
    "the run has 1 step and a warmup, whose first step trains at learning rate 0: nothing would be learned; "
    "set train.warmup_steps=0 train.warmup_ratio=0, or train more steps"
)


@dataclass
class ModelSection:
    path: str | None = None  # an already converted CLA checkpoint
    source: str | None = None  # a Llama/Mistral folder, .gguf file or Hub id, converted with `convert`
    revision: str | None = None
    convert: ConvertConfig | None = None  # clakit.convert's settings, strict (unknown keys refused)
    # the stock model the converted one came from: the teacher and the "original" eval baseline (default:
    # model.source, or the source recorded in model.path's clakit_convert.json)
    original: str | None = None
    # run code shipped with a model (a config or tokenizer with an auto_map, e.g. a custom tokenizer class) when any
    # model of the run is read: the source and its conversion, the student's tokenizer, the original/teacher. Off:
    # such a model is refused naming this key. The CLA student itself always loads clakit's own classes.
    trust_remote_code: bool = False
    # read pickle (.bin) weights, which can run code when loaded: of the source / original, and of model.path (f1186ab)
    allow_pickle: bool = False


@dataclass
class DataSection:
    train: list[str] = field(default_factory=list)  # files, folders of .txt, or datasets specs NAME:CONFIG:SPLIT
    eval: list[str] | None = None  # held-out text; default: the last `eval_fraction` of the train text
    seq_len: int = 512
    eval_fraction: float = 0.05
    eval_max_tokens: int = 16384  # held-out tokens scored at start, every eval_steps and at the end
    # long-range copying is what shared K/V loses first (passkey retrieval) and plain prose rarely asks for:
    # this share of the train windows end with a repeat of `copy_span` tokens from earlier in the same window
    copy_fraction: float = 0.0
    copy_span: int = 32


@dataclass
class TrainSection:
    output_dir: str = ""
    max_steps: int = -1  # > 0 wins over max_tokens and num_train_epochs; -1: not set
    max_tokens: int | None = None  # a token budget (> 0): steps = ceil(max_tokens / tokens per step)
    num_train_epochs: float = 1.0
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0  # 0: no clipping
    per_device_train_batch_size: int = 4
    per_device_eval_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    lr_scheduler_type: str = "cosine"
    bf16: bool = False
    gradient_checkpointing: bool = False
    seed: int = 0  # 0 <= seed < 2**32 (numpy's range; accelerate seeds python, numpy and torch)
    save_steps: int = 100  # 0: no intermediate checkpoints
    save_total_limit: int | None = 2  # null: keep every checkpoint
    logging_steps: int = 10
    eval_steps: int = 0  # 0: held-out loss at start and end only
    report_to: list[str] = field(default_factory=list)  # [] / ["none"] / ["tensorboard"]


@dataclass
class LoraSection:
    r: int = 16  # 0: no LoRA (only the `full_train` modules learn)
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    # modules trained in full: glob on module names, optionally prefixed `producers.` / `consumers.`,
    # e.g. ["k_proj", "v_proj", "consumers.q_proj"] (only producers have k_proj/v_proj)
    full_train: list[str] = field(default_factory=list)


@dataclass
class DistillSection:
    weight: float = 0.0  # loss = weight * KL * T^2 + (1 - weight) * CE + hidden_mse_weight * MSE; 0: no teacher
    temperature: float = 1.0
    hidden_mse_weight: float = 0.0  # relative MSE of every layer's output hidden states


@dataclass
class Recipe:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    lora: LoraSection = field(default_factory=LoraSection)
    distill: DistillSection = field(default_factory=DistillSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_record(cls, record: dict) -> "Recipe":
        """The recipe a run recorded (run.json's and uptrain.json's `recipe`: to_dict's), built as strictly as a
        recipe file: a section or key the record lacks (written before it existed) takes its default, an unknown one
        is refused naming it. Not validated again: a later clakit's cross-field checks are not the recorded run's."""
        return _build(cls, record, "")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def text_specs(self) -> list[str]:
        """Every text the run reads: data.train, data.eval, and the conversion's calibration and eval text."""
        return [spec for _, spec in self.keyed_text_specs()]

    def keyed_text_specs(self) -> list[tuple[str, str]]:
        """text_specs as (the recipe key that gives it, spec), for messages that name the key."""
        convert = self.model.convert
        keyed = [("data.train", self.data.train), ("data.eval", self.data.eval)]
        if convert:
            keyed += [("model.convert.calib_data", convert.calib_data), ("model.convert.eval_data", convert.eval_data)]
        return [(key, spec) for key, specs in keyed for spec in specs or []]

    def fingerprint(self) -> str:
        """Hash of the settings that change the trained weights (not logging/saving/output settings, not where the
        files are: identity())."""
        d = identity(self.to_dict())
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def needs_teacher(self) -> bool:
        return self.distill.weight > 0 or self.distill.hidden_mse_weight > 0


# --- what makes two recipes the same run --------------------------------------------------------------------------

# the recipe keys that name files or folders: (section, ..., key)
MODEL_PATH_KEYS = (("model", "path"), ("model", "source"), ("model", "original"))
DATA_PATH_KEYS = (
    ("data", "train"),
    ("data", "eval"),
    ("model", "convert", "calib_data"),
    ("model", "convert", "eval_data"),
)


def identity(recipe: dict) -> dict:
    """A recipe dict (to_dict's, or as run.json recorded it) as the settings that change the trained weights: the
    keys RUN_ONLY and MODEL_RUN_ONLY name left out, and the keys naming files too, for where a file is is not what it
    holds (`data/a.txt` typed in /w, `/w/data/a.txt`, or the project moved to /v: one run). What was read is
    recorded by content or by the path it resolved to, and --resume reads or checks that instead: the text by
    run.json's data_sha256 (the packed blocks), the start checkpoint and the original by the folders run.json
    recorded, the calibration text by the conversion record's calib_sha256 (the conversion is in the run folder);
    a model key or calib_data typed otherwise is compared with those (pipeline.resumed_model)."""
    d = json.loads(json.dumps(recipe))  # a copy
    for key in RUN_ONLY:
        (d.get("train") or {}).pop(key, None)
    for key in MODEL_RUN_ONLY:
        (d.get("model") or {}).pop(key, None)
    for keys in MODEL_PATH_KEYS + DATA_PATH_KEYS:
        section = d
        for part in keys[:-1]:
            section = section.get(part) if isinstance(section, dict) else None
        if isinstance(section, dict):
            section.pop(keys[-1], None)
    return d


def located_text(recipe: dict, cwd: str | None) -> dict[str, object]:
    """{"data.train": [...], "data.eval": [...]} of a recipe dict, each local path as the file or folder it names from
    `cwd` (the folder it was typed in; None: as typed), a datasets spec as typed: what --resume compares where the
    tokens cannot be (pipeline.check_same_data)."""
    data = recipe.get("data") if isinstance(recipe.get("data"), dict) else {}
    return {f"data.{key}": _located(data.get(key), cwd) for key in ("train", "eval")}


def _located(spec, cwd: str | None):
    if isinstance(spec, list):
        return [_located(s, cwd) for s in spec]
    if not isinstance(spec, str) or cwd is None:
        return spec
    path = Path(cwd, expand(spec, "data"))  # an absolute spec stays itself
    if path.exists():
        return str(path.resolve())
    return spec if is_datasets_spec(spec) else os.path.normpath(path)


# --- strict conversion of plain YAML data into the dataclasses ---------------------------------------------------


def _type_name(tp) -> str:
    names = {int: "an integer", float: "a number", bool: "true/false", str: "a string"}
    if tp in names:
        return names[tp]
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is list:
        return f"a list of {_type_name(args[0]).removeprefix('a ').removeprefix('an ')}s"
    return "a mapping"




def _coerce(value, tp, where: str):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if isinstance(value, _Yaml11Int | _Yaml11Float) and tp in (int, float):
        digits = value.text.replace("_", "")
        sign = "-" if digits.startswith("-") and value else ""
        meant = "" if ":" in digits else f", e.g. {where}={sign}{digits.lstrip('+-').lstrip('0') or '0'}"
        raise ClakitError(
            f"recipe key {where} is written {value.text}, which YAML reads as {value!r} (a leading 0 is octal, "
            f"a ':' counts in base 60); write the number without them{meant}"
        )
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if origin is list:
        if isinstance(value, str) and "," in value:  # `key=a,b` on the command line is one string, not two items
            raise ClakitError(_list_fix(value, where))
        items = [value] if isinstance(value, str | int | float) and not isinstance(value, bool) else value
        if not isinstance(items, list):
            raise ClakitError(
                f"recipe key {where} must be {_type_name(tp)}, got {settings.shown(value)}{_fix(value, tp, where)}"
            )
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(items)]
    if tp is float and isinstance(value, str | int) and not isinstance(value, bool):
        return _finite(value, where)
    if tp is float and isinstance(value, float):
        return _finite(value, where)
    if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    got = settings.shown(value)
    raise ClakitError(f"recipe key {where} must be {_type_name(tp)}, got {got}{_fix(value, tp, where)}")


def _fix(value, tp, where: str) -> str:
    """How to write what was probably meant: YAML reads an unquoted 0123 as the octal 83, 1234567 as a number and
    yes/no/on/off as booleans (a revision, a file name), and 1e6 as a string (a token count). The advice is written
    for both places a value comes from: a `key=value` override typed in a shell (which removes one pair of quotes
    before YAML sees the value) and the recipe file; an item of a list (`where` = `data.train[0]`) is written in the
    list's own key, as `data.train[0]=...` is no key."""
    if value is None:  # `train.output_dir=~` (a home folder meant) read as YAML's null: "got None" named no cause
        path = ", e.g. a path under the home folder as ~/NAME" if tp is str else ""
        return f" (YAML reads a bare ~, null or an empty value as null); give a value{path}"
    if tp is str and isinstance(value, int | float | bool | datetime.date):
        kind = {_Yaml11Int: "int", _Yaml11Float: "float"}.get(type(value), type(value).__name__)
        return f" (YAML read the unquoted value as {kind}); quote it, e.g. {_both(where, 'VALUE')}"
    if tp is int and isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return ""
        if math.isfinite(number) and number.is_integer():
            return f"; write it as a whole number: {_whole(where, int(number))}"
    return ""


def _both(where: str, text: str) -> str:
    """`model.revision='VALUE' (in a shell: "model.revision='VALUE'"; in the recipe file: revision: 'VALUE')`: a
    quoted string as an override and as a recipe line; a list item as a one-item list of its key."""
    key, item = where.rpartition("[")[0], where.endswith("]")
    if item:
        return f"\"{key}=['{text}']\" in a shell (each such item quoted), {_leaf(key)}: ['{text}'] in the recipe file"
    return f"{where}='{text}' (in a shell: \"{where}='{text}'\"; in the recipe file: {_leaf(where)}: '{text}')"


def _whole(where: str, number: int) -> str:
    """`train.max_tokens=100000000 (in the recipe file: max_tokens: 100000000)`; a list item named in its list."""
    if where.endswith("]"):
        return f"{number}, as item {where.rpartition('[')[2][:-1]} of {where.rpartition('[')[0]}"
    return f"{where}={number} (in the recipe file: {_leaf(where)}: {number})"


def _leaf(where: str) -> str:
    return where.rpartition(".")[2]


def _list_fix(value: str, where: str) -> str:
    """The refusal of `key=a,b` (one string): the list written in the recipe file, as a shell override (quoted, or
    the shell splits `[a, b]` at the space) and as one item holding the comma."""
    items = ", ".join(v.strip() for v in value.split(","))
    return (
        f"recipe key {where} is a list: write [{items}] (in a shell: '{where}=[{items}]'; one item holding a comma: "
        f"\"{where}=['{value}']\")"
    )


def _finite(value, where: str) -> float:
    """A float from YAML: "3e-4" (YAML 1.1 reads exponents without a dot as strings) and ints too; `.inf`/`.nan`
    are valid YAML but no setting means anything with them."""
    try:
        number = float(value)
    except (ValueError, OverflowError):
        raise ClakitError(f"recipe key {where} must be a number, got {settings.shown(value)}") from None
    if not math.isfinite(number):
        raise ClakitError(f"recipe key {where} must be a finite number, got {settings.shown(value)}")
    return number


def _build(cls, data, where: str):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        got = settings.shown(data)
        raise ClakitError(f"recipe section {where or 'top level'} must be a mapping of keys, got {got}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            place = f"{where}.{key}" if where else str(key)
            close = difflib.get_close_matches(str(key).replace("-", "_"), names, n=1)
            hint = f" (did you mean {f'{where}.{close[0]}' if where else close[0]}?)" if close else ""
            raise ClakitError(f"unknown recipe key {place!r}{hint}; valid keys here: {', '.join(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ClakitError as e:  # a section that checks itself (ConvertConfig) names its CLI flags: say where it is
        raise section_refusal(e, cls, where) from None


def section_refusal(error: ClakitError, cls, where: str, named: bool = True) -> ClakitError:
    """A refusal of the settings dataclass `cls` as the recipe section `where` reads it: each CLI flag it names given
    its key (settings.recipe_keys: `clakit uptrain` has no --layout), after "recipe section WHERE: " (`named`)."""
    text = settings.recipe_keys(str(error), cls, where)
    return ClakitError(f"recipe section {where}: {text}" if named else text)


# --- overrides and loading --------------------------------------------------------------------------------------


def apply_override(raw: dict, override: str) -> None:
    """`train.max_steps=10` -> raw["train"]["max_steps"] = 10 (the value is read as YAML: 1e-3, [a, b], null; a
    mapping is merged into the section it names)."""
    key, sep, text = override.partition("=")
    if not sep or not key.strip():
        raise ClakitError(f"override {override!r} must look like section.key=value, e.g. train.max_steps=10")
    try:
        value = yaml.load(text, StrictLoader) if text.strip() else None
        node = yaml.compose(text, StrictLoader) if text.strip() else None
    except RecursionError:
        raise ClakitError(f"override {settings.shown(override)}: the value {NESTING}") from None
    except yaml.YAMLError as e:
        raise ClakitError(
            f"override {override!r}: the value is not valid YAML ({_one_line(getattr(e, 'problem', None) or e)}); "
            "write e.g. train.max_steps=10, 'data.train=[a.txt, b.txt]', or quote a string (in a shell: "
            "\"key='[text'\")"
        ) from None
    if node is None and text.strip().startswith("#"):  # `train.save_total_limit=#3`: all comment, read as null
        raise ClakitError(
            f"override {settings.shown(override)}: YAML reads a value starting with '#' as a comment, so the value "
            f"would be null; quote it (in a shell: \"{key.strip()}='{_quoted(text)}'\"), or write {key.strip()}=null"
        )
    if node is not None and text[node.end_mark.index :].strip().startswith("#"):  # `runs/exp #2`: YAML's comment
        fix = f"quote it (in a shell: \"{key.strip()}='{_quoted(text)}'\")" if isinstance(value, str) else "drop it"
        raise ClakitError(
            f"override {settings.shown(override)}: YAML reads ' #' as the start of a comment, so the value would be "
            f"{settings.shown(value)}; {fix}"
        )
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = _merged(node.get(parts[-1]), value)


def _quoted(text: str) -> str:
    """`text` inside YAML single quotes, its own quotes doubled (`it's` -> `it''s`): the fix named was invalid YAML."""
    return text.strip().replace("'", "''")


def _merged(old, new):
    """A mapping given for a section (`lora={r: 8}`) sets the keys it names, as `lora.r=8` would; the others keep
    the recipe's values (replacing the section would silently reset them to the defaults). `section=null` resets
    it; any other value replaces."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return new
    return {**old, **{k: _merged(old.get(k), v) for k, v in new.items()}}


def shipped_recipes() -> Path:
    """The recipes that come with clakit: the repo's recipes/ when running from a source checkout, else the same
    files installed as package data `clakit.recipes` (pyproject maps recipes/ onto that package; no copy)."""
    root = Path(__file__).resolve().parents[2]
    if (root / "recipes").is_dir() and (root / "pyproject.toml").is_file():
        return root / "recipes"
    return Path(str(importlib.resources.files("clakit.recipes")))  # a regular package: a real folder


def resolve_recipe(path: str | Path) -> Path:
    """`path` when it exists; else the shipped recipe it names, written as in the docs (`recipes/smollm2/x.yaml`)
    or short (`smollm2/x`), so the documented commands work from any folder after `pip install clakit`."""
    given = expand(path, "recipe")
    if given.is_file() or given.is_absolute():
        return given
    parts = given.parts[1:] if given.parts[:1] == ("recipes",) else given.parts
    if not parts:
        return given
    shipped = shipped_recipes().joinpath(*parts)
    shipped = shipped if shipped.suffix in (".yaml", ".yml") else shipped.with_name(shipped.name + ".yaml")
    return shipped if shipped.is_file() else given


class _Yaml11Int(int):
    """An int YAML 1.1 read from `0755` (octal 493) or `1:30` (base 60: 90): `text` is how it was written."""

    def __new__(cls, value: int, text: str):
        number = super().__new__(cls, value)
        number.text = text
        return number


class StrictLoader(yaml.SafeLoader):
    """yaml.safe_load, refusing a key given twice in one mapping (PyYAML keeps the last one silently). Merge keys
    (`<<: *defaults`) work as in safe_load: the keys written beside them override the merged ones, by design."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # no value of its own: SafeLoader flattens it below
                continue
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, collections.abc.Hashable):  # `? [a, b] : 1`: `in seen` was a TypeError traceback
                raise yaml.constructor.ConstructorError(
                    None, None, f"a {type(key).__name__} is given as a key; keys are names", key_node.start_mark
                )
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice in one mapping", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)

    def construct_yaml_int(self, node):
        value = super().construct_yaml_int(node)
        digits = node.value.replace("_", "").lstrip("+-")
        if ":" in digits or (len(digits) > 1 and digits[0] == "0" and digits[1] not in "xXbB"):
            return _Yaml11Int(value, node.value)
        return value

    def construct_yaml_float(self, node):
        value = super().construct_yaml_float(node)
        return _Yaml11Float(value, node.value) if ":" in node.value else value  # `1:30.5`: base 60, 90.5


class _Yaml11Float(float):
    """A float YAML 1.1 read in base 60 (`1:30.5` is 90.5): `text` is how it was written."""

    def __new__(cls, value: float, text: str):
        number = super().__new__(cls, value)
        number.text = text
        return number


StrictLoader.add_constructor("tag:yaml.org,2002:int", StrictLoader.construct_yaml_int)
StrictLoader.add_constructor("tag:yaml.org,2002:float", StrictLoader.construct_yaml_float)

NESTING = "nests lists or mappings too deeply for a recipe (hundreds of levels); a recipe is a few levels deep"


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        names = ", ".join(sorted(str(p.relative_to(shipped_recipes())) for p in shipped_recipes().glob("*/*.yaml")))
        what = "is a folder" if path.is_dir() else "does not exist"
        raise ClakitError(f"recipe {path} {what}; give a recipe YAML file or a shipped recipe ({names})")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), StrictLoader)
    except UnicodeDecodeError as e:
        raise ClakitError(
            f"recipe {path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); save it as UTF-8"
        ) from None
    except OSError as e:
        raise ClakitError(f"cannot read recipe {path}: {e.strerror or e}") from None
    except RecursionError:
        raise ClakitError(f"recipe {path} {NESTING}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise ClakitError(f"recipe {path} is not valid YAML{at}: {_one_line(getattr(e, 'problem', e))}") from None
    if not isinstance(raw, dict):
        raise ClakitError(f"recipe {path} must be a YAML mapping with sections model, data, train, lora, distill")
    return raw


def _one_line(problem) -> str:
    """PyYAML's reader errors (a NUL or other control character) say where on a second line: one line here."""
    return " ".join(str(problem).split())


def load_recipe(path: str | Path, overrides: typing.Sequence[str] = ()) -> Recipe:
    """Read, override and validate a recipe; ClakitError names the first problem."""
    raw = _read_yaml(resolve_recipe(path))
    for override in overrides:
        apply_override(raw, override)
    recipe = _build(Recipe, raw, "")
    validate(recipe)
    return recipe


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ClakitError(message)


SEED_LIMIT = 2**32  # numpy's seeds are 32-bit; accelerate's set_seed seeds numpy too


def validate(recipe: Recipe) -> None:
    """Cross-field and range checks the types alone do not catch (every float is already finite)."""
    _validate_model(recipe.model)
    _check_no_variables(recipe)
    _check_datasets_specs(recipe)  # first: an empty spec is "." to the path comparisons below
    _validate_data(recipe.data)
    _check_calibration_held_out(recipe)
    _validate_train(recipe.train)
    _validate_lora(recipe.lora)
    ds = recipe.distill
    _check(0 <= ds.weight <= 1, f"distill.weight must be between 0 and 1, got {ds.weight}")
    _check(ds.temperature > 0, f"distill.temperature must be > 0, got {ds.temperature}")
    _check(ds.hidden_mse_weight >= 0, f"distill.hidden_mse_weight must be >= 0, got {ds.hidden_mse_weight}")


def _validate_model(m: ModelSection) -> None:
    _check(bool(m.path) != bool(m.source), "recipe needs exactly one of model.path (a CLA checkpoint) or model.source")
    _check(not (m.path and m.convert), "model.convert applies to model.source, not to an already converted model.path")
    check_revision(m.revision, m.path or m.source, m.original, option="model.revision")
    c = m.convert
    if c is None:
        return
    # one setting for every load: the conversion's alone would convert, then fail reading the source's tokenizer
    for key in MODEL_RUN_ONLY:
        _check(
            getattr(m, key) or not getattr(c, key),
            f"model.convert.{key} applies to the conversion only, but the run reads the source again (its "
            f"tokenizer, the teacher): set model.{key}=true instead, which the conversion uses too",
        )
    # one revision for every read of model.source too: the conversion's alone would convert one commit while the
    # student's tokenizer, the teacher and the "original" baseline are read at model.revision (or the default branch)
    _check(
        c.revision is None or c.revision == m.revision,
        f"model.convert.revision {c.revision} applies to the conversion only, but the run reads model.source again "
        "(its tokenizer, the teacher, the original's numbers) at model.revision "
        f"({m.revision or 'the default branch'}): set model.revision instead, which the conversion uses too",
    )
    check_revision(c.revision, m.source, option="model.convert.revision")  # a local source: the conversion refuses it
    # seed, calib_tokens and reconstruct_steps are ConvertConfig's own checks (refused while the section is parsed)
    _check(c.factor is None or c.factor > 0, f"model.convert.factor must be positive (or null), got {c.factor}")
    _check(
        c.kv_saving is None or 0 < c.kv_saving < 1,
        f"model.convert.kv_saving must be between 0 and 1 (0.5 halves the KV cache), got {c.kv_saving}",
    )


def _check_no_variables(recipe: Recipe) -> None:
    """A recipe's paths expand `~` but not environment variables: `output_dir: $HOME/runs/x` wrote into a folder
    literally named `$HOME` under the working directory. A path naming a variable that is not there is refused."""
    keyed = [(".".join(keys), _get(recipe, keys)) for keys in (*MODEL_PATH_KEYS, ("train", "output_dir"))]
    keyed += recipe.keyed_text_specs()
    for key, spec in keyed:
        for item in spec if isinstance(spec, list) else [spec]:
            if isinstance(item, str) and re.search(r"\$(\{|[A-Za-z_])", item) and not expand(item, key).exists():
                raise ClakitError(
                    f"{key} {item!r} names an environment variable, and recipe paths do not expand them (only ~): "
                    "write the path out, or give it as an override from the shell, which expands it "
                    f"(\"{key}=$VAR/...\")"
                )


def _get(recipe: Recipe, keys: tuple[str, ...]):
    node = recipe
    for key in keys:
        node = getattr(node, key, None)
    return node


def _validate_data(d: DataSection) -> None:
    _check(bool(d.train), "recipe needs data.train: text files, folders of .txt or datasets specs")
    # [] read as "given" here and as "not given" by packing (the tail held out, eval_fraction unchecked)
    _check(d.eval != [], "data.eval is an empty list: give held-out texts, or drop the key to hold out the end of "
           "data.train (data.eval_fraction)")  # fmt: skip
    for spec in d.eval or []:
        for train in d.train:
            _check(
                not same_spec_text(train, spec),
                f"data.eval {spec} is (or holds) training text {train}: its numbers would not be held out; give text "
                "that is not in data.train, or drop data.eval to hold out the end of the train text",
            )
    _check(d.seq_len >= 8, f"data.seq_len must be at least 8, got {d.seq_len}")
    # like copy_span without copies: a value that does nothing (data.eval is held out instead) is not checked
    _check(
        d.eval is not None or 0 < d.eval_fraction < 1,
        f"data.eval_fraction must be between 0 and 1, got {d.eval_fraction}",
    )
    _check(  # both values and both ways out: a data.seq_len beyond the model's window is found once it is read
        d.eval_max_tokens >= d.seq_len,
        f"data.eval_max_tokens ({d.eval_max_tokens}) must be at least data.seq_len ({d.seq_len}), one held-out "
        "window; raise data.eval_max_tokens or lower data.seq_len",
    )
    _check(0 <= d.copy_fraction <= 1, f"data.copy_fraction must be between 0 and 1, got {d.copy_fraction}")
    _check(
        d.copy_fraction == 0 or 1 <= d.copy_span <= d.seq_len // 2,
        f"data.copy_span must be between 1 and data.seq_len / 2 = {d.seq_len // 2} (the copy and its source share "
        f"one window), got {d.copy_span}",
    )


def _check_datasets_specs(recipe: Recipe) -> None:
    """Each text spec naming no local file is a well-formed datasets spec (corpus.datasets_spec), refused here before
    the run (and its --dry-run) rather than when the text is read; and none is named twice under one key."""
    keyed = recipe.keyed_text_specs()
    for key, spec in keyed:
        check_text_spec(spec, key)
        if local_path(spec, key) is None:
            datasets_spec(spec, key)
    for key in dict(keyed):  # a text listed twice under one key (across keys: the held-out checks)
        check_each_once([spec for k, spec in keyed if k == key], key)


def _check_calibration_held_out(recipe: Recipe) -> None:
    """The conversion fits the model on its calibration text: held-out numbers on that text would not be held out
    (the converted model's would look better than it is, and so would the uptrained one's)."""
    calib = recipe.model.convert.calib_data if recipe.model.convert else None
    for spec in recipe.data.eval or []:
        for text in calib or []:
            _check(
                not same_spec_text(text, spec),
                f"data.eval {spec} is (or holds) calibration text {text} of model.convert.calib_data: the conversion"
                " is fitted on it, so its numbers would not be held out; give held-out text it never reads",
            )
    if recipe.data.eval is None:  # the held-out text is the tail of data.train, always in its last text
        last = recipe.data.train[-1]
        for text in calib or []:  # (a calibration file inside that last folder: packing, once the tail is known)
            _check(not holds(text, last), calibrated_tail(text, last, recipe.data.eval_fraction))


def calibrated_tail(calib: str, train: str, fraction: float) -> str:
    """The refusal of calibration text that holds the held-out tail of data.train (the calibration windows are
    spread over the whole text, its tail included)."""
    return (
        f"model.convert.calib_data {calib} is (or holds) training text {train}, whose last data.eval_fraction="
        f"{fraction:g} is the held-out text: the conversion would be fitted on it, so its numbers would not be held "
        "out; give held-out text as data.eval, or calibration text that is not in data.train"
    )


def warmup_steps(train, total_steps: int) -> int:
    """The warmup's steps as the scheduler gets them: train.warmup_steps, else train.warmup_ratio of `total_steps`
    rounded up. One count for the recipe's check (`total_steps` = max_steps) and trainer.make_plan's."""
    return train.warmup_steps or math.ceil(train.warmup_ratio * total_steps)


def _validate_train(t: TrainSection) -> None:
    _validate_length(t)
    _validate_optimizer(t)
    _validate_schedule(t)
    _validate_warmup(t)


def _validate_length(t: TrainSection) -> None:
    """Where the run goes and how long it is (max_steps, max_tokens or epochs)."""
    _check(bool(t.output_dir), "recipe needs train.output_dir (where checkpoints and the result go)")
    _check(
        t.max_steps == -1 or t.max_steps > 0,
        f"train.max_steps must be a positive number of steps, or -1 to use max_tokens / num_train_epochs; "
        f"got {t.max_steps}",
    )
    _check(
        t.max_tokens is None or t.max_tokens > 0,
        f"train.max_tokens must be a positive number of tokens (or null), got {t.max_tokens}",
    )
    _check(t.num_train_epochs > 0, f"train.num_train_epochs must be > 0, got {t.num_train_epochs}")


def _validate_optimizer(t: TrainSection) -> None:
    """AdamW's settings and the batch each step takes."""
    _check(t.learning_rate > 0, f"train.learning_rate must be > 0, got {t.learning_rate}")
    _check(t.weight_decay >= 0, f"train.weight_decay must be >= 0, got {t.weight_decay}")
    for name in ("adam_beta1", "adam_beta2"):
        _check(0 <= getattr(t, name) < 1, f"train.{name} must be in [0, 1), e.g. 0.9, got {getattr(t, name)}")
    _check(t.adam_epsilon > 0, f"train.adam_epsilon must be > 0, e.g. 1e-8, got {t.adam_epsilon}")
    _check(t.max_grad_norm >= 0, f"train.max_grad_norm must be >= 0 (0: no clipping), got {t.max_grad_norm}")
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        _check(getattr(t, name) >= 1, f"train.{name} must be >= 1, got {getattr(t, name)}")


def _validate_schedule(t: TrainSection) -> None:
    """Each setting of the run's schedule alone: warmup, seed, logging/saving/eval intervals, scheduler, reporters."""
    _check(t.warmup_steps >= 0, f"train.warmup_steps must be >= 0, got {t.warmup_steps}")
    _check(0 <= t.warmup_ratio < 1, f"train.warmup_ratio must be in [0, 1), got {t.warmup_ratio}")
    _check(0 <= t.seed < SEED_LIMIT, f"train.seed must be between 0 and 2**32 - 1, got {t.seed}")
    _check(t.logging_steps >= 1, f"train.logging_steps must be >= 1 (log every N steps), got {t.logging_steps}")
    _check(t.save_steps >= 0, f"train.save_steps must be >= 0 (0: no intermediate checkpoints), got {t.save_steps}")
    _check(
        t.save_total_limit is None or t.save_total_limit >= 1,
        f"train.save_total_limit must be >= 1, or null to keep every checkpoint; got {t.save_total_limit}",
    )
    _check(t.eval_steps >= 0, f"train.eval_steps must be >= 0 (0: held-out loss at start and end), got {t.eval_steps}")
    _check(
        t.lr_scheduler_type in LR_SCHEDULERS,
        f"train.lr_scheduler_type {t.lr_scheduler_type!r} is not one of {', '.join(LR_SCHEDULERS)}",
    )
    for r in t.report_to:
        _check(r in REPORTERS, f"train.report_to {r!r} is not one of {', '.join(REPORTERS)}")


def _validate_warmup(t: TrainSection) -> None:
    """The warmup against the scheduler and train.max_steps, so that --dry-run refuses what the run would (steps from
    max_tokens or epochs are known only with the data: trainer.check_plan)."""
    _check(
        t.lr_scheduler_type != "constant" or (t.warmup_steps == 0 and t.warmup_ratio == 0),
        "train.lr_scheduler_type constant has no warmup (transformers ignores warmup_steps / warmup_ratio there); "
        "use constant_with_warmup, or set train.warmup_steps=0 train.warmup_ratio=0",
    )
    # the rate climbs from 0 over the warmup: a warmup as long as the run never reaches train.learning_rate
    _check(
        t.max_steps <= 1 or t.warmup_steps < t.max_steps,
        f"train.warmup_steps={t.warmup_steps} is not shorter than train.max_steps={t.max_steps}: the learning rate "
        f"would never reach its peak; set train.warmup_steps below {t.max_steps} (0: no warmup), or train more steps",
    )
    ratio_steps = warmup_steps(t, t.max_steps)  # read only where train.warmup_steps is 0: the ratio's steps
    _check(
        t.max_steps <= 1 or t.warmup_steps > 0 or ratio_steps < t.max_steps,
        f"the warmup ({ratio_steps} steps from train.warmup_ratio={t.warmup_ratio:g}) is not shorter than the run "
        f"(train.max_steps={t.max_steps}): the learning rate would never reach its peak; lower train.warmup_ratio, "
        "or train more steps",
    )
    # constant, whose warmup is refused above, has none
    _check(t.max_steps != 1 or (t.warmup_steps == 0 and t.warmup_ratio == 0), ONE_STEP_WARMUP)


def _validate_lora(lo: LoraSection) -> None:
    _check(lo.r >= 0, f"lora.r must be >= 0 (0: no LoRA), got {lo.r}")
    _check(
        bool(lo.full_train) or (lo.r > 0 and bool(lo.target_modules)),
        "nothing to train: set lora.r > 0 with lora.target_modules, or list modules in lora.full_train",
    )
    _check(lo.r == 0 or lo.lora_alpha > 0, f"lora.lora_alpha must be > 0, got {lo.lora_alpha}")
    _check(0 <= lo.lora_dropout < 1, f"lora.lora_dropout must be in [0, 1), got {lo.lora_dropout}")
