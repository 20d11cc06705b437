"""student.save_merged: the merged checkpoint an FSDP run saves, streamed from the start checkpoint one tensor at a
time, equals what the in-memory path (a whole student with the trained tensors -> merged -> save_cla) writes:
tensors, dtypes, config files, logits."""

import json
import re
import shutil
import weakref
from pathlib import Path

import pytest
import torch
from conftest import save_checkpoint, tiny_model
from safetensors import safe_open
from uptrain_fixtures import tiny_cla_checkpoint  # noqa: F401

from clakit.convert import checkpoint as reader
from clakit.convert.inmemory import cla_model_from
from clakit.convert.layout import uniform_layout
from clakit.errors import ClakitError
from clakit.sources import load_model, resolve_source
from clakit.uptrain import student
from clakit.uptrain.checkpoint import load_trainable, trainable_state
from clakit.uptrain.recipe import LoraSection

TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"}
CONFIG_FILES = ("config.json", "generation_config.json", "configuration_cla.py", "modeling_cla.py")
LORA_AND_K = LoraSection(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "gate_proj"], full_train=["k_proj"])
FULL_ONLY = LoraSection(r=0, target_modules=[], full_train=["k_proj", "v_proj"])
# tied model: LoRA on q_proj except the consumers' (trained in full), the tied lm_head trained in full (the embedding)
TIED = LoraSection(
    r=2, lora_alpha=16, target_modules=["q_proj", "gate_proj"], full_train=["k_proj", "consumers.q_proj", "lm_head"]
)


@pytest.fixture(scope="module")
def tied_bf16_checkpoint(tokenizer, tmp_path_factory) -> Path:
    """A tied-embedding CLA2 Llama with attention biases (k_proj.bias trains with k_proj), saved in bf16 in one
    model.safetensors, as a SmolLM2 conversion is (no lm_head.weight in the file)."""
    model = tiny_model("llama", tie_word_embeddings=True, attention_bias=True, seed=3)
    cla = cla_model_from(model, uniform_layout(4, 2), "mean").to(torch.bfloat16)
    return save_checkpoint(cla, tokenizer, tmp_path_factory.mktemp("tied_cla2"), max_shard_size="50GB")


@pytest.fixture(scope="module")
def no_generation_config_checkpoint(tiny_cla_checkpoint, tmp_path_factory) -> Path:  # noqa: F811
    """The tiny CLA2 checkpoint without generation_config.json: transformers makes one from config.json."""
    path = tmp_path_factory.mktemp("no_generation_config")
    for file in tiny_cla_checkpoint.iterdir():
        if file.name != "generation_config.json":
            shutil.copyfile(file, path / file.name)
    return path


def other_files(folder: Path) -> set[str]:
    """The files beside the weights."""
    return {p.name for p in folder.iterdir() if not p.name.startswith(("model.", "model-"))}


def trained_tensors(start: Path, lora, seed: int = 0) -> dict[str, torch.Tensor]:
    """The trainable tensors of the student as a run trains them: random values (lora_B starts at zero, so an
    untouched adapter would merge to nothing)."""
    model = student.make_trainable(student.load_cla(start, torch.float32), lora)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    return trainable_state(model)


def in_memory(start: Path, trained: dict, lora, dtype: torch.dtype, tokenizer, out: Path):
    """The reference (FSDP's end before save_merged; one process's end today): a whole fresh student with the
    trained tensors loaded strictly, merged, saved with save_cla."""
    model = student.make_trainable(student.load_cla(start, torch.float32), lora)
    load_trainable(model, trained, "the trained tensors")
    model = student.merged(model, dtype)
    out.mkdir()
    student.save_cla(model, tokenizer, out)
    return model


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    found = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            found |= {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    return found


def changed_by_training(trained: dict) -> set[str]:
    """Checkpoint names of the tensors the trained ones replace or merge into."""
    names = {n.removeprefix(student.PEFT_PREFIX) for n in trained}
    return {student.LORA_NAME.sub(r"\1.weight", n) for n in names}


CASES = {  # start checkpoint, recipe, dtype, output shard size
    "lora+k_proj,bf16": ("tiny_cla_checkpoint", LORA_AND_K, torch.bfloat16, "5GB"),
    "lora+k_proj,fp32,sharded": ("tiny_cla_checkpoint", LORA_AND_K, torch.float32, "100KB"),
    "r0,full_train only,fp32": ("tiny_cla_checkpoint", FULL_ONLY, torch.float32, "5GB"),
    "no generation_config.json": ("no_generation_config_checkpoint", FULL_ONLY, torch.bfloat16, "5GB"),
    "tied,bf16 start,bf16": ("tied_bf16_checkpoint", TIED, torch.bfloat16, "5GB"),
    "tied,bf16 start,fp32": ("tied_bf16_checkpoint", TIED, torch.float32, "5GB"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_streamed_merge_writes_what_the_in_memory_merge_saves(case, request, tokenizer, tmp_path):
    fixture, lora, dtype, shard_size = CASES[case]
    start = request.getfixturevalue(fixture)
    trained = trained_tensors(start, lora)
    reference = in_memory(start, trained, lora, dtype, tokenizer, tmp_path / "in_memory")
    streamed = tmp_path / "streamed"
    streamed.mkdir()
    student.save_merged(start, trained, lora, dtype, streamed, max_shard_size=shard_size)

    expected, got = tensors(tmp_path / "in_memory"), tensors(streamed)
    assert sorted(got) == sorted(expected)  # tied: the embedding only, like save_pretrained
    changed = changed_by_training(trained)
    assert changed <= set(got) and len(changed) >= 4
    for name, tensor in expected.items():  # bit for bit, merged ones too: the same fp32 operations as peft's merge
        assert got[name].dtype == tensor.dtype == dtype, name
        assert torch.equal(got[name], tensor), name
    start_tensors = tensors(start)
    assert any(not torch.equal(got[n].float(), start_tensors[n].float()) for n in changed if ".lora" not in n)
    assert (streamed / "model.safetensors.index.json").is_file() == (shard_size == "100KB")
    assert other_files(streamed) == other_files(tmp_path / "in_memory") - TOKENIZER_FILES  # the caller saves those
    for file in other_files(streamed):  # byte for byte: the dtype, use_cache true, auto_map, generation defaults
        assert (streamed / file).read_text() == (tmp_path / "in_memory" / file).read_text(), file
    assert set(CONFIG_FILES) - {"generation_config.json"} <= other_files(streamed)
    config = json.loads((streamed / "config.json").read_text())
    assert config["use_cache"] is True and config["dtype"] == str(dtype).removeprefix("torch.")
    assert "AutoModelForCausalLM" in config["auto_map"]
    modes = {p.stat().st_mode for p in streamed.glob("*.safetensors")}
    assert modes == {(tmp_path / "in_memory" / "config.json").stat().st_mode}  # not safetensors' 0600

    loaded = load_model(resolve_source(str(streamed)))  # strict: every tensor present, none extra
    assert loaded.dtype == dtype
    ids = torch.randint(0, loaded.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = loaded(input_ids=ids).logits
        assert torch.equal(logits, load_model(resolve_source(str(tmp_path / "in_memory")))(input_ids=ids).logits)
        # the in-memory merged model (what the run's "uptrained" score comes from) computes what its checkpoint
        # does; bf16 too: merged() once rounded RoPE's fp32 inv_freq buffer with the weights (up to 0.04 off)
        torch.testing.assert_close(logits, reference(input_ids=ids).logits, rtol=0, atol=0)


def test_streamed_merge_of_a_tied_model_keeps_the_trained_embedding_as_the_output_layer(
    tied_bf16_checkpoint, tmp_path
):
    """lm_head trained in full on a tied model is the embedding: the one tensor written, and both use it."""
    trained = trained_tensors(tied_bf16_checkpoint, TIED)
    assert f"{student.PEFT_PREFIX}model.embed_tokens.weight" in trained
    assert not any(n.endswith("lm_head.weight") for n in trained)
    student.save_merged(tied_bf16_checkpoint, trained, TIED, torch.float32, tmp_path)
    model = load_model(resolve_source(str(tmp_path)))
    embedding = trained[f"{student.PEFT_PREFIX}model.embed_tokens.weight"]
    assert torch.equal(model.lm_head.weight, embedding) and torch.equal(model.model.embed_tokens.weight, embedding)


def wrong(trained: dict, how: str) -> dict:
    trained = dict(trained)
    k = f"{student.PEFT_PREFIX}model.layers.0.self_attn.k_proj.weight"
    a = f"{student.PEFT_PREFIX}model.layers.0.self_attn.q_proj.lora_A.default.weight"
    if how == "unknown":
        trained[f"{student.PEFT_PREFIX}model.layers.7.self_attn.k_proj.weight"] = trained[k]  # 4 layers only
    elif how == "shape":
        trained[k] = trained[k].t().contiguous()
    elif how == "rank":
        trained[a] = trained[a][:2]
    elif how == "half":
        del trained[a]
    return trained


@pytest.mark.parametrize(
    "how, message",
    [
        ("unknown", "trained tensor model.layers.7.self_attn.k_proj.weight matches no tensor of the start checkpoint"),
        ("shape", "trained tensor model.layers.0.self_attn.k_proj.weight has shape (48, 24), the start checkpoint"),
        ("rank", "trained lora_A of model.layers.0.self_attn.q_proj.weight: shape (2, 48), expected (4, 48) (r=4)"),
        ("half", "trained lora_A of model.layers.0.self_attn.q_proj.weight: shape missing"),
    ],
)
def test_a_trained_tensor_without_its_place_is_refused_before_anything_is_written(
    tiny_cla_checkpoint,  # noqa: F811
    tmp_path,
    how,
    message,
):
    trained = wrong(trained_tensors(tiny_cla_checkpoint, LORA_AND_K), how)
    with pytest.raises(ClakitError, match="^" + re.escape(message)) as e:
        student.save_merged(tiny_cla_checkpoint, trained, LORA_AND_K, torch.bfloat16, tmp_path)
    assert "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_the_tied_alias_of_the_embedding_is_refused(tied_bf16_checkpoint, tmp_path):
    """A tied checkpoint has no lm_head.weight (save_pretrained writes the embedding only); trainable_state never
    gives that name (the embedding's it is), so it comes from another model."""
    trained = trained_tensors(tied_bf16_checkpoint, TIED)
    trained[f"{student.PEFT_PREFIX}lm_head.weight"] = torch.zeros(320, 48)
    with pytest.raises(ClakitError, match=r"^trained tensor lm_head\.weight matches no tensor of the start"):
        student.save_merged(tied_bf16_checkpoint, trained, TIED, torch.bfloat16, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_lora_target_the_checkpoint_lacks_is_refused(tiny_cla_checkpoint, tmp_path):  # noqa: F811
    """A consumer layer has no k_proj in a CLA checkpoint: LoRA there belongs to another layout."""
    trained = trained_tensors(tiny_cla_checkpoint, LORA_AND_K)
    a = f"{student.PEFT_PREFIX}model.layers.1.self_attn.k_proj.lora_A.default.weight"
    trained[a], trained[a.replace("lora_A", "lora_B")] = torch.zeros(4, 48), torch.zeros(24, 4)
    with pytest.raises(ClakitError, match=r"^the LoRA of model\.layers\.1\.self_attn\.k_proj\.weight matches no"):
        student.save_merged(tiny_cla_checkpoint, trained, LORA_AND_K, torch.bfloat16, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_streamed_merge_reads_the_start_tensors_one_at_a_time(tiny_cla_checkpoint, tmp_path, monkeypatch):  # noqa: F811
    """The memory design: every start tensor comes through the lazy reader, each read once for writing (plus once,
    header only, per trained tensor's shape check), and no two of them are alive at once; nothing loads the whole
    model or a whole file."""
    trained = trained_tensors(tiny_cla_checkpoint, LORA_AND_K)
    alive, most, reads = set(), [0], []
    real_get = reader.SafetensorsCheckpoint.get

    def counting_get(self, name):
        tensor = real_get(self, name)
        key = object()
        alive.add(key)
        most[0] = max(most[0], len(alive))
        weakref.finalize(tensor, alive.discard, key)
        reads.append(name)
        return tensor

    def refuse(*args, **kwargs):
        raise AssertionError("the whole model or a whole file was loaded")

    monkeypatch.setattr(reader.SafetensorsCheckpoint, "get", counting_get)
    monkeypatch.setattr(student, "load_model", refuse)
    monkeypatch.setattr("safetensors.torch.load_file", refuse)
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", refuse)
    student.save_merged(tiny_cla_checkpoint, trained, LORA_AND_K, torch.bfloat16, tmp_path)
    names = reader.open_checkpoint(tiny_cla_checkpoint, False).names
    assert reads[-len(names) :] == names  # the writing pass: each tensor once, in layer order
    assert len(reads) == len(names) + len(changed_by_training(trained))  # the checks: one shape read per target
    assert most[0] == 1
