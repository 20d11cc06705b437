"""vLLM serving, original vs CLA at the same KV cache bytes: capacity, maximum concurrency, throughput (JSON).

    flock /work/bench.lock .venv/bin/python benchmarks/serve_bench.py [-o docs/figures/serve_bench_cpu.json]
        [--original DIR --cla DIR] [--kv-cache-mib 64] [--prompt-tokens 32] [--max-tokens 32]

Defaults: SmolLM2-135M from the demo GGUF (`clakit fetch-demo`), saved as a plain HF folder, and its CLA2
conversion (`--factor 2 --init mean`); both fp32. Both run in the CPU vLLM venv (.venv-vllm, made by
serving/vllm/install-cpu.sh when absent; CLAKIT_VLLM_VENV overrides) with the same KV cache bytes. vLLM reports each
model's KV capacity in tokens and its maximum concurrency at max_model_len. Throughput: one fixed batch of
concurrent greedy requests (prompt + max_tokens tokens each, EOS ignored), twice as many as the original's cache
holds at once (requests take whole cache blocks), so the original must queue or preempt while a CLA2 model holds the
whole batch; generated tokens / wall seconds.
Ratios are CLA / original, measured in one run (the machine is shared: compare ratios, not absolute figures).

Writes the JSON (settings, provenance: versions of both venvs and the command, both models' figures, the ratios) to
-o once, at the end (staged, then renamed; an existing file is replaced only with --force) and prints the ratios.
"""

import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the vLLM-venv helpers the serving tests use

from common import Parser, check_output, main_guard, positive, provenance, refuse, write_json  # noqa: E402
from serving_vllm_fixtures import ensure_vllm_venv, run_vllm  # noqa: E402


def parse_args(argv=None):
    p = Parser(__doc__)
    p.add_argument(
        "-o",
        "--output",
        type=Path,
        default=Path("docs/figures/serve_bench_cpu.json"),
        help="the JSON report (default docs/figures/serve_bench_cpu.json); an existing file needs --force",
    )
    p.add_argument("--force", action="store_true", help="replace an existing -o file")
    p.add_argument("--original", type=Path, help="original checkpoint folder, with --cla (default: SmolLM2 from the "
                   "demo GGUF)")  # fmt: skip
    p.add_argument("--cla", type=Path, help="CLA checkpoint folder, with --original (default: SmolLM2 converted to "
                   "CLA2, mean init)")  # fmt: skip
    p.add_argument("--kv-cache-mib", type=positive, default=64, help="the same KV cache size for both models (MiB)")
    p.add_argument("--prompt-tokens", type=positive, default=32, help="prompt tokens per request (default 32)")
    p.add_argument("--max-tokens", type=positive, default=32, help="generated tokens per request (default 32)")
    p.add_argument("--max-model-len", type=positive, default=1024, help="<= the cache's capacity: vLLM refuses "
                   "less (default 1024)")  # fmt: skip
    args = p.parse_args(argv)
    if (args.original is None) != (args.cla is None):
        given = "--original" if args.original else "--cla"
        refuse(f"{given} without {'--cla' if args.original else '--original'}: pass both folders, or neither for "
               "the SmolLM2 pair")  # fmt: skip
    for flag, folder in (("--original", args.original), ("--cla", args.cla)):
        if folder is not None and not (folder / "config.json").is_file():
            refuse(f"{flag} {folder} is not a checkpoint folder (no config.json): pass a saved model folder")
    check_output(args.output, args.force, "-o")
    return args


def smollm2_pair(work: Path) -> tuple[Path, Path]:
    from clakit.convert import convert
    from clakit.demo.fetch import fetch_demo
    from clakit.sources import load_model, load_tokenizer, resolve_source
    from clakit.uptrain.student import drop_gguf_quantizer

    gguf = fetch_demo(quiet=True).gguf
    source = resolve_source(str(gguf))
    model = load_model(source)
    drop_gguf_quantizer(model)
    model.save_pretrained(work / "original")
    load_tokenizer(source).save_pretrained(work / "original")
    return work / "original", convert(gguf, work / "cla2", factor=2, init="mean", quiet=True)


def prompts(folder: Path, n: int, length: int) -> list[list[int]]:
    """n different prompts of exactly `length` tokens, cut from the demo's held-out text (or repeated words)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    try:
        from clakit.demo.fetch import fetch_demo

        text = fetch_demo(quiet=True).heldout.read_text()
    except Exception:  # a user's own checkpoints without the demo assets: any text of enough tokens will do
        text = "The quick brown fox jumps over the lazy dog. " * 50 * n
    ids = tokenizer(text).input_ids
    return [ids[i * length : (i + 1) * length] for i in range(n)]


def measure(python: Path, folder: Path, batch: list[list[int]], args, work: Path) -> dict:
    options = dict(max_tokens=args.max_tokens, kv_cache_bytes=args.kv_cache_mib << 20)
    options.update(max_model_len=args.max_model_len, max_num_seqs=len(batch))
    try:
        result = run_vllm(python, folder, batch, work, **options)
    except AssertionError as e:  # the helper's report of a failed vLLM run: its last line names the cause
        lines = [x.strip() for x in str(e).splitlines() if x.strip()]
        cause = lines[-1].removeprefix("[rank0]:").strip() if lines else "no output"
        refuse(f"vLLM could not serve {folder}: {cause}; check the model against vLLM's CPU backend (e.g. head_dim "
               "32, 64, 80, ...)")  # fmt: skip
    result.pop("tokens")
    return result


def main(argv=None) -> None:
    args = parse_args(argv)  # bad input is refused before the vLLM venv is made or any model is loaded
    python = ensure_vllm_venv()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        original, cla = (args.original, args.cla) if args.original else smollm2_pair(work)
        probe = measure(python, original, prompts(original, 1, args.prompt_tokens), args, work)
        per_request = args.prompt_tokens + args.max_tokens
        # twice the requests the original's cache holds at once (each takes whole blocks)
        n = 2 * (probe["kv_cache_blocks"] // math.ceil(per_request / probe["block_size"]))
        batch = prompts(original, n, args.prompt_tokens)
        results = {
            "original": measure(python, original, batch, args, work),
            "cla": measure(python, cla, batch, args, work),
        }
    o, c = results["original"], results["cla"]
    report = {
        "benchmark": "serve_bench",
        "provenance": provenance(args),
        "settings": {"requests": n, "tokens_per_request": per_request},
        **results,
        "ratios_cla_over_original": {
            "kv_cache_tokens": c["kv_cache_tokens"] / o["kv_cache_tokens"],
            "max_concurrency": c["max_concurrency"] / o["max_concurrency"],
            "tokens_per_s": c["tokens_per_s"] / o["tokens_per_s"],
        },
        "environment": environment(python),
        "wall_s": time.perf_counter() - start,
    }
    write_json(args.output, report)
    print(json.dumps(report["ratios_cla_over_original"], indent=2))
    print(f"wrote {args.output}")


def environment(python: Path) -> dict:
    versions = subprocess.run(
        [
            str(python),
            "-c",
            "import vllm, torch, transformers; print(vllm.__version__, torch.__version__, transformers.__version__)",
        ],
        capture_output=True,
        text=True,
    ).stdout.split()
    return {
        "vllm": versions[0] if versions else None,
        "torch": versions[1] if len(versions) > 1 else None,
        "transformers": versions[2] if len(versions) > 2 else None,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "load_average_at_end": os.getloadavg(),
    }


if __name__ == "__main__":
    main_guard(main)
