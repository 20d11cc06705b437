"""Several processes (DDP over gloo on CPU, the same code path `accelerate launch` takes on GPUs): two processes of
batch 1 (converting model.source first: the second process polls for the result) train to the weights of one process
of batch 2; a launch accelerate cannot see, or with more processes than held-out blocks, is refused before anything
is written. FSDP: test_uptrain_fsdp.py."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from uptrain_fixtures import tiny_cla_checkpoint, tiny_recipe, write_recipe  # noqa: F401


def launch(args: list[str], cwd: Path, processes: int = 2, use_cpu: bool = True) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node N -m clakit ...` (N=1: plain `python -m clakit`), on the CPU even where a GPU is
    visible, so both runs compute alike; ACCELERATE_USE_CPU makes accelerate join the processes (gloo)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "WORLD_SIZE", "RANK"))}
    path = [str(Path(__file__).parent.parent)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env |= {"OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(path), "CUDA_VISIBLE_DEVICES": ""}
    if use_cpu:
        env["ACCELERATE_USE_CPU"] = "1"
    command = [sys.executable]
    if processes > 1:
        command += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    command += ["-m", "clakit", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def weights(folder: Path) -> dict:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def two_process_recipe(corpus_dir: Path, out: Path, checkpoint: Path, original: Path, batch: int) -> dict:
    # no dropout: the two runs draw different random numbers; distillation on, so the teacher path is covered too
    return tiny_recipe(
        corpus_dir,
        out,
        model={"path": str(checkpoint), "original": str(original)},
        train={"per_device_train_batch_size": batch, "max_steps": 4, "save_steps": 2},
        lora={"lora_dropout": 0.0, "full_train": ["k_proj", "consumers.q_proj"]},
        distill={"weight": 0.5, "temperature": 2.0},
    )


def test_two_processes_train_like_one_process_of_twice_the_batch(
    tiny_cla_checkpoint,  # noqa: F811
    tiny_llama_checkpoint,
    corpus_dir,
    tmp_path,
):
    one = two_process_recipe(corpus_dir, tmp_path / "one", tiny_cla_checkpoint, tiny_llama_checkpoint, batch=2)
    two = two_process_recipe(corpus_dir, tmp_path / "two", tiny_cla_checkpoint, tiny_llama_checkpoint, batch=1)
    # the same CLA2 start, converted on the fly by the main process while the other one waits for it
    two["model"] = {"source": str(tiny_llama_checkpoint), "convert": {"factor": 2, "init": "mean"}}
    for name, recipe, processes in (("one", one, 1), ("two", two, 2)):
        proc = launch(["uptrain", str(write_recipe(tmp_path / f"{name}.yaml", recipe)), "-q"], tmp_path, processes)
        assert proc.returncode == 0, proc.stderr[-3000:]

    assert (tmp_path / "two" / "converted" / "config.json").is_file() and not list(tmp_path.glob("two/*.failed"))
    record = json.loads((tmp_path / "two" / "model" / "uptrain.json").read_text())
    assert record["processes"] == 2 and record["train_tokens"] == 4 * 2 * 32
    # the card's rerun command launches the processes it ran on (`clakit uptrain` alone trained half a step's blocks)
    cards = {name: (tmp_path / name / "model" / "README.md").read_text() for name in ("one", "two")}
    assert "run `accelerate launch --num_processes 2 -m clakit uptrain recipe.yaml" in cards["two"]
    assert "--nproc_per_node 2 -m clakit uptrain" in cards["two"] and "num_processes" not in cards["one"]
    a, b = weights(tmp_path / "one" / "model"), weights(tmp_path / "two" / "model")
    assert set(a) == set(b)
    for name in a:  # same blocks per step, gradients averaged by DDP: equal up to the all-reduce's float rounding
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)
    k = "model.layers.0.self_attn.k_proj.weight"
    assert not torch.allclose(a[k], weights(tiny_cla_checkpoint)[k], atol=1e-4)  # equal as trained, not as untouched
    one_ppl = json.loads((tmp_path / "one" / "eval" / "uptrained.json").read_text())["perplexity"]
    two_ppl = json.loads((tmp_path / "two" / "eval" / "uptrained.json").read_text())["perplexity"]
    assert two_ppl == pytest.approx(one_ppl, rel=1e-4)  # the held-out score is split over the processes and reduced


def test_launch_that_accelerate_does_not_join_is_refused(
    tiny_cla_checkpoint,  # noqa: F811
    tiny_llama_checkpoint,
    corpus_dir,
    tmp_path,
):
    """torchrun on CPU without ACCELERATE_USE_CPU: each process would run the whole job alone in the same folder."""
    recipe = two_process_recipe(corpus_dir, tmp_path / "run", tiny_cla_checkpoint, tiny_llama_checkpoint, batch=1)
    proc = launch(["uptrain", str(write_recipe(tmp_path / "r.yaml", recipe)), "-q"], tmp_path, use_cpu=False)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("clakit: error:")]
    assert errors and all("launched as 2 processes but accelerate sees 1" in line for line in errors)
    assert not [line for line in proc.stderr.splitlines() if line.strip().startswith("File") and "/clakit/" in line]
    assert not (tmp_path / "run").exists() and not (tmp_path / ".run.partial").exists()


def test_more_processes_than_held_out_blocks_is_refused(
    tiny_cla_checkpoint,  # noqa: F811
    tiny_llama_checkpoint,
    corpus_dir,
    tmp_path,
):
    recipe = two_process_recipe(corpus_dir, tmp_path / "run", tiny_cla_checkpoint, tiny_llama_checkpoint, batch=1)
    recipe["data"]["eval_max_tokens"] = 32  # one held-out block of seq_len 32 for two processes
    proc = launch(["uptrain", str(write_recipe(tmp_path / "r.yaml", recipe)), "-q"], tmp_path)
    assert proc.returncode != 0, proc.stderr[-2000:]  # torchrun exits 1 when its processes exit 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("clakit: error:")]
    assert errors and all("launched on 2 processes but the held-out data has only 1 blocks" in e for e in errors)
    assert not [line for line in proc.stderr.splitlines() if line.strip().startswith("File") and "/clakit/" in line]
    assert not (tmp_path / "run").exists() and not (tmp_path / ".run.partial").exists()


STOP_AFTER = """import os, sys
from clakit.uptrain import trainer
hook = trainer.Trainer.on_step_end
def stop(self):
    hook(self)
    if self.step == {step}:
        os._exit(0)  # a kill right after the checkpoint: no cleanup, no final save
trainer.Trainer.on_step_end = stop
from clakit.cli import main
sys.exit(main(sys.argv[1:]))
"""


def launch_stopped(args: list[str], cwd: Path, step: int) -> subprocess.CompletedProcess:
    """`launch` on 2 processes of a script that runs clakit and kills every process after optimizer step `step`."""
    script = cwd / "stop_after.py"
    script.write_text(STOP_AFTER.format(step=step))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "WORLD_SIZE", "RANK"))}
    path = [str(Path(__file__).parent.parent)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env |= {"OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(path), "CUDA_VISIBLE_DEVICES": ""}
    env["ACCELERATE_USE_CPU"] = "1"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    return subprocess.run([*command, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def assert_same_run(result: Path, reference: Path) -> None:
    """The resumed run's weights and record against an uninterrupted one of the same blocks per step."""
    a, b = weights(reference / "model"), weights(result / "model")
    assert set(a) == set(b)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=name)
    record = json.loads((result / "model" / "uptrain.json").read_text())
    assert record["train_tokens"] == 4 * 2 * 32 and record["plan"]["tokens_per_step"] == 2 * 32
    tokens = [json.loads(line)["tokens"] for line in (result / "metrics.jsonl").read_text().splitlines()]
    assert tokens == sorted(tokens) and tokens[-1] == 4 * 2 * 32  # never counted backwards
    return record


def test_a_run_resumed_on_another_number_of_processes_trains_the_blocks_an_uninterrupted_run_would(
    tiny_cla_checkpoint,  # noqa: F811
    tiny_llama_checkpoint,
    corpus_dir,
    tmp_path,
    monkeypatch,
):
    """2 processes of batch 1 killed after step 2 and resumed on 1 (the steps keep their 2 blocks: batch 1 x 2
    accumulation), and 1 process of batch 2 killed after step 2 and resumed on 2 (batch 1 each): both train the
    weights of one uninterrupted process of batch 2. Before, a step read the new world's share of other positions:
    blocks trained twice or skipped, tokens counted backwards, a max_tokens schedule stretched."""
    from uptrain_fixtures import killed_at_step

    from clakit.uptrain import uptrain

    monkeypatch.chdir(tmp_path)
    reference = two_process_recipe(corpus_dir, tmp_path / "ref", tiny_cla_checkpoint, tiny_llama_checkpoint, batch=2)
    uptrain(write_recipe(tmp_path / "ref.yaml", reference), quiet=True)

    down = two_process_recipe(corpus_dir, tmp_path / "down", tiny_cla_checkpoint, tiny_llama_checkpoint, batch=1)
    proc = launch_stopped(["uptrain", str(write_recipe(tmp_path / "down.yaml", down)), "-q"], tmp_path, step=2)
    assert (tmp_path / "down" / "checkpoints" / "step-000002").is_dir(), proc.stderr[-3000:]
    uptrain(tmp_path / "down.yaml", resume=True, quiet=True)
    record = assert_same_run(tmp_path / "down", tmp_path / "ref")
    assert record["step_shape"] == {"per_device_train_batch_size": 1, "gradient_accumulation_steps": 2,
                                    "processes": 1, "blocks_per_step": 2}  # fmt: skip
    card = (tmp_path / "down" / "model" / "README.md").read_text()  # it said "on 1 process(es)", nothing more
    assert re.search(r"on 1 process\(es\) \([^)]*\); resumed: it started on 2 process\(es\)", card)

    up = two_process_recipe(corpus_dir, tmp_path / "up", tiny_cla_checkpoint, tiny_llama_checkpoint, batch=2)
    killed_at_step(2, write_recipe(tmp_path / "up.yaml", up))
    proc = launch(["uptrain", str(tmp_path / "up.yaml"), "-q", "--resume"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = assert_same_run(tmp_path / "up", tmp_path / "ref")
    assert record["step_shape"]["per_device_train_batch_size"] == 1 and record["processes"] == 2
    card = (tmp_path / "up" / "model" / "README.md").read_text()
    assert re.search(r"on 2 process\(es\) \([^)]*\); resumed: it started on 1 process\(es\)", card)


def test_a_step_the_new_processes_cannot_share_is_refused():
    from types import SimpleNamespace

    from clakit.errors import ClakitError
    from clakit.uptrain.trainer import StepShape, step_shape

    train = SimpleNamespace(per_device_train_batch_size=4, gradient_accumulation_steps=3)
    assert step_shape(train, 2) == StepShape(4, 3, 2)  # a fresh run: the recipe's
    assert step_shape(train, 1, blocks=24) == StepShape(4, 6, 1)  # fewer processes: more accumulation
    assert step_shape(train, 4, blocks=24) == StepShape(3, 2, 4)  # more: 6 blocks each, batch at most the recipe's
    assert step_shape(train, 8, blocks=24) == StepShape(3, 1, 8)
    with pytest.raises(ClakitError, match="which 5 processes cannot share evenly; resume on 1, 2, 3, 4, 6, 8, 12, 24"):
        step_shape(train, 5, blocks=24)


def test_a_process_lost_mid_run_stops_the_others_in_one_line(tmp_path):
    """gloo's error in the processes left when another one dies inside a collective (measured: a 2-process gloo
    all_reduce after the other process's os._exit) was a 60-line traceback on each; one line now, naming the way
    on. Any other error, or one process, passes through unchanged."""
    from types import SimpleNamespace

    from clakit.errors import ClakitError
    from clakit.uptrain import pipeline

    gloo = RuntimeError(
        "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
        "[127.0.0.1]:63673. This is typically caused by a remote worker crashing."
    )
    two, one = SimpleNamespace(num_processes=2), SimpleNamespace(num_processes=1)
    with pytest.raises(ClakitError, match=r"another process of this run stopped while training \(\[.*Connection "
                       r"closed by peer.*\); run it again$"):  # fmt: skip
        with pipeline._peer_lost(two, tmp_path):
            raise gloo
    (tmp_path / "checkpoints" / "step-000004").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-000004" / "state.json").write_text("{}")
    with pytest.raises(ClakitError, match="add --resume to the same launch to continue from step-000004"):
        with pipeline._peer_lost(two, tmp_path):
            raise gloo
    for acc, error in ((one, gloo), (two, RuntimeError("mat1 and mat2 shapes cannot be multiplied"))):
        with pytest.raises(RuntimeError) as caught:
            with pipeline._peer_lost(acc, tmp_path):
                raise error
        assert caught.value is error
