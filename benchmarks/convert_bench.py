"""Benchmark `clakit convert` on a synthetic sharded Llama checkpoint (random bf16 weights, >= 2 GB by default).

Prints JSON (and writes it to --out at the end): the settings and provenance (versions, command), conversion wall
time vs `shutil.copytree` of the same files in the same run (ratio), and peak RSS of
the converting process above what it held right after importing clakit, vs the largest source shard; checked against
targets.json ("convert_bench": ratio <= 1.3 for producer/mean, RSS <= largest shard + 300 MB). Each conversion runs
in a fresh subprocess so its peak RSS is its own.

    python benchmarks/convert_bench.py                      # ~2.1 GB, shards of 500 MB
    python benchmarks/convert_bench.py --size-gb 0.3        # quick look
    python benchmarks/convert_bench.py --shape tiny --size-gb 0.001 --repeats 1   # seconds: a smoke test
"""

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import (
    FORCE_HELP,
    OUT_HELP,
    Parser,
    check_output,
    emit,
    main_guard,
    positive,
    positive_float,
    provenance,
    refuse,
)
from safetensors.torch import save_file
from targets import check

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, VOCAB = 2048, 5632, 16, 4, 32000
SHAPES = {  # (hidden, intermediate, heads, kv_heads, vocab)
    "tinyllama": (HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, VOCAB),  # TinyLlama-1.1B's width
    "tiny": (64, 128, 4, 2, 512),  # a smoke test in seconds
}
INITS = ("producer", "mean")  # the data-free inits the targets are for (no calibration text here)

# Runs in the child: import, note RSS, convert, report wall time and peak RSS. Peak is VmHWM, not ru_maxrss:
# Linux carries ru_maxrss across exec, so a child would inherit this (large) parent's peak.
CHILD = """
import json, sys, time
import clakit.convert
def status(field):
    return int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1]) * 1024
base = status("VmRSS:")
start = time.perf_counter()
clakit.convert.convert(sys.argv[1], sys.argv[2], init=sys.argv[3], max_shard_size=sys.argv[4], quiet=True)
wall = time.perf_counter() - start
print(json.dumps({"wall_s": wall, "rss_after_import": base, "peak_rss": status("VmHWM:")}))
"""


def layer_tensors(i: int, hidden=HIDDEN, intermediate=INTERMEDIATE, heads=HEADS, kv_heads=KV_HEADS) -> dict:
    """Llama decoder layer i's tensor names -> shapes (also used by convert_scale.py)."""
    head_dim = hidden // heads
    p = f"model.layers.{i}."
    return {
        p + "self_attn.q_proj.weight": (hidden, hidden),
        p + "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
        p + "self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
        p + "self_attn.o_proj.weight": (hidden, hidden),
        p + "mlp.gate_proj.weight": (intermediate, hidden),
        p + "mlp.up_proj.weight": (intermediate, hidden),
        p + "mlp.down_proj.weight": (hidden, intermediate),
        p + "input_layernorm.weight": (hidden,),
        p + "post_attention_layernorm.weight": (hidden,),
    }


def make_checkpoint(folder: Path, size_gb: float, shard_bytes: int, shape: str = "tinyllama") -> int:
    """Write a random bf16 Llama of about `size_gb` over shards of <= shard_bytes; returns the largest shard."""
    width = shape
    hidden, intermediate, heads, kv_heads, vocab = SHAPES[width]
    per_layer = sum(torch.Size(s).numel() for s in layer_tensors(0, *SHAPES[shape][:4]).values()) * 2
    fixed = 2 * vocab * hidden * 2
    layers = max(2, round((size_gb * 1e9 - fixed) / per_layer))
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        shapes |= layer_tensors(i, *SHAPES[shape][:4])
    shapes |= {"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    shards, current, size = [], {}, 0
    for name, shape in shapes.items():
        nbytes = torch.Size(shape).numel() * 2
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
        size += nbytes
    shards.append(current)
    weight_map, largest = {}, 0
    for i, tensors in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, folder / file, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(tensors, file)
        largest = max(largest, (folder / file).stat().st_size)
    total = sum(t.numel() * 2 for s in shards for t in s.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text(json.dumps(config(layers, width)))
    return largest


def config(layers: int, shape: str = "tinyllama") -> dict:
    hidden, intermediate, heads, kv_heads, vocab = SHAPES[shape]
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "vocab_size": vocab, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "dtype": "bfloat16",
    }  # fmt: skip


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir())


def warm(folder: Path) -> None:
    """Read every file once so copy and conversion both start from the page cache."""
    for p in folder.iterdir():
        with open(p, "rb") as f:
            while f.read(1 << 24):
                pass


def timed_copy(src: Path, dest: Path) -> float:
    os.sync()  # both timings start with no dirty pages queued for writeback
    start = time.perf_counter()
    shutil.copytree(src, dest)
    wall = time.perf_counter() - start
    shutil.rmtree(dest)
    return wall


def timed_convert(src: Path, dest: Path, init: str, shard_size: str) -> dict:
    os.sync()
    out = subprocess.run([sys.executable, "-c", CHILD, str(src), str(dest), init, shard_size], capture_output=True,
                         text=True)  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"the conversion ({init}) failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["output_bytes"] = folder_bytes(dest)
    shutil.rmtree(dest)
    return result


def summarise(copies: list[float], runs: list[dict], largest: int) -> dict:
    copy_s, convert_s = statistics.median(copies), statistics.median(r["wall_s"] for r in runs)
    extra = max(r["peak_rss"] - r["rss_after_import"] for r in runs)
    return {
        "convert_s": round(convert_s, 2), "copytree_s": round(copy_s, 2), "ratio": round(convert_s / copy_s, 2),
        "convert_runs_s": [round(r["wall_s"], 2) for r in runs], "copytree_runs_s": [round(c, 2) for c in copies],
        "output_bytes": runs[0]["output_bytes"], "peak_rss_above_import_mb": round(extra / 1e6),
        "largest_shard_mb": round(largest / 1e6), "rss_margin_mb": round((extra - largest) / 1e6),
        "targets": check("convert_bench", {"convert_over_copytree": convert_s / copy_s,
                                           "rss_margin_mb": (extra - largest) / 1e6}),
    }  # fmt: skip


def main() -> None:
    parser = Parser(__doc__)
    parser.add_argument("--size-gb", type=positive_float, default=2.1, help="checkpoint size (default 2.1; at least "
                        "2 layers are written)")  # fmt: skip
    parser.add_argument(
        "--shape",
        choices=sorted(SHAPES),
        default="tinyllama",
        help="model width: tinyllama (hidden 2048; default) or tiny (hidden 64, a smoke test)",
    )
    parser.add_argument("--shard-size", default="500MB", help="source and output shard size (default 500MB)")
    parser.add_argument("--inits", default="producer,mean", help="comma-separated data-free inits to time: "
                        f"{', '.join(INITS)} (default: both)")  # fmt: skip
    parser.add_argument("--repeats", type=positive, default=5, help="timings per init; medians reported (default 5)")
    parser.add_argument("--workdir", type=Path, default=None, help="an existing folder to put the checkpoints in "
                        "(default: the system's temp folder); removed at the end")  # fmt: skip
    parser.add_argument("--out", type=Path, help=OUT_HELP)
    parser.add_argument("--force", action="store_true", help=FORCE_HELP)
    args = parser.parse_args()
    from clakit.convert.checkpoint import parse_size
    from clakit.errors import ClakitError

    inits = [i for i in args.inits.split(",") if i]
    unknown = [i for i in inits if i not in INITS]
    if unknown or not inits:
        refuse(f"--inits {args.inits!r}: pass a comma-separated list of {', '.join(INITS)}")
    if args.workdir is not None and not args.workdir.is_dir():
        refuse(f"--workdir {args.workdir} is not a folder: create it or pass an existing one")
    try:
        shard_bytes = parse_size(args.shard_size)
    except ClakitError:
        refuse(f"--shard-size {args.shard_size!r}: pass a size like 500MB, 2GB or 100KB")
    check_output(args.out, args.force)
    work = Path(tempfile.mkdtemp(prefix="clakit_bench_", dir=args.workdir))
    try:
        src = work / "src"
        largest = make_checkpoint(src, args.size_gb, shard_bytes, args.shape)
        warm(src)
        report = {"benchmark": "convert_bench", "provenance": provenance(args)}
        report |= {
            "checkpoint_bytes": folder_bytes(src),
            "largest_shard_bytes": largest,
            "shard_size": args.shard_size,
        }
        copies, runs = {i: [] for i in inits}, {i: [] for i in inits}
        for _ in range(args.repeats):  # interleaved (copy, convert) pairs, medians: writeback makes timings noisy
            for init in inits:
                copies[init].append(timed_copy(src, work / "copy"))
                runs[init].append(timed_convert(src, work / f"cla_{init}", init, args.shard_size))
        for init in inits:
            report[init] = summarise(copies[init], runs[init], largest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    emit(report, args.out)


if __name__ == "__main__":
    main_guard(main)
