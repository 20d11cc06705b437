"""16-bit runs on a CPU without native 16-bit kernels: they are slower than float32 there, not faster (a bf16
forward + backward of a (1024 x 576) @ (576 x 1536) linear took 45x fp32's time with oneDNN held to AVX2, and 0.28x
of it on the AMX CPU unheld), so clakit says so in one line where a run asks for them. ONEDNN_MAX_CPU_ISA=AVX2 shows
a machine without them."""

import json
import os
import subprocess
import sys

import pytest
import torch
from uptrain_fixtures import tiny_cla_checkpoint, tiny_recipe, write_recipe  # noqa: F401

from clakit import devices

PROBE = (
    "import json, torch; from clakit import devices; "
    "print(json.dumps([devices.native_on_cpu(torch.bfloat16), devices.native_on_cpu(torch.float16), "
    "devices.native_on_cpu(torch.float32), devices.slow_on_cpu(torch.bfloat16, 'train.bf16')]))"
)


def probe(**env) -> list:
    run = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env={**os.environ, **env})
    assert run.returncode == 0, run.stderr[-800:]
    return json.loads(run.stdout)


def test_a_cpu_held_to_avx2_has_no_native_16_bit_kernels_and_a_bf16_run_is_told_so():
    bf16, fp16, fp32, line = probe(ONEDNN_MAX_CPU_ISA="AVX2")
    assert (bf16, fp16, fp32) == (False, False, True)
    assert line.startswith("train.bf16: this CPU has no native bfloat16 kernels (AVX512-BF16 or AMX)")
    assert "use float32" in line


def test_the_answer_on_this_cpu_is_onednns():
    bf16, fp16, fp32, line = probe()
    assert (bf16, fp16, fp32) == (
        torch.ops.mkldnn._is_mkldnn_bf16_supported(),
        torch.ops.mkldnn._is_mkldnn_fp16_supported(),
        True,
    )
    assert (line is None) == bf16


@pytest.mark.parametrize("native", [True, False])
def test_a_bf16_uptrain_on_such_a_cpu_says_so_in_one_line(native, tmp_path, corpus_dir, monkeypatch, capsys, request):
    from clakit.uptrain import uptrain

    monkeypatch.setattr(devices, "native_on_cpu", lambda dtype: native)
    cla_checkpoint = request.getfixturevalue("tiny_cla_checkpoint")
    recipe = tiny_recipe(corpus_dir, tmp_path / "out", train={"bf16": True, "max_steps": 2, "save_steps": 0})
    recipe["model"] = {"path": str(cla_checkpoint)}
    uptrain(write_recipe(tmp_path / "r.yaml", recipe), quiet=False)
    said = [line for line in capsys.readouterr().err.splitlines() if "native bfloat16" in line]
    assert len(said) == (0 if native else 1), said


@pytest.mark.parametrize("native", [True, False])
def test_a_16_bit_eval_on_such_a_cpu_says_so_in_one_line(native, tiny_llama_checkpoint, corpus_dir, tmp_path,
                                                          monkeypatch, capsys):  # fmt: skip
    """`clakit eval --dtype bfloat16` on the CPU got no word where a 16-bit matmul takes 45x fp32's time."""
    from clakit.cli import main

    monkeypatch.setattr(devices, "native_on_cpu", lambda dtype: native)
    args = ["-o", str(tmp_path / "r.json"), "--data", str(corpus_dir / "heldout.txt"), "--seq-len", "64"]
    args += ["--max-tokens", "128", "--no-speed", "--dtype", "bfloat16"]
    assert main(["eval", str(tiny_llama_checkpoint), *args]) == 0
    said = [line for line in capsys.readouterr().err.splitlines() if "native bfloat16" in line]
    assert len(said) == (0 if native else 1), said
    assert all(line.startswith("clakit eval: --dtype bfloat16: this CPU has no native") for line in said), said
