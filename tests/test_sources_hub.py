"""Hub ids without the Hub: `huggingface_hub.snapshot_download` replaced by a local repo that records what was
asked. A Hub checkpoint's config.json is fetched and checked before its weights (a quantized or unsupported 70B
repo is refused after one small file, not after 140 GB), the weights come from the config's commit, and a Hub
revision given with a local path (read as it is) is refused rather than recorded."""

import fnmatch
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import save_checkpoint, tiny_model

from clakit.convert import ConvertConfig, convert
from clakit.errors import ClakitError
from clakit.sources import check_revision, resolve_source
from clakit.uptrain import load_recipe
from clakit.uptrain.recipe import ModelSection
from clakit.uptrain.student import check_model_section

COMMIT = "0123456789abcdef0123456789abcdef01234567"
# what is fetched before anything is checked (clakit's records: a CLA checkpoint's refusal names one)
FIRST = ["config.json", "model.safetensors.index.json", "clakit_convert.json", "uptrain.json"]


class FakeHub:
    """snapshot_download over one local folder, laid out as huggingface_hub's cache: the files the patterns allow
    linked from snapshots/COMMIT to blobs/<etag>, a weight file's (git-lfs) etag being its sha256; a blob already
    there is kept, as huggingface_hub keeps it."""

    def __init__(self, repo, cache):
        self.repo, self.cache, self.calls = repo, cache, []

    def __call__(self, repo_id, revision=None, allow_patterns=None, **_):
        self.calls.append((repo_id, revision, list(allow_patterns)))
        snapshot, blobs = self.cache / "snapshots" / COMMIT, self.cache / "blobs"
        snapshot.mkdir(parents=True, exist_ok=True)
        blobs.mkdir(exist_ok=True)
        for f in self.repo.iterdir():
            if any(fnmatch.fnmatch(f.name, p) for p in allow_patterns) and not (snapshot / f.name).exists():
                digest = hashlib.sha256(f.read_bytes()).hexdigest()  # git's sha1 (40 digits) for other files
                blob = blobs / (digest if f.suffix in (".safetensors", ".bin") else digest[:40])
                shutil.copy(f, blob)
                (snapshot / f.name).unlink(missing_ok=True)  # a link whose blob was deleted: fetched anew
                (snapshot / f.name).symlink_to(f"../../blobs/{blob.name}")
        return str(snapshot)

    def weights_fetched(self) -> bool:
        return len(self.calls) > 1


@pytest.fixture
def hub(tmp_path, tokenizer, monkeypatch):
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    repo = save_checkpoint(tiny_model("llama"), tokenizer, tmp_path / "repo")
    fake = FakeHub(repo, tmp_path / "cache")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    return fake


def edit_config(repo, **changes):
    path = repo / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"quantization_config": {"quant_method": "fp8"}}, "is a quantized checkpoint (quantization_config: fp8)"),
        ({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}, "is a Qwen2ForCausalLM model"),
    ],
)
def test_a_refused_hub_config_is_refused_before_the_weights_download(hub, tmp_path, changes, needle):
    edit_config(hub.repo, **changes)
    with pytest.raises(ClakitError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        convert("org/model", tmp_path / "out", factor=2, quiet=True)
    assert hub.calls == [("org/model", None, FIRST)] and not hub.weights_fetched()
    assert not (tmp_path / "out").exists()


def test_an_unindexed_hub_repo_fetches_model_safetensors_and_no_other_safetensors(hub, tmp_path, tokenizer):
    shutil.rmtree(hub.repo)
    tiny_model("llama").save_pretrained(hub.repo)  # one model.safetensors, no index
    tokenizer.save_pretrained(hub.repo)
    shutil.copy(hub.repo / "model.safetensors", hub.repo / "consolidated.safetensors")  # Mistral's second copy
    convert("org/model", tmp_path / "out", factor=2, quiet=True)
    snapshot = hub.cache / "snapshots" / COMMIT
    assert "*.safetensors" not in hub.calls[1][2] and [f.name for f in snapshot.glob("*.safetensors")] == [
        "model.safetensors"
    ]


def test_a_hub_repo_without_config_is_refused_after_one_request(hub, tmp_path):
    (hub.repo / "config.json").unlink()
    with pytest.raises(ClakitError, match="has no config.json, so it is not a transformers checkpoint"):
        convert("org/model", tmp_path / "out", factor=2, quiet=True)
    assert len(hub.calls) == 1 and not hub.weights_fetched()


def test_a_bad_output_folder_is_refused_before_any_download(hub, tmp_path):
    (tmp_path / "out").write_text("mine")
    with pytest.raises(ClakitError, match="out"):
        convert("org/model", tmp_path / "out", factor=2, quiet=True)
    assert hub.calls == [] and (tmp_path / "out").read_text() == "mine"


def test_a_hub_checkpoint_converts_from_the_commit_its_config_came_from(hub, tmp_path):
    """Only the shards the index lists are fetched: a stray consolidated.safetensors (Mistral's repos hold one
    beside the shards, the same weights again) is not downloaded."""
    first_shard = min(hub.repo.glob("model-*.safetensors"))
    (hub.repo / "consolidated.safetensors").write_bytes(first_shard.read_bytes())
    out = convert("org/model", tmp_path / "out", factor=2, revision="v1", quiet=True)
    (_, first_rev, first), (_, probe_rev, probe), (_, second_rev, second) = hub.calls
    assert (first_rev, first) == ("v1", FIRST)
    assert probe_rev == second_rev == COMMIT  # the weights of the same commit, not v1's tip
    assert "model.safetensors" in probe and not any("model-" in p for p in probe)  # what transformers reads first
    shards = sorted(f.name for f in hub.repo.glob("model-*.safetensors"))
    snapshot = hub.cache / "snapshots" / COMMIT
    assert sorted(f.name for f in snapshot.glob("*.safetensors")) == shards and "*.safetensors" not in second
    record = json.loads((out / "clakit_convert.json").read_text())
    assert record["source"]["kind"] == "hub" and record["source"]["revision"] == COMMIT


def test_a_hub_weight_file_damaged_in_the_cache_is_refused_before_work_and_a_clean_one_is_named_whole(hub, tmp_path):
    """huggingface_hub checks a download's size only: a shard of the right size with one byte changed converted and
    was recorded like the clean one. Each weight file is now checked against the sha256 its blob is named by."""
    out = convert("org/model", tmp_path / "out", factor=2, quiet=True)
    files = json.loads((out / "clakit_convert.json").read_text())["source"]["files"]
    for name, entry in files.items():
        if name.endswith(".safetensors"):
            assert entry["sha256"] == hashlib.sha256((hub.repo / name).read_bytes()).hexdigest()
    shard = min((hub.cache / "snapshots" / COMMIT).glob("model-*.safetensors"))
    blob = shard.resolve()
    data = bytearray(blob.read_bytes())
    data[-1] ^= 1  # one bit of the last tensor's data: the header still parses, the size is the same
    blob.write_bytes(bytes(data))
    with pytest.raises(ClakitError, match=f"{shard.name} in the Hub cache .*damaged; delete that file") as caught:
        convert("org/model", tmp_path / "out2", factor=2, quiet=True)
    assert str(blob) in str(caught.value) and not (tmp_path / "out2").exists()
    blob.unlink()  # what the message says to do: the next run downloads it anew, and converts
    convert("org/model", tmp_path / "out2", factor=2, quiet=True)


def test_a_damaged_xet_file_in_huggingface_hubs_shared_blob_store_is_refused_too(hub, tmp_path):
    """huggingface_hub >= 2 moves a Xet download into the cache-wide store blobs/<2 hex>/<xet hash> and makes the
    repo's blobs/<sha256> a link to it: realpath ends at the Xet hash (not the file's sha256), and the damaged shard
    converted unchecked, recorded without a sha256."""
    convert("org/model", tmp_path / "out", factor=2, quiet=True)  # the cache laid out, clean
    shard = min((hub.cache / "snapshots" / COMMIT).glob("model-*.safetensors"))
    blob = hub.cache / "blobs" / Path(shard.readlink()).name
    xet_hash = hashlib.sha256(b"chunks of " + blob.read_bytes()).hexdigest()  # 64 hex digits, not the sha256
    store = tmp_path / "blobs" / xet_hash[:2] / xet_hash  # as huggingface_hub's publish_blob_to_shared_store moves it
    store.parent.mkdir(parents=True)
    blob.replace(store)
    blob.symlink_to(store)
    assert shard.resolve() == store
    data = bytearray(store.read_bytes())
    data[-1] ^= 1
    store.write_bytes(bytes(data))
    with pytest.raises(ClakitError, match=f"{shard.name} in the Hub cache .*damaged; delete that file") as caught:
        convert("org/model", tmp_path / "out2", factor=2, quiet=True)
    assert str(store) in str(caught.value)


def test_a_hub_repo_with_model_safetensors_beside_an_index_converts_what_transformers_loads(hub, tmp_path):
    """transformers loads model.safetensors even beside an index; the download took the index's shards, so a repo
    holding both (other weights in each) converted other weights than from_pretrained reads (helper's measurement:
    held-out perplexity 379.5 from the Hub, 427.6 from a local copy of the same files). Now model.safetensors first,
    and the shards are not fetched."""
    import torch
    from safetensors.torch import load_file, save_file

    other = tiny_model("llama", seed=7)
    save_file({k: v.contiguous() for k, v in other.state_dict().items() if k != "lm_head.weight" or
               not other.config.tie_word_embeddings}, hub.repo / "model.safetensors", metadata={"format": "pt"})
    out = convert("org/model", tmp_path / "out", kv_source_layers=[0, 1, 2, 3], quiet=True)  # identity: copies
    snapshot = hub.cache / "snapshots" / COMMIT
    assert sorted(f.name for f in snapshot.glob("*.safetensors")) == ["model.safetensors"]
    local = convert(str(snapshot), tmp_path / "local", kv_source_layers=[0, 1, 2, 3], quiet=True)

    def weights(folder):
        return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}

    hub_weights, local_weights = weights(out), weights(local)
    assert hub_weights.keys() == local_weights.keys()
    assert all(torch.equal(hub_weights[k], local_weights[k]) for k in hub_weights)
    embed = other.state_dict()["model.embed_tokens.weight"]
    assert torch.equal(hub_weights["model.embed_tokens.weight"], embed)  # model.safetensors', not the shards'


def test_a_hub_repo_of_one_pickle_file_names_the_flag_not_missing_weights(hub, tmp_path):
    """A repo whose only weights are pytorch_model.bin (no index to fetch) was "holds no model weights": the file is
    not fetched without --allow-pickle, and the refusal said the repo was broken."""
    import torch
    from safetensors.torch import load_file

    state = {k: v for f in hub.repo.glob("*.safetensors") for k, v in load_file(f).items()}
    for f in [*hub.repo.glob("*.safetensors"), hub.repo / "model.safetensors.index.json"]:
        f.unlink()
    torch.save(state, hub.repo / "pytorch_model.bin")
    with pytest.raises(ClakitError, match="pytorch_model.bin is fetched only with --allow-pickle"):
        convert("org/model", tmp_path / "out", factor=2, quiet=True)


def test_a_local_path_never_carries_a_revision(tmp_path, tiny_llama_checkpoint):
    assert resolve_source(str(tiny_llama_checkpoint)).revision is None
    check_revision("v1", tiny_llama_checkpoint, "org/model")  # the Hub id may be what it is for
    check_revision(None, tiny_llama_checkpoint)
    with pytest.raises(ClakitError, match="--revision v1 selects a Hub revision, but"):
        check_revision("v1", tiny_llama_checkpoint, None)


def test_uptrain_model_revision_with_only_local_models_is_refused(tmp_path, tiny_llama_checkpoint):
    recipe = {
        "model": {"path": str(tiny_llama_checkpoint), "revision": "v1"},
        "data": {"train": ["train.txt"]},
        "train": {"output_dir": str(tmp_path / "run")},
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(ClakitError, match="model.revision v1 selects a Hub revision, but"):
        load_recipe(path)
    assert load_recipe(path, ["model.original=org/model"]).model.revision == "v1"  # the revision of the original


@pytest.mark.parametrize(
    ("section", "changes", "needle"),
    [
        ({"path": "org/model"}, {}, "model.path org/model is not a CLA checkpoint"),
        (
            {"source": "org/model", "convert": ConvertConfig(factor=2)},
            {"quantization_config": {"quant_method": "awq"}},
            "is a quantized checkpoint",
        ),
    ],
)
def test_uptrain_checks_a_hub_model_before_its_weights_download(hub, section, changes, needle):
    """A 70B stock repo given as model.path (or a quantized one as model.source) was refused after its download."""
    edit_config(hub.repo, **changes)
    with pytest.raises(ClakitError, match=needle):
        check_model_section(ModelSection(**section), seq_len=32)
    assert not hub.weights_fetched()


def test_an_offline_hub_cache_is_read(tmp_path, tiny_llama_checkpoint, corpus_dir):
    """HF_HUB_OFFLINE=1 with the model in the Hub cache (air-gapped clusters download ahead): the id was refused as
    "does not exist"; huggingface_hub reads it from the cache. An id the cache lacks is still one line."""
    import os
    import subprocess
    import sys

    repo = tmp_path / "hub" / "models--org--model"
    shutil.copytree(tiny_llama_checkpoint, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    data = ["--data", str(corpus_dir / "heldout.txt"), "--seq-len", "32", "--max-tokens", "64", "--no-speed", "-q"]

    def clakit_eval(spec):
        argv = [sys.executable, "-m", "clakit", "eval", spec, "-o", str(tmp_path / f"{spec[:3]}.json"), *data]
        return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)

    done = clakit_eval("org/model")
    assert done.returncode == 0, done.stderr
    provenance_ = json.loads((tmp_path / "org.json").read_text())["provenance"]
    assert (provenance_["revision"], provenance_["commit"]) == ("main", COMMIT)  # what was asked, what was read
    missing = clakit_eval("org/other")
    assert missing.returncode == 2 and "'org/other' does not exist" in missing.stderr.strip().splitlines()[-1]
    # a cached repo without config.json (a GGUF repo: its .gguf alone) was "not in the Hub cache": named as it is
    ggufs = tmp_path / "hub" / "models--org--gguf"
    (ggufs / "snapshots" / COMMIT).mkdir(parents=True)
    (ggufs / "snapshots" / COMMIT / "model-Q4_0.gguf").write_bytes(b"GGUF")
    (ggufs / "refs").mkdir()
    (ggufs / "refs" / "main").write_text(COMMIT)
    cached = clakit_eval("org/gguf")
    line = cached.stderr.strip().splitlines()[-1]
    assert cached.returncode == 2 and "org/gguf is not a model checkpoint folder (no config.json)" in line, line
    gguf = ggufs / "snapshots" / COMMIT / "model-Q4_0.gguf"
    assert f"it holds model-Q4_0.gguf: give that file's path ({gguf})" in line, line
    # a snapshot without the tokenizer (fetched in part): fetched again, not files copied into the Hub cache
    partial = tmp_path / "hub" / "models--org--notok"
    shutil.copytree(repo, partial)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json"):
        (partial / "snapshots" / COMMIT / name).unlink(missing_ok=True)
    refused = clakit_eval("org/notok")
    line = refused.stderr.strip().splitlines()[-1]
    assert refused.returncode == 2 and "org/notok has no tokenizer files" in line, line
    assert line.endswith("download org/notok again (its snapshot lacks them)"), line


def test_an_empty_revision_is_refused_not_read_as_the_default_branch():
    with pytest.raises(ClakitError, match=r"the revision is an empty string \(' '\): give a branch, tag or commit"):
        resolve_source("org/model", revision=" ")


@pytest.mark.parametrize(
    ("changes", "flags", "needle"),
    [
        ({"max_position_embeddings": 64}, ["--seq-len", "128"], "--seq-len 128 exceeds the model's context window"),
        ({"architectures": ["T5ForConditionalGeneration"], "model_type": "t5"}, [], "is not a causal language model"),
    ],
    ids=["seq-len-past-the-window", "not-a-causal-lm"],
)
def test_eval_checks_a_hub_config_before_the_weights_download(hub, tmp_path, corpus_dir, changes, flags, needle):
    from clakit.eval import evaluate

    edit_config(hub.repo, **changes)
    with pytest.raises(ClakitError, match=needle):
        seq_len = int(flags[1]) if flags else None
        evaluate("org/model", data=[str(corpus_dir)], seq_len=seq_len, speed=False, quiet=True)
    assert hub.calls == [("org/model", None, FIRST)] and not hub.weights_fetched()


def test_convert_checks_a_given_seq_len_against_a_hub_config_before_the_weights_download(hub, tmp_path):
    edit_config(hub.repo, max_position_embeddings=64)
    with pytest.raises(ClakitError, match="--seq-len 128 exceeds the context window of org/model"):
        convert("org/model", tmp_path / "out", factor=2, seq_len=128, quiet=True)
    assert hub.calls == [("org/model", None, FIRST)] and not hub.weights_fetched()


def test_eval_source_model_on_the_hub_reads_its_config_alone_and_records_its_commit(hub, tmp_path, corpus_dir):
    """`clakit eval CLA --source-model org/name --revision dev` downloaded the source's whole snapshot, weights too
    (140 GB for a 70B), to read its config.json for the KV saving, and recorded "dev", not the commit it read."""
    from clakit.eval import evaluate

    converted = convert(str(hub.repo), tmp_path / "cla", factor=2, init="mean", quiet=True)
    report = evaluate(converted, source_model="org/model", revision="dev", data=[str(corpus_dir / "heldout.txt")],
                      seq_len=32, max_tokens=64, speed=False, quiet=True)  # fmt: skip
    assert hub.calls == [("org/model", "dev", ["config.json", "*.py"])] and not hub.weights_fetched()
    kv = report["kv_cache"]
    assert (kv["source"], kv["source_commit"], kv["saving_factor"]) == ("org/model", COMMIT, 2.0), kv


@pytest.mark.parametrize("quiet", [False, True])
def test_eval_names_a_hub_like_model_read_as_a_local_folder_when_revision_goes_to_the_source(
    hub, tmp_path, corpus_dir, monkeypatch, capsys, quiet
):
    """`clakit eval org/cla --source-model org/model --revision v2`, with a folder org/cla here: MODEL is read as
    that folder, and --revision went to the source repo without a word (helper R3). Said now, as it is done."""
    from clakit.eval import evaluate

    convert(str(hub.repo), tmp_path / "org" / "cla", factor=2, init="mean", quiet=True)
    monkeypatch.chdir(tmp_path)
    evaluate("org/cla", source_model="org/model", revision="v2", data=[str(corpus_dir / "heldout.txt")],
             seq_len=32, max_tokens=64, speed=False, quiet=quiet)  # fmt: skip
    assert hub.calls[0][:2] == ("org/model", "v2")
    err = capsys.readouterr().err
    note = f"org/cla is the local folder {tmp_path / 'org' / 'cla'}, read as it is, so --revision v2 selects"
    assert (note in err) != quiet, err


def test_a_cla_checkpoint_on_the_hub_as_model_path_keeps_its_original(hub, tmp_path):
    """A CLA checkpoint downloaded by its Hub id (model.path org/cla) had its conversion record looked for as a local
    folder: the original (the teacher, the baseline) was unknown, and distillation refused "set model.original".
    Its records are read from the Hub's small files alone, never the weights."""
    from clakit.uptrain.student import original_source

    converted = convert("org/model", tmp_path / "cla", factor=2, init="mean", revision="v1", quiet=True)
    hub.repo, hub.cache, hub.calls = converted, tmp_path / "cache_cla", []  # the Hub now serves the CLA checkpoint
    assert original_source(ModelSection(path="org/cla", revision="v2")) == ("org/model", COMMIT)
    assert hub.calls == [("org/cla", "v2", ["config.json", "*.py", "clakit_convert.json", "uptrain.json"])]
    assert original_source(ModelSection(path="org/cla"), fetch=False) is None  # --dry-run fetches nothing


def test_an_uptrained_cla_checkpoint_on_the_hub_given_to_convert_names_its_uptrain_record(hub, tmp_path):
    """convert of an uptrained CLA checkpoint by its Hub id was refused naming clakit_convert.json as the record
    of its original: the config-only first fetch did not bring uptrain.json (a local folder's refusal named it)."""
    converted = convert("org/model", tmp_path / "cla", factor=2, init="mean", quiet=True)
    (converted / "clakit_convert.json").rename(converted / "uptrain.json")  # as an uptrained model's folder holds
    hub.repo, hub.cache, hub.calls = converted, tmp_path / "cache_cla", []
    with pytest.raises(ClakitError, match=r"its uptrain.json names it as original"):
        convert("org/cla", tmp_path / "again", factor=2, quiet=True)
    assert hub.calls == [("org/cla", None, FIRST)] and not hub.weights_fetched()


def test_records_name_the_hub_endpoint_without_its_credentials(monkeypatch):
    """HF_ENDPOINT (a mirror, a private Hub) serves other files under the same ids and commits: recorded; a
    user:token@ in it would ship with the model's records (helper 50r): dropped."""
    import huggingface_hub
    from huggingface_hub import constants

    from clakit.provenance import provenance

    monkeypatch.setattr(constants, "ENDPOINT", "https://me:s3cret@hub.example.com:8443/x")
    record = provenance()
    assert record["hf_endpoint"] == "https://hub.example.com:8443/x" and "s3cret" not in str(record)
    monkeypatch.setattr(constants, "ENDPOINT", "https://tok@[::1]:8080/Hf")  # a host kept as written (helper 50s)
    assert provenance()["hf_endpoint"] == "https://[::1]:8080/Hf"
    assert record["huggingface_hub"] == huggingface_hub.__version__
