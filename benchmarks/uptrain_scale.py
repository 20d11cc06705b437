"""Uptraining throughput and memory at size (JSON): tokens/s and peak memory per process.

CPU mode (default): a random Llama of fixed width (hidden 768, intermediate 2048, 12 heads, 4 KV heads, vocab 4096,
the width of benchmarks/convert_scale.py) at two depths, CLA2 (mean init) vs the original model, trained with clakit's
LoRA setup (`make_trainable`: r 16 on q/k/v/o, so CLA2's consumers train no k/v adapters) on
  single  1 process
  ddp     2 processes, torch DDP over gloo
  fsdp    2 processes, torch FSDP2 (`fully_shard` per decoder layer + root) over gloo
Each configuration runs in fresh processes (peak RSS is per process: ru_maxrss, minus the RSS after imports).
tokens/s counts the tokens of all processes over the timed steps (the first --warmup steps are not timed).
Keep it short: `flock /work/bench.lock python benchmarks/uptrain_scale.py --out docs/figures/uptrain_scale.json`.

GPU mode (--gpu; not run on this CPU machine): a Llama-3.2-1B-shaped random model (hidden 2048, intermediate 8192,
32 heads, 8 KV heads, vocab 128256; --layers 16) in bf16 (weights bf16, LoRA fp32, autocast), gradient checkpointing,
self-distillation from the original (the teacher shares the student's frozen tensors, as clakit does): tokens/s,
peak GPU memory and MFU (model FLOPs: 4 N per token for the LoRA student (forward + activation gradients; frozen
weights get no weight gradients), 2 N for the teacher's forward, attention included; checkpointing's recompute not
counted) against --peak-tflops (989: H100/H200 dense bf16). Budget ~6 device-minutes:
  python benchmarks/uptrain_scale.py --gpu --out gpu_uptrain.json
Smoke test of the GPU path on CPU: python benchmarks/uptrain_scale.py --gpu --device cpu --shape tiny --steps 2
Smoke test of the CPU mode: python benchmarks/uptrain_scale.py --shape tiny --depths 2 --launches single --steps 1

Prints JSON (and writes it to --out once, at the end): settings and provenance (versions, command), the runs and, in
CPU mode, CLA2 / original ratios measured in this run.
"""

import json
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import (  # noqa: E402
    FORCE_HELP,
    OUT_HELP,
    Parser,
    check_output,
    emit,
    main_guard,
    non_negative,
    positive,
    positive_float,
    provenance,
)

SHAPES = {
    "cpu": dict(
        hidden_size=768, intermediate_size=2048, num_attention_heads=12, num_key_value_heads=4, vocab_size=4096
    ),
    "llama3_2_1b": dict(
        hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256
    ),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, vocab_size=512),
}
LORA = SimpleNamespace(
    r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], full_train=[]
)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build(shape: str, layers: int, cla: bool, dtype=None):
    """(student, original): the random Llama and, with `cla`, its CLA2 conversion (mean init) as the student."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from clakit.convert.inmemory import cla_model_from
    from clakit.convert.layout import uniform_layout

    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=layers, max_position_embeddings=4096, **SHAPES[shape])
    original = LlamaForCausalLM(config)
    if not cla:  # make_trainable reads the layout: every layer its own K/V (the stock model is not modified)
        original.config.kv_source_layers = list(range(layers))
    student = cla_model_from(original, uniform_layout(layers, 2), "mean") if cla else original
    if dtype is not None:
        student.to(dtype)
        original.to(dtype)
    student.config.use_cache = False
    return student, original


def wrap(model, launch: str):
    """The trainable student as the launch wraps it: as is, DDP, or FSDP2 per decoder layer + root."""
    import torch

    if launch == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    if launch == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in model.base_model.model.model.layers:
            fully_shard(layer)
        return fully_shard(model)
    return model


def cpu_worker(rank: int, args: dict, port: int, out: str) -> None:
    """One process of one CPU configuration; rank 0 writes the JSON line to `out`, the others their memory."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    world = 1 if args["launch"] == "single" else 2
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    import peft  # noqa: F401  (imported before the baseline: memory above it is the model's and training's)
    import transformers.models.llama.modeling_llama  # noqa: F401

    import clakit.convert.inmemory  # noqa: F401
    from clakit.uptrain.distill import causal_lm_loss
    from clakit.uptrain.student import make_trainable

    after_import = rss_mb()
    student, original = build(args["shape"], args["layers"], args["model"] == "cla2")
    del original
    model = wrap(make_trainable(student, LORA), args["launch"])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(rank)
    vocab = SHAPES[args["shape"]]["vocab_size"]
    times = []
    for _ in range(args["warmup"] + args["steps"]):
        ids = torch.randint(0, vocab, (args["batch"], args["seq_len"]), generator=g)
        t0 = time.perf_counter()
        causal_lm_loss(model(input_ids=ids).logits, ids).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    timed = sum(times[args["warmup"] :])
    mine = torch.tensor([peak_rss_mb(), peak_rss_mb() - after_import, timed], dtype=torch.float64)
    gathered = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine) if world > 1 else gathered.__setitem__(0, mine)
    if rank == 0:
        slowest = max(float(x[2]) for x in gathered)  # steps are synchronous: the slowest process sets the pace
        tokens = world * args["batch"] * args["seq_len"] * args["steps"]
        record = {
            **args,
            "processes": world,
            "tokens_per_s": round(tokens / slowest, 1),
            "peak_rss_mb_per_process": [round(float(x[0])) for x in gathered],
            "peak_rss_above_imports_mb_per_process": [round(float(x[1])) for x in gathered],
        }
        Path(out).write_text(json.dumps(record))
    if world > 1:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cpu_config(config: dict) -> dict:
    """One configuration in fresh processes (this script re-run with --worker)."""
    out = Path(f"/tmp/uptrain_scale_{os.getpid()}.json")
    command = [sys.executable, __file__, "--worker", json.dumps(config), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{config}: failed\n{proc.stderr[-3000:]}")
    record = json.loads(out.read_text())
    out.unlink()
    return record


def worker_main(config: str, out: str) -> None:
    import torch.multiprocessing as mp

    args = json.loads(config)
    if args["launch"] == "single":
        cpu_worker(0, args, 0, out)
    else:
        mp.spawn(cpu_worker, args=(args, free_port(), out), nprocs=2)


def cpu_bench(opts) -> dict:
    runs = []
    for layers in opts.depths:
        for launch in opts.launches:
            for model in ("original", "cla2"):  # adjacent in time, so load changes hit both alike
                config = dict(
                    shape=opts.shape, layers=layers, model=model, launch=launch, batch=opts.batch,
                    seq_len=opts.seq_len, steps=opts.steps, warmup=opts.warmup,
                )  # fmt: skip
                runs.append(run_cpu_config(config))
                print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    ratios = []
    for a, b in zip(runs[::2], runs[1::2], strict=True):
        ratios.append({
            "layers": a["layers"], "launch": a["launch"],
            "cla2_over_original_tokens_per_s": round(b["tokens_per_s"] / a["tokens_per_s"], 3),
            "cla2_over_original_peak_rss_above_imports": round(
                max(b["peak_rss_above_imports_mb_per_process"]) / max(a["peak_rss_above_imports_mb_per_process"]), 3
            ),
        })  # fmt: skip
    return {"runs": runs, "ratios": ratios}


# --- GPU mode ---------------------------------------------------------------------------------------------------


def model_flops_per_token(model, layers: int, seq_len: int, hidden: int) -> float:
    """Forward FLOPs per token: 2 x the matmul parameters (the embedding lookup excluded; CLA's missing consumer
    k/v projections count as missing) + attention's QK^T and AV (2 x 2 x seq x hidden per layer, causal: half)."""
    matmul = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n and p.dim() == 2)
    return 2 * matmul + 2 * layers * seq_len * hidden


def gpu_bench(opts) -> dict:
    import torch

    from clakit.uptrain.distill import share_frozen_weights, uptrain_loss
    from clakit.uptrain.student import make_trainable

    device = torch.device(opts.device)
    dtype = torch.bfloat16
    student, teacher = build(opts.shape, opts.layers, True, dtype)
    student = make_trainable(student, LORA, gradient_checkpointing=True).to(device)
    teacher.requires_grad_(False)
    teacher.config.use_cache = False
    share_frozen_weights(teacher, student)
    teacher.to(device).eval()
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-4)
    distill = SimpleNamespace(weight=0.5, temperature=2.0, hidden_mse_weight=0.0)
    vocab, hidden = SHAPES[opts.shape]["vocab_size"], SHAPES[opts.shape]["hidden_size"]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(opts.warmup + opts.steps):
        ids = torch.randint(0, vocab, (opts.batch, opts.seq_len), device=device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype):
            loss, _ = uptrain_loss(student, teacher, ids, distill)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    timed, tokens = sum(times[opts.warmup :]), opts.batch * opts.seq_len * opts.steps
    per_token = model_flops_per_token(teacher, opts.layers, opts.seq_len, hidden)
    student_per_token = model_flops_per_token(student, opts.layers, opts.seq_len, hidden)
    flops = (2 * student_per_token + per_token) * tokens  # student: forward + activation gradients; teacher: forward
    record = {
        "shape": opts.shape, "layers": opts.layers, "batch": opts.batch, "seq_len": opts.seq_len,
        "steps": opts.steps, "device": str(device), "dtype": "bf16", "gradient_checkpointing": True,
        "distillation": True, "tokens_per_s": round(tokens / timed, 1),
        "model_tflops_per_s": round(flops / timed / 1e12, 2),
    }  # fmt: skip
    if device.type == "cuda":
        record["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        record["gpu"] = torch.cuda.get_device_name(device)
        record["mfu"] = round(flops / timed / (opts.peak_tflops * 1e12), 4)
    record["peak_rss_mb"] = round(peak_rss_mb())
    return record


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        return worker_main(sys.argv[2], sys.argv[3])
    p = Parser(__doc__)
    p.add_argument("--gpu", action="store_true", help="the GPU mode (bf16, checkpointing, distillation, MFU)")
    p.add_argument("--device", default="cuda", help="GPU mode: torch device (default cuda; cpu for a smoke test)")
    p.add_argument("--shape", default=None, choices=sorted(SHAPES), help="model width (default: cpu, or "
                   "llama3_2_1b with --gpu; tiny for a smoke test)")  # fmt: skip
    p.add_argument("--depths", type=positive, nargs="+", default=[4, 8], help="CPU mode: decoder layers (default 4 8)")
    p.add_argument("--layers", type=positive, default=16, help="GPU mode: decoder layers (default 16)")
    p.add_argument("--launches", nargs="+", default=["single", "ddp", "fsdp"], choices=["single", "ddp", "fsdp"],
                   help="CPU mode: how the processes train (default: all three)")  # fmt: skip
    p.add_argument("--batch", type=positive, default=None, help="per process (default: 2 on CPU, 8 on GPU)")
    p.add_argument("--seq-len", type=positive, default=None, help="default: 128 on CPU, 2048 on GPU")
    p.add_argument("--steps", type=positive, default=3, help="timed training steps (default 3)")
    p.add_argument("--warmup", type=non_negative, default=1, help="untimed steps before them (default 1)")
    p.add_argument("--peak-tflops", type=positive_float, default=989.0, help="GPU mode: the device's peak dense "
                   "bf16 TFLOP/s for MFU (default 989: H100/H200)")  # fmt: skip
    p.add_argument("--out", type=Path, help=OUT_HELP)
    p.add_argument("--force", action="store_true", help=FORCE_HELP)
    opts = p.parse_args()
    check_output(opts.out, opts.force)
    opts.batch = opts.batch or (8 if opts.gpu else 2)
    opts.seq_len = opts.seq_len or (2048 if opts.gpu else 128)
    opts.shape = opts.shape or ("llama3_2_1b" if opts.gpu else "cpu")
    start = time.perf_counter()
    result = {"benchmark": "uptrain_scale", "provenance": provenance(opts)}
    result |= {"load_before": os.getloadavg()[0], "cpus": os.cpu_count()}
    result |= {"gpu": gpu_bench(opts)} if opts.gpu else cpu_bench(opts)
    result |= {"load_after": os.getloadavg()[0], "wall_s": round(time.perf_counter() - start, 1)}
    emit(result, opts.out)


if __name__ == "__main__":
    main_guard(main)
