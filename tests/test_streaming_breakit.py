"""Break-it tests of the streaming reader and writer (clakit/convert/checkpoint.py and the code that uses them):
what stays mapped or resident after a tensor is used, and what reaches the output folder."""

import gc
import json
import os
from pathlib import Path

import pytest
import torch

from clakit import outputs
from clakit.convert.checkpoint import PickleCheckpoint
from clakit.errors import ClakitError


def _mapped(path: Path) -> bool:
    """Whether this process has `path` memory-mapped (its pages can stay resident while it is)."""
    return str(path) in Path("/proc/self/maps").read_text()


def _pickle_shards(folder: Path, state: dict[str, torch.Tensor]) -> list[Path]:
    """`state` saved as two pytorch_model-0000i-of-00002.bin shards with their index."""
    names, files, where = sorted(state), [], {}
    for i in range(2):
        file = folder / f"pytorch_model-{i + 1:05d}-of-00002.bin"
        torch.save({n: state[n] for n in names[i::2]}, file)
        where |= dict.fromkeys(names[i::2], file.name)
        files.append(file)
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": where}))
    return files


def test_a_pickle_checkpoint_keeps_no_shard_mapped_once_its_tensors_are_dropped(tmp_path):
    # old: a cached state dict per file kept every shard mapped, and every page read stayed in RSS (the whole
    # checkpoint by the end of a conversion); each tensor must own the only reference to its mapping
    state = {f"model.layers.{i}.w": torch.randn(64, 32) for i in range(4)}
    files = _pickle_shards(tmp_path, state)
    checkpoint = PickleCheckpoint(tmp_path)
    for name in checkpoint.names:
        tensor = checkpoint.get(name)
        assert torch.equal(tensor, state[name])
        del tensor
    gc.collect()
    assert [f.name for f in files if _mapped(f)] == []


def test_an_empty_mount_point_as_the_output_is_refused_before_any_work(tmp_path, monkeypatch):
    # old: accepted (empty); all the work was staged beside it, on the parent's disk, and the final rename onto the
    # mount point failed ("Device or resource busy", read as a disk or permission problem), losing the output
    volume = tmp_path / "volume"
    volume.mkdir()
    real_ismount = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda p: Path(p) == volume or real_ismount(p))  # mounting needs root
    with pytest.raises(ClakitError, match="is a mount point.*inside it"):
        outputs.check_folder(volume, "convert")
    assert outputs.check_folder(volume / "out", "convert") == volume / "out"


def test_mount_points_are_told_from_folders():
    # /proc is mounted on every Linux (its own device); a plain folder is not a mount point
    assert outputs._is_mount_point(Path("/proc"))
    assert not outputs._is_mount_point(Path(__file__).parent)


def test_a_resume_maps_the_optimizer_state_instead_of_copying_it_into_each_process(tmp_path):
    # old: optimizer.pt (whole: AdamW's moments of every trained tensor) read into private memory by every process
    # of a resume, N copies on a node at once; mapped, the processes share the page cache's one
    from safetensors.torch import save_file

    from clakit.uptrain.checkpoint import read_checkpoint

    step = tmp_path / "checkpoints" / "step-000001"
    step.mkdir(parents=True)
    moments = {"exp_avg": torch.randn(256, 64), "exp_avg_sq": torch.rand(256, 64), "step": torch.tensor(1.0)}
    torch.save({"state": {"w": moments}, "param_groups": [{"lr": 1e-3, "params": ["w"]}]}, step / "optimizer.pt")
    torch.save({"last_epoch": 1}, step / "scheduler.pt")
    save_file({"w": torch.zeros(256, 64)}, step / "trainable.safetensors")
    (step / "state.json").write_text(json.dumps({"step": 1}))
    saved = read_checkpoint(step)
    assert torch.equal(saved["optimizer"]["state"]["w"]["exp_avg"], moments["exp_avg"])
    assert _mapped(step / "optimizer.pt")


def test_an_interrupt_while_an_output_is_replaced_puts_the_old_one_back(tmp_path, monkeypatch):
    """publish moves the old OUT aside, then renames the new one in; only an OSError put the old one back, so a
    Ctrl-C or SIGTERM (a KeyboardInterrupt) between the two renames left no OUT and the old output hidden in
    .OUT.XXXXXXXX.old."""
    out, tmp = tmp_path / "out", tmp_path / ".out.new.partial"
    for folder, text in ((out, "old"), (tmp, "new")):
        folder.mkdir()
        (folder / "config.json").write_text(text)
    outputs.write_marker(out, "convert")
    real_rename = Path.rename

    def interrupted(self, target):
        if self == tmp:
            raise KeyboardInterrupt
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", interrupted)
    with pytest.raises(KeyboardInterrupt):
        outputs.publish(tmp, out, "convert", overwrite=True)
    assert (out / "config.json").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".old")] == []
