"""Speed of saved checkpoints against each other, interleaved: is one model really slower than another of its shapes?

A single `clakit eval` speed figure per model is one prefill on a shared machine; this alternates the models
`--repeats` times under each flush-denormal setting and reports medians, with each model's subnormal weights
counted (a trained weight that underflows can slow CPU kernels).

    python benchmarks/checkpoint_speed.py CONVERTED UPTRAINED [--prompt 512] [--repeats 3]

Prints JSON (and writes it to --out at the end): the settings and provenance (versions, command), per model the
subnormal count and the median prefill/decode tokens/s (clakit.eval.speed) with and without flush-denormal, and each
model's speeds as ratios to the first model's, measured in this run (compare ratios, not absolute figures).
"""

import statistics
from pathlib import Path

import torch
from common import FORCE_HELP, OUT_HELP, Parser, check_output, emit, main_guard, positive, provenance, refuse

from clakit.eval.speed import throughput
from clakit.sources import context_window, load_model, resolve_source


def subnormals(model) -> int:
    """Non-zero weights below float32's smallest normal number."""
    tiny = torch.finfo(torch.float32).tiny
    return sum(int(((t != 0) & (t.abs() < tiny)).sum()) for t in model.state_dict().values())


def timings(models: dict, ids: torch.Tensor, repeats: int, flush: bool) -> dict:
    """Median tokens/s per model, the models alternating within each repeat so load on the machine hits all alike."""
    torch.set_flush_denormal(flush)
    runs = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            # inside the model's window, as `clakit eval` times it (speed.fit_window): past it the positions are ones
            # the model never saw (a learned position table: an IndexError)
            runs[name].append(throughput(model, ids, batch_size=1, window=context_window(model.config)))
    torch.set_flush_denormal(False)
    return {
        name: {key: statistics.median(r[key] for r in rs) for key in ("prefill_tokens_per_s", "decode_tokens_per_s")}
        for name, rs in runs.items()
    }


def main() -> None:
    parser = Parser(__doc__)
    parser.add_argument("models", nargs="+", help="model specs (folders, GGUF files...); ratios are to the first")
    parser.add_argument("--prompt", type=positive, default=512, help="prompt tokens per prefill (default 512)")
    parser.add_argument("--repeats", type=positive, default=3, help="runs per model and setting; medians (default 3)")
    parser.add_argument("--out", type=Path, help=OUT_HELP)
    parser.add_argument("--force", action="store_true", help=FORCE_HELP)
    args = parser.parse_args()
    if len(set(args.models)) != len(args.models):
        refuse("a model is named twice: pass each model once")
    check_output(args.out, args.force)
    models = {m: load_model(resolve_source(m), dtype=torch.float32) for m in args.models}
    for m, model in models.items():  # clakit eval refuses --seq-len past the window; so does this, before timing
        window = context_window(model.config)
        if window and args.prompt > window:
            refuse(f"--prompt {args.prompt} exceeds {m}'s context window ({window} tokens): pass at most {window}")
    vocab = min(m.config.vocab_size for m in models.values())
    ids = torch.randint(0, vocab, (args.prompt,), generator=torch.Generator().manual_seed(0))  # (L,)
    result = {m: {"subnormal_weights": subnormals(model)} for m, model in models.items()}
    for flush in (False, True):
        for m, speed in timings(models, ids, args.repeats, flush).items():
            result[m]["flush_denormal" if flush else "default"] = speed
    first = result[args.models[0]]
    for m in args.models:
        result[m]["ratio_to_first"] = {
            setting: {k: result[m][setting][k] / first[setting][k] for k in first[setting]}
            for setting in ("default", "flush_denormal")
        }
    emit({"benchmark": "checkpoint_speed", "provenance": provenance(args), "models": result}, args.out)


if __name__ == "__main__":
    main_guard(main)
