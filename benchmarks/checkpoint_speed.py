"""Speed of saved checkpoints against each other, interleaved: is one model really slower than another of its shapes?

A single `clakit eval` speed figure per model is one prefill on a shared machine; this alternates the models
`--repeats` times under each flush-denormal setting and reports medians, with each model's subnormal weights
counted (a trained weight that underflows can slow CPU kernels).

    python benchmarks/checkpoint_speed.py CONVERTED UPTRAINED [--prompt 512] [--repeats 3]

Prints JSON: per model, the subnormal count and the median prefill/decode tokens/s with and without flush-denormal.
"""

import argparse
import json
import statistics

import torch

from clakit.eval.speed import throughput
from clakit.sources import load_model, resolve_source


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
            runs[name].append(throughput(model, ids, batch_size=1))
    torch.set_flush_denormal(False)
    return {
        name: {key: statistics.median(r[key] for r in rs) for key in ("prefill_tokens_per_s", "decode_tokens_per_s")}
        for name, rs in runs.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    models = {m: load_model(resolve_source(m), dtype=torch.float32) for m in args.models}
    ids = torch.randint(100, 40_000, (args.prompt,), generator=torch.Generator().manual_seed(0))  # (L,)
    result = {m: {"subnormal_weights": subnormals(model)} for m, model in models.items()}
    for flush in (False, True):
        for m, speed in timings(models, ids, args.repeats, flush).items():
            result[m]["flush_denormal" if flush else "default"] = speed
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
