"""Held-out perplexity of `clakit convert` outputs per --init, on text the calibration never saw.

Converts SRC (e.g. the SmolLM2-135M GGUF) once per init with `clakit.convert.convert`, then scores the source and
every output with the eval suite's perplexity (disjoint windows) on each held-out file. Prints a JSON line per init
on stderr as it goes, then on stdout the report (settings, provenance: versions and command, the scores; --out
writes it at the end).

    python benchmarks/convert_quality.py SmolLM2-135M-Instruct.Q4_1.gguf --calib-data calib.txt \\
        --eval-data heldout_a.txt heldout_b.txt --inits producer,mean,calibrated
"""

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import (
    FORCE_HELP,
    OUT_HELP,
    Parser,
    check_output,
    emit,
    existing_file,
    main_guard,
    positive,
    provenance,
    refuse,
)

from clakit.convert import convert
from clakit.convert.config import DEFAULT_SEQ_LEN
from clakit.convert.pipeline import DATA_AWARE_INITS as DATA_AWARE
from clakit.convert.pipeline import check_not_calibrated
from clakit.corpus import join_texts, load_texts
from clakit.errors import ClakitError
from clakit.eval.perplexity import perplexity
from clakit.sources import Source, load_model, load_tokenizer, resolve_source

INITS = ("producer", "mean", "calibrated", "reconstruct")


def scores(model, tokenizer, eval_data: list[str], max_tokens: int, seq_len: int) -> dict[str, float]:
    return {
        spec: round(
            perplexity(model, tokenizer, join_texts(load_texts([spec])), seq_len, max_tokens=max_tokens)["perplexity"],
            2,
        )
        for spec in eval_data
    }


def main() -> None:
    parser = Parser(__doc__)
    parser.add_argument("src", help="the source model (folder or GGUF file)")
    parser.add_argument("--calib-data", type=existing_file, required=True, help="calibration text file")
    parser.add_argument("--calib-tokens", type=positive, default=8192, help="calibration tokens (default 8192)")
    parser.add_argument("--eval-data", type=existing_file, nargs="+", required=True, help="held-out text files")
    parser.add_argument("--eval-tokens", type=positive, default=8192, help="tokens scored per file (default 8192)")
    parser.add_argument("--seq-len", type=positive, default=512, help="tokens per held-out window (default 512)")
    parser.add_argument("--calib-seq-len", type=positive, help="tokens per calibration sequence (default: the "
                        f"converter's, {DEFAULT_SEQ_LEN})")  # fmt: skip
    parser.add_argument("--factor", type=positive, default=2, help="layers per KV group (default 2)")
    parser.add_argument("--inits", default="producer,mean,calibrated", help="comma-separated inits to convert with "
                        f"({', '.join(INITS)}; default producer,mean,calibrated)")  # fmt: skip
    parser.add_argument("--out", type=Path, help=OUT_HELP)
    parser.add_argument("--force", action="store_true", help=FORCE_HELP)
    args = parser.parse_args()
    inits = [i for i in args.inits.split(",") if i]
    if not inits or any(i not in INITS for i in inits):
        refuse(f"--inits {args.inits!r}: pass a comma-separated list of {', '.join(INITS)}")
    calib_seq_len = args.calib_seq_len or DEFAULT_SEQ_LEN
    if args.calib_tokens < calib_seq_len and any(i in ("calibrated", "reconstruct") for i in inits):
        refuse(f"--calib-tokens {args.calib_tokens} is less than one calibration sequence ({calib_seq_len} tokens): "
               "pass more --calib-tokens or a smaller --calib-seq-len")  # fmt: skip
    check_output(args.out, args.force)
    args.calib_data, args.eval_data = str(args.calib_data), [str(f) for f in args.eval_data]
    try:  # held-out means not calibrated on: the same text under another name included (convert refuses it too)
        check_not_calibrated(load_texts(args.eval_data), load_texts([args.calib_data]))
    except ClakitError as e:
        refuse(str(e))
    source = resolve_source(args.src)
    tokenizer = load_tokenizer(source)
    model = load_model(source, torch.float32)
    report = {
        "benchmark": "convert_quality",
        "provenance": provenance(args),
        "source": args.src,
        "factor": args.factor,
        "calib_data": args.calib_data,
        "calib_tokens": args.calib_tokens,
    }
    report["eval_tokens"], report["seq_len"] = args.eval_tokens, args.seq_len
    report["original"] = scores(model, tokenizer, args.eval_data, args.eval_tokens, args.seq_len)
    del model
    work = Path(tempfile.mkdtemp(prefix="clakit_quality_"))
    try:
        for init in inits:
            start = time.perf_counter()
            calib = {"calib_data": [args.calib_data], "calib_tokens": args.calib_tokens} if init in DATA_AWARE else {}
            out = convert(
                args.src, work / init, factor=args.factor, init=init, seq_len=args.calib_seq_len, quiet=True, **calib
            )  # fmt: skip
            convert_s = time.perf_counter() - start
            cla = load_model(Source(str(out), "dir", out), torch.float32)
            report[init] = scores(cla, tokenizer, args.eval_data, args.eval_tokens, args.seq_len)
            report[init]["convert_s"] = round(convert_s, 1)
            print(json.dumps({init: report[init]}), file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    emit(report, args.out)


if __name__ == "__main__":
    main_guard(main)
