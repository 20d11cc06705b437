"""What CPU CI cannot run: the model, eval and uptraining paths on a GPU, in bf16, under accelerate's launchers.

Prints JSON (settings, provenance: versions and command, then each part's figures; speeds also as CLA2 / original
ratios measured in this run) and writes it to --out at the end (staged, then renamed; an existing file is replaced
only with --force). While it runs, OUT.partial holds the parts finished so far, so a run cut short still reports.
Each part records its error instead of stopping the rest. Parts:
- modeling: a Llama-3.2-1B-shaped model with random weights (bf16): factor-1 CLA logits vs stock, CLA2 cache bytes
  measured vs computed, greedy decoding with a dynamic and a static cache vs no cache (fp32, SmolLM2 shape), and
  decode tokens/s and peak memory of the original at batch B vs CLA2 at B and 2B (CLA2's cache at 2B = original's);
- convert: the default data-aware conversion (auto layout, reconstruct, end-to-end distillation) of a tiny model
  on the GPU and on the CPU;
- eval: `clakit eval` of a tiny CLA2 checkpoint on the GPU vs on the CPU (same tokens, fp32);
- uptrain: the tiny recipe in bf16 with gradient checkpointing and distillation; a run killed at step 5 and resumed
  vs an uninterrupted one; the same recipe under `accelerate launch --use_fsdp` (one process: FSDP's wrapping,
  sharded checkpoints and the gathered result).

    python benchmarks/gpu_check.py --out gpu_check.json [--small]   # --small: tiny shapes, for a CPU dry run
"""

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from common import Parser, check_output, main_guard, positive, provenance, refuse, write_json  # noqa: E402

PARTS = ("modeling", "eval", "uptrain", "convert")

LLAMA_1B = dict(
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=4096,
    rope_theta=500000.0,
    tie_word_embeddings=True,
)
SMALL = dict(LLAMA_1B, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4)
SMALL |= dict(num_attention_heads=4, num_key_value_heads=2)


def python_path() -> str:
    """The subprocesses import this checkout's clakit (and whatever PYTHONPATH already held)."""
    return os.pathsep.join([str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])


def device_info(device: torch.device) -> dict:
    info = {"device": str(device), "torch": torch.__version__}
    if device.type == "cuda":
        info["name"] = torch.cuda.get_device_name(device)
    import transformers

    return info | {"transformers": transformers.__version__}


def random_llama(shape: dict, device, dtype, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    with torch.device(device):
        return LlamaForCausalLM(LlamaConfig(**shape)).to(dtype).eval()


def logits_parity(model) -> dict:
    """A CLA model whose every layer produces its own K/V must be the stock model (max |logit difference|)."""
    from clakit.convert.inmemory import cla_model_from

    cla = cla_model_from(model, list(range(model.config.num_hidden_layers)))
    ids = torch.randint(0, model.config.vocab_size, (2, 256), device=model.device)
    with torch.inference_mode():
        a, b = model(ids).logits.float(), cla(ids).logits.float()
    del cla
    return {"max_abs_diff": (a - b).abs().max().item(), "logit_scale": a.abs().max().item()}


def cache_check(model, cla2) -> dict:
    from clakit.eval.kvcache import bytes_per_token, measured_bytes

    ids = torch.randint(0, model.config.vocab_size, (1, 512))
    m_orig, m_cla = measured_bytes(model, ids), measured_bytes(cla2, ids)
    computed = bytes_per_token(cla2.config, cla2.dtype) * 512
    return {"original_bytes": m_orig, "cla2_bytes": m_cla, "ratio": m_cla / m_orig, "cla2_computed": computed}


def greedy_consistency(shape: dict, device) -> dict:
    """fp32 CLA2: tokens from generate() with a dynamic and a static cache equal re-running the whole sequence."""
    from clakit.convert.inmemory import cla_model_from
    from clakit.convert.layout import uniform_layout

    base = random_llama(shape, device, torch.float32, seed=1)
    cla2 = cla_model_from(base, uniform_layout(shape["num_hidden_layers"], 2))
    del base
    prompt = torch.randint(0, shape["vocab_size"], (2, 64), device=device)
    out = {}
    with torch.inference_mode():
        seq = prompt
        for _ in range(24):  # no cache: the reference
            seq = torch.cat([seq, cla2(seq).logits[:, -1:].argmax(-1)], dim=1)
        for impl in ("dynamic", "static"):
            kwargs = {"cache_implementation": "static"} if impl == "static" else {}
            try:
                gen = cla2.generate(prompt, max_new_tokens=24, do_sample=False, min_new_tokens=24, **kwargs)
                out[impl] = {"equal_to_no_cache": torch.equal(gen, seq)}
            except Exception as e:  # noqa: BLE001 - report it and go on with the other checks
                out[impl] = {"error": f"{type(e).__name__}: {e}"}
    return out


def decode_speed(model, cla2, batch: int, seq_len: int, steps: int, repeats: int = 3) -> dict:
    """Decode tokens/s (median of `repeats`, the configurations alternated after one warm-up each) and peak GPU
    memory: original at `batch`, CLA2 at `batch` and at 2x (where its cache holds the original's bytes)."""
    from clakit.eval.speed import throughput

    ids = torch.randint(0, model.config.vocab_size, (seq_len,))
    runs = {"original": (model, batch), "cla2": (cla2, batch), "cla2_2x_batch": (cla2, 2 * batch)}
    out = {name: {"batch_size": b, "decode": [], "prefill": []} for name, (_, b) in runs.items()}
    for name, (m, b) in runs.items():  # warm-up, and the peak memory of one prefill + decode
        if m.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        throughput(m, ids, b, decode_steps=steps)
        out[name]["peak_gb"] = torch.cuda.max_memory_allocated() / 2**30 if m.device.type == "cuda" else None
    for _ in range(repeats):
        for name, (m, b) in runs.items():
            t = throughput(m, ids, b, decode_steps=steps)
            out[name]["decode"].append(t["decode_tokens_per_s"])
            out[name]["prefill"].append(t["prefill_tokens_per_s"])
    for r in out.values():
        r["decode_tokens_per_s"], r["prefill_tokens_per_s"] = (
            statistics.median(r["decode"]),
            statistics.median(r["prefill"]),
        )
    base = out["original"]
    out["ratios_to_original"] = {
        name: {k: out[name][k] / base[k] for k in ("decode_tokens_per_s", "prefill_tokens_per_s")}
        for name in ("cla2", "cla2_2x_batch")
    }
    return out


def part_modeling(args, device) -> dict:
    from clakit.convert.inmemory import cla_model_from
    from clakit.convert.layout import uniform_layout

    shape = SMALL if args.small else LLAMA_1B
    model = random_llama(shape, device, torch.bfloat16)
    result = {"shape": "small" if args.small else "llama-3.2-1b", "parity_bf16": logits_parity(model)}
    cla2 = cla_model_from(model, uniform_layout(shape["num_hidden_layers"], 2))
    result["cache"] = cache_check(model, cla2)
    result["decode"] = decode_speed(model, cla2, args.batch, args.seq_len, args.decode_steps)
    del model, cla2
    result["greedy_fp32"] = greedy_consistency(SMALL if args.small else dict(LLAMA_1B, num_hidden_layers=8), device)
    return result


# --- eval and uptrain on tiny checkpoints ---------------------------------------------------------------------------


def tiny_assets(work: Path) -> dict:
    from conftest import build_tokenizer, make_text, save_checkpoint, tiny_model

    from clakit.convert.inmemory import cla_model_from
    from clakit.convert.layout import uniform_layout

    tok = build_tokenizer()
    save_checkpoint(tiny_model("llama"), tok, work / "src")
    save_checkpoint(cla_model_from(tiny_model("llama"), uniform_layout(4, 2)), tok, work / "cla2")
    for i, name in enumerate(["train", "heldout"]):
        (work / f"{name}.txt").write_text(make_text(4000, seed=i + 1))
    return {"src": work / "src", "cla2": work / "cla2"}


def part_eval(work: Path, assets: dict) -> dict:
    out = {}
    for dev in ("cuda", "cpu") if torch.cuda.is_available() else ("cpu",):
        report = work / f"eval_{dev}.json"
        cmd = [sys.executable, "-m", "clakit", "eval", str(assets["cla2"]), "-o", str(report), "--seq-len", "64"]
        env = dict(os.environ, PYTHONPATH=python_path())
        if dev == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
        proc = subprocess.run(cmd + ["--data", str(work / "heldout.txt")], env=env, capture_output=True, text=True)
        if proc.returncode:
            out[dev] = {"error": proc.stderr[-1500:]}
            continue
        r = json.loads(report.read_text())
        out[dev] = {k: r[k] for k in ("perplexity", "num_tokens")} | {"kv": r["kv_cache"], "device": r["provenance"]}
    return out


def part_convert(work: Path, assets: dict) -> dict:
    """The default data-aware conversion (layout, reconstruct, end-to-end distillation) on each device: its
    distillation stage keeps the teacher's logits on the CPU, so the GPU run checks that they meet the student."""
    out = {}
    for dev in ("cuda", "cpu") if torch.cuda.is_available() else ("cpu",):
        dest = work / f"convert_{dev}"
        cmd = [sys.executable, "-m", "clakit", "convert", str(assets["src"]), str(dest), "--device", dev, "-q"]
        cmd += ["--calib-data", str(work / "train.txt"), "--calib-tokens", "512", "--seq-len", "64"]
        proc = subprocess.run(cmd, env=dict(os.environ, PYTHONPATH=python_path()), capture_output=True, text=True)
        if proc.returncode:
            out[dev] = {"error": proc.stderr[-1500:]}
            continue
        record = json.loads((dest / "clakit_convert.json").read_text())
        distill = {k: v for k, v in (record.get("distill") or {}).items() if k != "losses"}
        out[dev] = {"layout": record["settings"]["kv_source_layers"], "distill": distill}
    return out


def tiny_recipe_file(work: Path, assets: dict, name: str, **train) -> Path:
    from uptrain_fixtures import tiny_recipe, write_recipe

    recipe = tiny_recipe(
        work,
        work / name,
        model={"path": str(assets["cla2"]), "original": str(assets["src"])},
        train={"max_steps": 12, "save_steps": 4, "bf16": True, "gradient_checkpointing": True, **train},
        lora={"full_train": ["k_proj", "v_proj", "consumers.q_proj"]},
        distill={"weight": 0.5, "temperature": 2.0},
    )
    return write_recipe(work / f"{name}.yaml", recipe)


def run_numbers(run: Path) -> dict:
    reports = {n: json.loads((run / "eval" / f"{n}.json").read_text()) for n in ("original", "converted", "uptrained")}
    record = json.loads((run / "model" / "uptrain.json").read_text())
    ppl = {n: r["perplexity"] for n, r in reports.items()}
    return {"perplexity": ppl, "processes": record["processes"], "device": reports["uptrained"]["provenance"]}


def max_weight_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    wa, wb = load_file(a / "model" / "model.safetensors"), load_file(b / "model" / "model.safetensors")
    return max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)


def killed_and_resumed(work: Path, assets: dict) -> dict:
    from clakit.uptrain import trainer as trainer_module
    from clakit.uptrain import uptrain

    uptrain(tiny_recipe_file(work, assets, "full"), quiet=True)
    path = tiny_recipe_file(work, assets, "killed")
    hook = trainer_module.Trainer.on_step_end

    def kill_at_step_10(self):
        hook(self)
        if self.step == 10:
            raise KeyboardInterrupt

    trainer_module.Trainer.on_step_end = kill_at_step_10
    try:
        uptrain(path, quiet=True)
    except KeyboardInterrupt:
        pass
    finally:
        trainer_module.Trainer.on_step_end = hook
    uptrain(path, resume=True, quiet=True)
    return {"max_abs_weight_diff": max_weight_diff(work / "full", work / "killed")}


def fsdp_run(work: Path, assets: dict) -> dict:
    path = tiny_recipe_file(work, assets, "fsdp", gradient_checkpointing=False)
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--use_fsdp",
        "--num_processes",
        "1",
        "--fsdp_sharding_strategy",
        "FULL_SHARD",
    ]
    cmd += ["--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP", "--fsdp_transformer_layer_cls_to_wrap"]
    cmd += ["LlamaCLADecoderLayer", "--fsdp_use_orig_params", "true", "--mixed_precision", "bf16"]
    cmd += ["-m", "clakit", "uptrain", str(path), "-q"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=python_path()))
    if proc.returncode:
        return {"error": proc.stderr[-3000:]}
    checkpoints = sorted(p.name for p in (work / "fsdp" / "checkpoints").iterdir())
    return run_numbers(work / "fsdp") | {"wall_s": time.perf_counter() - start, "checkpoints": checkpoints}


def part_uptrain(work: Path, assets: dict) -> dict:
    result = {}
    start = time.perf_counter()
    result["resume"] = killed_and_resumed(work, assets)
    result["bf16_gc_distill"] = run_numbers(work / "full") | {"wall_s_both_runs": time.perf_counter() - start}
    result["fsdp_1_process"] = fsdp_run(work, assets)
    result["fsdp_vs_single_max_abs_weight_diff"] = (
        max_weight_diff(work / "full", work / "fsdp") if (work / "fsdp" / "model").is_dir() else None
    )
    return result


def main() -> None:
    parser = Parser(__doc__)
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="the JSON report (default "
                        "gpu_check.json); an existing file needs --force")  # fmt: skip
    parser.add_argument("--force", action="store_true", help="replace an existing --out file")
    parser.add_argument("--work", type=Path, default=None, help="an existing folder for this run's scratch folder "
                        "(default: the system's temp folder); the scratch folder is removed at the end")  # fmt: skip
    parser.add_argument("--small", action="store_true", help="tiny shapes (a CPU dry run of the script)")
    parser.add_argument("--batch", type=positive, default=32, help="modeling: decode batch of the original (default "
                        "32; CLA2 also at twice it)")  # fmt: skip
    parser.add_argument("--seq-len", type=positive, default=2048, help="modeling: prompt tokens (default 2048)")
    parser.add_argument("--decode-steps", type=positive, default=32, help="modeling: decoded tokens (default 32)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated parts (default {','.join(PARTS)})")
    args = parser.parse_args()
    names = [n for n in args.parts.split(",") if n]
    if not names or any(n not in PARTS for n in names):
        refuse(f"--parts {args.parts!r}: pass a comma-separated list of {', '.join(PARTS)}")
    if args.work is not None and not args.work.is_dir():
        refuse(f"--work {args.work} is not a folder: create it or pass an existing one")
    check_output(args.out, args.force)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    work = Path(tempfile.mkdtemp(prefix="clakit_gpu_check_", dir=args.work))  # fresh: no earlier run's outputs
    partial = args.out.with_name(args.out.name + ".partial")
    result = {"benchmark": "gpu_check", "provenance": provenance(args), "env": device_info(device)}
    try:
        assets = tiny_assets(work)
        parts = {"modeling": lambda: part_modeling(args, device), "eval": lambda: part_eval(work, assets)}
        parts["uptrain"] = lambda: part_uptrain(work, assets)
        parts["convert"] = lambda: part_convert(work, assets)
        for name in names:
            start = time.perf_counter()
            try:
                result[name] = parts[name]()
            except Exception:  # noqa: BLE001 - one broken part must not hide the others' numbers
                result[name] = {"error": traceback.format_exc()[-3000:]}
            result[name + "_s"] = round(time.perf_counter() - start, 1)
            write_json(partial, result)  # the parts so far, if the run is cut short
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=1, default=str))
    write_json(args.out, result)
    partial.unlink(missing_ok=True)


if __name__ == "__main__":
    main_guard(main)
