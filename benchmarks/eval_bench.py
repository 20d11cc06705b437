"""Eval-suite overhead: clakit's perplexity loop vs a bare loop of the model's forward over the same windows.

    python benchmarks/eval_bench.py                      # SmolLM2 + held-out text from the demo cache (fetched once)
    python benchmarks/eval_bench.py --model DIR --data heldout.txt --seq-len 1024 --max-tokens 8192

Prints JSON (and writes it to --out at the end): the settings and provenance (versions, command), both wall
times (best of --repeats, interleaved so load on the machine hits both alike), the overhead
in percent (target in targets.json, "eval_bench": <= 5%) and tokens/s, and the peak RSS of the load and
the loops above the RSS before them against the model's weight bytes (target <= 1.3: the weights held once, plus
one batch; `clakit eval` measured 1.06 on a 1.03 GB fp32 synthetic Llama, hidden 1536, 10 layers).
The bare loop runs the identical batches and `logits_to_keep`, without the loss, the window bookkeeping or the
progress bar.
"""

import time
from pathlib import Path

import torch
from common import (
    FORCE_HELP,
    OUT_HELP,
    Parser,
    check_output,
    emit,
    existing_file,
    main_guard,
    positive,
    provenance,
    refuse,
)
from targets import check

from clakit.demo import fetch_demo
from clakit.eval import perplexity as ppl
from clakit.sources import load_model, load_tokenizer, resolve_source


def bare_loop(model, ids: torch.Tensor, wins: list, batch_size: int) -> None:
    with torch.inference_mode():
        for batch in ppl.batches(wins, batch_size):
            inputs = torch.stack([ids[w.start : w.end] for w in batch])
            model(input_ids=inputs, use_cache=False, logits_to_keep=max(w.scored for w in batch))


def memory(field: str) -> int:
    """Bytes of a /proc/self/status field (VmRSS: now; VmHWM: the peak since the last reset)."""
    return int(next(line for line in open("/proc/self/status") if line.startswith(field)).split()[1]) * 1024


def reset_peak() -> int:
    """Reset the peak RSS (`5 > clear_refs`, Linux >= 4.0: imports and earlier work do not count); the RSS now."""
    Path("/proc/self/clear_refs").write_text("5")
    return memory("VmRSS:")


def weight_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    p = Parser(__doc__)
    p.add_argument("--model", help="model spec: a folder, a GGUF file, ... (default: the demo's SmolLM2 GGUF)")
    p.add_argument("--data", type=existing_file, help="UTF-8 text file (default: the demo's held-out text)")
    p.add_argument("--seq-len", type=positive, default=512, help="tokens per window (default 512)")
    p.add_argument("--stride", type=positive, help="tokens between window starts (default: --seq-len, disjoint)")
    p.add_argument("--max-tokens", type=positive, default=2048, help="tokens of --data scored (default 2048)")
    p.add_argument("--batch-size", type=positive, default=2, help="windows per forward (default 2)")
    p.add_argument("--repeats", type=positive, default=3, help="timings of each loop, interleaved; best (default 3)")
    p.add_argument(
        "--threads", type=positive, help="torch threads (default: torch's; 1 is steadier on a busy machine)"
    )
    p.add_argument("--out", type=Path, help=OUT_HELP)
    p.add_argument("--force", action="store_true", help=FORCE_HELP)
    args = p.parse_args()
    check_output(args.out, args.force)
    stride = ppl.check_window(args.seq_len, args.stride)
    if args.threads:
        torch.set_num_threads(args.threads)
    assets = None if args.model and args.data else fetch_demo(quiet=True)
    source = resolve_source(args.model or str(assets.model))
    data = args.data or assets.heldout  # recorded: the default's path was nowhere in the report
    try:  # before the model loads: a file that is not text was refused after it
        text = data.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        refuse(f"--data {data} is not UTF-8 text: pass a text file")
    before = reset_peak()  # the load and both loops: memory-mapped weights count once their pages are read
    model, tokenizer = load_model(source), load_tokenizer(source)
    ids = ppl.tokenize(tokenizer, text, args.max_tokens).ids
    if len(ids) < args.seq_len + 1:
        refuse(f"--data holds {len(ids)} tokens (of --max-tokens {args.max_tokens}), too few for one window of "
               f"--seq-len {args.seq_len}: pass more text or a smaller --seq-len")  # fmt: skip
    wins = ppl.windows(len(ids), args.seq_len, stride)
    bare, ours = [], []
    for _ in range(args.repeats):
        bare.append(timed(lambda: bare_loop(model, ids, wins, args.batch_size)))
        ours.append(timed(lambda: ppl.score(model, ids, args.seq_len, stride, args.batch_size, quiet=True)))
    n = len(ids) - 1
    rss = (memory("VmHWM:") - before) / weight_bytes(model)
    overhead = 100 * (min(ours) / min(bare) - 1)
    emit(
        {
            "benchmark": "eval_bench",
            "provenance": provenance(args),
            "model": source.spec,
            "data": str(data),
            "tokens": n,
            "seq_len": args.seq_len,
            "stride": stride,
            "batch_size": args.batch_size,
            "torch_threads": torch.get_num_threads(),
            "bare_forward_s": min(bare),
            "perplexity_loop_s": min(ours),
            "overhead_pct": overhead,
            "rss_over_weights": rss,
            "targets": check("eval_bench", {"overhead_pct": overhead, "rss_over_weights": rss}),
            "perplexity_tokens_per_s": n / min(ours),
            "bare_tokens_per_s": n / min(bare),
            "all_bare_s": bare,
            "all_perplexity_s": ours,
        },
        args.out,
    )


if __name__ == "__main__":
    main_guard(main)
