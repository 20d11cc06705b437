"""What each part of `reconstruct` buys, on SmolLM2-135M (the demo assets) with a fixed layout. Prints JSON lines.

The calibration statistics are computed once; each variant then runs `reconstruct_overrides` with its options and
the converted model is scored with the eval suite's perplexity on the held-out text (as `clakit convert
--eval-data` does). Variants: `base` (shared K/V + q_proj), `o` (+ o_proj), `seq` (sequential inputs), combined
with `+`, e.g. `o+seq` (the default).

    python benchmarks/reconstruct_variants.py --layout "[0,1,2,2,2,5,5,5,...]" --steps 100 base o o+seq
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clakit.convert import ConvertConfig  # noqa: E402
from clakit.convert.calibrate import calib_input_ids, calibrated_overrides, collect_stats, group_pairs  # noqa: E402
from clakit.convert.inmemory import cla_model_from  # noqa: E402
from clakit.convert.layout import check_layout, groups  # noqa: E402
from clakit.convert.reconstruct import reconstruct_overrides  # noqa: E402
from clakit.corpus import Text  # noqa: E402
from clakit.eval.perplexity import perplexity  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("variants", nargs="+")
    ap.add_argument("--layout", required=True, help="kv_source_layers as JSON, e.g. the auto layout chosen")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--calib-tokens", type=int, default=4096)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from clakit.demo import fetch_demo

    assets = fetch_demo(quiet=True)
    kwargs = {"gguf_file": assets.model.name}
    model = AutoModelForCausalLM.from_pretrained(assets.model.parent, dtype=torch.float32, **kwargs).eval()
    tokenizer = AutoTokenizer.from_pretrained(assets.model.parent, **kwargs)
    layout = json.loads(args.layout)
    check_layout(layout, model.config.num_hidden_layers)
    held = assets.heldout.read_text()

    def ppl(m) -> float:
        return perplexity(m, tokenizer, held, seq_len=512, max_tokens=args.eval_tokens, quiet=True)["perplexity"]

    ids = calib_input_ids(tokenizer, [Text("calib", assets.calib.read_text())], args.calib_tokens, 512)
    shared = [i for members in groups(layout).values() if len(members) > 1 for i in members]
    stats = collect_stats(model, ids, group_pairs(layout), keep=shared, progress=False)
    closed = calibrated_overrides(model, layout, stats)
    print(json.dumps({"variant": "original", "perplexity": ppl(model)}), flush=True)
    print(json.dumps({"variant": "calibrated", "perplexity": ppl(cla_model_from(model, layout, overrides=closed))}))
    for variant in args.variants:
        parts, report = variant.split("+"), {}
        start = time.perf_counter()
        config = ConvertConfig(train_o_proj="o" in parts, sequential="seq" in parts, reconstruct_steps=args.steps)
        fitted = reconstruct_overrides(
            model, layout, stats, closed, steps=config.reconstruct_steps, progress=False, report=report,
            train_o=config.train_o_proj, sequential=config.sequential, lr=config.reconstruct_lr,
        )  # fmt: skip
        row = {
            "variant": variant, "steps": args.steps, "wall_s": round(time.perf_counter() - start, 1),
            "perplexity": ppl(cla_model_from(model, layout, overrides=fitted)),
            "objective_best_over_start": {k: round(r["best"] / r["start"], 3) for k, r in report.items()},
        }  # fmt: skip
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
