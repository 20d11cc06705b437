"""The `clakit` command: parse arguments, call one library function per command, turn ClakitError into one line."""

import argparse
import sys

import clakit
from clakit.errors import ClakitError


def _add_convert(sub) -> None:
    """`clakit convert SRC OUT` -> clakit.convert (issue 3)."""


def _add_eval(sub) -> None:
    """`clakit eval MODEL -o report.json` -> clakit.eval (issue 4)."""


def _add_report(sub) -> None:
    """`clakit report A.json B.json -o DIR` -> clakit.eval (issue 4)."""


def _add_fetch_demo(sub) -> None:
    """`clakit fetch-demo DIR` -> clakit.eval (issue 4)."""


def _add_demo(sub) -> None:
    """`clakit demo` -> clakit.eval (issue 4; grows with uptrain, issue 5)."""


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
