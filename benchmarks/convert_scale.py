"""How `clakit convert`'s data-aware fits scale with depth: peak host RSS and wall time per layer.

A random Llama of fixed width (hidden 768, intermediate 2048, 12 heads, 4 KV heads, vocab 4096, bf16 safetensors,
its own BPE tokenizer) at 8/16/24/32 layers, converted in a fresh subprocess each (so its peak RSS is its own) with
  reconstruct: --factor 2 --init reconstruct --distill-steps 0  (statistics + closed form + sequential reconstruction)
  auto:        --layout auto --init calibrated --distill-steps 0 (the layout search, then the closed-form fit)
(`--distill-steps 0`: the end-to-end distillation that follows by default needs the whole model; it is measured
in docs/quality.md, not here.)
Targets (targets.json, "convert_scale"; issue 11): peak RSS above the import footprint at 24 layers <= 1.5x that at
8 layers and <= 0.6x the 24-layer model's fp32 bytes; wall time linear in depth (reported: seconds per layer at each
depth). Output shards of at most 100 MB (`--max-shard-size`): the writer holds one shard, so a shard larger than the
model would make the write phase hold the whole output and hide what the fits hold. `--layout auto` scores every
candidate group with a forward to the last layer, so its cost is quadratic in depth by design; it runs up to
`--max-auto-layers`.

Prints JSON (each run as a line on stderr while it goes; on stdout the report: settings, provenance (versions,
command), the runs and the targets' check per mode, null where 8 or 24 layers were not run); --out also writes the
report (once, at the end) and a .png plot beside it.

    python benchmarks/convert_scale.py --out docs/figures/convert_scale.json      # ~10-15 min on 2 loaded cores
    python benchmarks/convert_scale.py --layers 2 --modes reconstruct --steps 1 --calib-tokens 64 --seq-len 32
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from common import (
    FORCE_HELP,
    OUT_HELP,
    Parser,
    check_apart,
    check_output,
    demo_text,
    emit,
    existing_file,
    main_guard,
    non_negative,
    positive,
    provenance,
    refuse,
    save_figure,
)
from safetensors.torch import save_file
from targets import check

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, VOCAB = 768, 2048, 12, 4, 4096
CONTEXT = 2048  # the checkpoints' max_position_embeddings
MODES = {
    # the layer-by-layer fits only: --distill-steps 0 (the end-to-end distillation holds the whole model by design)
    "reconstruct": ["--factor", "2", "--init", "reconstruct", "--distill-steps", "0"],
    "auto": ["--layout", "auto", "--init", "calibrated", "--distill-steps", "0"],
}
# Runs in the child: import, note RSS, convert, report wall time and peak RSS (VmHWM: ru_maxrss survives exec).
CHILD = """
import json, sys, time
from clakit.cli import main
def status(field):
    return int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1]) * 1024
base = status("VmRSS:")
start = time.perf_counter()
rc = main(["convert", *sys.argv[1:]])
wall = time.perf_counter() - start
print(json.dumps({"rc": rc, "wall_s": wall, "rss_after_import": base, "peak_rss": status("VmHWM:")}))
"""


def layer_shapes(i: int) -> dict[str, tuple[int, ...]]:
    from convert_bench import layer_tensors  # this folder is on sys.path when the script runs

    return layer_tensors(i, HIDDEN, INTERMEDIATE, HEADS, KV_HEADS)


def make_checkpoint(folder: Path, layers: int, tokenizer) -> int:
    """Random bf16 checkpoint, one shard per layer (+ embeddings); returns the model's fp32 bytes."""
    from transformers import LlamaConfig

    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(layers)

    def rand(shape):
        return torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=gen) * 0.05

    shards = [{"model.embed_tokens.weight": rand((VOCAB, HIDDEN)), "lm_head.weight": rand((VOCAB, HIDDEN)),
               "model.norm.weight": rand((HIDDEN,))}]  # fmt: skip
    shards += [{name: rand(shape) for name, shape in layer_shapes(i).items()} for i in range(layers)]
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: t.to(torch.bfloat16) for n, t in shard.items()}, folder / file, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(shard, file)
        total += sum(t.numel() * 4 for t in shard.values())
    index = {"metadata": {"total_size": total // 2}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                         num_hidden_layers=layers, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                         max_position_embeddings=CONTEXT, tie_word_embeddings=False, dtype="bfloat16")  # fmt: skip
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return total


def train_tokenizer(text: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator([text], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def run(src: Path, out: Path, mode: str, args) -> dict:
    steps = ["--reconstruct-steps", str(args.steps)] if "reconstruct" in MODES[mode] else []  # its init's alone
    flags = [*MODES[mode], "--calib-data", args.calib, "--calib-tokens", str(args.calib_tokens), "--seq-len",
             str(args.seq_len), *steps, "--device", "cpu", "--max-shard-size", args.max_shard_size, "-q"]  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", CHILD, str(src), str(out), *flags], capture_output=True, text=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else {"rc": proc.returncode}
    if result["rc"] == 2:  # clakit convert's one-line refusal of a setting: the same line, not a traceback
        lines = proc.stderr.strip().splitlines()
        refuse(lines[-1].removeprefix("clakit: error: ") if lines else f"the {mode} conversion refused its settings")
    if result["rc"] != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return result


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for mode, rows in result["runs"].items():
        depth = [r["layers"] for r in rows]
        ax1.plot(depth, [r["peak_rss_above_import_mb"] for r in rows], "o-", label=mode)
        ax2.plot(depth, [r["wall_s"] for r in rows], "o-", label=mode)
    ax1.plot(depth, [r["model_fp32_mb"] for r in rows], "k--", label="model fp32 bytes")
    ax1.set(xlabel="decoder layers", ylabel="MB", title="peak RSS above imports")
    ax2.set(xlabel="decoder layers", ylabel="s", title="wall time")
    for ax in (ax1, ax2):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def main() -> None:
    p = Parser(__doc__)
    p.add_argument("--layers", type=positive, nargs="+", default=[8, 16, 24, 32], help="depths to convert (default "
                   "8 16 24 32; the targets need 8 and 24)")  # fmt: skip
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES), help="conversions (default: both)")
    p.add_argument("--calib", type=existing_file, default=None,
                   help="calibration text, also the tokenizer's training text (default: the demo's calib.txt, from "
                   "`clakit fetch-demo`)")  # fmt: skip
    p.add_argument("--calib-tokens", type=positive, default=512, help="calibration tokens (default 512)")
    p.add_argument("--seq-len", type=positive, default=128, help="calibration sequence length (default 128)")
    p.add_argument("--steps", type=non_negative, default=4, help="--reconstruct-steps per group (default 4)")
    p.add_argument("--max-auto-layers", type=positive, default=24, help="skip --layout auto above this depth "
                   "(its cost is quadratic; default 24)")  # fmt: skip
    p.add_argument(
        "--max-shard-size", default="100MB", help="output shards: the writer holds one, so it bounds the write's RSS"
    )
    p.add_argument("--out", type=Path, help=OUT_HELP)
    p.add_argument("--force", action="store_true", help=FORCE_HELP)
    args = p.parse_args()
    check_output(args.out, args.force)
    check_apart(args.out, args.out and args.out.with_suffix(".png"), "--out (a .png) and its plot beside it")
    if args.out is not None and args.out.with_suffix(".png").exists() and not args.force:
        refuse(f"{args.out.with_suffix('.png')} (the plot beside --out) exists: pass --force to replace it")
    check_settings(args)
    text = args.calib.read_text(errors="replace")[:2_000_000]
    if len(text.split()) < 100:
        refuse(f"--calib {args.calib} holds fewer than 100 words: pass a longer text")
    tokenizer = train_tokenizer(text)
    result = {"benchmark": "convert_scale", "provenance": provenance(args), "runs": {m: [] for m in args.modes}}
    with tempfile.TemporaryDirectory() as tmp:
        for layers in args.layers:
            src = Path(tmp) / f"src{layers}"
            fp32 = make_checkpoint(src, layers, tokenizer)
            for mode in [m for m in args.modes if m != "auto" or layers <= args.max_auto_layers]:
                r = run(src, Path(tmp) / f"out{layers}-{mode}", mode, args)
                row = {"layers": layers, "model_fp32_mb": fp32 / 1e6, "wall_s": r["wall_s"],
                       "wall_s_per_layer": r["wall_s"] / layers,
                       "peak_rss_above_import_mb": (r["peak_rss"] - r["rss_after_import"]) / 1e6}  # fmt: skip
                result["runs"][mode].append(row)
                print(json.dumps({"mode": mode, **row}), file=sys.stderr, flush=True)
    result["targets"] = targets(result)
    if args.out:
        plot(result, args.out.with_suffix(".png"))
    emit(result, args.out)


def check_settings(args) -> None:
    """The conversion's settings, before the tokenizer and the checkpoints are made: a bad --max-shard-size or a
    --seq-len past the checkpoints' context was refused by the first conversion (after minutes at the default
    depths), as a traceback naming a temp folder already gone."""
    from clakit.convert.checkpoint import parse_size
    from clakit.errors import ClakitError

    try:
        parse_size(args.max_shard_size)
    except ClakitError as e:
        refuse(str(e))
    if args.seq_len > CONTEXT:
        refuse(f"--seq-len {args.seq_len} exceeds the checkpoints' context ({CONTEXT} tokens): pass at most {CONTEXT}")
    if args.calib_tokens < args.seq_len:
        refuse(f"--calib-tokens {args.calib_tokens} is below one --seq-len window ({args.seq_len}): raise it")
    args.calib = args.calib or demo_text("calib.txt", "--calib")


def targets(result: dict) -> dict:
    """RSS at 24 vs 8 layers and vs the 24-layer fp32 model, per mode, against targets.json (null: not measured,
    when this run did not convert 24 layers, or 8 layers for the first ratio)."""
    out = {}
    for mode, rows in result["runs"].items():
        by = {r["layers"]: r for r in rows}
        ratio = vs_model = None
        if 24 in by:
            vs_model = round(by[24]["peak_rss_above_import_mb"] / by[24]["model_fp32_mb"], 3)
            if 8 in by:
                ratio = round(by[24]["peak_rss_above_import_mb"] / by[8]["peak_rss_above_import_mb"], 3)
        out[mode] = check("convert_scale", {"rss_24_over_8": ratio, "rss_24_over_fp32_model": vs_model})
    return out


if __name__ == "__main__":
    main_guard(main)
