"""What refining the auto layout beyond adjacent runs buys, on SmolLM2-135M (the demo assets). Prints JSON lines.

Each variant runs the converter's default with calibration text (`--layout auto --kv-saving 0.5 --init
reconstruct`) with the refinement off (`dp`: runs of adjacent layers only), capped at the DP's largest group
(`capped`, the default) or uncapped (`uncapped`), then scores the result on the demo's held-out text (the
converter's `--eval-data`) and on any `--extra-eval` texts (`clakit eval`'s perplexity, 8,192 tokens, windows of 512).
Each variant's row is printed as a JSON line as it finishes; then the report (settings, provenance: versions and
command, the rows), also written to --out at the end. An existing conversion in --out-dir is replaced only with
--force.

    python benchmarks/layout_refine.py --out-dir /tmp/refine dp capped uncapped \
        --extra-eval /usr/share/common-licenses/GPL-3 /usr/share/common-licenses/Apache-2.0
"""

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import (  # noqa: E402
    OUT_HELP,
    Parser,
    check_output,
    emit,
    existing_file,
    main_guard,
    positive,
    provenance,
    refuse,  # noqa: E402
)

from clakit.convert import ConvertConfig, convert  # noqa: E402
from clakit.demo import fetch_demo  # noqa: E402
from clakit.eval import evaluate  # noqa: E402

VARIANTS = {"dp": {"refine": False}, "capped": {}, "uncapped": {"refine_max_group": 10**6}}  # ConvertConfig fields


def run_variant(name: str, assets, out: Path, calib_tokens: int, overwrite: bool = False) -> dict:
    config = ConvertConfig(
        calib_data=[str(assets.calib)], calib_tokens=calib_tokens, eval_data=[str(assets.heldout)], **VARIANTS[name]
    )
    start = time.perf_counter()
    convert(assets.model, out, config, overwrite=overwrite, quiet=True)
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
    ap = Parser(__doc__)
    ap.add_argument("variants", nargs="+", choices=sorted(VARIANTS), help="refinement variants (see above)")
    ap.add_argument("--out-dir", type=Path, required=True, help="where each variant's conversion is written")
    ap.add_argument("--force", action="store_true", help="replace earlier conversions in --out-dir and --out")
    ap.add_argument("--calib-tokens", type=positive, default=4096, help="calibration tokens (default 4096)")
    ap.add_argument("--extra-eval", type=existing_file, nargs="*", default=[], help="more held-out text files, "
                    "scored together")  # fmt: skip
    ap.add_argument("--out", type=Path, help=OUT_HELP)
    args = ap.parse_args()
    check_output(args.out, args.force)
    for name in args.variants:
        if (args.out_dir / name).exists() and not args.force:
            refuse(
                f"{args.out_dir / name} exists: pass --force to replace an earlier conversion, or another --out-dir"
            )
    args.extra_eval = [str(f) for f in args.extra_eval]
    report = {"benchmark": "layout_refine", "provenance": provenance(args), "rows": []}
    assets = fetch_demo()
    for name in args.variants:
        result = run_variant(name, assets, args.out_dir / name, args.calib_tokens, args.force)
        if args.extra_eval:
            r = evaluate(
                str(args.out_dir / name), data=args.extra_eval, seq_len=512, max_tokens=8192, speed=False, quiet=True
            )
            result["extra_eval_perplexity"] = r["perplexity"]
        print(json.dumps(result), file=sys.stderr, flush=True)
        report["rows"].append(result)
    emit(report, args.out)


if __name__ == "__main__":
    main_guard(main)
