"""clakit's checkpoint save / resume / merge and held-out evaluation under real torch FSDP (FSDP1 with
use_orig_params and FSDP2 fully_shard) on 2 CPU processes over gloo: see fsdp_worker.py."""

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fsdp_worker import EVAL_BATCH, HELDOUT_BLOCKS, blocks, student_model, trainer_parts
from safetensors.torch import load_file
from uptrain_fixtures import tiny_cla_checkpoint  # noqa: F401

from clakit.uptrain import checkpoint
from clakit.uptrain.trainer import heldout_loss, padded_share


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def fsdp_run(tiny_cla_checkpoint, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("fsdp")
    root = Path(__file__).parent
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "WORLD_SIZE", "RANK"))}
    path = [str(root.parent)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env |= {"OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(path), "FSDP_TEST_PORT": str(free_port())}
    command = [sys.executable, str(root / "fsdp_worker.py"), str(tiny_cla_checkpoint), str(out)]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


@pytest.mark.parametrize("mode", ["fsdp1", "fsdp2"])
def test_fsdp_checkpoint_holds_every_trainable_tensor_by_clean_name(fsdp_run, tiny_cla_checkpoint, mode):  # noqa: F811
    result = json.loads((fsdp_run / mode / "result.json").read_text())
    plain = student_model(tiny_cla_checkpoint)
    expected = [n for n, p in plain.named_parameters() if p.requires_grad]
    assert result["names"] == expected  # FSDP1's `_fsdp_wrapped_module.` parts removed
    saved = load_file(fsdp_run / mode / "run" / "checkpoints" / "step-000001" / "trainable.safetensors")
    assert sorted(saved) == sorted(expected) and len(saved) == 18
    for name, p in plain.named_parameters():  # whole tensors (not shards), and trained (not the initial values)
        if p.requires_grad:
            assert saved[name].shape == p.shape, name
    k = "base_model.model.model.layers.0.self_attn.k_proj.weight"
    assert not torch.allclose(saved[k], dict(plain.named_parameters())[k])


@pytest.mark.parametrize("mode", ["fsdp1", "fsdp2"])
def test_fsdp_resume_merge_and_strict_loading(fsdp_run, mode):
    result = json.loads((fsdp_run / mode / "result.json").read_text())
    assert result["resume_max_diff"] == 0.0  # resumed from the checkpoint == continued in memory, bit for bit
    assert result["merge_max_diff"] < 1e-4  # the merged whole model computes what the sharded LoRA model did
    assert "does not hold this recipe's trainable tensors (17 saved, 18 trainable" in result["short_state"]


@pytest.mark.parametrize("mode", ["fsdp1", "fsdp2"])
def test_a_write_failing_on_rank_0_mid_stream_stops_every_rank_in_one_line(fsdp_run, mode):
    """Rank 0's disk fills while it writes the gathered tensors (fsdp1) or moments (fsdp2): both ranks raise the
    same ClakitError instead of rank 1 waiting in the next gather (the worker's 60 s process-group timeout would
    fail the run), the unfinished step-000002.tmp is gone, and step-000001 stays whole."""
    result = json.loads((fsdp_run / mode / "result.json").read_text())
    other = json.loads((fsdp_run / mode / "failed_save1.json").read_text())
    assert result["failed_save"] == other
    assert other.startswith("could not write checkpoint step-000002 in ") and "No space left on device" in other
    assert other.endswith("then add --resume to the same command to continue from step-000001")
    folders = sorted(p.name for p in (fsdp_run / mode / "run" / "checkpoints").iterdir())
    assert folders == ["step-000001"]
    assert len(load_file(fsdp_run / mode / "run" / "checkpoints" / "step-000001" / "trainable.safetensors")) == 18


@pytest.mark.parametrize("mode", ["fsdp1", "fsdp2"])
def test_fsdp_heldout_loss_equals_one_process(fsdp_run, tiny_cla_checkpoint, mode):  # noqa: F811
    """9 blocks, 2 processes, batch 4: 5 and 4 blocks, so unpadded shares would run 2 and 1 forward passes and hang
    FSDP; padded, both run 2 and the padding is left out of the sums."""
    result = json.loads((fsdp_run / mode / "result.json").read_text())
    model = student_model(tiny_cla_checkpoint)
    one = heldout_loss(model, blocks(HELDOUT_BLOCKS, 2, model.config.vocab_size), EVAL_BATCH)
    assert result["heldout_before"]["tokens"] == one["tokens"] == HELDOUT_BLOCKS * 15
    assert result["heldout_before"]["loss"] == pytest.approx(one["loss"], rel=1e-5)


def test_a_checkpoint_saved_on_two_fsdp_processes_resumes_on_one(fsdp_run, tiny_cla_checkpoint):  # noqa: F811
    """The optimizer state is saved whole, by parameter name, so the process count may change on resume."""
    model = student_model(tiny_cla_checkpoint)
    optimizer, scheduler = trainer_parts(model)
    path = fsdp_run / "fsdp2" / "run" / "checkpoints" / "step-000001"
    assert checkpoint.load_checkpoint(path, model, optimizer, scheduler) == {"step": 1}
    saved = load_file(path / "trainable.safetensors")
    params = dict(model.named_parameters())
    assert all(torch.equal(params[k], v) for k, v in saved.items())
    assert len(optimizer.state) == len(saved) and scheduler.last_epoch == 1


def test_padded_shares_give_every_process_the_same_forward_passes():
    """Equal shares, so equal forwards at any batch size; padded only up to the largest share (they were padded to
    full batches: 3 blocks on one process at batch 64 scored 64 rows)."""
    for n, world in [(9, 2), (3, 4), (8, 2), (1, 1), (17, 3), (3, 1)]:
        shares = [padded_share(n, r, world) for r in range(world)]
        assert {len(index) for index, _ in shares} == {math.ceil(n / world)}
        real = sorted(int(i) for index, w in shares for i, keep in zip(index, w, strict=True) if keep)
        assert real == list(range(n))  # every block scored once, padding weighted 0



def test_the_teacher_is_read_by_rank_0_and_sharded_over_both(fsdp_run):
    """sharding.load_on_main + shard_frozen (uptrain's teacher under FSDP): rank 1 reads no weights, yet after the
    broadcast both compute the whole model's logits, each holding half of it, before and after forwards."""
    ranks = [json.loads((fsdp_run / "teacher" / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r in ranks:
        assert r["max_diff"] == 0.0
        assert 0.4 * r["total"] < r["local"] < 0.6 * r["total"]
        # the root (embeddings, lm_head) resharded after no-grad forwards (it stayed whole), no forward records kept
        # (they grew with every forward: FSDP2 clears them in the backward a frozen model never runs)
        assert r["root_sharded"] and r["forward_records"] == 0
    assert sum(r["local"] for r in ranks) == ranks[0]["total"]
