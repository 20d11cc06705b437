"""The documentation says what the code does: README.md and docs/*.md, checked against the parsers, settings, files
and outputs.

Reviewers read the docs and then type what they say, so what is cheap to check is checked here:

* every `--flag` written after `clakit COMMAND` (code blocks fenced or indented, `\\`-continued lines, inline code
  spanning lines) is one that command's parser accepts; the same for `python benchmarks/X.py` and
  `python -m clakit_vllm.run` (flags read from the script's source); every `--flag` named anywhere belongs to some
  command of ours or to a listed outside tool (accelerate, pip, vLLM, torchrun); every option in a command's --help
  is named in some doc;
* a default the docs state for a flag ("`--calib-tokens N` (default 32768") is the default its `--help` states;
* every recipe key the docs name (`train.max_steps=10`, `model.convert.init`, ...) is a field of the recipe, every
  shipped recipe loads, every `key=value` written after `clakit uptrain recipes/X.yaml` loads onto that recipe, and a
  yaml block headed `# clakit uptrain recipes/X.yaml` shows that file's values;
* every repository path the docs name exists, every `tests/test_x.py::name` names a test there, every CLAKIT_*
  variable is read by some code;
* every import in a Python block imports, every keyword a snippet passes to a clakit function or settings class is
  one it takes, every `clakit.module.name` the docs name resolves, and every signature written as
  `clakit.mod.func(a, b=..., *, c=...)` names that function's parameters;
* a tiny conversion's clakit_convert.json and a tiny eval report hold every field docs/convert.md and docs/eval.md
  name (the only tests here that run a model: a 4-layer random Llama, seconds);
* the README's install and test commands are what `.ci/run` runs.

Each check collects every problem and fails naming the file and line, so a wrong doc reads as its own fix.
"""

import argparse
import ast
import dataclasses
import importlib
import inspect
import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
COMMANDS = ("convert", "eval", "report", "fetch-demo", "demo", "uptrain")
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```", re.M | re.S)
# flags of other programs the docs show (accelerate launch, torchrun, pip, vLLM's server) and flags the docs name as
# not built; anything else that looks like a flag must be one of clakit's, a benchmark's or clakit_vllm.run's
OUTSIDE_FLAGS = {  # accelerate launch:
    "--multi_gpu", "--num_processes", "--use_fsdp", "--fsdp_version", "--fsdp_reshard_after_forward",
    "--fsdp_auto_wrap_policy", "--fsdp_transformer_layer_cls_to_wrap", "--fsdp_cpu_ram_efficient_loading",
    "--fsdp_sync_module_states", "--fsdp_sharding_strategy", "--fsdp_use_orig_params", "--mixed_precision",
    "--standalone", "--nproc_per_node",  # torchrun
    "--no-deps", "--dry-run", "--report", "--index-url",  # pip
    "--model", "--kv-cache-dtype", "--kv-cache-memory-bytes",  # vLLM's server
    "--kv-cache-dtype-skip-layers", "--kv-sharing-fast-prefill",  # vLLM's engine arguments (vllm 0.32 arg_utils)
    "--resum",  # uptrain.md: the abbreviation clakit refuses
    "--merge",  # llama.cpp's llama-gguf-split (convert.md: split GGUFs)
}  # fmt: skip
NOT_BUILT = {("convert", "--kv-heads")}  # quality.md: "`clakit convert --kv-heads` ... was not built"
RECIPE_SECTIONS = ("model", "data", "train", "lora", "distill")
# dotted names in docs/uptrain.md that are not recipe keys (module names, a method)
NOT_RECIPE_KEYS = {"model.layers", "model.train", "model.config"}
FILE_NAME = re.compile(r"\.(?:txt|json|jsonl|yaml|safetensors|py|md|gz|bin|gguf)$")


# ----------------------------------------------------------------------------------------------------- extraction


def doc_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


def line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


INDENTED = re.compile(r"(?:^|\n)\n((?: {4}[^\n]*\n)+)")  # a Markdown code block by indentation


def blocks(text: str) -> list[tuple[str, int, str]]:
    """(language, first line, body) of every fenced block and every indented one (language "", its indent removed)."""
    found = [(m.group(1).strip(), line_of(text, m.start(2)), m.group(2)) for m in FENCE.finditer(text)]
    outside = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)  # keep line numbers
    for m in INDENTED.finditer(outside):
        body = "\n".join(line[4:] for line in m.group(1).split("\n"))
        found.append(("", line_of(outside, m.start(1)), body))
    return found


def code_pieces(text: str) -> list[tuple[int, str]]:
    """(line, code) for every line of a code block (`\\`-continued lines joined) and every inline code span (one
    that wraps over lines joined into one)."""
    pieces = []
    for _, start, body in blocks(text):
        lines = body.split("\n")
        i = 0
        while i < len(lines):
            j, joined = i, lines[i]
            while joined.rstrip().endswith("\\") and j + 1 < len(lines):
                j += 1
                joined = joined.rstrip()[:-1] + " " + lines[j].strip()
            pieces.append((start + i, joined))
            i = j + 1
    outside = INDENTED.sub(
        lambda m: "\n" * m.group(0).count("\n"), FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    )
    for m in re.finditer(r"`([^`]+)`", outside):
        pieces.append((line_of(outside, m.start()), m.group(1).replace("\n", " ")))
    return pieces


PROGRAM = re.compile(
    r"(?:^|[\s(=;&|])(?:"
    rf"(?:python3? -m )?clakit (?P<cmd>{'|'.join(COMMANDS)})(?![\w-])"
    r"|python3? (?P<bench>benchmarks/[\w/]+\.py)"
    r"|python3? -m (?P<vllm>clakit_vllm\.run)"
    r")(?P<rest>.*)"
)


def invocations() -> list[tuple[str, int, str, str, str]]:
    """(doc, line, program, its arguments, the code) for every command line of ours the docs write."""
    found = []
    for path in DOCS:
        for line, code in code_pieces(path.read_text()):
            for m in PROGRAM.finditer(code):
                program = m.group("cmd") or m.group("bench") or "clakit_vllm.run"
                rest = re.split(r"\s(?:#|\|\|?|&&|;|>)", m.group("rest"))[0]  # up to a comment or the next command
                found.append((doc_id(path), line, program, rest, code.strip()))
    return found


def flags_in(arguments: str) -> list[str]:
    try:
        words = shlex.split(arguments)
    except ValueError:
        words = arguments.split()
    return [w.split("=")[0] for w in words if re.match(r"--?[A-Za-z]", w)]


def subparsers() -> dict[str, argparse.ArgumentParser]:
    from clakit.cli import build_parser

    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def clakit_flags() -> dict[str, set[str]]:
    """Every option string each command accepts (uptrain's flags after the recipe are the same four)."""
    return {name: set(p._option_string_actions) for name, p in subparsers().items()}


def script_flags(script: str) -> set[str]:
    """The flags a script defines: string literals starting with '-' in its source (its add_argument calls)."""
    source = (ROOT / script).read_text()
    return set(re.findall(r"""["'](--?[A-Za-z][\w-]*)["']""", source)) | {"-h", "--help"}


def known_flags(program: str, clakit: dict[str, set[str]]) -> set[str] | None:
    if program in clakit:
        return clakit[program]
    path = "serving/vllm/clakit_vllm/run.py" if program == "clakit_vllm.run" else program
    return script_flags(path) if (ROOT / path).is_file() else None


# ------------------------------------------------------------------------------------------------------ the tests


def test_extraction_finds_the_documented_commands():
    """The extraction itself: it must see the commands the docs are about, or every check below passes vacuously."""
    programs = {(doc, program) for doc, _, program, _, _ in invocations()}
    for doc, program in [
        ("README.md", "demo"),
        ("docs/convert.md", "convert"),
        ("docs/eval.md", "eval"),
        ("docs/eval.md", "report"),
        ("docs/uptrain.md", "uptrain"),
        ("docs/uptrain.md", "benchmarks/uptrain_bench.py"),
        ("docs/serving.md", "clakit_vllm.run"),
    ]:
        assert (doc, program) in programs, f"no `{program}` command found in {doc}"
    continued = [r for d, _, p, r, _ in invocations() if d == "docs/uptrain.md" and "model.path=runs/l8b-cla2" in r]
    assert continued, "a `\\`-continued command line was not joined"


def test_every_flag_after_a_command_is_one_it_accepts():
    clakit = clakit_flags()
    problems = []
    for doc, line, program, rest, code in invocations():
        known = known_flags(program, clakit)
        if known is None:
            problems.append(f"{doc}:{line}: {program} does not exist ({code})")
            continue
        bad = [f for f in flags_in(rest) if f not in known and (program, f) not in NOT_BUILT]
        if bad:
            problems.append(f"{doc}:{line}: {program} has no {', '.join(bad)} ({code[:120]})")
    assert not problems, "\n".join(problems)


def test_every_flag_the_docs_name_exists_somewhere():
    """A flag in prose ("`--distill-lr`, default 5e-4") is checked too: it must be one of clakit's commands', a
    benchmark's or clakit_vllm.run's flags (or an outside tool's, listed above). Catches a renamed flag."""
    clakit = clakit_flags()
    ours = set().union(*clakit.values(), script_flags("serving/vllm/clakit_vllm/run.py"))
    for script in (ROOT / "benchmarks").glob("*.py"):
        ours |= script_flags(str(script.relative_to(ROOT)))
    problems = []
    for path in DOCS:
        text = path.read_text()
        for line, code in code_pieces(text):
            for flag in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", code):
                if flag not in ours and flag not in OUTSIDE_FLAGS and ("convert", flag) not in NOT_BUILT:
                    problems.append(f"{doc_id(path)}:{line}: {flag} is no flag of clakit's ({code[:100]})")
    assert not problems, "\n".join(problems)


def _same_value(doc: str, help_value: str) -> bool:
    try:
        return float(doc) == float(help_value)
    except ValueError:
        return doc.strip("`.,;:") == help_value.strip("`.,;:")


def test_documented_defaults_are_the_ones_help_states():
    """The docs' "`--flag ...` (default V" / "`--flag`, default V" / "`--flag` defaults to V" in the docs against the
    `(default ...)` of that flag's --help (every command that has the flag; one must agree)."""
    parsers = subparsers()
    helps: dict[str, list[str]] = {}
    for parser in parsers.values():
        for action in parser._actions:
            for option in action.option_strings:
                helps.setdefault(option, []).append(action.help or "")
    claim = re.compile(r"`(--[a-z][\w-]*)(?: [^` ]+)?`[^`()]{0,40}?\(?(?<!the )\bdefaults? (?:to )?`?([\w.:+-]+)`?")
    checked, problems = 0, []
    for path in DOCS:
        text = re.sub(r"\s+", " ", path.read_text())
        for m in claim.finditer(text):
            flag, value = m.group(1), m.group(2).rstrip(".,;:")
            if flag not in helps or value in ("when", "the", "is", "of"):
                continue
            stated = [v for h in helps[flag] for v in re.findall(r"default:? (?:without [^:]*: )?`?([\w.:+-]+)", h)]
            checked += 1
            if not any(_same_value(value, s.rstrip(".,;:")) for s in stated):
                problems.append(f"{doc_id(path)}: {flag} documented default {value!r}, --help says {stated or 'none'}")
    assert checked >= 10, f"only {checked} documented defaults found: the pattern no longer matches the docs"
    assert not problems, "\n".join(problems)


def _recipe_key_problem(dotted: str) -> str | None:
    from clakit.convert.config import ConvertConfig
    from clakit.uptrain.recipe import Recipe

    def names(cls):
        return {f.name for f in dataclasses.fields(cls)}

    section, *keys = dotted.split(".")
    cls = {f.name: f.default_factory for f in dataclasses.fields(Recipe)}[section]
    if not keys:
        return None
    if keys[0] not in names(cls):
        return f"{section} has no key {keys[0]!r}"
    if len(keys) > 1:
        if (section, keys[0]) != ("model", "convert"):
            return f"{section}.{keys[0]} has no keys"
        if keys[1] not in names(ConvertConfig):
            return f"model.convert (ConvertConfig) has no key {keys[1]!r}"
    return None


def test_every_recipe_key_the_docs_name_is_a_recipe_field():
    sections = "|".join(RECIPE_SECTIONS)
    override = re.compile(rf"(?<![\w./-])((?:{sections})(?:\.[a-z_][a-z0-9_]*)*)=")
    named = re.compile(rf"(?<![\w./-])((?:{sections})\.[a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)?)(?![\w.])")
    checked, problems = 0, []
    for path in DOCS:
        for line, code in code_pieces(path.read_text()):
            keys = set(override.findall(code))
            if path.name == "uptrain.md":  # the recipe's own doc: every dotted section name is a key
                keys |= {k for k in named.findall(code) if k not in NOT_RECIPE_KEYS and not FILE_NAME.search(k)}
            for key in sorted(keys):
                checked += 1
                if (problem := _recipe_key_problem(key)) is not None:
                    problems.append(f"{doc_id(path)}:{line}: `{key}`: {problem}")
    assert checked >= 30, f"only {checked} recipe keys found: the pattern no longer matches the docs"
    assert not problems, "\n".join(problems)


def test_shipped_recipes_load_and_documented_overrides_apply():
    from clakit.uptrain import load_recipe

    recipes = sorted((ROOT / "recipes").glob("*/*.yaml"))
    assert recipes
    for recipe in recipes:
        load_recipe(recipe)
    problems = []
    for doc, line, program, rest, code in invocations():
        if program != "uptrain":
            continue
        words = shlex.split(rest.replace("...", ""))
        overrides = [w for w in words if "=" in w and not w.startswith("-")]
        if not words or not overrides or not words[0].startswith("recipes/"):
            continue  # a recipe of the doc's own (base.yaml, RECIPE): its keys are checked above
        try:
            load_recipe(ROOT / words[0], overrides)
        except Exception as e:  # ClakitError: the message names the key
            problems.append(f"{doc}:{line}: {e} ({code[:120]})")
    assert not problems, "\n".join(problems)


PATH = re.compile(r"(?<![\w/.~$-])((?:clakit|tests|benchmarks|recipes|docs|serving|\.ci)/[\w./-]*\w)(?:::(\w+))?")


def test_every_repository_path_and_test_name_the_docs_give_exists():
    checked, problems = 0, []
    for path in DOCS:
        text = path.read_text()
        for m in PATH.finditer(text):
            target, name = m.groups()
            if target == "clakit/transformers/torch":  # "clakit/transformers/torch versions"
                continue
            checked += 1
            where = f"{doc_id(path)}:{line_of(text, m.start())}"
            if not (ROOT / target).exists():
                problems.append(f"{where}: {target} does not exist")
            elif name:
                tree = ast.parse((ROOT / target).read_text())
                defined = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.ClassDef)}
                if name not in defined:
                    problems.append(f"{where}: {target} has no {name}")
    assert checked >= 40, f"only {checked} paths found: the pattern no longer matches the docs"
    assert not problems, "\n".join(problems)


def python_blocks() -> list[tuple[str, int, str]]:
    """```python blocks, and indented blocks that start with an import."""
    found = []
    for path in DOCS:
        for language, start, body in blocks(path.read_text()):
            if language in ("python", "py") or (not language and re.match(r"(from \S+ )?import ", body)):
                found.append((doc_id(path), start, body))
    return found


def _resolve(dotted: str):
    """The object a dotted name `a.b.c` names: the longest importable module prefix, then attributes."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for part in parts[i:]:
            obj = getattr(obj, part)
        return obj
    raise ModuleNotFoundError(dotted)


def _accepted_keywords(obj) -> set[str] | None:
    """Keyword names obj takes; None: any. `convert(**settings)` and `evaluate(**settings)` take their config's
    fields, a dataclass its fields."""
    from clakit.convert import ConvertConfig, convert
    from clakit.eval import EvalConfig, evaluate

    if dataclasses.is_dataclass(obj) and isinstance(obj, type):
        return {f.name for f in dataclasses.fields(obj)}
    try:
        params = inspect.signature(obj).parameters
    except (TypeError, ValueError):
        return None
    names = {n for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        config = {convert: ConvertConfig, evaluate: EvalConfig}.get(obj)
        if config is None:
            return None
        names |= {f.name for f in dataclasses.fields(config)}
    return names


def test_python_snippets_import_and_call_what_exists():
    """Every import in a ```python block imports (vLLM's only where vLLM is installed: it lives in its own venv),
    and every keyword a snippet passes to a name it imported from clakit is one that name takes."""
    checked, problems = 0, []
    for doc, start, source in python_blocks():
        tree = ast.parse(source)
        imported: dict[str, str] = {}  # local name -> dotted name
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                pairs = [(a.asname or a.name.split(".")[0], a.name.split(".")[0] if not a.asname else a.name)
                         for a in node.names]  # fmt: skip
                modules = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                pairs = [(a.asname or a.name, f"{node.module}.{a.name}") for a in node.names]
                modules = [node.module]
            else:
                continue
            if modules[0].split(".")[0] == "vllm" and importlib.util.find_spec("vllm") is None:
                continue
            for local, dotted in pairs:
                checked += 1
                try:
                    _resolve(dotted)
                    imported[local] = dotted
                except (ImportError, AttributeError) as e:
                    problems.append(f"{doc}:{start + node.lineno - 1}: {dotted}: {e}")
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            head, _, tail = name.partition(".")
            if head not in imported or not imported[head].startswith("clakit"):
                continue
            where = f"{doc}:{start + node.lineno - 1}"
            try:
                obj = _resolve(imported[head] + ("." + tail if tail else ""))
            except (ImportError, AttributeError) as e:
                problems.append(f"{where}: {name}: {e}")
                continue
            accepted = _accepted_keywords(obj)
            for kw in node.keywords:
                checked += 1
                if kw.arg is not None and accepted is not None and kw.arg not in accepted:
                    problems.append(f"{where}: {name}() takes no keyword {kw.arg!r}")
    assert checked >= 20, f"only {checked} imports and keywords found in the docs' Python blocks"
    assert not problems, "\n".join(problems)


DOTTED = re.compile(r"`(clakit(?:\.\w+)+)(\([^`]*\))?")


def test_every_clakit_name_and_signature_the_docs_give_resolves():
    """`clakit.losses.token_kl`, `clakit.eval.records.FIELDS`, and signatures written out in full, e.g.
    `clakit.uptrain.uptrain(recipe_path, overrides=(), *, dry_run=False, ...)`: the parameters it names exist."""
    checked, problems = 0, []
    for path in DOCS:
        text = path.read_text()
        for m in DOTTED.finditer(text):
            dotted, args = m.groups()
            where = f"{doc_id(path)}:{line_of(text, m.start())}"
            checked += 1
            try:
                obj = _resolve(dotted)
            except (ImportError, AttributeError) as e:
                problems.append(f"{where}: {dotted} does not resolve ({e})")
                continue
            if args and args != "()":
                params = [p.split("=")[0].strip() for p in re.sub(r"\[[^\]]*\]|\([^)]*\)", "", args[1:-1]).split(",")]
                params = [p for p in params if p.isidentifier()]
                accepted = _accepted_keywords(obj) or set()
                missing = [p for p in params if p not in accepted]
                if missing:
                    problems.append(f"{where}: {dotted} has no parameter {', '.join(missing)}")
    assert checked >= 10, f"only {checked} clakit names found in the docs"
    assert not problems, "\n".join(problems)


def test_readme_install_and_test_commands_are_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    blocks = [b for lang, b in FENCE.findall(readme) if lang.strip() == "bash"]
    install = next(b for b in blocks if "pip install" in b and "clakit demo" in b).strip()
    test_command = next(b for b in blocks if "pytest" in b).strip()
    ci_lines = [line.split("#")[0].strip() for line in ci.splitlines()]
    assert test_command in ci_lines, f"README's test command {test_command!r} is not a line of .ci/run"
    for step in ("python3 -m venv .venv", "pip install torch==2.13.0", 'pip install -e ".[dev]"'):
        assert step in install, f"README's install line lacks {step!r}"
        assert step.replace("pip install", "pip install -q") in ci or step in ci, f".ci/run lacks {step!r}"


def test_every_flag_in_help_is_documented():
    """Each option of each command is named somewhere in README.md or docs/*.md (one of its spellings: `-o` for
    `-o/--output`, `--no-allow-pickle` for `--allow-pickle/--no-allow-pickle`)."""
    text = "\n".join(path.read_text() for path in DOCS)
    problems = []
    for command, parser in subparsers().items():
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction) or not action.option_strings:
                continue
            if not any(re.search(rf"(?<![\w-]){re.escape(o)}(?![\w-])", text) for o in action.option_strings):
                problems.append(f"clakit {command} {'/'.join(action.option_strings)}: in no doc")
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------------------- outputs: the fields the docs name


def _has_path(record: dict, dotted: str) -> bool:
    node = record
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _keys_anywhere(node) -> set[str]:
    if isinstance(node, dict):
        return set(node) | {k for v in node.values() for k in _keys_anywhere(v)}
    if isinstance(node, list):
        return {k for v in node for k in _keys_anywhere(v)}
    return set()


def test_clakit_convert_json_holds_the_fields_docs_convert_md_names(tiny_llama_checkpoint, corpus_dir, tmp_path):
    """A tiny conversion with every stage (auto layout, reconstruct, distillation, held-out evaluation): its
    clakit_convert.json has every `settings.X`, `stage_seconds.X` and top-level record the docs name."""
    import json

    from clakit.convert import convert

    heldout, calib = str(corpus_dir / "heldout.txt"), str(corpus_dir / "calib.txt")
    out = convert(
        str(tiny_llama_checkpoint), str(tmp_path / "out"), calib_data=[calib], calib_tokens=256, seq_len=32,
        reconstruct_steps=2, distill_steps=2, distill_tokens=256, eval_data=[heldout], eval_tokens=128, device="cpu",
        quiet=True,
    )  # fmt: skip
    record = json.loads((out / "clakit_convert.json").read_text())
    docs = {name: (ROOT / "docs" / name).read_text() for name in ("convert.md", "quality.md")}
    named = {f"settings.{k}" for k in re.findall(r"`settings\.(\w+)`", docs["convert.md"])}
    named |= {f"stage_seconds.{k}" for k in re.findall(r"`stage_seconds\.(\w+)`", docs["quality.md"])}
    stages = re.search(r"`stage_seconds` in `clakit_convert.json` \(([^)]*)\)", docs["convert.md"]).group(1)
    named |= {f"stage_seconds.{k.strip()}" for k in stages.split(",")}
    sketch = re.search(r"`clakit_convert.json` \(the same, machine-readable: ([^)]*)\)", docs["convert.md"]).group(1)
    named |= set(re.findall(r"`(\w+)`", sketch)) | {"config.device_used", "config.bf16_used", "distill.kl_before"}
    named |= {"distill.losses"}
    assert len(named) >= 15, named
    missing = sorted(k for k in named if not _has_path(record, k))
    assert not missing, f"clakit_convert.json lacks what docs/convert.md names: {missing}"
    for file in ("README.md", "config.json", "configuration_cla.py", "modeling_cla.py", ".clakit_output.json"):
        assert (out / file).is_file(), f"docs/convert.md: OUT holds {file}"


def test_eval_report_holds_the_fields_docs_eval_md_names(tiny_llama_checkpoint, corpus_dir):
    """The report table's keys, the dotted fields in the text, and every key of the passkey JSON sketch."""
    from clakit.eval import evaluate
    from clakit.eval.passkey import PasskeySettings

    report = evaluate(
        str(tiny_llama_checkpoint), data=[str(corpus_dir / "heldout.txt")], seq_len=64, max_tokens=256, batch_size=1,
        decode_steps=2, passkey=PasskeySettings(lengths=[220], depths=[0], samples=1), quiet=True,
    )  # fmt: skip
    doc = (ROOT / "docs" / "eval.md").read_text()
    table = doc[doc.index("The report (JSON) holds:") : doc.index("**Perplexity definition.**")]
    named = set()
    for row in re.findall(r"^\| ([^|]+) \|", table, re.M):
        named |= {k for k in re.findall(r"`([\w.]+)`", row)}
    speed_row = next(r for r in table.splitlines() if r.startswith("| `speed`"))
    named |= {f"speed.{k}" for k in re.findall(r"`(\w+_per_s|prefill_length)`", speed_row)}
    named |= set(re.findall(r"`((?:provenance|kv_cache)\.\w+)`", doc)) - {"provenance.sources"}  # demo.json's
    named |= {"data.sources", "data.sha256"}
    assert len(named) >= 15, named
    missing = sorted(k for k in named if not _has_path(report, k))
    assert not missing, f"clakit eval's report lacks what docs/eval.md names: {missing}"
    sketch = re.search(r'`"passkey": \{.*?\}`', doc, re.S).group(0)
    quoted = set(re.findall(r'"(\w+)"', sketch))
    assert len(quoted) >= 10, quoted
    missing = sorted(quoted - _keys_anywhere({"passkey": report["passkey"]}))
    assert not missing, f"the report's passkey record lacks what docs/eval.md sketches: {missing}"


def test_a_yaml_block_that_names_a_shipped_recipe_shows_its_values():
    """A ```yaml block headed `# clakit uptrain recipes/X.yaml` shows that recipe: every value it writes (the
    placeholders `...` aside) is the shipped file's."""
    import yaml

    def leaves(node, prefix=""):
        if isinstance(node, dict):
            for k, v in node.items():
                yield from leaves(v, f"{prefix}{k}.")
        else:
            yield prefix[:-1], node

    checked, problems = 0, []
    for path in DOCS:
        for language, start, body in blocks(path.read_text()):
            m = re.match(r"# clakit uptrain (recipes/\S+\.yaml)", body)
            if language != "yaml" or not m:
                continue
            shown = yaml.safe_load(re.sub(r",? \.\.\.(?=[,}\]])|\[\.\.\.\]", "", body))
            shipped = dict(leaves(yaml.safe_load((ROOT / m.group(1)).read_text())))
            for key, value in leaves(shown):
                if value is None or value == []:  # a placeholder emptied above
                    continue
                checked += 1
                if shipped.get(key, "(absent)") != value:
                    where = f"{doc_id(path)}:{start}"
                    problems.append(
                        f"{where}: {key} is {value!r} here, {shipped.get(key, '(absent)')!r} in {m.group(1)}"
                    )
    assert checked >= 10, f"only {checked} recipe values compared"
    assert not problems, "\n".join(problems)


def test_every_clakit_environment_variable_the_docs_name_is_read_somewhere():
    code = "\n".join(
        p.read_text() for folder in ("clakit", "tests", "benchmarks", "serving") for p in (ROOT / folder).rglob("*.py")
    )
    named = {v for path in DOCS for v in re.findall(r"\bCLAKIT_[A-Z_]+\b", path.read_text())}
    assert named, "no CLAKIT_ variable found in the docs"
    unread = sorted(v for v in named if v not in code)
    assert not unread, f"environment variables the docs name that no code reads: {unread}"


def test_an_uptrain_run_folder_holds_what_docs_uptrain_md_lists(tiny_llama_checkpoint, corpus_dir, tmp_path):
    """A 2-step run from a conversion on the fly: every path of uptrain.md's run-folder table, the records it names in
    run.json, model/uptrain.json and a checkpoint's state.json, and the metrics.jsonl fields."""
    import json

    import yaml

    from clakit.uptrain import uptrain

    recipe = {
        "model": {"source": str(tiny_llama_checkpoint), "convert": {"factor": 2, "init": "mean"}},
        "data": {"train": [str(corpus_dir / "train.txt")], "eval": [str(corpus_dir / "heldout.txt")], "seq_len": 32,
                 "eval_max_tokens": 64},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 2, "per_device_train_batch_size": 2,
                  "save_steps": 1, "logging_steps": 1, "eval_steps": 1},
        "lora": {"r": 2, "lora_alpha": 4, "target_modules": ["gate_proj"], "full_train": ["k_proj"]},
        "distill": {"weight": 1.0},
    }  # fmt: skip
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    run = uptrain(tmp_path / "r.yaml", quiet=True).parent
    doc = (ROOT / "docs" / "uptrain.md").read_text()
    table = doc[doc.index("| path | what |") : doc.index("TensorBoard logs go to")]
    paths = {p for row in re.findall(r"^\| ([^|]+) \|", table, re.M) for p in re.findall(r"`([\w./-]+/?)`", row)}
    paths -= {"path"}
    assert len(paths) >= 8, paths
    missing = sorted(p for p in paths if not list(run.glob(p.replace("NNNNNN", "*").rstrip("/"))))
    assert not missing, f"the run folder lacks what docs/uptrain.md lists: {missing}"
    records = {
        "model/uptrain.json": ["start_checkpoint", "conversion", "original", "recipe", "command"],
        "run.json": ["fingerprint", "start_checkpoint", "original", "provenance", "data_sha256"],
        sorted(run.glob("checkpoints/step-*/state.json"))[-1].relative_to(run): ["step", "fingerprint", "provenance"],
    }
    for file, keys in records.items():
        record = json.loads((run / file).read_text())
        assert not [k for k in keys if k not in record], f"{file} lacks {[k for k in keys if k not in record]}"
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    row = table[table.index("`metrics.jsonl`") :].splitlines()[0]
    train_fields = re.search(r"\(([^)]*)\)", row).group(1).replace(": the rate that step trained at", "")
    named = {f.strip() for f in train_fields.split(",")} - {"hidden_mse"}  # only with distill.hidden_mse_weight > 0
    logged = set().union(*(set(line) for line in lines if "event" not in line))
    assert not named - logged, f"metrics.jsonl training lines lack {sorted(named - logged)}"
    evals = [line for line in lines if line.get("event") == "eval"]
    assert [e["step"] for e in evals] == [0, 1, 2] and all("eval_perplexity" in e for e in evals)


def test_every_recipe_key_is_documented_in_docs_uptrain_md():
    """Each field of each recipe section is named in docs/uptrain.md: `model.X` for the model section (its names are
    common words), the bare key for the others, where a written pattern (`adam_*`) covers the keys it matches."""
    from clakit.uptrain.recipe import Recipe

    doc = (ROOT / "docs" / "uptrain.md").read_text()
    patterns = [p.replace("*", r"\w+") for p in re.findall(r"\b(\w+_\*)", doc)]
    problems = []
    for section in dataclasses.fields(Recipe):
        for field in dataclasses.fields(section.default_factory):
            if section.name == "model":
                found = re.search(rf"`model\.{field.name}\b", doc)
            else:
                found = re.search(rf"(?<![\w-]){field.name}(?![\w-])", doc) or any(
                    re.fullmatch(p, field.name) for p in patterns
                )
            if not found:
                problems.append(f"{section.name}.{field.name}")
    assert not problems, f"recipe keys docs/uptrain.md never names: {problems}"
