"""What refining the auto layout beyond adjacent runs buys, on SmolLM2-135M (the demo assets). Prints JSON lines.

Each variant runs the converter's default with calibration text (`--layout auto --kv-saving 0.5 --init
reconstruct`) with the refinement off (`dp`: runs of adjacent layers only), capped at the DP's largest group
(`capped`, the default) or uncapped (`uncapped`), then scores the result on the demo's held-out text (the
converter's `--eval-data`) and on any `--extra-eval` texts (`clakit eval`'s perplexity, 8,192 tokens, windows of 512).

    python benchmarks/layout_refine.py --out-dir /tmp/refine dp capped uncapped \
        --extra-eval /usr/share/common-licenses/GPL-3 /usr/share/common-licenses/Apache-2.0
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clakit.convert import ConvertConfig, convert  # noqa: E402
from clakit.demo import fetch_demo  # noqa: E402
from clakit.eval import evaluate  # noqa: E402

VARIANTS = {"dp": {"refine": False}, "capped": {}, "uncapped": {"refine_max_group": 10**6}}  # ConvertConfig fields


def run_variant(name: str, assets, out: Path, calib_tokens: int) -> dict:
    config = ConvertConfig(
        calib_data=[str(assets.calib)], calib_tokens=calib_tokens, eval_data=[str(assets.heldout)], **VARIANTS[name]
    )
    start = time.perf_counter()
    convert(assets.model, out, config, overwrite=True, quiet=True)
    record = json.loads((out / "clakit_convert.json").read_text())
    chosen = record["auto_layout"]["chosen"]
    return {
        "variant": name,
        "wall_s": round(time.perf_counter() - start, 1),
        "layout": record["auto_layout"]["candidates"][chosen]["layout"],
        "nll_increase_mean_init": record["auto_layout"]["candidates"][chosen]["nll_increase_mean_init"],
        "moves": record["auto_layout"].get("refine_moves", []),
        "heldout_perplexity": record["eval"]["perplexity_after"],
        "heldout_original": record["eval"]["perplexity_before"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("variants", nargs="+", choices=sorted(VARIANTS))
    ap.add_argument("--out-dir", type=Path, required=True)
    ap.add_argument("--calib-tokens", type=int, default=4096)
    ap.add_argument("--extra-eval", nargs="*", default=[], help="more held-out text files, scored together")
    args = ap.parse_args()
    assets = fetch_demo()
    for name in args.variants:
        result = run_variant(name, assets, args.out_dir / name, args.calib_tokens)
        if args.extra_eval:
            r = evaluate(
                str(args.out_dir / name), data=args.extra_eval, seq_len=512, max_tokens=8192, speed=False, quiet=True
            )
            result["extra_eval_perplexity"] = r["perplexity"]
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
