"""Break-it probes of the CLA model classes and of model loading (clakit/modeling, clakit/sources.py): each test
is a case that once went wrong, checked against what huggingface_hub, transformers or the stock model do."""

import json
import os
import re
import shutil
from pathlib import Path

import httpx2
import pytest
import torch
from conftest import save_checkpoint, tiny_kwargs, tiny_model
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError
from test_sources_hub import COMMIT, hub  # noqa: F401
from transformers import AttentionInterface, AutoModel, AutoModelForCausalLM
from transformers.cache_utils import KVSharingDict
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from clakit.cli import main
from clakit.convert.inmemory import cla_model_from
from clakit.errors import ClakitError
from clakit.eval.kvquant import QuantizedKVCache
from clakit.modeling import LlamaCLAConfig, MistralCLAConfig, MistralCLAForCausalLM
from clakit.modeling.modeling_cla import WeightsMismatch
from clakit.sources import load_config, load_model, load_tokenizer, resolve_source

# --- sources: Hub ids ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["0", "false", "OFF", ""])
def test_hub_offline_set_to_a_false_value_still_downloads(hub, monkeypatch, value):  # noqa: F811
    """huggingface_hub reads HF_HUB_OFFLINE=0 (or false/off) as online; clakit took any non-empty value as offline
    and refused an id its cache lacked as "does not exist" without trying to download it."""
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    source = resolve_source("org/model")
    assert source.kind == "dir" and (source.path / "config.json").is_file()
    assert hub.weights_fetched()


@pytest.mark.parametrize("variable", ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"])
def test_hub_offline_set_to_a_true_value_never_downloads(hub, monkeypatch, variable):  # noqa: F811
    monkeypatch.setenv(variable, "yes")
    with pytest.raises(ClakitError, match="'org/model' does not exist"):
        resolve_source("org/model")
    assert hub.calls == []


def test_an_id_missing_from_the_offline_cache_is_named_as_such(hub, monkeypatch, tmp_path):  # noqa: F811
    """Offline, a Hub id the cache lacks was refused as "does not exist: give a checkpoint folder, a .gguf file or
    a Hub id (org/name)", which is what was given: the line now says the Hub was not asked, and why."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(
        ClakitError, match="'org/model' does not exist locally nor in the Hub cache at revision v2"
    ) as e:
        resolve_source("org/model", revision="v2")
    assert "the Hub is not asked (offline: HF_HUB_OFFLINE)" in str(e.value) and "or a Hub id" not in str(e.value)


# --- sources: remote code -------------------------------------------------------------------------------------------

REMOTE_CONFIG = "from transformers import LlamaConfig\n\n\nclass MyConfig(LlamaConfig):\n    model_type = 'my_llama'\n"
REMOTE_MODEL = (
    "from transformers import LlamaForCausalLM\nfrom .configuration_my import MyConfig\n\n\n"
    "class MyLM(LlamaForCausalLM):\n    config_class = MyConfig\n"
)


def remote_code_checkpoint(folder: Path, tokenizer) -> Path:
    """A tiny Llama whose config.json names code shipped beside it (model_type unknown to transformers)."""
    save_checkpoint(tiny_model("llama"), tokenizer, folder)
    config = json.loads((folder / "config.json").read_text())
    config |= {
        "model_type": "my_llama",
        "auto_map": {"AutoConfig": "configuration_my.MyConfig", "AutoModelForCausalLM": "modeling_my.MyLM"},
    }
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "configuration_my.py").write_text(REMOTE_CONFIG)
    (folder / "modeling_my.py").write_text(REMOTE_MODEL)
    return folder


@pytest.mark.parametrize("load", [load_config, load_model], ids=["config", "model"])
def test_remote_code_without_the_flag_names_the_flag(tmp_path, tokenizer, load):
    """transformers' refusal ("contains custom code which must be executed") came out with the advice to download
    the files again; the fix is --trust-remote-code."""
    source = resolve_source(str(remote_code_checkpoint(tmp_path / "rc", tokenizer)))
    with pytest.raises(ClakitError, match="--trust-remote-code") as e:
        load(source)
    assert "my_llama" in str(e.value) and "download it again" not in str(e.value)
    assert type(load(source, trust_remote_code=True)).__name__ in ("MyConfig", "MyLM")


def test_a_cla_checkpoint_needs_no_remote_code_flag(tmp_path):
    """Its auto_map names clakit's own classes, registered on import: loaded without --trust-remote-code."""
    cla = cla_model_from(tiny_model("llama", num_hidden_layers=4), [0, 0, 2, 2], init="mean")
    cla.save_pretrained(tmp_path / "cla")
    assert type(load_model(resolve_source(str(tmp_path / "cla")))) is type(cla)


# --- generate's cache implementations -------------------------------------------------------------------------------

HQQ_4BIT = {"backend": "hqq", "nbits": 4, "residual_length": 4, "q_group_size": 12, "axis_key": 1, "axis_value": 1}


def prompt(batch: int = 2, length: int = 20, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, 300, (batch, length), generator=torch.Generator().manual_seed(seed))


def greedy(model, x, **kwargs):
    return model.generate(x, max_new_tokens=12, do_sample=False, pad_token_id=0, **kwargs)


def test_quantized_cache_generate_on_the_all_producer_layout_is_the_stock_models():
    """generate(cache_implementation="quantized") raised on every CLA model (QuantizedCache refuses the "dummy" type
    of consumer layers, even when there are none in the cache's view). With every layer a producer it is the stock
    model: the same tokens with the quantisation active (4 bits, residual of 4 tokens)."""
    stock = tiny_model("llama", num_hidden_layers=4)
    cla = cla_model_from(stock, [0, 1, 2, 3], init="mean").eval()
    x = prompt()
    expected = greedy(stock, x, cache_implementation="quantized", cache_config=HQQ_4BIT)
    assert not torch.equal(expected, greedy(stock, x))  # the quantisation changes the tokens: it is at work
    assert torch.equal(greedy(cla, x, cache_implementation="quantized", cache_config=HQQ_4BIT), expected)


def test_quantized_cache_generate_holds_only_producers():
    """CLA2: consumers hold no cache (DummyLayer), producers quantise, and the tokens are those of clakit eval's
    quantised cache (built layer by layer, passed as `cache`) at the same settings."""
    cla = cla_model_from(tiny_model("llama", num_hidden_layers=4), [0, 0, 2, 2], init="mean").eval()
    x = prompt()
    out = greedy(cla, x, cache_implementation="quantized", cache_config=HQQ_4BIT, return_dict_in_generate=True)
    assert [type(layer).__name__ for layer in out.cache.layers] == ["HQQQuantizedLayer", "DummyLayer"] * 2
    assert all(out.cache.layers[i]._quantized_keys is not None for i in (0, 2))
    reference = QuantizedKVCache(cla.config, nbits=4, q_group_size=12, residual_length=4)
    assert torch.equal(out.sequences, greedy(cla, x, cache=reference))
    assert not torch.equal(out.sequences, greedy(cla, x))  # the quantisation is at work


# --- the layout, checked whenever it can have changed ---------------------------------------------------------------

MUTATIONS = {  # an attribute set after the config was made -> the refusal
    "fewer-layers": ("num_hidden_layers", 2, "kv_source_layers has 4 entries but the model has 2 layers"),
    "more-layers": ("num_hidden_layers", 6, "kv_source_layers has 4 entries but the model has 6 layers"),
    "forward-source": ("kv_source_layers", [0, 2, 2, 2], "layer 1 takes K/V from a later layer 2"),
    "consumer-source": (
        "kv_source_layers",
        [0, 0, 1, 1],
        "layer 2 takes K/V from layer 1, which is itself a consumer",
    ),
    "layer-0-consumer": ("kv_source_layers", [1, 1, 2, 2], "layer 0 must be a producer"),
}


def mutated_config(kind: str, case: str):
    config_cls = LlamaCLAConfig if kind == "llama" else MistralCLAConfig
    config = config_cls(**tiny_kwargs(4), kv_source_layers=[0, 0, 2, 2])
    name, value, _ = MUTATIONS[case]
    setattr(config, name, value)
    return config


@pytest.mark.parametrize("kind", ["llama", "mistral"])
@pytest.mark.parametrize("case", list(MUTATIONS))
def test_a_layout_changed_after_the_config_was_made_is_refused_when_the_model_is_built(kind, case):
    """Only the config's constructor checked kv_source_layers: a model was built from a config whose layers no longer
    matched it (2 layers of a 4-entry layout; a forward source), then failed at its first forward with KeyError '2',
    or at construction with IndexError, or saved a config.json that cannot be loaded."""
    with pytest.raises(ValueError, match=MUTATIONS[case][2]):
        AutoModelForCausalLM.from_config(mutated_config(kind, case))


@pytest.mark.parametrize("case", ["fewer-layers", "forward-source"])
def test_a_config_whose_layout_no_longer_matches_is_not_saved(tmp_path, case):
    config = mutated_config("llama", case)
    with pytest.raises(Exception, match=MUTATIONS[case][2]):
        config.save_pretrained(tmp_path)
    assert not (tmp_path / "config.json").exists()


# --- sources: config.json values of the wrong type ------------------------------------------------------------------

WRONG_VALUES = {  # key: (value, what the refusal must say)
    "rms_norm_eps": ("1e-05", "'rms_norm_eps' expected float, got str (value: '1e-05')"),
    "attention_bias": (1, "'attention_bias' expected bool, got int"),
    "kv_source_layers": ([0, 0, 2, 2.0], "'kv_source_layers' with value [0, 0, 2, 2.0]"),
}


@pytest.fixture(scope="module")
def cla_checkpoint(tmp_path_factory, tokenizer) -> Path:
    path = tmp_path_factory.mktemp("cla")
    cla_model_from(tiny_model("llama", num_hidden_layers=4), [0, 0, 2, 2], init="mean").save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("load", [load_config, load_model], ids=["config", "model"])
@pytest.mark.parametrize("key", list(WRONG_VALUES))
def test_a_config_value_of_the_wrong_type_is_named_with_its_problem(cla_checkpoint, tmp_path, load, key):
    """huggingface_hub's strict config validation puts the field on its first line and the problem on the next:
    clakit kept the first line only ("Validation error for field 'rms_norm_eps'", then "download it again"), and
    load_model let the StrictDataclassFieldValidationError out as a traceback."""
    value, needle = WRONG_VALUES[key]
    folder = shutil.copytree(cla_checkpoint, tmp_path / "bad")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {key: value}))
    with pytest.raises(ClakitError) as e:
        load(resolve_source(str(folder)))
    assert needle in str(e.value) and "config.json" in str(e.value) and "download it again" not in str(e.value)


# --- sources: what a Hub download fetches with --allow-pickle -------------------------------------------------------


def test_allow_pickle_fetches_no_pickle_beside_safetensors(hub):  # noqa: F811
    """A repo holding both formats (many older ones: model*.safetensors and pytorch_model.bin): transformers loads the
    safetensors, but --allow-pickle made the download fetch every *.bin too (for a 7B, 14 GB nothing reads)."""
    torch.save({"unread": torch.zeros(2)}, hub.repo / "pytorch_model.bin")
    source = resolve_source("org/model", allow_pickle=True)
    assert (source.path / "model.safetensors.index.json").is_file()
    assert not list(source.path.glob("*.bin")) and not any("*.bin" in call[2] for call in hub.calls)


def test_allow_pickle_fetches_pickle_where_it_is_the_only_weights(hub):  # noqa: F811
    state = load_model(resolve_source(str(hub.repo))).state_dict()
    for path in [*hub.repo.glob("model*.safetensors"), hub.repo / "model.safetensors.index.json"]:
        path.unlink()
    torch.save(state, hub.repo / "pytorch_model.bin")
    source = resolve_source("org/model", allow_pickle=True)
    assert (source.path / "pytorch_model.bin").is_file()
    loaded = load_model(source, allow_pickle=True).state_dict()
    assert all(torch.equal(loaded[name], state[name]) for name in state)


# --- sources: folders without config.json ---------------------------------------------------------------------------

NOT_CHECKPOINTS = {  # files written into the folder -> what the refusal must name
    "gguf-inside": ({"model-Q8_0.gguf": b"GGUF"}, "it holds model-Q8_0.gguf: give that file's path ("),
    "peft-adapter": (
        {"adapter_config.json": json.dumps({"base_model_name_or_path": "org/base"}).encode()},
        "it is a PEFT adapter (adapter_config.json): merge it into its base model (org/base)",
    ),
    "hub-cache-entry": ({"snapshots/abc123/config.json": b"{}"}, "it is a Hub cache entry: give a snapshot folder ("),
    "meta-release": (
        {"params.json": json.dumps({"dim": 4096, "multiple_of": 256}).encode(), "consolidated.00.pth": b""},
        "Meta's original Llama format (params.json, no config.json)",
    ),
    "mistral-release": (
        {"params.json": json.dumps({"dim": 4096, "hidden_dim": 14336}).encode(), "consolidated.safetensors": b""},
        "Mistral's native format (params.json, no config.json)",
    ),
    "empty": ({}, "give the folder that holds the checkpoint's config.json and weights"),
}


@pytest.mark.parametrize("case", list(NOT_CHECKPOINTS))
def test_a_folder_without_config_json_is_named_with_what_to_give(tmp_path, case):
    """'X is not a model checkpoint folder (no config.json)' named no fix, and Meta's original Llama release was
    called Mistral's native format with the Mistral converter to run."""
    files, needle = NOT_CHECKPOINTS[case]
    for name, data in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    with pytest.raises(ClakitError, match=re.escape(needle)) as e:
        resolve_source(str(tmp_path))
    assert len(str(e.value).splitlines()) == 1
    if case == "meta-release":
        assert "llama/convert_llama_weights_to_hf.py" in str(e.value) and "mistral" not in str(e.value).lower()


def test_a_hub_cache_entry_names_the_snapshot_refs_main_points_at(tmp_path):
    """The hint named whichever snapshot's commit hash sorted last, not the one the Hub id reads (refs/main)."""
    for commit in ("fff", "aaa", "ccc"):
        (tmp_path / "snapshots" / commit).mkdir(parents=True)
        (tmp_path / "snapshots" / commit / "config.json").write_text("{}")
    (tmp_path / "refs").mkdir()
    (tmp_path / "refs" / "main").write_text("aaa\n")
    with pytest.raises(ClakitError, match=re.escape(f"give a snapshot folder ({tmp_path / 'snapshots' / 'aaa'})")):
        resolve_source(str(tmp_path))
    (tmp_path / "refs" / "main").unlink()  # no refs/main: the newest snapshot
    os.utime(tmp_path / "snapshots" / "ccc", (2e9, 2e9))
    with pytest.raises(ClakitError, match=re.escape(f"give a snapshot folder ({tmp_path / 'snapshots' / 'ccc'})")):
        resolve_source(str(tmp_path))


# --- the CLA classes are the stock ones but for CLA -----------------------------------------------------------------


def test_mistral_has_no_attention_biases_whatever_its_config_says(tmp_path, tokenizer):
    """Stock Mistral ignores `attention_bias` (some mistral-type config.json files carry it); the CLA attention read
    it, so the stock checkpoint loaded into the CLA class (every layer a producer: the stock model) was refused for
    lacking biases, and a CLA Mistral built from such a config had random ones."""
    stock = tiny_model("mistral", attention_bias=True)
    assert stock.model.layers[0].self_attn.q_proj.bias is None
    save_checkpoint(stock, tokenizer, tmp_path / "stock")
    assert json.loads((tmp_path / "stock" / "config.json").read_text())["attention_bias"] is True
    cla = MistralCLAForCausalLM.from_pretrained(tmp_path / "stock").eval()
    assert not any(name.endswith("bias") for name, _ in cla.named_parameters())
    x = prompt()
    with torch.no_grad():
        torch.testing.assert_close(cla(x).logits, stock(x).logits, rtol=0, atol=0)


RECORDED: list[dict] = []  # the keyword arguments each attention call received, in call order


def recording_attention(module, query, key, value, attention_mask, **kwargs):
    RECORDED.append({k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor | KVSharingDict)})
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


@pytest.mark.parametrize("kind", ["llama", "mistral"])
@pytest.mark.parametrize("layout", [[0, 1, 2, 3], [0, 0, 2, 2]], ids=["all-producers", "cla2"])
def test_the_attention_function_gets_the_stock_models_arguments(kind, layout):
    """The CLA attention passed config.sliding_window to the attention function for Llama too (stock Llama never
    does; a Llama config.json may carry the key): with flash attention a CLA Llama attended within a window the stock
    model does not have. Recorded through a registered attention function (sdpa underneath), layer by layer."""
    AttentionInterface.register("clakit_recording", recording_attention)
    AttentionMaskInterface.register("clakit_recording", sdpa_mask)
    stock = tiny_model(kind, sliding_window=8, attn_implementation="clakit_recording")
    cla = cla_model_from(stock, layout, init="mean").eval()
    assert cla.config._attn_implementation == "clakit_recording"
    calls = []
    for model in (stock, cla):
        RECORDED.clear()
        with torch.no_grad():
            model(prompt(1))
        calls.append(list(RECORDED))
    assert len(calls[1]) == 4 and calls[1] == calls[0]
    assert all(call.get("sliding_window") == (8 if kind == "mistral" else None) for call in calls[1])


def test_a_hub_source_names_the_commit_its_files_came_from(hub, tiny_llama_checkpoint):  # noqa: F811
    """Source.revision is what was asked ("main", which moves): eval's provenance recorded only that. The commit
    (the snapshot folder's name) is now a property every output can record; a local path has none."""
    source = resolve_source("org/model")
    assert source.revision == "main" and source.commit == COMMIT
    assert resolve_source(str(tiny_llama_checkpoint)).commit is None


def hub_refusal(error_cls, status: int, message: str):
    """snapshot_download raising what huggingface_hub raises for a refused request."""
    request = httpx2.Request("GET", "https://huggingface.co/api/models/org/model")

    def refuse(*_, **__):
        raise error_cls(message, response=httpx2.Response(status, request=request))

    return refuse


HUB_REFUSALS = {  # huggingface_hub's error (its real first line is the status only) -> what the line must say
    "gated": (GatedRepoError, 401, "is gated: accept its terms at https://huggingface.co/org/model"),
    # a token without access (not yet approved): "log in" was the fix named, to a user logged in
    "gated-token": (GatedRepoError, 403, "is gated and the token in use has no access to it: request access at"),
    "no-revision": (RevisionNotFoundError, 404, "has no revision 'v9'; give a branch, tag or commit it has"),
    "no-repo": (RepositoryNotFoundError, 401, "does not exist, or is private (then log in"),
}


@pytest.mark.parametrize("case", list(HUB_REFUSALS))
def test_a_refused_hub_download_names_why_and_the_fix(monkeypatch, case):
    """A gated repo (every meta-llama one) said '(401 Client Error. (Request ID: ...)); check the id and your
    connection': neither the reason nor the fix (accept the terms, log in)."""
    import huggingface_hub

    error_cls, status, needle = HUB_REFUSALS[case]
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    refusal = hub_refusal(error_cls, status, f"{status} Client Error. (Request ID: abc)\n\nRefused for url ...")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", refusal)
    with pytest.raises(ClakitError, match=re.escape(needle)) as e:
        resolve_source("org/model", revision="v9")
    assert "Request ID" not in str(e.value) and len(str(e.value).splitlines()) == 1


def gguf_of(arch: str, path: Path) -> Path:
    """A small, sound GGUF file of `arch` (as test_sources_gguf's tiny_gguf)."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), arch)
    for add, value in [("block_count", 2), ("context_length", 64), ("embedding_length", 16)]:
        getattr(writer, f"add_{add}")(value)
    writer.add_feed_forward_length(32)
    writer.add_head_count(2)
    writer.add_head_count_kv(1)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tensor("token_embd.weight", np.random.default_rng(0).standard_normal((8, 16), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("load", [load_config, load_model], ids=["config", "model"])
def test_a_gguf_of_an_architecture_transformers_cannot_read_says_so(tmp_path, load):
    """'GGUF model with architecture gemma is not supported yet.; check that its files are complete (download it
    again)': the file is sound, downloading it again changes nothing."""
    with pytest.raises(ClakitError, match="architecture gemma is not supported") as e:
        load(resolve_source(str(gguf_of("gemma", tmp_path / "g.gguf"))))
    message = str(e.value)
    assert "cannot read GGUF files of this architecture" in message
    assert "download it again" not in message and "config.json" not in message


def test_a_tokenizer_with_its_own_code_names_the_flag(tmp_path, tokenizer):
    """tokenizer_config.json naming a tokenizer class shipped with the checkpoint (auto_map): transformers' refusal
    came out with 'check that its files are complete (download it again)'."""
    folder = save_checkpoint(tiny_model("llama"), tokenizer, tmp_path / "m")
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    settings |= {"auto_map": {"AutoTokenizer": ["tokenization_my.MyTok", None]}, "tokenizer_class": "MyTok"}
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    (folder / "tokenization_my.py").write_text(
        "from transformers import PreTrainedTokenizerFast\n\n\nclass MyTok(PreTrainedTokenizerFast):\n    pass\n"
    )
    source = resolve_source(str(folder))
    with pytest.raises(ClakitError, match="pass --trust-remote-code if you trust the source") as e:
        load_tokenizer(source)
    assert "download it again" not in str(e.value)
    assert type(load_tokenizer(source, trust_remote_code=True)).__name__ == "MyTok"


@pytest.mark.parametrize("name", ["config.json", "model-00001-of-00004.safetensors"])
def test_a_file_of_a_checkpoint_folder_names_the_folder(tiny_llama_checkpoint, name):
    """The checkpoint's config.json or a weights shard given for the model: 'is neither a checkpoint folder nor a
    .gguf file', with no fix; the folder that holds it is what to give."""
    with pytest.raises(ClakitError, match="neither a checkpoint folder nor a .gguf file") as e:
        resolve_source(str(tiny_llama_checkpoint / name))
    assert f"give its folder ({tiny_llama_checkpoint.resolve()})" in str(e.value)


@pytest.mark.parametrize("spec", ["", "  "])
def test_an_empty_model_string_is_refused_not_read_as_the_working_folder(tiny_llama_checkpoint, monkeypatch, spec):
    """Path("") is ".": `clakit eval "$MODEL" ...` with MODEL unset, run inside a checkpoint folder, read that
    checkpoint as the model without a word."""
    monkeypatch.chdir(tiny_llama_checkpoint)
    with pytest.raises(ClakitError, match="the model is an empty string"):
        resolve_source(spec)


@pytest.mark.parametrize(
    "changes",
    [{"kv_source_layers": [0, 0, 0, 0]}, {"kv_source_layers": [0, 0, 2], "num_hidden_layers": 3}],
    ids=["kv-without-a-place", "fewer-layers"],
)
def test_a_base_model_checkpoint_whose_layout_does_not_match_is_refused(tmp_path, changes):
    """A CLA base model saved alone (LlamaCLAModel: tensor names 'layers.N...', no 'model.' prefix) with a config
    whose kv_source_layers (or layer count) do not match: AutoModel loaded it, dropping the tensors it had no place
    for, while the causal-LM checkpoint of the same edit was refused."""
    cla = cla_model_from(tiny_model("llama", num_hidden_layers=4), [0, 0, 2, 2], init="mean")
    cla.model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | changes))
    with pytest.raises(WeightsMismatch, match=r"tensors its config.json has no place for \(e.g. layers\."):
        AutoModel.from_pretrained(tmp_path)


def test_a_base_model_checkpoint_loaded_as_a_causal_lm_is_named_as_one(tmp_path):
    """A base model's save (no lm_head.weight) given to AutoModelForCausalLM: refused (the head would start at
    random) with "restore the config.json written with these weights", which is not what is wrong. Now it says the
    head is missing and to load it with AutoModel, which loads it as saved."""
    cla = cla_model_from(tiny_model("llama", num_hidden_layers=4), [0, 0, 2, 2], init="mean")
    cla.model.save_pretrained(tmp_path)
    with pytest.raises(WeightsMismatch, match=r"has no lm_head.weight \(a base model saved without its language"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
    x = torch.randint(1, 100, (1, 7))
    with torch.no_grad():
        got = AutoModel.from_pretrained(tmp_path)(x).last_hidden_state
        torch.testing.assert_close(got, cla.model(x).last_hidden_state, rtol=0, atol=0)


def test_kv_tensors_without_a_place_are_named_as_a_layout_mismatch_with_biases_too(tmp_path):
    """With attention biases (attention_bias: true) the K/V tensors without a place include k_proj.bias: the
    message blamed num_hidden_layers, not kv_source_layers."""
    cla = cla_model_from(tiny_model("llama", attention_bias=True), [0, 0, 2, 2], init="mean")
    cla.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"kv_source_layers": [0, 0, 0, 0]}))
    with pytest.raises(WeightsMismatch, match="holds 4 tensors its config.json has no place for") as e:
        AutoModelForCausalLM.from_pretrained(tmp_path)
    assert "its kv_source_layers do not match the weights" in str(e.value)


def test_an_unreachable_hub_with_nothing_cached_says_so(monkeypatch, tmp_path):
    """huggingface_hub raises LocalEntryNotFoundError for a refused connection too: with nothing of the repo cached
    that read as "the Hub cache holds only part of org/model" (helper R3)."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    def unreachable(*_, **__):
        try:
            raise ConnectionRefusedError(111, "Connection refused")
        except ConnectionRefusedError as cause:
            raise LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub") from cause

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    with pytest.raises(ClakitError, match="could not be reached .*Connection refused.* holds nothing of it") as e:
        resolve_source("org/model")
    assert "only part of" not in str(e.value) and len(str(e.value).splitlines()) == 1


def test_a_missing_model_is_named_before_its_source_model_is_fetched(monkeypatch, tmp_path, capsys):
    """`clakit eval ./no-such-model --source-model org/base` offline said org/base was not cached: the source was
    resolved first (to refuse a bad one before a Hub MODEL's weights download), and MODEL's typo was named second."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "t.txt").write_text("some text " * 50)
    args = ["eval", "./no-such-model", "--source-model", "org/base", "--data", "t.txt", "-o", "r.json"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "no-such-model" in err and "org/base" not in err and not (tmp_path / "r.json").exists()
