"""Helpers for the vLLM serving tests: the CPU vLLM venv, running a checkpoint in it, transformers' reference tokens.

vLLM pins a transformers range that excludes clakit's, so vLLM runs in its own venv (`.venv-vllm`, made by
serving/vllm/install-cpu.sh when absent) in a subprocess; checkpoints and reference tokens come from this venv.
The subprocess puts serving/vllm first on PYTHONPATH, so it serves this checkout's plugin, not a stale install.
"""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_DIR = ROOT / "serving" / "vllm"
VLLM_VENV = Path(os.environ.get("CLAKIT_VLLM_VENV", ROOT / ".venv-vllm"))
INSTALL_TIMEOUT_S = 1800
RUN_TIMEOUT_S = 900
RESULT_PREFIX = "CLAKIT_VLLM_RESULT "
KV_CACHE_GIB = "1"


def vllm_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(
        PYTHONPATH=str(PLUGIN_DIR),
        VLLM_CPU_KVCACHE_SPACE=KV_CACHE_GIB,  # the same KV cache bytes for every run: capacities compare
        VLLM_ENABLE_V1_MULTIPROCESSING="0",
        HF_HUB_OFFLINE="1",
        **extra,
    )
    return env


def _venv_works(python: Path) -> bool:
    if not python.is_file():
        return False
    probe = [str(python), "-c", "import vllm, clakit_vllm"]
    return subprocess.run(probe, env=vllm_env(), capture_output=True, timeout=600).returncode == 0


def ensure_vllm_venv() -> Path:
    """The venv's python, installing it with install-cpu.sh when absent; fails (never skips) when that fails."""
    python = VLLM_VENV / "bin" / "python"
    if _venv_works(python):
        return python
    cmd = ["bash", str(PLUGIN_DIR / "install-cpu.sh"), str(VLLM_VENV)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
    if proc.returncode != 0 or not _venv_works(python):
        pytest.fail(
            f"could not build the CPU vLLM venv at {VLLM_VENV} with `{' '.join(cmd)}` (exit {proc.returncode}); "
            f"the vLLM serving tests need it. Last output:\n{(proc.stdout + proc.stderr)[-3000:]}",
            pytrace=False,
        )
    return python


FP8_NEEDS = "FP8 KV cache on CPU requires x86 with AVX-512 or AMX"  # vLLM 0.32's CPU backend, as it says it


def cpu_runs_fp8_kv() -> bool:
    """Whether this CPU has what vLLM's CPU backend needs for an fp8 KV cache (AVX-512 or AMX): the stop-41 hosts
    did (Intel, AMX); an AVX2-only host (AMD EPYC at stop 42) gets vLLM's own refusal."""
    info = Path("/proc/cpuinfo")
    flags = set(info.read_text().split()) if info.exists() else set()
    return bool(flags & {"avx512f", "amx_tile"})


def run_vllm(python: Path, model: Path, prompts: list[list[int]], tmp_path: Path, **options) -> dict:
    """`python -m clakit_vllm.run MODEL` in the vLLM venv; its JSON result (serving/vllm/clakit_vllm/run.py)."""
    prompts_file = tmp_path / f"prompts_{model.name}.json"
    prompts_file.write_text(json.dumps(prompts))
    cmd = [str(python), "-m", "clakit_vllm.run", str(model), "--prompts-json", str(prompts_file)]
    for key, value in options.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    env = vllm_env()
    if "kv_cache_bytes" in options:  # vLLM's CPU platform lets VLLM_CPU_KVCACHE_SPACE override the engine argument
        del env["VLLM_CPU_KVCACHE_SPACE"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, cwd=tmp_path)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    assert proc.returncode == 0 and lines, f"vLLM failed on {model} (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
    return json.loads(lines[-1][len(RESULT_PREFIX) :])


def hf_greedy(model_dir: Path, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """transformers' greedy continuation of each prompt (fp32, exactly `max_new_tokens` tokens, EOS ignored).

    As vLLM's `ignore_eos`: EOS may be chosen and decoding goes on. (`min_new_tokens` would instead forbid EOS, and
    a model whose greedy token is EOS would continue differently from vLLM.)"""
    from transformers import AutoModelForCausalLM

    import clakit.modeling  # noqa: F401  registers the CLA classes with transformers' Auto* classes

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokens = []
    with torch.no_grad():
        for prompt in prompts:
            ids = list(prompt)
            for _ in range(max_new_tokens):  # a full forward per token: tiny models, a few tokens
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
            tokens.append(ids[len(prompt) :])
    return tokens


@pytest.fixture(scope="session")
def vllm_python() -> Path:
    return ensure_vllm_venv()


# One vLLM process runs each engine of a list in turn (a start-up costs seconds, not a fresh interpreter's import):
# each run is {"model", "prompts" (token-id lists), "max_tokens", "dtype", "engine" (LLM keyword arguments), "passes"
# (generate the batch this many times: later passes hit the prefix cache), "lora" (a PEFT adapter folder to apply;
# the engine needs enable_lora)}; one RESULT line each, an error as text;
# with engine disable_log_stats=False it has vLLM's counters too.
RUN_ENGINES = """
import gc, json, sys
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
from vllm.lora.request import LoRARequest

for run in json.loads(sys.argv[1]):
    try:
        llm = LLM(model=run["model"], dtype=run.get("dtype", "float32"), enforce_eager=True, seed=0, **run["engine"])
        cache = llm.llm_engine.vllm_config.cache_config
        params = SamplingParams(temperature=0.0, max_tokens=run["max_tokens"], ignore_eos=True)
        batch = [TokensPrompt(prompt_token_ids=ids) for ids in run["prompts"]]
        lora = LoRARequest("adapter", 1, run["lora"]) if run.get("lora") else None
        passes = [llm.generate(batch, params, lora_request=lora, use_tqdm=False) for _ in range(run.get("passes", 1))]
        result = dict(tokens=[[list(o.outputs[0].token_ids) for o in outs] for outs in passes],
                      kv_cache_tokens=cache.kv_cache_size_tokens, kv_cache_blocks=cache.num_gpu_blocks,
                      block_size=cache.block_size, max_concurrency=cache.kv_cache_max_concurrency)
        if run["engine"].get("disable_log_stats") is False:  # vLLM's counters, e.g. vllm:num_preemptions
            result["metrics"] = {m.name: m.value for m in llm.get_metrics() if hasattr(m, "value")}
        del llm
    except Exception as e:
        result = dict(error=f"{type(e).__name__}: {e}".replace("\\n", " / "))
    gc.collect()
    print("CLAKIT_VLLM_RESULT " + json.dumps(result), flush=True)
"""


def run_engines(python: Path, runs: list[dict], cwd: Path) -> list[dict]:
    """Each run of `runs` (see RUN_ENGINES) in one vLLM process: its greedy tokens per pass and the KV cache vLLM
    allocated, or {"error": one line} when vLLM failed on it. The KV cache size is each run's own
    `kv_cache_memory_bytes` (VLLM_CPU_KVCACHE_SPACE would override it)."""
    env = vllm_env()
    del env["VLLM_CPU_KVCACHE_SPACE"]
    cmd = [str(python), "-c", RUN_ENGINES, json.dumps(runs, default=str)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, cwd=cwd)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    results = [json.loads(line[len(RESULT_PREFIX) :]) for line in lines]
    assert proc.returncode == 0 and len(results) == len(runs), f"vLLM exit {proc.returncode}:\n{proc.stderr[-4000:]}"
    return results
