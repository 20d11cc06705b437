"""Does the fix work: a refusal names the problem and the fix; here the fix is followed as a reader would, and the
command then runs (or stops for a next, different reason).

Each case is (the bad input, how a reader follows the message's advice): the advice is read from the refusal's own
text (a regex on it, never a hard-coded fix), applied to the command line, and the command run again. An override
typed in a shell loses one pair of quotes before clakit sees it, so advice meant for a shell is split with
`shlex.split`, as the shell would. `clakit uptrain` runs with `--dry-run` (validation, no training).
"""

import dataclasses
import difflib
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from bad_input import run_clakit
from uptrain_fixtures import tiny_cla_checkpoint, tiny_recipe, write_recipe  # noqa: F401

from clakit import settings
from clakit.convert.config import ConvertConfig
from clakit.uptrain.recipe import resolve_recipe


def error_line(run) -> str:
    """The one `clakit: error: ...` line of a refusal (exit 2, no traceback)."""
    assert "Traceback" not in run.err and run.code == 2, (run.code, run.err[-2000:])
    lines = run.err.strip().splitlines()
    assert len(lines) == 1 and "error: " in lines[0], lines
    return lines[0].split("error: ", 1)[1]


def found(pattern: str, text: str) -> re.Match:
    m = re.search(pattern, text)
    assert m, f"the refusal gives no advice matching {pattern!r}: {text}"
    return m


def typed_in_a_shell(message: str, fallback: str, **values) -> list[str]:
    """The arguments a reader types after reading `message`: the form it gives for a shell (`in a shell: "..."` or
    `"..." in a shell`), else the first one `fallback` finds (the message's only example); VALUE and the other
    placeholders replaced by what the reader meant; split as a POSIX shell splits it."""
    shell = re.search(r"""in a shell: ("[^"]*"|'[^']*')|("[^"]*"|'[^']*') in a shell""", message)
    text = (shell.group(1) or shell.group(2)) if shell else found(fallback, message).group(1)
    for placeholder, value in values.items():
        text = text.replace(placeholder, value)
    return shlex.split(text)


@dataclass(frozen=True)
class Advice:
    """A bad `clakit uptrain RECIPE` command (its overrides) and how a reader follows the refusal: `follow(message,
    overrides)` returns the overrides of the next try."""

    id: str
    overrides: tuple[str, ...]
    follow: object

    def __str__(self) -> str:
        return self.id


def _set(*pairs):
    """follow: drop the overrides of the keys the advice sets, add the advice's."""

    def follow(message, overrides):
        new = [_paths(p.format(*found(pattern, message).groups())) for pattern, p in pairs]
        keys = {n.split("=")[0] for n in new}
        return [o for o in overrides if o.split("=")[0] not in keys] + new

    return follow


def _paths(text: str) -> str:
    """`<heldout>` -> the test's path of that name (PATHS)."""
    return re.sub(r"<(\w+)>", lambda m: PATHS[m.group(1)], text)


def _shell(fallback: str, **values):
    def follow(message, overrides):
        return [o for o in overrides if not o.startswith(_key(overrides[-1]))] + typed_in_a_shell(
            message, fallback, **values
        )

    return follow


def _key(override: str) -> str:
    return override.split("=")[0]


def _whole_item(message, overrides):
    """`write it as a whole number: 2, as item 3 of KEY` -> KEY=[..., 2, ...]; the old advice
    `KEY[3]=2` is typed as written."""
    m = re.search(r"whole number: (\d+), as item (\d+) of (\S+)", message)
    if not m:
        return overrides[:-1] + [found(r"whole number: (\S+=\d+)", message).group(1)]
    items = re.search(r"=\[(.*)\]", overrides[-1]).group(1).split(",")
    items[int(m.group(2))] = m.group(1)
    return overrides[:-1] + [f"{m.group(3)}=[{','.join(items)}]"]


def _convert_key(message, overrides):
    """`--calib-tokens must be ... (in the recipe: --calib-tokens is model.convert.calib_tokens)`: the key set to a
    valid value; without that key named, the flag the message names typed as a flag."""
    m = re.search(r"in the recipe: --[\w-]+ is (model\.convert\.\w+)", message)
    flag = found(r"(--[\w-]+)", message).group(1)
    return overrides[:-1] + ([f"{m.group(1)}=4096"] if m else [flag, "4096"])


def _closest_key(message, overrides):
    wrong = found(r"unknown recipe key '([\w.]+)'", message).group(1)
    valid = found(r"valid keys here: (.*)$", message).group(1).split(", ")
    section, _, key = wrong.rpartition(".")
    best = difflib.get_close_matches(key, valid, n=1)[0]
    return [o.replace(f"{wrong}=", f"{section}.{best}=") for o in overrides]


SOURCE = ("model.path=null", "model.source={llama}", "model.convert={{factor: 2}}")
RECIPE_ADVICE = [
    # a string YAML reads as a number or a boolean: the advice quoted for a shell (HEAD: the same refusal again)
    Advice("octal-string", ("train.output_dir=0123",), _shell(r"quote it, e.g. (\S+)", VALUE="0123")),
    Advice("bool-string", ("train.output_dir=yes",), _shell(r"quote it, e.g. (\S+)", VALUE="yes")),
    # a list item: `data.train[0]=...` is no key (HEAD: unknown recipe key 'data.train[0]')
    Advice("int-list-item", ("data.train=[2024]",), _shell(r"quote it, e.g. (\S+)", VALUE="2024")),
    # `key=a,b`: the list advice typed in a shell (HEAD: `data.train=[a, b]` split in two, unrecognized 'b]')
    Advice("comma-list", ("data.train={train},{more}",), _shell(r"recipe key (\S+ is a list: write \[[^]]*\])",
                                                                **{" is a list: write ": "="})),
    Advice("not-yaml", ("train.output_dir=[runs",),
           _shell(r"quote a string: (\S+)", key="train.output_dir", **{"[text": "[runs"})),
    Advice("whole-number", ("train.max_tokens=1e5",), _set((r"whole number: (\S+=\d+)", "{}"))),
    # not beside SOURCE's factor 2: both together are refused (--factor cannot be combined with ...)
    Advice("whole-number-item",
           (*SOURCE[:2], "model.convert={{init: mean}}", "model.convert.kv_source_layers=[0,0,2,2e0]"), _whole_item),
    # a ConvertConfig refusal in a recipe names the key of the flag it names (HEAD: `--calib-tokens 4096`,
    # unrecognized by clakit uptrain)
    # with the calibration text it budgets: --calib-tokens alone is refused as acting in no stage
    Advice("convert-flag", (*SOURCE[:2], "model.convert={{factor: 2, init: calibrated, calib_data: [{more}]}}",
                            "model.convert.calib_tokens=0"), _convert_key),  # fmt: skip
    Advice("constant-warmup", ("train.lr_scheduler_type=constant", "train.warmup_steps=2"),
           _set((r"set (train\.\w+=\d+) train", "{}"), (r"set train\.\w+=\d+ (train\.\w+=\d+)", "{}"))),
    Advice("warmup-too-long", ("train.warmup_steps=6",), _set((r"set (train\.warmup_steps) below (\d+)", "{}=1"))),
    Advice("one-step-warmup", ("train.max_steps=1", "train.warmup_ratio=0.5"),
           _set((r"set (train\.\w+=\d+) train", "{}"), (r"set train\.\w+=\d+ (train\.\w+=\d+)", "{}"))),
    Advice("nothing-to-train", ("lora.r=0",), _set((r"list modules in (lora\.full_train)", "{}=[q_proj]"))),
    Advice("convert-read-key", (*SOURCE, "model.convert.trust_remote_code=true"),
           _set((r"set (model\.\w+=true) instead", "{}"))),
    Advice("copy-span", ("data.copy_fraction=0.5", "data.copy_span=20"),
           _set((r"between 1 and (data\.seq_len) / 2 = (\d+)", "data.copy_span={1}"))),
    Advice("eval-is-train", ("data.eval=[{train}]",), _set((r"drop (data\.eval)", "{}=null"))),
    Advice("local-revision", ("model.revision=main",), _set((r"drop (model\.revision)", "{}=null"))),
    Advice("eval-tokens", ("data.eval_max_tokens=8",), _set((r"at least (data\.seq_len)", "data.eval_max_tokens=32"))),
    Advice("keep-limit", ("train.save_total_limit=0",), _set((r"or (null) to keep", "train.save_total_limit={}"))),
    Advice("unknown-key", ("train.max_step=3",), _closest_key),
    Advice("reporter", ("train.report_to=[wandb]",), _set((r"not one of (\w+)", "train.report_to={}"))),
    # a stock model as model.path -> give it as model.source -> add a convert section as the example says -> passes
    Advice("stock-model-path", ("model.path={llama}",), [
        _set((r"give it as (model\.source) with model\.convert", "{}=<llama>"),
             (r"(model\.path) \S+ is not", "{}=null")),
        _set((r"add e\.g\. `convert: (\{[^}]*\})`", "model.convert={}")),
    ]),
    Advice("convert-on-a-cla-path", ("model.convert={{factor: 2}}",),
           _set((r"(model\.convert) applies to model\.source", "{}=null"))),
    Advice("calibrated-tail", ("model.path=null", "model.source={llama}", "model.convert={{calib_data: [{train}]}}",
                               "data.eval=null"), _set((r"give held-out text as (data\.eval)", "{}=[<heldout>]"))),
    Advice("eval-is-calibration", (*SOURCE[:2], "model.convert={{calib_data: [{heldout}]}}"),
           _set((r"data\.eval (\S+) is \(or holds\) calibration text", "data.eval=[<more>]"))),
    # --dry-run passed both (the run refused them at once), and the run's refusals named flags uptrain lacks:
    # "add --layout auto" (then "unrecognized argument '--layout'"), "pass --calib-data"
    Advice("kv-saving-without-layout", (*SOURCE[:2], "model.convert={{kv_saving: 0.25}}"), [
        _set((r"add --layout (auto) .*--layout is (model\.convert\.layout)", "{1}={0}")),
        _set((r"pass --calib-data .*--calib-data is (model\.convert\.calib_data)", "{}=[<more>]")),
    ]),
    Advice("reconstruct-without-text", (*SOURCE[:2], "model.convert={{init: reconstruct, factor: 2}}"),
           _set((r"pass --calib-data .*--calib-data is (model\.convert\.calib_data)", "{}=[<more>]"))),
]  # fmt: skip


@pytest.fixture
def uptrain_paths(tmp_path, corpus_dir, tiny_cla_checkpoint, tiny_llama_checkpoint) -> dict:  # noqa: F811
    recipe = tiny_recipe(corpus_dir, tmp_path / "run")
    recipe["model"] = {"path": str(tiny_cla_checkpoint)}
    (tmp_path / "2024").write_text((corpus_dir / "train.txt").read_text()[:20000])
    (tmp_path / "more.txt").write_text((corpus_dir / "calib.txt").read_text())
    return {
        "recipe": str(write_recipe(tmp_path / "r.yaml", recipe)),
        "llama": str(tiny_llama_checkpoint),
        "train": str(corpus_dir / "train.txt"),
        "more": str(tmp_path / "more.txt"),
        "heldout": str(corpus_dir / "heldout.txt"),
        "tmp": tmp_path,
    }


PATHS: dict = {}  # the test's paths, for a follow that names one (`<heldout>`)


def dry_run(paths: dict, overrides) -> object:
    return run_clakit("uptrain", paths["recipe"], *overrides, "--dry-run", cwd=paths["tmp"])


@pytest.mark.parametrize("case", RECIPE_ADVICE, ids=str)
def test_following_a_recipe_refusal_makes_the_recipe_pass(case, uptrain_paths):
    PATHS.clear()
    PATHS.update(uptrain_paths)
    fixed, seen = [o.format(**uptrain_paths) for o in case.overrides], []
    for follow in case.follow if isinstance(case.follow, list) else [case.follow]:  # a chain: one refusal each
        message = error_line(dry_run(uptrain_paths, fixed))
        assert message not in seen, f"the same refusal again after following it: {message}"
        seen.append(message)
        fixed = follow(message, fixed)
    run = dry_run(uptrain_paths, fixed)
    assert run.code == 0, f"refused: {seen}\nfollowed as {fixed}\nthen: {run.err.strip()[-600:]}"


def test_a_shipped_recipe_named_in_the_refusal_of_a_missing_one_is_found(tmp_path):
    """`recipe X does not exist; give a recipe YAML file or a shipped recipe (llama3_1/8b_cla2_lora.yaml, ...)`:
    each name it lists resolves to the shipped file, from any folder."""
    message = error_line(run_clakit("uptrain", "no/such.yaml", "--dry-run", cwd=tmp_path))
    names = found(r"shipped recipe \(([^)]*)\)", message).group(1).split(", ")
    assert len(names) >= 4, names
    for name in names:
        assert resolve_recipe(name).is_file(), name


def test_every_flag_a_convert_setting_refusal_names_in_a_recipe_is_given_its_key():
    """recipe_keys: the flags of ConvertConfig fields in a message get their `model.convert.` key."""
    message = "--dtype bfloat16 fits need a GPU (--device cuda); on the CPU use --dtype float32 (see --help)"
    said = settings.recipe_keys(message, ConvertConfig, "model.convert")
    assert said.endswith("(in the recipe: --dtype is model.convert.dtype, --device is model.convert.device)"), said
    assert settings.recipe_keys("no flag here", ConvertConfig, "model.convert") == "no flag here"


# --- convert and eval: the advice names a flag; give it as the message says ---------------------------------------


def _flag_value(pattern: str):
    """follow: set the flag the advice names to the value it gives (replacing the flag if given)."""

    def follow(message, args):
        flag, value = found(pattern, message).groups()
        drop = {i for i, a in enumerate(args) if a == flag} | {i + 1 for i, a in enumerate(args) if a == flag}
        return [a for i, a in enumerate(args) if i not in drop] + [flag, value]

    return follow


def _drop(pattern: str):
    def follow(message, args):
        flag = found(pattern, message).group(1)
        i = args.index(flag)
        return args[:i] + args[i + 2 :]

    return follow


def _add(pattern: str, value: str):
    def follow(message, args):
        return [*args, found(pattern, message).group(1), *([value] if value else [])]

    return follow


FAST = ("--reconstruct-steps", "2", "--distill-steps", "2", "--calib-tokens", "128", "--seq-len", "64")
CONVERT_ADVICE = [
    # a chain: --kv-saving alone -> add --layout auto -> pass --calib-data -> converts
    Advice("kv-saving", ("--kv-saving", "0.25", "--reconstruct-steps", "2", "--distill-steps", "2", "--seq-len", "64",
                         "--calib-tokens", "128"),
           [_add(r"add (--layout) auto", "auto"), _add(r"pass (--calib-data)", "{calib}")]),
    # --factor fixes the layout: "add --layout auto" was then refused as --factor with --layout auto
    Advice("kv-saving-with-factor", ("--factor", "2", "--kv-saving", "0.25", *FAST),
           [_drop(r"drop (--factor) \(it fixes the layout\)"), _add(r"add (--layout) auto", "auto"),
            _add(r"pass (--calib-data)", "{calib}")]),
    Advice("init-without-text", ("--init", "reconstruct", "--factor", "2", *FAST[:4]),
           [_add(r"pass (--calib-data)", "{calib}")]),
    Advice("calib-tokens", ("--calib-data", "{calib}", *FAST[:4], "--seq-len", "64", "--calib-tokens", "10"),
           [_flag_value(r"give (--calib-tokens) (\d+) or more")]),
    Advice("copy-span", ("--calib-data", "{calib}", *FAST, "--distill-copy-span", "40"),
           [_flag_value(r"^(--distill-copy-span) .* give a span up to (\d+)")]),
    Advice("copies-without-distill", ("--factor", "2", "--distill-copy-fraction", "0.5", "--distill-steps", "0"),
           [_drop(r"^(--distill-copy-fraction)")]),
    Advice("seq-len-beyond-window", ("--factor", "2", "--eval-data", "{heldout}", "--seq-len", "1000"),
           [_flag_value(r"^(--seq-len) \d+ .* use at most (\d+)")]),
    Advice("fits-bf16-on-cpu", ("--factor", "2", "--device", "cpu", "--dtype", "bfloat16"),
           [_flag_value(r"on the CPU use (--dtype) (\w+)")]),
]  # fmt: skip


@pytest.mark.parametrize("case", CONVERT_ADVICE, ids=str)
def test_following_a_convert_refusal_converts(case, tmp_path, tiny_llama_checkpoint, corpus_dir):
    paths = {"calib": str(corpus_dir / "calib.txt"), "heldout": str(corpus_dir / "heldout.txt")}
    args = [a.format(**paths) for a in case.overrides]
    seen = []
    for follow in case.follow:
        message = error_line(run_clakit("convert", tiny_llama_checkpoint, tmp_path / "out", "-q", *args))
        assert message not in seen, f"the same refusal again after following it: {message}"
        seen.append(message)
        args = [a.format(**paths) for a in follow(message, args)]
    run = run_clakit("convert", tiny_llama_checkpoint, tmp_path / "out", "-q", *args)
    assert run.code == 0, f"refused: {seen}\nfollowed as {args}\nthen: {run.err.strip()[-600:]}"
    assert (tmp_path / "out" / "config.json").is_file()


EVAL_ADVICE = [
    Advice("max-tokens", ("--seq-len", "64", "--max-tokens", "10"),
           [_flag_value(r"give (--max-tokens) of at least (\d+)")]),
    Advice("device-and-map", ("--seq-len", "64", "--max-tokens", "128", "--device", "cpu", "--device-map", "auto"),
           [_drop(r"argument (--device-map): not allowed with argument --device")]),
    Advice("window", ("--seq-len", "1000", "--max-tokens", "512"),
           [_flag_value(r"^(--seq-len) .* use at most (\d+)")]),
]  # fmt: skip
if not torch.cuda.is_available():  # the advice for a GPU this machine lacks
    EVAL_ADVICE.append(
        Advice("no-gpu", ("--seq-len", "64", "--max-tokens", "128", "--device", "cuda"),
               [_flag_value(r"use (--device) (cpu)")])
    )  # fmt: skip


@pytest.mark.parametrize("case", EVAL_ADVICE, ids=str)
def test_following_an_eval_refusal_evaluates(case, tmp_path, tiny_llama_checkpoint, corpus_dir):
    base = ["eval", tiny_llama_checkpoint, "--data", str(corpus_dir / "heldout.txt"), "--no-speed", "-q"]
    args = list(case.overrides)
    for follow in case.follow:
        args = follow(error_line(run_clakit(*base, *args, "-o", tmp_path / "r.json")), args)
    run = run_clakit(*base, *args, "-o", tmp_path / "r.json")
    assert run.code == 0, f"followed as {args}, then: {run.err.strip()[-600:]}"
    assert Path(tmp_path / "r.json").is_file()


# --- the shipped recipes' comments: the commands they say to run exist, their figures are the docs' ---------------

RECIPES = sorted(resolve_recipe("smollm2/135m_cla2_cpu.yaml").parents[1].rglob("*.yaml"))
ROOT = Path(__file__).resolve().parents[1]


def comments(recipe: Path) -> str:
    """A recipe's comments as one line of text (a comment wrapped over lines joined)."""
    return " ".join(line.split("#", 1)[1].strip() for line in recipe.read_text().splitlines() if "#" in line)


def core_dependencies() -> set[str]:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {re.split(r"[<>=!~\[ ;]", d)[0].lower() for d in project["dependencies"]}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_the_commands_a_recipe_comment_names_exist(recipe):
    """`huggingface-cli login` (gone from huggingface_hub 1.x; `hf auth login`), `pip install datasets` (a clakit
    dependency already): every command in backticks names a program installed beside clakit, a pip install of
    something clakit does not already bring, or a clakit command whose flags exist."""
    from test_docs_commands import clakit_flags, flags_in

    flags, problems = clakit_flags(), []
    for code in re.findall(r"`([^`]+)`", comments(recipe)):
        words = code.split()
        if words[0] == "clakit" and words[1] in flags:
            problems += [f"{code}: no {f}" for f in flags_in(" ".join(words[2:])) if f not in flags[words[1]]]
        elif words[:2] == ["pip", "install"]:
            problems += [f"{code}: {w} comes with clakit" for w in words[2:] if w.lower() in core_dependencies()]
        elif re.fullmatch(r"[a-z][\w-]*", words[0]) and len(words) > 1 and not re.search(r"[=:]", words[0]):
            found_it = (Path(sys.executable).parent / words[0]).exists() or shutil.which(words[0])
            problems += [] if found_it else [f"{code}: no program {words[0]}"]
    assert not problems, problems


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_the_figures_in_a_recipe_comment_are_the_docs_figures(recipe):
    """A measured figure a recipe's comment quotes (a perplexity, a ratio, passkeys N/90, a duration) is one the docs
    record (README.md, docs/*.md): the conversion of the CPU recipe's measured day took 892 s = 14 min 52 s
    (docs/quality.md), not 14 min 58 s. Estimates (GPU hours, GB) are not figures the docs measured."""
    docs = "\n".join(p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])
    figures = re.findall(r"\d+ min \d+ s|\b\d+/\d+\b|\b\d+\.\d+x?\b|\b\d+x\b", comments(recipe))
    assert len(figures) >= 5, figures  # the extraction sees the comment's figures
    missing = sorted({f for f in figures if f not in docs and f.replace("x", "×") not in docs})
    assert not missing, f"{recipe.name} quotes figures the docs do not hold: {missing}"


# --- documented defaults are the code's --------------------------------------------------------------------------


def test_the_recipe_defaults_docs_uptrain_md_states_are_the_dataclass_defaults():
    """The docs' "`model.allow_pickle` (default false)", "`data.copy_fraction` / `data.copy_span` (default 0 / 32;
    ...)": each value read as YAML equals the recipe dataclass's default for that key."""
    import yaml

    from clakit.uptrain.recipe import Recipe

    doc = (ROOT / "docs" / "uptrain.md").read_text()
    stated = [(m[1].split(" / "), m[2].split(" / ")) for m in re.finditer(
        r"((?:`\w+\.\w+`(?: / )?)+) \(default ([^;)]+)[;)]", doc)]  # fmt: skip
    assert len(stated) >= 3, stated
    defaults = Recipe().to_dict()
    problems = []
    for keys, values in stated:
        for key, value in zip(keys, values, strict=True):
            section, name = key.strip("`").split(".")
            if yaml.safe_load(value) != defaults[section][name]:
                problems.append(f"{key}: docs say {value}, the dataclass {defaults[section][name]!r}")
    assert not problems, problems


def test_recipe_defaults_docs_uptrain_md_lists_as_key_value_are_the_dataclass_defaults():
    """HEAD's "The recipe's defaults are therefore `full_train: [k_proj, v_proj, consumers.q_proj]`, `distill.weight:
    1.0`" (a past stop's CPU recipe; the dataclass's are [] and 0): each `key: value` a "defaults ... are" sentence
    lists is the dataclass default."""
    import yaml

    from clakit.uptrain.recipe import Recipe

    defaults = Recipe().to_dict()
    by_name = {name: value for section in defaults.values() for name, value in section.items()}
    doc = re.sub(r"\s+", " ", (ROOT / "docs" / "uptrain.md").read_text())
    problems = []
    for listing in re.findall(r"defaults(?: \([^)]*\))? are(?: therefore)? ((?:`[\w.]+: [^`]+`(?:, | and )?)+)", doc):
        for key, value in re.findall(r"`([\w.]+): ([^`]+)`", listing):
            section, _, name = key.rpartition(".")
            want = defaults[section][name] if section else by_name[name]
            if yaml.safe_load(value) != want:
                problems.append(f"{key}: docs say {value}, the dataclass {want!r}")
    assert not problems, problems


def test_the_demo_flags_defaults_are_the_demo_settings_defaults():
    """`clakit demo --max-tokens/--uptrain-steps` hold their own argparse defaults beside DemoSettings'; the help's
    "(default N)" must be both."""
    from test_docs_commands import subparsers

    from clakit.demo import DemoSettings

    parser = subparsers()["demo"]
    for name in ("max_tokens", "uptrain_steps"):
        action = next(a for a in parser._actions if a.dest == name)
        want = getattr(DemoSettings(), name)
        assert action.default == want and f"(default {want}" in action.help, (name, action.default, action.help)


def test_the_eval_seq_len_help_states_the_default_the_suite_uses():
    from clakit.eval.config import EvalConfig
    from clakit.eval.perplexity import DEFAULT_SEQ_LEN

    help_ = next(f for f in dataclasses.fields(EvalConfig) if f.name == "seq_len").metadata["help"]
    assert f"default {DEFAULT_SEQ_LEN}," in help_, help_


# --- the report command docs/uptrain.md gives for a run whose report could not be written ---------------------------


def test_the_documented_report_command_rebuilds_the_runs_own_report(
    tmp_path,
    corpus_dir,
    tiny_cla_checkpoint,  # noqa: F811
    tiny_llama_checkpoint,
):
    """docs/uptrain.md: "`clakit report OUTPUT_DIR/eval/....json -o FOLDER` writes the report". Typed in a shell, the
    report it writes has the run's rows in the run's order: the first is the baseline (HEAD: `eval/*.json` sorted
    `converted` first, and every Δ% was against the converted model)."""
    recipe = tiny_recipe(corpus_dir, tmp_path / "run", train={"max_steps": 2, "warmup_steps": 0, "save_steps": 0})
    recipe["model"] = {"path": str(tiny_cla_checkpoint), "original": str(tiny_llama_checkpoint)}
    assert run_clakit("uptrain", write_recipe(tmp_path / "r.yaml", recipe), "-q").code == 0
    doc = (ROOT / "docs" / "uptrain.md").read_text()
    command = found(r"`clakit report (OUTPUT_DIR/eval/\S+) -o FOLDER`", re.sub(r"\s+", " ", doc)).group(1)
    typed = subprocess.run(["bash", "-c", f"printf '%s\\n' {command.replace('OUTPUT_DIR', str(tmp_path / 'run'))}"],
                           capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
    assert run_clakit("report", *typed, "-o", tmp_path / "again", "-q").code == 0

    def rows(folder: Path) -> list[str]:
        return re.findall(r"^\| (\w+) \| [\d.]+ \| ([+-][\d.]+%)", (folder / "report.md").read_text(), re.M)

    assert rows(tmp_path / "again") == rows(tmp_path / "run" / "report"), (typed, rows(tmp_path / "again"))
    assert rows(tmp_path / "again")[0] == ("original", "+0.0%")


def test_the_convert_help_states_the_defaults_the_pipeline_applies():
    """`--kv-saving` "(default 0.5)" and `--init` "reconstruct when --calib-data is given" are the pipeline's
    DEFAULT_KV_SAVING and DEFAULT_DATA_INIT, which the help text restates by hand."""
    from clakit.convert import pipeline

    helps = {f.name: f.metadata["help"] for f in dataclasses.fields(ConvertConfig)}
    assert f"(default {pipeline.DEFAULT_KV_SAVING})" in helps["kv_saving"], helps["kv_saving"]
    assert f"{pipeline.DEFAULT_DATA_INIT} when --calib-data is given" in helps["init"], helps["init"]


# --- --help ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command, cls", [("convert", ConvertConfig), ("eval", "EvalConfig")])
def test_help_lists_each_setting_in_a_titled_section_with_a_short_metavar(command, cls):
    """`clakit convert --help` listed its 30 settings in one "options" list with metavars like
    RECONSTRUCT_STEPS; each now sits in a section named for its stage, and numbers read N / F (as the docs write
    `--calib-tokens N`)."""
    from test_docs_commands import subparsers

    from clakit.eval.config import EvalConfig

    cls = EvalConfig if cls == "EvalConfig" else cls
    parser, problems = subparsers()[command], []
    titled = {a.dest: g.title for g in parser._action_groups for a in g._group_actions}
    for f in dataclasses.fields(cls):
        action = next(a for a in parser._actions if a.dest == f.name)
        if titled.get(f.name) in (None, "options"):
            problems.append(f"--{settings.flag(f.name)} is in no titled section")
        if action.type in (int, float) and not action.choices and action.metavar not in ("N", "F"):
            problems.append(f"--{settings.flag(f.name)} {action.metavar}")
    assert not problems, problems
    assert len(set(titled.values()) - {"options", "positional arguments"}) >= 4, set(titled.values())
