"""The quality frontier: held-out perplexity of SmolLM2-135M converted to CLA by each init and layout, per KV saving.

Uses the demo assets (`clakit fetch-demo`: SmolLM2-135M-Instruct GGUF, the Jargon File and the KJV Bible, split into
disjoint calibration / held-out text). For every KV saving it converts in memory with

    mean              uniform layout, group mean of k_proj/v_proj (no data)
    calibrated        uniform layout, Fisher-weighted closed-form fit
    reconstruct       uniform layout, calibrated + per-group attention-output reconstruction
    auto+calibrated   layout chosen from data (`auto_layout`), calibrated fit
    auto+reconstruct  layout chosen from data, reconstruct

and measures held-out perplexity (text never used for calibration). Prints a JSON table (and writes it with
`--out`), and plots perplexity vs KV bytes per token (`--plot`), the original model as a point.

    python benchmarks/quality_bench.py --savings 0.5 --out quality.json --plot quality.png
    python benchmarks/quality_bench.py --calib-tokens 2048 --eval-tokens 4096 --savings 0.5   # quick look
    python benchmarks/quality_bench.py --savings "" --model uptrained=runs/x/model    # a saved checkpoint only
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clakit.convert.autolayout import auto_layout  # noqa: E402
from clakit.convert.calibrate import calib_input_ids, fit_kv  # noqa: E402
from clakit.convert.inmemory import cla_model_from  # noqa: E402
from clakit.convert.layout import groups, kv_saving, uniform_layout  # noqa: E402
from clakit.corpus import Text  # noqa: E402

METHODS = ("mean", "calibrated", "reconstruct", "auto+calibrated", "auto+reconstruct")


def load_demo():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from clakit.demo import fetch_demo

    assets = fetch_demo(quiet=True)
    kwargs = {"gguf_file": assets.model.name}
    model = AutoModelForCausalLM.from_pretrained(assets.model.parent, dtype=torch.float32, **kwargs).eval()
    tokenizer = AutoTokenizer.from_pretrained(assets.model.parent, **kwargs)
    return model, tokenizer, assets


@torch.no_grad()
def perplexity(model, input_ids: torch.Tensor) -> float:
    losses = [model(row[None], labels=row[None], use_cache=False).loss.item() for row in input_ids]
    return math.exp(sum(losses) / len(losses))


def kv_bytes_per_token(config, layout: list[int], bytes_per_value: int = 2) -> int:
    """K and V of every producer for one token, at 16-bit."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * len(groups(layout)) * config.num_key_value_heads * head_dim * bytes_per_value


def uniform_for(num_layers: int, saving: float) -> list[int]:
    factor = 1
    while kv_saving(uniform_layout(num_layers, factor)) < saving - 1e-9:
        factor += 1
    return uniform_layout(num_layers, factor)


def convert(model, method: str, saving: float, calib_ids: torch.Tensor, steps: int | None, layouts: dict) -> tuple:
    """(CLA model, layout, extra record) for one method at one saving; timed by the caller.

    `layouts` caches the auto layout per saving (the first auto method of a saving pays for choosing it)."""
    n = model.config.num_hidden_layers
    extra = {}
    if method.startswith("auto+"):
        if saving not in layouts:
            layouts[saving] = auto_layout(model, calib_ids, saving, progress=False)
        layout, extra["auto_layout"] = layouts[saving]
    else:
        layout = uniform_for(n, saving)
    init = method.removeprefix("auto+")
    overrides = {} if init == "mean" else fit_kv(model, layout, calib_ids, init, steps=steps, progress=False)
    return cla_model_from(model, layout, init="mean", overrides=overrides), layout, extra


def checkpoint_row(label: str, folder: str, config, heldout: torch.Tensor, original: dict) -> dict:
    """A saved CLA checkpoint (e.g. after uptraining) measured on the same held-out windows."""
    from transformers import AutoModelForCausalLM

    import clakit  # noqa: F401  (registers the CLA classes)

    cla = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    layout = list(cla.config.kv_source_layers)
    ppl = perplexity(cla, heldout)
    return {
        "method": label, "kv_saving": kv_saving(layout), "layout": layout, "checkpoint": folder,
        "kv_bytes_per_token": kv_bytes_per_token(config, layout), "perplexity": ppl,
        "ratio_to_original": ppl / original["perplexity"],
    }  # fmt: skip


def plot(rows: list[dict], original: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in dict.fromkeys(r["method"] for r in rows):  # the methods in order, then any checkpoints
        pts = sorted((r["kv_bytes_per_token"], r["perplexity"]) for r in rows if r["method"] == method)
        ax.plot(*zip(*pts, strict=True), marker="o" if method in METHODS else "*", markersize=8, label=method)
    ax.scatter([original["kv_bytes_per_token"]], [original["perplexity"]], color="black", zorder=5, label="original")
    ax.set_xlabel("KV cache bytes per token (16-bit)")
    ax.set_ylabel("held-out perplexity")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("SmolLM2-135M retrofitted to CLA (held-out perplexity)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--savings", default="0.25,0.5,0.67")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--calib-tokens", type=int, default=8192)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=None, help="reconstruct Adam steps per group")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--plot", default=None)
    ap.add_argument(
        "--model", action="append", default=[], metavar="LABEL=DIR",
        help="also measure a converted/uptrained CLA checkpoint (e.g. the uptraining recipe's output)",
    )  # fmt: skip
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer, assets = load_demo()
    calib = calib_input_ids(tokenizer, [Text("calib", assets.calib.read_text())], args.calib_tokens, args.seq_len)
    heldout = calib_input_ids(tokenizer, [Text("heldout", assets.heldout.read_text())], args.eval_tokens, args.seq_len)
    n = model.config.num_hidden_layers
    original = {
        "perplexity": perplexity(model, heldout),
        "kv_bytes_per_token": kv_bytes_per_token(model.config, list(range(n))),
    }
    rows, layouts = [], {}
    for saving in [float(s) for s in args.savings.split(",") if s]:
        for method in args.methods.split(","):
            done = [(r["method"], r["layout"]) for r in rows]
            if not method.startswith("auto+") and (method, uniform_for(n, saving)) in done:
                continue  # the same uniform layout as a smaller saving (e.g. CLA2 for 0.25 and 0.5): measured once
            start = time.perf_counter()
            cla, layout, extra = convert(model, method, saving, calib, args.steps, layouts)
            wall = time.perf_counter() - start
            ppl = perplexity(cla, heldout)
            rows.append({
                "method": method, "kv_saving_requested": saving, "kv_saving": kv_saving(layout), "layout": layout,
                "kv_bytes_per_token": kv_bytes_per_token(model.config, layout), "perplexity": ppl,
                "ratio_to_original": ppl / original["perplexity"], "convert_wall_s": wall,
                **({"auto_choice": extra["auto_layout"]["chosen"]} if extra else {}),
            })  # fmt: skip
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    for label, folder in (spec.split("=", 1) for spec in args.model):
        rows.append(checkpoint_row(label, folder, model.config, heldout, original))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    result = {
        "model": str(assets.model), "calib_text": str(assets.calib), "heldout_text": str(assets.heldout),
        "calib_tokens": calib.numel(), "eval_tokens": heldout.numel(), "seq_len": args.seq_len,
        "threads": torch.get_num_threads(), "original": original, "rows": rows,
    }  # fmt: skip
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    if args.plot:
        plot(rows, original, args.plot)


if __name__ == "__main__":
    main()
