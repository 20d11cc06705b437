"""The quality frontier at equal KV bytes: held-out perplexity of SmolLM2-135M against KV-cache bytes per token for
CLA conversions and the cheap alternatives (KV-cache quantisation, KV-head merging), alone and combined.

Uses the demo assets (`clakit fetch-demo`: SmolLM2-135M-Instruct GGUF, the Jargon File and the KJV Bible, split into
disjoint calibration / held-out text). Every perplexity is `clakit eval`'s (clakit.eval.perplexity: BOS first,
disjoint windows of `--seq-len`, the first `--eval-tokens` tokens of the held-out text), so the original here is the
number `clakit eval GGUF --data heldout.txt --max-tokens N --seq-len 512` prints. KV bytes are at 16-bit (bf16),
computed from the config (clakit.eval.kvcache / kvquant; tests check both equal what the caches hold).

CLA conversions, in memory, per KV saving (`--savings`, `--methods`):

    mean              uniform layout, group mean of k_proj/v_proj (no data)
    calibrated        uniform layout, Fisher-weighted closed-form fit
    reconstruct       uniform layout, calibrated + per-group attention-output reconstruction
    auto+calibrated   layout chosen from data (`auto_layout`), calibrated fit
    auto+reconstruct  layout chosen from data, reconstruct
    auto+reconstruct+distill  the same, then end-to-end distillation (`--distill-steps`): the converter's default

Baselines on the original model (`--baselines`):

    kv8, kv4          transformers' QuantizedCache (HQQ, per-token groups of --kv-group, scale + zero each) at 8/4 bits
    heads-mean        KV heads merged to `--kv-heads` (mean-pool, GQA uptraining's start)
    heads-fitted      KV heads merged, values fitted on the calibration text (clakit.convert.kvheads)

and every CLA model of the best method asked for (auto+reconstruct+distill, else auto+reconstruct) and every `--model`
checkpoint again with a quantised cache (`--cla-kv-bits 8`):
CLA + 8-bit KV. Quantised caches are scored chunk by chunk (`--chunk` tokens per forward, each chunk folded into the
quantised store before the next reads it; `perplexity.score_cached`). Prints JSON lines, writes the table (`--out`)
and the plot of perplexity against KV bytes per token (`--plot`), both once, at the end (an existing file is replaced
only with --force); the table holds the settings, provenance (versions, command), the load average and the rows.
While the sweep runs, each row is also appended to OUT.partial.jsonl (removed once OUT is written).

    python benchmarks/quality_bench.py --savings 0.5 --methods auto+reconstruct --baselines kv8,kv4 --out q.json
    python benchmarks/quality_bench.py --savings "" --baselines "" --model uptrained=runs/x/model   # a checkpoint
    python benchmarks/quality_bench.py --savings "" --methods "" --baselines "" --cla-kv-bits "" --eval-tokens 64 \
        --calib-tokens 64 --seq-len 32                                      # the original only: a smoke test
"""

import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import (  # noqa: E402
    Parser,
    check_apart,
    check_output,
    main_guard,
    non_negative,
    positive,
    provenance,
    refuse,
    save_figure,
    write_json,
)

from clakit.convert import distill, kvheads  # noqa: E402
from clakit.convert.autolayout import auto_layout  # noqa: E402
from clakit.convert.calibrate import calib_input_ids, fit_kv  # noqa: E402
from clakit.convert.config import DEFAULT_DISTILL_STEPS, ConvertConfig  # noqa: E402
from clakit.convert.inmemory import cla_model_from  # noqa: E402
from clakit.convert.layout import kv_saving, uniform_layout  # noqa: E402
from clakit.corpus import Text, join_texts, load_texts  # noqa: E402
from clakit.errors import ClakitError  # noqa: E402
from clakit.eval import kvcache, kvquant, passkey, perplexity  # noqa: E402
from clakit.sources import context_window  # noqa: E402

METHODS = ("mean", "calibrated", "reconstruct", "auto+calibrated", "auto+reconstruct", "auto+reconstruct+distill")
BASELINES = ("kv8", "kv4", "heads-mean", "heads-fitted")
SIXTEEN_BIT = torch.bfloat16  # the dtype KV bytes are counted in (the models run in fp32 on CPU)


def load_demo():
    from clakit.demo import fetch_demo
    from clakit.sources import load_model, load_tokenizer, resolve_source

    assets = fetch_demo(quiet=True)
    source = resolve_source(str(assets.model))  # what `clakit eval GGUF` loads: fp32
    return load_model(source), load_tokenizer(source), assets


class Heldout:
    """The held-out tokens and how every model is scored on them: clakit.eval's perplexity, one number per model."""

    def __init__(self, tokenizer, path: Path, max_tokens: int, seq_len: int, chunk: int, group: int):
        self.tokens = perplexity.tokenize(tokenizer, join_texts(load_texts([str(path)])), max_tokens)
        self.seq_len, self.chunk, self.group = seq_len, chunk, group

    def ppl(self, model, nbits: int | None = None) -> float:
        """`clakit eval`'s perplexity; with `nbits`, through a quantised cache, `chunk` tokens per forward."""
        ids, n = self.tokens.ids, self.seq_len
        if nbits is None:
            scored = perplexity.score(model, ids, n, n, batch_size=4, quiet=True)
        else:
            chunk, group = self.chunk, self.group

            def new_cache():
                return kvquant.QuantizedKVCache(model.config, nbits, q_group_size=group, residual_length=chunk)

            scored = perplexity.score_cached(model, ids, n, n, new_cache, chunk, quiet=True)
        return perplexity.metrics(scored["nll_sum"], scored["num_scored"], self.tokens.text)["perplexity"]


def kv_bytes(config, nbits: int | None = None, group: int = kvquant.DEFAULT_GROUP) -> float:
    """KV-cache bytes per token at 16-bit: plain (producers only, for CLA) or quantised to `nbits`."""
    if nbits is None:
        return kvcache.bytes_per_token(config, SIXTEEN_BIT)
    return kvquant.bytes_per_token(config, nbits, SIXTEEN_BIT, group)


def uniform_for(num_layers: int, saving: float) -> list[int]:
    factor = 1
    while kv_saving(uniform_layout(num_layers, factor)) < saving - 1e-9:
        factor += 1
    return uniform_layout(num_layers, factor)


def convert(model, method: str, saving: float, calib_ids: torch.Tensor, args, layouts: dict) -> tuple:
    """(CLA model, layout, extra record) for one method at one saving; timed by the caller.

    `layouts` caches the auto layout per saving (the first auto method of a saving pays for choosing it)."""
    steps = args.steps
    n = model.config.num_hidden_layers
    extra = {}
    if method.startswith("auto+"):
        if saving not in layouts:
            layouts[saving] = auto_layout(model, calib_ids, saving, progress=False)
        layout, extra["auto_layout"] = layouts[saving]
    else:
        layout = uniform_for(n, saving)
    init = method.removeprefix("auto+").removesuffix("+distill")
    overrides = {} if init == "mean" else fit_kv(model, layout, calib_ids, init, steps=steps, progress=False)
    if method.endswith("+distill"):  # what the converter does next (clakit.convert.distill)
        student = distill.cla_student(model, layout, overrides)
        logits = distill.teacher_logits(model, calib_ids)
        trained, extra["distill"] = distill.distill(
            student, calib_ids, logits, steps=args.distill_steps, lr=ConvertConfig.distill_lr, seed=0, progress=False
        )
        del extra["distill"]["losses"]
        overrides = {**overrides, **trained}
    return cla_model_from(model, layout, init="mean", overrides=overrides), layout, extra


class Sweep:
    """Rows of the table: each measured model, its KV bytes per token, perplexity, ratio to the original."""

    def __init__(self, heldout: Heldout, original_bytes: float, partial: str | None = None):
        self.heldout, self.original_bytes, self.partial = heldout, original_bytes, partial
        self.rows: list[dict] = []
        self.original_ppl = None

    def add(self, method: str, model, nbits: int | None = None, passkey_of=None, **extra) -> dict:
        start = time.perf_counter()
        ppl = self.heldout.ppl(model, nbits)
        if passkey_of is not None:  # (tokenizer, prepared prompts): retrieval through the model's own cache
            found = passkey.run(model, passkey_of[0], passkey_of[1])
            extra["passkey"] = {k: found[k] for k in ("accuracy", "cells", "settings")}
        self.original_ppl = self.original_ppl or ppl  # the first row is the original
        kv = kv_bytes(model.config, nbits, self.heldout.group)
        row = {
            "method": method, "kv_bits": nbits or 16, "kv_bytes_per_token": kv,
            "kv_saving_factor": self.original_bytes / kv, "perplexity": ppl,
            "ratio_to_original": ppl / self.original_ppl, "eval_wall_s": round(time.perf_counter() - start, 1),
            **extra,
        }  # fmt: skip
        self.rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
        if self.partial:  # a long sweep keeps what it measured if it is stopped
            Path(self.partial).write_text("".join(json.dumps(r) + "\n" for r in self.rows))
        return row


def run_cla(sweep: Sweep, model, calib, args) -> None:
    """CLA conversions per saving; auto+reconstruct models also with a quantised cache (`--cla-kv-bits`)."""
    n, layouts, done = model.config.num_hidden_layers, {}, set()
    for saving in [float(s) for s in args.savings.split(",") if s]:
        for method in [m for m in args.methods.split(",") if m]:
            key = (method, tuple(uniform_for(n, saving))) if not method.startswith("auto+") else (method, saving)
            if key in done:
                continue  # the same uniform layout as a smaller saving (e.g. CLA2 for 0.25 and 0.5): measured once
            done.add(key)
            start = time.perf_counter()
            cla, layout, extra = convert(model, method, saving, calib, args, layouts)
            info = {"kv_saving_requested": saving, "layout": layout, "convert_wall_s": time.perf_counter() - start}
            info |= {"auto_choice": extra["auto_layout"]["chosen"]} if "auto_layout" in extra else {}
            info |= {"distill": extra["distill"]} if "distill" in extra else {}
            retrieval = method == args.best and saving in args.passkey_savings
            sweep.add(method, cla, passkey_of=args.passkey if retrieval else None, **info)
            if method == args.best and (args.cla_kv_savings is None or saving in args.cla_kv_savings):
                for bits in args.cla_kv_bits:
                    sweep.add(f"{method}+kv{bits}", cla, bits, kv_saving_requested=saving, layout=layout)


def run_baselines(sweep: Sweep, model, calib, args) -> None:
    for name in [b for b in args.baselines.split(",") if b]:
        if name.startswith("kv"):
            sweep.add(name, model, int(name[2:]))
            continue
        start = time.perf_counter()
        merged = kvheads.merge_kv_heads(model, args.kv_heads, name.removeprefix("heads-"), calib_ids=calib)
        sweep.add(name, merged, kv_heads=args.kv_heads, convert_wall_s=time.perf_counter() - start)


def run_checkpoints(sweep: Sweep, specs: list[str], args) -> None:
    """Saved checkpoints (e.g. the uptraining recipe's output), plain and with a quantised cache."""
    from clakit.sources import load_model, resolve_source

    for label, folder in (spec.split("=", 1) for spec in specs):
        model = load_model(resolve_source(folder), dtype=torch.float32)
        layout = list(getattr(model.config, "kv_source_layers", None) or range(model.config.num_hidden_layers))
        sweep.add(label, model, passkey_of=args.passkey, checkpoint=folder, layout=layout)
        for bits in args.cla_kv_bits:
            sweep.add(f"{label}+kv{bits}", model, bits, checkpoint=folder, layout=layout)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    families = dict.fromkeys(r["method"].split("+kv")[0] if "+kv" in r["method"] else r["method"] for r in rows)
    for family in families:
        for quantised in (False, True):
            pts = sorted(
                (r["kv_bytes_per_token"], r["perplexity"]) for r in rows
                if (r["method"].startswith(family + "+kv") if quantised else r["method"] == family)
            )  # fmt: skip
            if pts:
                label = f"{family} + 8/4-bit KV" if quantised else family
                style = dict(marker="s" if quantised else "o", linestyle="--" if quantised else "-")
                ax.plot(*zip(*pts, strict=True), markersize=7, label=label, **style)
    ax.set_xlabel("KV cache bytes per token (16-bit; quantised: integers + scales)")
    ax.set_ylabel("held-out perplexity (clakit eval)")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("SmolLM2-135M: held-out perplexity vs KV bytes per token")
    fig.tight_layout()
    save_figure(fig, Path(path), dpi=120)


def main() -> None:
    ap = Parser(__doc__)
    ap.add_argument("--savings", default="0.25,0.5,0.67", help="comma-separated KV savings in (0, 1) for the CLA "
                    "conversions ('' for none; default 0.25,0.5,0.67)")  # fmt: skip
    ap.add_argument(
        "--methods", default=",".join(METHODS), help="comma-separated CLA methods (see above; '' for none)"
    )
    ap.add_argument("--baselines", default=",".join(BASELINES), help="comma-separated baselines (see above; '' for "
                    "none)")  # fmt: skip
    ap.add_argument("--kv-heads", type=positive, default=1, help="KV heads after merging (SmolLM2: 3 -> 1)")
    ap.add_argument("--cla-kv-bits", default="8", help="bits of the quantised cache on CLA models ('' for none)")
    ap.add_argument("--cla-kv-savings", default=None, help="savings whose CLA model also runs quantised (default all)")
    ap.add_argument("--chunk", type=positive, default=32, help="tokens per forward through a quantised cache")
    ap.add_argument("--kv-group", type=positive, default=kvquant.DEFAULT_GROUP,
                    help=f"values per quantisation group; divides head_dim (default {kvquant.DEFAULT_GROUP})")
    ap.add_argument("--passkey-lengths", default="", help="e.g. 512,1024,2048: passkey accuracy (depths 0/0.5/1)")
    ap.add_argument("--passkey-savings", default="0.5", help="auto+reconstruct savings that also run the passkey")
    ap.add_argument("--calib-tokens", type=positive, default=4096, help="calibration tokens (default 4096)")
    ap.add_argument("--eval-tokens", type=positive, default=4096, help="held-out tokens scored (default 4096)")
    ap.add_argument("--seq-len", type=positive, default=512, help="tokens per window (default 512)")
    ap.add_argument("--steps", type=non_negative, default=None, help="reconstruct Adam steps per group")
    ap.add_argument("--distill-steps", type=non_negative, default=DEFAULT_DISTILL_STEPS, help="+distill: Adam steps")
    ap.add_argument("--threads", type=positive, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", type=Path, default=None, help="write the table (JSON) here, at the end")
    ap.add_argument("--plot", type=Path, default=None, help="write the plot (PNG) here, at the end")
    ap.add_argument("--force", action="store_true", help="replace an existing --out / --plot file")
    ap.add_argument(
        "--model", action="append", default=[], metavar="LABEL=DIR",
        help="also measure a converted/uptrained CLA checkpoint (e.g. the uptraining recipe's output)",
    )  # fmt: skip
    args = ap.parse_args()
    validate(args)
    settings = provenance(args)  # the settings as given, before parsing the lists
    args.cla_kv_bits = [int(b) for b in args.cla_kv_bits.split(",") if b]
    methods = [m for m in args.methods.split(",") if m]  # the best asked for also runs quantised and the passkey
    args.best = next((m for m in ("auto+reconstruct+distill", "auto+reconstruct") if m in methods), None)
    args.passkey_savings = [float(x) for x in args.passkey_savings.split(",") if x]
    if args.cla_kv_savings is not None:
        args.cla_kv_savings = [float(x) for x in args.cla_kv_savings.split(",") if x]
    if args.threads:
        torch.set_num_threads(args.threads)
    start, load = time.perf_counter(), os.getloadavg()
    model, tokenizer, assets = load_demo()
    check_kv_group(model.config, args)
    calib = calib_input_ids(tokenizer, [Text("calib", assets.calib.read_text())], args.calib_tokens, args.seq_len)
    heldout = Heldout(tokenizer, assets.heldout, args.eval_tokens, args.seq_len, args.chunk, args.kv_group)
    partial = args.out and args.out.with_name(args.out.name + ".partial.jsonl")
    sweep = Sweep(heldout, kv_bytes(model.config), partial)
    args.passkey = None
    if args.passkey_lengths:  # passkey retrieval on the original, auto+reconstruct at --passkey-savings, checkpoints
        lengths = [int(n) for n in args.passkey_lengths.split(",")]
        # not `settings` (the run's provenance): it replaced it, and json.dumps failed at the end (the sweep lost)
        asked = passkey.PasskeySettings(lengths, [0.0, 0.5, 1.0], samples=2)
        filler = join_texts(load_texts([str(assets.heldout)]))
        args.passkey = (tokenizer, passkey.prepare(tokenizer, filler, asked, context_window(model.config) or 0))
    sweep.add("original", model, passkey_of=args.passkey)
    run_baselines(sweep, model, calib, args)
    run_cla(sweep, model, calib, args)
    run_checkpoints(sweep, args.model, args)
    result = {
        "benchmark": "quality_bench", "provenance": settings,
        "model": str(assets.model), "calib_text": str(assets.calib), "heldout_text": str(assets.heldout),
        "calib_tokens": calib.numel(), "eval_tokens": len(heldout.tokens.ids) - 1, "seq_len": args.seq_len,
        "kv_quant": {"backend": "hqq", "axis": kvquant.AXIS, "group": args.kv_group, "chunk": args.chunk},
        "kv_bytes_dtype": "bfloat16", "threads": torch.get_num_threads(), "command": " ".join(sys.argv),
        "load_average_start": load, "load_average_end": os.getloadavg(),
        "wall_s": round(time.perf_counter() - start, 1), "rows": sweep.rows,
    }  # fmt: skip
    if args.plot:
        plot(sweep.rows, args.plot)
    print(json.dumps(result, indent=1))
    if args.out:
        write_json(args.out, result)
        partial.unlink(missing_ok=True)


def check_kv_group(config, args) -> None:
    """Where a run goes through a quantised cache, --kv-group must divide the model's head_dim (kvquant's rule):
    refused before the first row, not after the sweep's unquantised rows."""
    if not (args.cla_kv_bits or any(b.startswith("kv") for b in args.baselines.split(","))):
        return
    try:
        kvquant.check(config, kvquant.NBITS[0], args.kv_group)
    except ClakitError as e:
        refuse(f"--kv-group: {e}")


def validate(args) -> None:
    """Refuse bad lists before any model is loaded: one line naming the flag and what it takes."""

    def numbers(flag: str, text: str, kind=float, low=0.0, high=1.0) -> None:
        for item in [x for x in text.split(",") if x]:
            try:
                value = kind(item)
            except ValueError:
                refuse(f"{flag} {text!r}: {item!r} is not a number; pass comma-separated numbers")
            if not low < value < high:
                refuse(f"{flag} {text!r}: {item} is outside ({low:g}, {high:g}); pass values inside it")

    numbers("--savings", args.savings)
    numbers("--passkey-savings", args.passkey_savings)
    if args.cla_kv_savings is not None:
        numbers("--cla-kv-savings", args.cla_kv_savings)
    numbers("--passkey-lengths", args.passkey_lengths, int, 0, float("inf"))
    for flag, text, known in (("--methods", args.methods, METHODS), ("--baselines", args.baselines, BASELINES)):
        unknown = [x for x in text.split(",") if x and x not in known]
        if unknown:
            refuse(f"{flag}: unknown {', '.join(unknown)}; pass a comma-separated list of {', '.join(known)}")
    bits = [b for b in args.cla_kv_bits.split(",") if b]
    if any(b not in {str(n) for n in kvquant.NBITS} for b in bits):
        refuse(f"--cla-kv-bits {args.cla_kv_bits!r}: pass comma-separated bits among {kvquant.NBITS}")
    for spec in args.model:
        label, _, folder = spec.partition("=")
        if not label or not folder:
            refuse(f"--model {spec!r}: pass LABEL=DIR, e.g. uptrained=runs/x/model")
        if not Path(folder).exists():
            refuse(f"--model {spec!r}: {folder} does not exist; pass a saved checkpoint")
    check_output(args.out, args.force)
    check_output(args.plot, args.force, "--plot")
    check_apart(args.out, args.plot, "--out and --plot")


if __name__ == "__main__":
    main_guard(main)
