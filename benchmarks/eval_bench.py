"""Eval-suite overhead: clakit's perplexity loop vs a bare loop of the model's forward over the same windows.

    python benchmarks/eval_bench.py                      # SmolLM2 + held-out text from the demo cache (fetched once)
    python benchmarks/eval_bench.py --model DIR --data heldout.txt --seq-len 1024 --max-tokens 8192

Prints JSON: both wall times (best of --repeats, interleaved so load on the machine hits both alike), the overhead
in percent (target in targets.json, "eval_bench": <= 5%) and tokens/s. The bare loop runs the identical batches and
`logits_to_keep`, without the loss, the window bookkeeping or the progress bar.
"""

import argparse
import json
import time

import torch
from targets import check

from clakit.demo import fetch_demo
from clakit.eval import perplexity as ppl
from clakit.sources import load_model, load_tokenizer, resolve_source


def bare_loop(model, ids: torch.Tensor, wins: list, batch_size: int) -> None:
    with torch.inference_mode():
        for batch in ppl.batches(wins, batch_size):
            inputs = torch.stack([ids[w.start : w.end] for w in batch])
            model(input_ids=inputs, use_cache=False, logits_to_keep=max(w.scored for w in batch))


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="model spec (default: the demo's SmolLM2 GGUF)")
    p.add_argument("--data", help="text file (default: the demo's held-out text)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--stride", type=int)
    p.add_argument("--max-tokens", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's; 1 is steadier on a busy machine)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    assets = None if args.model and args.data else fetch_demo(quiet=True)
    source = resolve_source(args.model or str(assets.model))
    model, tokenizer = load_model(source), load_tokenizer(source)
    text = open(args.data or assets.heldout, encoding="utf-8").read()
    stride = ppl.check_window(args.seq_len, args.stride)
    ids = ppl.tokenize(tokenizer, text, args.max_tokens).ids
    wins = ppl.windows(len(ids), args.seq_len, stride)
    bare, ours = [], []
    for _ in range(args.repeats):
        bare.append(timed(lambda: bare_loop(model, ids, wins, args.batch_size)))
        ours.append(timed(lambda: ppl.score(model, ids, args.seq_len, stride, args.batch_size, quiet=True)))
    n = len(ids) - 1
    print(
        json.dumps(
            {
                "model": source.spec,
                "tokens": n,
                "seq_len": args.seq_len,
                "stride": stride,
                "batch_size": args.batch_size,
                "torch_threads": torch.get_num_threads(),
                "bare_forward_s": min(bare),
                "perplexity_loop_s": min(ours),
                "overhead_pct": 100 * (min(ours) / min(bare) - 1),
                "targets": check("eval_bench", {"overhead_pct": 100 * (min(ours) / min(bare) - 1)}),
                "perplexity_tokens_per_s": n / min(ours),
                "bare_tokens_per_s": n / min(bare),
                "all_bare_s": bare,
                "all_perplexity_s": ours,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
