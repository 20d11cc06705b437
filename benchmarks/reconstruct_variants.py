"""What each part of `reconstruct` buys, on SmolLM2-135M (the demo assets) with a fixed layout. Prints JSON lines.

The calibration statistics are computed once; each variant then runs `reconstruct_overrides` with its options and
the converted model is scored with the eval suite's perplexity on the held-out text (as `clakit convert
--eval-data` does). Variants: `base` (shared K/V + q_proj), `o` (+ o_proj), `seq` (sequential inputs), combined
with `+`, e.g. `o+seq` (the default). Each row is printed as a JSON line as it finishes; then the report (settings,
provenance: versions and command, the rows), also written to --out at the end.

    python benchmarks/reconstruct_variants.py --layout "[0,1,2,2,2,5,5,5,...]" --steps 100 base o o+seq
"""

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import (  # noqa: E402
    FORCE_HELP,
    OUT_HELP,
    Parser,
    check_output,
    emit,
    main_guard,
    non_negative,
    positive,
    provenance,
    refuse,  # noqa: E402
)

from clakit.convert import ConvertConfig  # noqa: E402
from clakit.convert.calibrate import calib_input_ids, calibrated_overrides, collect_stats, group_pairs  # noqa: E402
from clakit.convert.inmemory import cla_model_from  # noqa: E402
from clakit.convert.layout import check_layout, groups  # noqa: E402
from clakit.convert.reconstruct import reconstruct_overrides  # noqa: E402
from clakit.corpus import Text  # noqa: E402
from clakit.eval.perplexity import perplexity  # noqa: E402

WINDOW = 512  # tokens per calibration sequence and per held-out window, as `clakit convert --eval-data` scores


def main() -> None:
    ap = Parser(__doc__)
    ap.add_argument("variants", nargs="+", help="base, o, seq or combinations with + (e.g. o+seq)")
    ap.add_argument("--layout", required=True, help="kv_source_layers as JSON, e.g. the auto layout chosen")
    ap.add_argument("--steps", type=non_negative, default=100, help="reconstruction Adam steps per group")
    ap.add_argument("--calib-tokens", type=positive, default=4096, help="calibration tokens (default 4096)")
    ap.add_argument("--eval-tokens", type=positive, default=8192, help="held-out tokens scored (default 8192)")
    ap.add_argument("--out", type=Path, help=OUT_HELP)
    ap.add_argument("--force", action="store_true", help=FORCE_HELP)
    args = ap.parse_args()
    for variant in args.variants:
        if not set(variant.split("+")) <= {"base", "o", "seq"}:
            refuse(f"variant {variant!r}: pass base, o, seq or a combination with + (e.g. o+seq)")
    try:
        layout = json.loads(args.layout)
    except ValueError:
        refuse(f"--layout {args.layout!r} is not JSON: pass a list like [0,0,2,2]")
    if not isinstance(layout, list) or not all(isinstance(x, int) for x in layout):
        refuse(f"--layout {args.layout!r}: pass a JSON list of layer indices like [0,0,2,2]")
    for flag, tokens in (("--calib-tokens", args.calib_tokens), ("--eval-tokens", args.eval_tokens)):
        if tokens < WINDOW:
            refuse(f"{flag} {tokens} is less than one window of {WINDOW} tokens: pass {WINDOW} or more")
    check_output(args.out, args.force)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from clakit.demo import fetch_demo

    assets = fetch_demo(quiet=True)
    kwargs = {"gguf_file": assets.model.name}
    model = AutoModelForCausalLM.from_pretrained(assets.model.parent, dtype=torch.float32, **kwargs).eval()
    tokenizer = AutoTokenizer.from_pretrained(assets.model.parent, **kwargs)
    check_layout(layout, model.config.num_hidden_layers)
    held = assets.heldout.read_text()

    def ppl(m) -> float:
        return perplexity(m, tokenizer, held, seq_len=WINDOW, max_tokens=args.eval_tokens, quiet=True)["perplexity"]

    ids = calib_input_ids(tokenizer, [Text("calib", assets.calib.read_text())], args.calib_tokens, WINDOW)
    shared = [i for members in groups(layout).values() if len(members) > 1 for i in members]
    stats = collect_stats(model, ids, group_pairs(layout), keep=shared, progress=False)
    closed = calibrated_overrides(model, layout, stats)
    report = {"benchmark": "reconstruct_variants", "provenance": provenance(args), "layout": layout, "rows": []}

    def row(r: dict) -> None:
        print(json.dumps(r), file=sys.stderr, flush=True)
        report["rows"].append(r)

    row({"variant": "original", "perplexity": ppl(model)})
    row({"variant": "calibrated", "perplexity": ppl(cla_model_from(model, layout, overrides=closed))})
    for variant in args.variants:
        parts, objective = variant.split("+"), {}
        start = time.perf_counter()
        config = ConvertConfig(train_o_proj="o" in parts, sequential="seq" in parts, reconstruct_steps=args.steps)
        fitted = reconstruct_overrides(
            model, layout, stats, closed, steps=config.reconstruct_steps, progress=False, report=objective,
            train_o=config.train_o_proj, sequential=config.sequential, lr=config.reconstruct_lr,
        )  # fmt: skip
        fitted_row = {
            "variant": variant, "steps": args.steps, "wall_s": round(time.perf_counter() - start, 1),
            "perplexity": ppl(cla_model_from(model, layout, overrides=fitted)),
            "objective_best_over_start": {k: round(r["best"] / r["start"], 3) for k, r in objective.items()},
        }  # fmt: skip
        row(fitted_row)
    emit(report, args.out)


if __name__ == "__main__":
    main_guard(main)
