"""config.json's `transformers_weights` names the weights file transformers' from_pretrained loads before any other
(model.safetensors beside it is ignored): `clakit convert` reads that file, a Hub download fetches it, a named
pickle needs --allow-pickle everywhere (convert, and the one loader eval and uptrain use), and a name outside the
folder or a missing file is refused in one line before any work."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import save_checkpoint, tiny_model
from convert_fixtures import load
from safetensors.torch import load_file
from test_convert_unindexed import assert_refused, converts_what_transformers_loads, single_file_checkpoint
from test_sources_hub import COMMIT, hub  # noqa: F401

from clakit.convert import convert
from clakit.errors import ClakitError
from clakit.sources import load_model, resolve_source

Q0 = "model.layers.0.self_attn.q_proj.weight"


def name_weights(folder: Path, name) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["transformers_weights"] = name
    (folder / "config.json").write_text(json.dumps(config))


def other_weights(tmp_path: Path, tokenizer, shard: bool = False) -> Path:
    """Another tiny Mistral's checkpoint (seed 1): the weights the named file holds."""
    return save_checkpoint(
        tiny_model("mistral", seed=1), tokenizer, tmp_path / "other", max_shard_size="80KB" if shard else "50MB"
    )


def with_named_single(tmp_path: Path, tokenizer, name: str = "v2.safetensors") -> Path:
    src = single_file_checkpoint(tmp_path / "src", tokenizer, seed=0)
    shutil.copy(other_weights(tmp_path, tokenizer) / "model.safetensors", src / name)
    name_weights(src, name)
    return src


def with_named_index(tmp_path: Path, tokenizer) -> Path:
    src = single_file_checkpoint(tmp_path / "src", tokenizer, seed=0)
    other = other_weights(tmp_path, tokenizer, shard=True)
    for shard in other.glob("model-*.safetensors"):
        shutil.copy(shard, src / shard.name)
    shutil.copy(other / "model.safetensors.index.json", src / "v2.safetensors.index.json")
    name_weights(src, "v2.safetensors.index.json")
    return src


@pytest.mark.parametrize("build", [with_named_single, with_named_index], ids=["single", "index"])
def test_convert_reads_the_file_config_json_names(tmp_path, tokenizer, build):
    """It read model.safetensors, which transformers ignores here: the converted model was another model's."""
    src = build(tmp_path, tokenizer)
    assert not torch.equal(load(src).state_dict()[Q0], load_file(src / "model.safetensors")[Q0])  # the named one
    converts_what_transformers_loads(src, tmp_path / "out", "--factor", "2", "--init", "mean")
    assert "transformers_weights" not in json.loads((tmp_path / "out" / "config.json").read_text())


def test_a_named_pickle_needs_allow_pickle(tmp_path, tokenizer, capsys):
    """model.safetensors beside it made the folder look safe: transformers loaded the named pickle (adapter_model.bin,
    the one pickle name it accepts there) without the flag."""
    src = single_file_checkpoint(tmp_path / "src", tokenizer, seed=0)
    torch.save(load(other_weights(tmp_path, tokenizer)).state_dict(), src / "adapter_model.bin")
    name_weights(src, "adapter_model.bin")
    with pytest.raises(ClakitError, match=r"names pickle weights \(transformers_weights='adapter_model.bin'\)"):
        load_model(resolve_source(str(src)))  # the one loader: eval, uptrain's student, teacher and original
    assert_refused(capsys, src, tmp_path / "out", "names pickle weights", "--allow-pickle")
    converts_what_transformers_loads(src, tmp_path / "out", "--factor", "2", "--init", "mean", "--allow-pickle")


@pytest.mark.parametrize(
    ("name", "needle"),
    [
        ("../other/model.safetensors", "which is not a file inside the checkpoint folder"),
        ("/etc/passwd", "which is not a file inside the checkpoint folder"),
        (5, "which is not a file inside the checkpoint folder"),
        ("v3.safetensors", "which is missing"),
        ("v2.bin", "which transformers refuses to load"),
    ],
)
def test_a_bad_weights_name_is_refused_in_one_line(tmp_path, tokenizer, capsys, name, needle):
    src = single_file_checkpoint(tmp_path / "src", tokenizer, seed=0)
    other_weights(tmp_path, tokenizer)
    name_weights(src, name)
    assert_refused(capsys, src, tmp_path / "out", "transformers_weights", needle)
    with pytest.raises(ClakitError, match=needle):
        load_model(resolve_source(str(src)))


def test_a_hub_repo_fetches_the_file_its_config_names(hub, tmp_path):  # noqa: F811
    """Only the named file (no model shards the index lists): what transformers loads from that repo."""
    shutil.copy(min(hub.repo.glob("model-*.safetensors")), tmp_path / "keep.safetensors")
    single = tmp_path / "whole"
    load(hub.repo).save_pretrained(single, max_shard_size="50MB")
    shutil.copy(single / "model.safetensors", hub.repo / "v2.safetensors")
    name_weights(hub.repo, "v2.safetensors")
    out = convert("org/model", tmp_path / "out", factor=2, quiet=True)
    snapshot = hub.cache / "snapshots" / COMMIT
    assert [f.name for f in snapshot.glob("*.safetensors")] == ["v2.safetensors"]
    assert out.is_dir()


def test_a_hub_repo_naming_pickle_weights_is_refused_before_they_are_fetched(hub, tmp_path):  # noqa: F811
    torch.save(load(hub.repo).state_dict(), hub.repo / "adapter_model.bin")
    name_weights(hub.repo, "adapter_model.bin")
    with pytest.raises(ClakitError, match="names pickle weights"):
        convert("org/model", tmp_path / "out", factor=2, quiet=True)
    assert len(hub.calls) == 1 and not (tmp_path / "out").exists()
