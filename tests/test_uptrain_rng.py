"""uptrain checkpoints' CUDA RNG state, emulated on a CPU-only machine (torch.cuda's calls replaced): each process
saves its own GPU's state, and a checkpoint written where more GPUs were visible resumes where fewer are."""

import random

import torch

from clakit.uptrain import checkpoint


def fake_cuda(monkeypatch, visible: int) -> list:
    """torch.cuda with `visible` GPUs, this process on GPU 0; returns the list of states restored."""
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": torch.tensor([7], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [torch.tensor([7], dtype=torch.uint8)] * visible)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": restored.append(state))

    def set_all(states):  # torch's own: one state per visible GPU, by index
        gens = (None,) * visible
        for i, state in enumerate(states):
            restored.append((gens[i], state))

    monkeypatch.setattr(torch.cuda, "set_rng_state_all", set_all)
    return restored


def test_a_checkpoint_from_two_gpus_resumes_on_one(monkeypatch):
    restored = fake_cuda(monkeypatch, visible=1)
    first, second = torch.tensor([1], dtype=torch.uint8), torch.tensor([2], dtype=torch.uint8)
    version, state, _ = random.getstate()
    checkpoint.set_rng_state({"torch": torch.get_rng_state(), "python": list(state), "python_v": version,
                              "cuda": [first, second]})  # fmt: skip
    assert len(restored) == 1 and torch.equal(restored[0], first)


def test_each_process_saves_its_own_gpus_state_and_restores_it(monkeypatch):
    restored = fake_cuda(monkeypatch, visible=4)
    state = checkpoint.rng_state()
    assert torch.equal(state["cuda"], torch.tensor([7], dtype=torch.uint8))
    checkpoint.set_rng_state(state)
    assert len(restored) == 1 and torch.equal(restored[0], state["cuda"])
