"""Held-out perplexity of `clakit convert` outputs per --init, on text the calibration never saw.

Converts SRC (e.g. the SmolLM2-135M GGUF) once per init with `clakit.convert.convert`, then scores the source and
every output with the converter's own `heldout_perplexity` on each held-out file. Prints JSON.

    python benchmarks/convert_quality.py SmolLM2-135M-Instruct.Q4_1.gguf --calib-data calib.txt \\
        --eval-data heldout_a.txt heldout_b.txt --inits producer,mean,calibrated
"""

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from clakit.convert import convert
from clakit.convert.heldout import heldout_perplexity
from clakit.corpus import load_texts
from clakit.sources import Source, load_model, load_tokenizer, resolve_source


def scores(model, tokenizer, eval_data: list[str], max_tokens: int, seq_len: int) -> dict[str, float]:
    return {
        spec: round(heldout_perplexity(model, tokenizer, load_texts([spec]), max_tokens, seq_len), 2)
        for spec in eval_data
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src")
    parser.add_argument("--calib-data", required=True)
    parser.add_argument("--calib-tokens", type=int, default=8192)
    parser.add_argument("--eval-data", nargs="+", required=True)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--factor", type=int, default=2)
    parser.add_argument("--inits", default="producer,mean,calibrated")
    args = parser.parse_args()
    source = resolve_source(args.src)
    tokenizer = load_tokenizer(source)
    model = load_model(source, torch.float32)
    report = {
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
        for init in args.inits.split(","):
            start = time.perf_counter()
            out = convert(
                args.src, work / init, factor=args.factor, init=init, calib_data=[args.calib_data],
                calib_tokens=args.calib_tokens, quiet=True,
            )  # fmt: skip
            convert_s = time.perf_counter() - start
            cla = load_model(Source(str(out), "dir", out), torch.float32)
            report[init] = scores(cla, tokenizer, args.eval_data, args.eval_tokens, args.seq_len)
            report[init]["convert_s"] = round(convert_s, 1)
            print(json.dumps({init: report[init]}), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
