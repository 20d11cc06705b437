"""`clakit uptrain` end to end under accelerate's FSDP (FSDP2, and FSDP1 with use_orig_params), 2 CPU processes:
tests/accelerate_fsdp_cpu.py runs clakit's CLI with accelerate's own FSDP preparation on gloo. Two processes of
batch 1 train to the weights of one process of batch 2 (the teacher, the held-out reports and the merged result
included), with and without rank-0-only loading (`fsdp_cpu_ram_efficient_loading`), where the other process
never reads a checkpoint (it builds empty models from the config and receives the main process's weights)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_uptrain_distributed import launch, two_process_recipe, weights
from uptrain_fixtures import tiny_cla_checkpoint, write_recipe  # noqa: F401


def launch_fsdp(args: list[str], cwd: Path, **env) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "WORLD_SIZE", "RANK", "FSDP_"))}
    path = [str(Path(__file__).parent.parent)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    base |= {"OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(path), "CUDA_VISIBLE_DEVICES": ""} | env
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += [str(Path(__file__).parent / "accelerate_fsdp_cpu.py"), *args]
    return subprocess.run(command, cwd=cwd, env=base, capture_output=True, text=True, timeout=400)


@pytest.fixture(scope="module")
def one_process(tiny_cla_checkpoint, tiny_llama_checkpoint, corpus_dir, tmp_path_factory):  # noqa: F811
    tmp = tmp_path_factory.mktemp("one")
    recipe = two_process_recipe(corpus_dir, tmp / "run", tiny_cla_checkpoint, tiny_llama_checkpoint, batch=2)
    proc = launch(["uptrain", str(write_recipe(tmp / "r.yaml", recipe)), "-q"], tmp, processes=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "run"


# rank-0 loading; every other process fails if it reads a checkpoint (accelerate_fsdp_cpu.py)
MAIN_LOADS = {"FSDP_CPU_RAM_EFFICIENT_LOADING": "true", "FSDP_TEST_MAIN_LOADS_ONLY": "true"}


@pytest.mark.parametrize(
    "mode",
    [
        {"FSDP_VERSION": "2"},
        {"FSDP_VERSION": "2"} | MAIN_LOADS,
        {"FSDP_VERSION": "1"},  # with rank-0 loading FSDP1 needs sync_module_states, which accelerate refuses on CPU
    ],
    ids=["fsdp2", "fsdp2-main-loads", "fsdp1"],
)
def test_fsdp_trains_like_one_process_of_twice_the_batch(
    one_process,
    tiny_cla_checkpoint,  # noqa: F811
    tiny_llama_checkpoint,
    corpus_dir,
    tmp_path,
    mode,
):
    recipe = two_process_recipe(corpus_dir, tmp_path / "run", tiny_cla_checkpoint, tiny_llama_checkpoint, batch=1)
    proc = launch_fsdp(["uptrain", str(write_recipe(tmp_path / "r.yaml", recipe)), "-q"], tmp_path, **mode)
    assert proc.returncode == 0, proc.stderr[:12000]
    a, b = weights(one_process / "model"), weights(tmp_path / "run" / "model")
    assert set(a) == set(b)
    for name in a:  # same blocks per step, gradients reduced over the shards: equal up to float rounding
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)
    k = "model.layers.0.self_attn.k_proj.weight"
    assert not torch.allclose(a[k], weights(tiny_cla_checkpoint)[k], atol=1e-4)  # trained, not untouched
    for report in ("original", "converted", "uptrained"):
        one = json.loads((one_process / "eval" / f"{report}.json").read_text())["perplexity"]
        two = json.loads((tmp_path / "run" / "eval" / f"{report}.json").read_text())["perplexity"]
        assert two == pytest.approx(one, rel=1e-4), report


def test_fsdp_naming_the_stock_layer_class_is_refused_before_anything_is_written(
    tiny_cla_checkpoint,  # noqa: F811
    tiny_llama_checkpoint,
    corpus_dir,
    tmp_path,
):
    """An accelerate config written for stock Llama wraps LlamaDecoderLayer, which the CLA student does not have:
    accelerate failed with a traceback once the models were loaded."""
    recipe = two_process_recipe(corpus_dir, tmp_path / "run", tiny_cla_checkpoint, tiny_llama_checkpoint, batch=1)
    args = ["uptrain", str(write_recipe(tmp_path / "r.yaml", recipe)), "-q"]
    proc = launch_fsdp(args, tmp_path, FSDP_VERSION="2", FSDP_TRANSFORMER_CLS_TO_WRAP="LlamaDecoderLayer")
    errors = [line for line in proc.stderr.splitlines() if line.startswith("clakit: error:")]
    assert proc.returncode != 0 and errors, proc.stderr[-3000:]
    assert all("names LlamaDecoderLayer, which the CLA student does not have" in e for e in errors)
    assert all("--fsdp_transformer_layer_cls_to_wrap LlamaCLADecoderLayer" in e for e in errors)
    assert not [line for line in proc.stderr.splitlines() if line.strip().startswith("File") and "/clakit/" in line]
    assert not (tmp_path / "run").exists() and not list(tmp_path.glob(".run.*"))
