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
    "devices.native_on_cpu(torch.float32), devices.slow_on_cpu(torch.bfloat16, 'train.bf16', 'cpu'), "
    "[devices.slow_on_cpu(d, 'x', dev) for d, dev in ((torch.bfloat16, 'cuda'), (torch.float32, 'cpu'), "
    "(None, 'cpu'), (torch.float16, torch.device('cpu')))]]))"
)


def probe(**env) -> list:
    run = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env={**os.environ, **env})
    assert run.returncode == 0, run.stderr[-800:]
    return json.loads(run.stdout)


def test_a_cpu_held_to_avx2_has_no_native_16_bit_kernels_and_a_bf16_run_is_told_so():
    bf16, fp16, fp32, line, others = probe(ONEDNN_MAX_CPU_ISA="AVX2")
    assert (bf16, fp16, fp32) == (False, False, True)
    assert line.startswith("train.bf16: this CPU has no native bfloat16 kernels (AVX512-BF16 or AMX)")
    assert "use float32" in line
    # bf16 on a GPU, fp32 and a dtype left to the checkpoint are never slow; fp16 on this CPU is
    assert others[:3] == [None, None, None]
    assert others[3].startswith("x: this CPU has no native float16 kernels (AVX512-FP16 or AMX-FP16)")


def test_the_answer_on_this_cpu_is_onednns():
    bf16, fp16, fp32, line, _ = probe()
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


@pytest.mark.parametrize("device_map", [None, "sequential"])
@pytest.mark.parametrize("native", [True, False])
def test_a_16_bit_eval_on_such_a_cpu_says_so_in_one_line(native, device_map, tiny_llama_checkpoint, corpus_dir,
                                                          tmp_path, monkeypatch, capsys):  # fmt: skip
    """`clakit eval --dtype bfloat16` on the CPU got no word where a 16-bit matmul takes 45x fp32's time; with
    --device-map on a machine without GPUs (every layer on that CPU) it still got none."""
    from clakit.cli import main

    monkeypatch.setattr(devices, "native_on_cpu", lambda dtype: native)
    args = ["-o", str(tmp_path / "r.json"), "--data", str(corpus_dir / "heldout.txt"), "--seq-len", "64"]
    args += ["--max-tokens", "128", "--no-speed", "--dtype", "bfloat16"]
    args += ["--device-map", device_map] if device_map else []
    assert main(["eval", str(tiny_llama_checkpoint), *args]) == 0
    said = [line for line in capsys.readouterr().err.splitlines() if "native bfloat16" in line]
    assert len(said) == (0 if native else 1), said
    assert all(line.startswith("clakit eval: --dtype bfloat16: this CPU has no native") for line in said), said


# --- convert's --bf16: the data stages under torch.autocast over fp32 weights -----------------------------------

CONVERT_FAST = dict(calib_tokens=512, seq_len=64, reconstruct_steps=20, distill_steps=10, distill_tokens=512,
                    eval_tokens=128, device="cpu")  # fmt: skip


def _convert(checkpoint, corpus_dir, out, **settings) -> dict:
    from clakit.convert import ConvertConfig, convert

    data = dict(calib_data=[str(corpus_dir / "calib.txt")], eval_data=[str(corpus_dir / "heldout.txt")])
    convert(checkpoint, out, ConvertConfig(**data, **CONVERT_FAST, **settings), quiet=True)
    return json.loads((out / "clakit_convert.json").read_text())


@pytest.mark.parametrize("native", [True, False])
def test_the_default_conversion_computes_in_float32_on_any_cpu_and_bf16_only_when_asked(
    native, tiny_llama_checkpoint, corpus_dir, tmp_path, monkeypatch
):
    """The same command writes the same tensors on every machine: --bf16 is asked for, not inferred from the CPU."""
    monkeypatch.setattr(devices, "native_on_cpu", lambda dtype: native)
    default = _convert(tiny_llama_checkpoint, corpus_dir, tmp_path / "default")
    assert default["config"]["bf16"] is False and default["config"]["bf16_used"] is False
    on = _convert(tiny_llama_checkpoint, corpus_dir, tmp_path / "on", bf16=True)
    assert on["config"]["bf16_used"] is True
    assert on["distill"]["kl_after"] != default["distill"]["kl_after"], (on["distill"], default["distill"])


def test_bf16_fits_train_every_step_and_write_float32_tensors_and_float32_quick_checks(
    tiny_llama_checkpoint, corpus_dir, tmp_path
):
    """The autocast spans whole stages; with its cast cache on, every step saw the bf16 copy of the trained leaves
    made at step 0 (the distillation's KL after equalled its KL before, and the fits moved nothing)."""
    from safetensors.torch import load_file

    on = _convert(tiny_llama_checkpoint, corpus_dir, tmp_path / "on", bf16=True)
    off = _convert(tiny_llama_checkpoint, corpus_dir, tmp_path / "off", bf16=False)
    assert on["config"]["bf16_used"] is True
    assert on["distill"]["kl_after"] < on["distill"]["kl_before"], on["distill"]
    # the quick check reads in float32 either way: the source's perplexity is the same number
    assert on["eval"]["perplexity_before"] == off["eval"]["perplexity_before"]
    assert abs(on["eval"]["perplexity_after"] / off["eval"]["perplexity_after"] - 1) < 0.05
    tensors = load_file(tmp_path / "on" / "model.safetensors")
    fitted = [n for n in tensors if ".self_attn." in n and tensors[n].dtype == torch.float32]
    assert fitted and all(tensors[n].dtype == torch.float32 for n in tensors)
    # fitted fp32 leaves are written as trained, not rounded to bf16 on the way
    assert any(not torch.equal(tensors[n], tensors[n].bfloat16().float()) for n in fitted)


@pytest.mark.parametrize("native", [True, False])
def test_bf16_convert_on_a_cpu_without_native_kernels_says_so_in_one_line(
    native, tiny_llama_checkpoint, corpus_dir, tmp_path, monkeypatch, capsys
):
    from clakit.cli import main

    monkeypatch.setattr(devices, "native_on_cpu", lambda dtype: native)
    args = ["--calib-data", str(corpus_dir / "calib.txt"), "--calib-tokens", "256", "--seq-len", "64"]
    args += ["--reconstruct-steps", "2", "--distill-steps", "2", "--distill-tokens", "256", "--device", "cpu"]
    assert main(["convert", str(tiny_llama_checkpoint), str(tmp_path / "out"), *args, "--bf16"]) == 0
    said = [line for line in capsys.readouterr().err.splitlines() if "native bfloat16" in line]
    assert len(said) == (0 if native else 1), said
    assert all(line.startswith("clakit convert: --bf16: this CPU has no native") for line in said), said
    record = json.loads((tmp_path / "out" / "clakit_convert.json").read_text())
    assert record["config"]["bf16"] is True and record["config"]["bf16_used"] is True


def test_a_reconstruct_fit_under_the_stage_wide_bf16_autocast_moves_its_tensors():
    """The per-group fit runs inside the stage's autocast: its Adam steps must see their own updates."""
    from conftest import tiny_model

    from clakit.convert.calibrate import collect_stats
    from clakit.convert.layerwise import autocast
    from clakit.convert.reconstruct import reconstruct_group

    model = tiny_model("llama").eval()
    ids = torch.randint(0, 320, (4, 32), generator=torch.Generator().manual_seed(0))
    stats = collect_stats(model, ids, [(0, 1)], keep=[0, 1], progress=False)
    with autocast(torch.bfloat16, torch.device("cpu")):
        _, record = reconstruct_group(model, stats, [0, 1], {}, steps=40, seed=0)
    assert record["best"] < 0.99 * record["start"], record
