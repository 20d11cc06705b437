"""The `clakit` command: parse arguments, call one library function per command, turn ClakitError into one line."""

import argparse
import sys

import clakit
from clakit.errors import ClakitError


def _add_convert(sub) -> None:
    """`clakit convert SRC OUT` -> clakit.convert (issue 3)."""
    p = sub.add_parser(
        "convert",
        help="turn a Llama/Mistral checkpoint into a CLA checkpoint",
        description="Convert a Llama/Mistral checkpoint (folder, Hub id or .gguf file) into a Cross-Layer Attention "
        "checkpoint folder. Streams tensor by tensor; writes into a temporary folder beside OUT and renames it.",
    )
    p.add_argument("src", metavar="SRC", help="checkpoint folder, Hugging Face Hub id (org/name) or .gguf file")
    p.add_argument("out", metavar="OUT", help="output folder (must not exist unless --overwrite)")
    layout = p.add_argument_group("layout (one of)").add_mutually_exclusive_group()
    layout.add_argument("--factor", type=int, help="uniform CLA-K: groups of K adjacent layers (default 2)")
    layout.add_argument("--kv-source-layers", metavar="LIST", help="explicit layout, e.g. 0,0,2,2 (one per layer)")
    layout.add_argument("--layout", choices=["auto"], help="choose the layout on calibration data (--kv-saving)")
    p.add_argument("--kv-saving", type=float, help="with --layout auto: fraction of the KV cache to save, e.g. 0.5")
    p.add_argument(
        "--init",
        choices=["producer", "mean", "calibrated", "reconstruct"],
        help="shared K/V initialisation (default: mean; calibrated when --calib-data is given)",
    )
    p.add_argument(
        "--calib-data", nargs="+", metavar="TEXT", help="calibration text: files, folders, NAME:CONFIG:SPLIT"
    )
    p.add_argument("--calib-tokens", type=int, default=32768, help="calibration tokens to use (default 32768)")
    p.add_argument(
        "--eval-data",
        action="append",
        metavar="TEXT",
        help="held-out text (repeatable): print perplexity before/after",
    )
    p.add_argument("--revision", help="Hub revision (branch, tag or commit) when SRC is a Hub id")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="dtype of the output (default: kept)")
    p.add_argument("--max-shard-size", default="5GB", help="largest output shard (default 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--allow-pickle", action="store_true", help="accept pickle (.bin) weights; they can run code")
    p.add_argument("--trust-remote-code", action="store_true", help="allow SRC's own code (config/tokenizer)")
    p.add_argument("--seed", type=int, default=0, help="seed for data-aware fitting (default 0)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or messages")
    p.set_defaults(run=_run_convert)


def _run_convert(args) -> int:
    from clakit.convert import convert

    convert(
        args.src, args.out, factor=args.factor, kv_source_layers=args.kv_source_layers, layout=args.layout,
        kv_saving=args.kv_saving, init=args.init, calib_data=args.calib_data, calib_tokens=args.calib_tokens,
        eval_data=args.eval_data, revision=args.revision, dtype=args.dtype, max_shard_size=args.max_shard_size,
        overwrite=args.overwrite, allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code,
        quiet=args.quiet, seed=args.seed,
    )  # fmt: skip
    return 0


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
