"""Loading never guesses: a checkpoint whose config.json and weights disagree, or whose weights are pickle files, is
refused in one line by `clakit eval`, `convert` and `uptrain` (never run with randomly initialised tensors); a
NaN/inf loss stops training and publishes nothing; `-q` silences the libraries too.

Placeholders as in test_bad_input_values.py; setup helpers add {bad}, a damaged copy of {model} or {cla}.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from bad_input import Case, assert_clean_refusal, check, run_clakit
from conftest import build_tokenizer, save_checkpoint, tiny_model
from safetensors.torch import load_file, save_file
from test_bad_input_values import eval_report, paths  # noqa: F401  (the same folders as the values table)
from transformers import AutoModelForCausalLM
from uptrain_fixtures import tiny_cla_checkpoint  # noqa: F401

from clakit.modeling.modeling_cla import WeightsMismatch
from clakit.uptrain import trainer

EVAL = "eval {bad} -o {tmp}/r.json --data {data}/heldout.txt --seq-len 32 --max-tokens 64 --no-speed -q"
CONVERT = "convert {bad} {tmp}/out -q"
UPTRAIN = "uptrain {recipe} -q model.path={bad}"
TEACHER = "uptrain {recipe} -q model.original={bad} distill.weight=0.5"


def damaged(src: str, edit) -> callable:
    """setup: {bad}, a copy of {src} (model or cla) changed by `edit(folder)`."""

    def setup(p: dict) -> None:
        folder = Path(p["tmp"], "bad")
        shutil.copytree(p[src], folder)
        edit(folder)
        p["bad"] = str(folder)

    return setup


def config(change) -> callable:
    """edit: config.json replaced by `change(dict)` (a dict, or anything JSON, or bytes written as they are)."""

    def edit(folder: Path) -> None:
        new = change(json.loads((folder / "config.json").read_text()))
        path = folder / "config.json"
        path.write_bytes(new) if isinstance(new, bytes) else path.write_text(json.dumps(new))

    return edit


def weights_renamed(name: str) -> callable:
    """edit: the sharded weights saved again as one pickle file `name`, which transformers does not load."""

    def edit(folder: Path) -> None:
        shards = sorted(folder.glob("model-*.safetensors"))
        torch.save({k: v for shard in shards for k, v in load_file(shard).items()}, folder / name)
        for path in [*shards, folder / "model.safetensors.index.json"]:
            path.unlink()

    return edit


def updated(**values) -> callable:
    return config(lambda c: {**c, **values})


def without(*keys) -> callable:
    return config(lambda c: {k: v for k, v in c.items() if k not in keys})


def tensor(name: str, change) -> callable:
    """edit: the tensor `name` in its shard replaced by `change(tensor)`."""

    def edit(folder: Path) -> None:
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        shard = folder / index["weight_map"][name]
        tensors = load_file(shard)
        tensors[name] = change(tensors[name]).contiguous()
        save_file(tensors, shard, metadata={"format": "pt"})

    return edit


def other_model(**config) -> callable:
    """setup: {bad}, a tiny Llama with `config` changed (a teacher that is not the student's original)."""

    def setup(p: dict) -> None:
        p["bad"] = str(save_checkpoint(tiny_model("llama", **config), build_tokenizer(), Path(p["tmp"], "bad")))

    return setup


def truncate(folder: Path, shard: str) -> None:
    path = folder / f"{shard}.safetensors"
    path.write_bytes(path.read_bytes()[:20000])


def pickle_weights(folder: Path) -> None:
    """edit: the safetensors weights replaced by one pickle file, as older exports hold."""
    state = {}
    for shard in sorted(folder.glob("*.safetensors")):
        state |= load_file(shard)
        shard.unlink()
    (folder / "model.safetensors.index.json").unlink()
    torch.save(state, folder / "pytorch_model.bin")


def pickle_beside_consolidated(folder: Path) -> None:
    """edit: pickle weights, plus a consolidated.safetensors (Mistral's native names), which transformers ignores."""
    pickle_weights(folder)
    save_file({"layers.0.attention.wq.weight": torch.zeros(2, 2)}, folder / "consolidated.safetensors")


class Code:
    """An object beyond tensors: unpickling it would call print (any callable: code)."""

    def __reduce__(self):
        return (print, ("ran code from a pickle",))


def pickle_with_code(folder: Path) -> None:
    """edit: pickle weights that also hold an object whose unpickling runs code."""
    pickle_weights(folder)
    torch.save({**torch.load(folder / "pytorch_model.bin"), "extra": Code()}, folder / "pytorch_model.bin")


def index(change) -> callable:
    """edit: model.safetensors.index.json replaced by `change(index, folder)` (a dict, or anything JSON)."""

    def edit(folder: Path) -> None:
        path = folder / "model.safetensors.index.json"
        path.write_text(json.dumps(change(json.loads(path.read_text()), folder)))

    return edit


def extra_layer_kv(folder: Path) -> None:
    """edit: K/V of a layer past the config's num_hidden_layers added to the last shard (and the index)."""
    layers = json.loads((folder / "config.json").read_text())["num_hidden_layers"]
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = sorted(folder.glob("model-*.safetensors"))[-1]
    tensors = load_file(shard)
    for proj in ("k_proj", "v_proj"):
        name = f"model.layers.{layers}.self_attn.{proj}.weight"
        tensors[name] = load_file(folder / index["weight_map"][f"model.layers.0.self_attn.{proj}.weight"])[
            f"model.layers.0.self_attn.{proj}.weight"].clone()  # fmt: skip
        index["weight_map"][name] = shard.name
    save_file(tensors, shard, metadata={"format": "pt"})
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def duplicated_tensor(folder: Path) -> None:
    """edit: the first shard's first tensor stored again, zeroed, in the second shard (the index names the first)."""
    first, second = sorted(folder.glob("model-*.safetensors"))[:2]
    name = sorted(load_file(first))[0]
    tensors = load_file(second)
    tensors[name] = torch.zeros_like(load_file(first)[name])
    save_file(tensors, second, metadata={"format": "pt"})


def dangling_single(folder: Path) -> None:
    """edit: the weights replaced by model.safetensors, a link to a file that is gone (a Hub-cache blob removed)."""
    for path in [*folder.glob("model-*.safetensors"), folder / "model.safetensors.index.json"]:
        path.unlink()
    (folder / "model.safetensors").symlink_to(folder / "gone.safetensors")


def shard_outside(name: str) -> callable:
    """change: the index's second shard moved out of the folder, the index naming it `name` (its new place)."""

    def change(idx: dict, folder: Path) -> dict:
        shard = sorted(set(idx["weight_map"].values()))[1]
        if not Path(name).is_absolute():
            (folder / shard).rename(folder / name)
        return {**idx, "weight_map": {t: name if f == shard else f for t, f in idx["weight_map"].items()}}

    return change


def shard_named(name: str) -> callable:
    """change: the index names `name` for the tensors of its last shard (the shard itself left in place)."""

    def change(idx: dict, folder: Path) -> dict:
        shard = sorted(set(idx["weight_map"].values()))[-1]
        return {**idx, "weight_map": {t: name if f == shard else f for t, f in idx["weight_map"].items()}}

    return change


def link_outside(name: str) -> callable:
    """edit: `name` in the folder a link to a file beside it, outside the checkpoint (a secret, say)."""

    def edit(folder: Path) -> None:
        (folder.parent / "secret.txt").write_text("AWS_SECRET=hunter2\n")
        (folder / name).symlink_to(folder.parent / "secret.txt")

    return edit


ALL_PRODUCERS = updated(kv_source_layers=[0, 1, 2, 3])  # the CLA2 weights have no K/V for layers 1 and 3
ONE_PRODUCER = updated(kv_source_layers=[0, 0, 0, 0])  # layer 2's K/V have no place
K1 = "model.layers.1.self_attn.k_proj.weight"
K2 = "model.layers.2.self_attn.k_proj.weight"

CASES = [
    # --- config.json that is not a config (AttributeError in transformers for a list)
    *[Case(cmd, "config.json must be a JSON object of settings, got a list", damaged("model", config(lambda c: [c])),
           id=f"{cmd.split()[0]}-config-list") for cmd in (EVAL, CONVERT)],
    Case(UPTRAIN, "config.json must be a JSON object of settings, got a list", damaged("cla", config(lambda c: [c])),
         id="uptrain-config-list"),
    Case(EVAL, "config.json (Expecting property name", damaged("model", config(lambda c: b"{oops")),
         id="eval-config-not-json"),
    Case(CONVERT, "config.json (Expecting property name", damaged("model", config(lambda c: b"{oops")),
         id="convert-config-not-json"),
    Case(EVAL, "config.json ('utf-8' codec can't decode", damaged("model", config(lambda c: b'{"a": "\xff"}')),
         id="eval-config-not-utf8"),
    Case(EVAL, "config.json lacks hidden_size", damaged("model", without("hidden_size")), id="eval-no-hidden-size"),
    Case(CONVERT, "config.json lacks hidden_size, vocab_size", damaged("model", without("hidden_size", "vocab_size")),
         id="convert-no-hidden-size"),
    Case(EVAL, "config.json has no model_type", damaged("model", without("model_type")), id="eval-no-model-type"),
    *[Case(EVAL, f"config.json: {key} must be a positive integer, got {value!r}",
           damaged("model", updated(**{key: value})), id=f"eval-config-{key}-{value}")
      for key, value in (("num_hidden_layers", "4"), ("hidden_size", -48), ("num_attention_heads", 0),
                         ("intermediate_size", True))],
    Case(CONVERT, "config.json: hidden_size must be a positive integer, got -48",
         damaged("model", updated(hidden_size=-48)), id="convert-config-negative"),
    # a dtype that is no floating dtype's name: a traceback (5), or "download it again" (float17, auto)
    *[Case(cmd, f"config.json: dtype must name a floating dtype such as bfloat16 or float16 (or be null), got {shown}",
           damaged("model", updated(dtype=value)), id=f"{cmd.split()[0]}-config-dtype-{value}")
      for cmd in (EVAL, CONVERT) for value, shown in ((5, "5"), ("float17", '"float17"'), ("auto", '"auto"'))],
    Case(UPTRAIN, "config.json: torch_dtype must name a floating dtype", damaged("cla", updated(torch_dtype=True)),
         id="uptrain-config-torch-dtype-bool"),
    # a string read as a list of classes ("a L model"), a mapping a KeyError traceback
    *[Case(CONVERT, "config.json: architectures must be a list of class names", damaged("model", updated(
          architectures=value)), id=f"convert-config-architectures-{type(value).__name__}")
      for value in ("LlamaForCausalLM", {"a": 1}, [None])],
    Case(EVAL, "dtype must name a floating dtype", damaged("model", updated(dtype="float99")), id="eval-config-dtype"),
    Case(EVAL, "cannot read the config of", damaged("cla", updated(kv_source_layers="abc")), id="eval-cla-layout-str"),
    Case(EVAL, "kv_source_layers has 3 entries but the model has 4 layers",
         damaged("cla", updated(kv_source_layers=[0, 0, 2])), id="eval-cla-layout-short"),
    # --- weights or tokenizer files damaged
    Case(EVAL, "Error while deserializing header", damaged("model", lambda f: truncate(f, "model-00002-of-00004")),
         id="eval-truncated-shard"),
    Case(EVAL, "holds no model weights (no model.safetensors",
         damaged("model", lambda f: [p.unlink() for p in f.glob("model*")]),
         id="eval-no-weights"),
    # shards without their index, or weights under a name transformers never loads: eval, convert and uptrain refuse
    # them alike (sources.loadable_weights, transformers' order, shared by the load checks and convert's reader)
    *[Case(cmd, "but no model.safetensors or model.safetensors.index.json, so transformers loads none of it",
           damaged("model", lambda f: (f / "model.safetensors.index.json").unlink()), id=f"{name}-shards-no-index")
      for cmd, name in [(EVAL, "eval"), (CONVERT, "convert"), (TEACHER, "teacher")]],
    *[Case(cmd, "holds no model weights (no model.safetensors", damaged("model", weights_renamed("model.pt")),
           id=f"{name}-weights-other-name") for cmd, name in [(EVAL, "eval"), (CONVERT, "convert")]],
    Case(EVAL, "cannot load the tokenizer of", damaged("model", lambda f: (f / "tokenizer.json").write_text("{x")),
         id="eval-bad-tokenizer"),
    # --- config.json that disagrees with the weights' shapes
    Case(CONVERT, "has shape [320, 48] but its config.json makes it [320, 64]",
         damaged("model", updated(hidden_size=64, head_dim=16)), id="convert-hidden-size"),
    Case(EVAL, "config.json does not match the weights: lm_head.weight is [320, 48] in the checkpoint but the "
         "config makes it [320, 64]", damaged("model", updated(hidden_size=64, head_dim=16)), id="eval-hidden-size"),
    Case(CONVERT, "self_attn.o_proj.weight has shape [48, 48] but its config.json makes it [48, 96]",
         damaged("model", updated(num_attention_heads=8)), id="convert-heads"),
    Case(CONVERT, f"tensor {K1} has shape [12, 48] but its config.json makes it [24, 48]",
         damaged("model", tensor(K1, lambda t: t[:12])), id="convert-consumer-k-proj-shape"),
    Case(CONVERT + " --kv-source-layers 0,0,2,2", f"tensor {K1} has shape [24, 40]",
         damaged("model", tensor(K1, lambda t: t[:, :40])), id="convert-consumer-k-proj-columns"),
    Case(EVAL, f"config.json does not match the weights: {K2} is [12, 48]",
         damaged("model", tensor(K2, lambda t: t[:12])), id="eval-k-proj-shape"),
    # --- CLA checkpoints whose layout (kv_source_layers) does not match their K/V tensors
    Case(EVAL, "the checkpoint lacks 4 tensors its config.json needs (e.g. model.layers.1.self_attn.k_proj.weight)",
         damaged("cla", ALL_PRODUCERS), id="eval-cla-missing-kv"),
    Case(UPTRAIN, "the checkpoint lacks 4 tensors its config.json needs", damaged("cla", ALL_PRODUCERS),
         id="uptrain-cla-missing-kv"),
    Case(EVAL, f"the checkpoint holds 2 tensors its config.json has no place for (e.g. {K2}), which would be "
         "dropped: its kv_source_layers do not match", damaged("cla", ONE_PRODUCER), id="eval-cla-unexpected-kv"),
    Case(UPTRAIN, "its kv_source_layers do not match the weights", damaged("cla", ONE_PRODUCER),
         id="uptrain-cla-unexpected-kv"),
    Case(EVAL, "holds 9 tensors its config.json has no place for (e.g. model.layers.3.input_layernorm.weight), which "
         "would be dropped: its num_hidden_layers do not match", damaged("model", updated(num_hidden_layers=3)),
         id="eval-fewer-layers"),
    # K/V of a layer the stock model does not have: its layer count, not a layout it has none of
    Case(EVAL, "holds 2 tensors its config.json has no place for (e.g. model.layers.4.self_attn.k_proj.weight), which "
         "would be dropped: its num_hidden_layers do not match", damaged("model", extra_layer_kv),
         id="eval-kv-of-an-extra-layer"),
    Case(EVAL, "the checkpoint lacks 9 tensors its config.json needs (e.g. model.layers.4.input_layernorm.weight)",
         damaged("model", updated(num_hidden_layers=5)), id="eval-more-layers"),
    Case(CONVERT, "holds 9 decoder tensors its config.json has no place for (e.g. model.layers.3.input_layernorm."
         "weight)", damaged("model", updated(num_hidden_layers=3)), id="convert-fewer-layers"),
    Case(CONVERT, "tensor model.layers.4.input_layernorm.weight is missing from the checkpoint",
         damaged("model", updated(num_hidden_layers=5)), id="convert-more-layers"),
    Case(EVAL, "config.json does not match the weights: model.layers.0.self_attn.k_proj.weight is [24, 40]",
         damaged("cla", tensor("model.layers.0.self_attn.k_proj.weight", lambda t: t[:, :40])),
         id="eval-cla-k-proj-shape"),
    Case(EVAL, "layer 2 takes K/V from layer 1, which is itself a consumer",
         damaged("cla", updated(kv_source_layers=[0, 0, 1, 1])), id="eval-cla-bad-layout"),
    # --- a teacher that cannot teach this student: refused from the configs, not at the first step's KL
    Case(TEACHER, "bad has vocab_size 400 but the student 320: distillation needs the model",
         other_model(vocab_size=400), id="teacher-vocab"),
    Case(TEACHER + " distill.hidden_mse_weight=1", "bad has num_hidden_layers 2 but the student 4",
         other_model(num_hidden_layers=2), id="teacher-layers-hidden-mse"),
    # --- weights: pickle only with the flag (they can run code), NaN weights never make a report
    Case(EVAL, "loadable weights are pickle (pytorch_model.bin; no model.safetensors or model.safetensors.index.json"
         "), which can run code when loaded; pass --allow-pickle", damaged("model", pickle_weights), id="eval-pickle"),
    Case(UPTRAIN, "loadable weights are pickle (pytorch_model.bin;", damaged("cla", pickle_weights),
         id="uptrain-pickle"),
    # a stray safetensors file transformers does not load (Mistral's consolidated.safetensors) is no safe copy
    Case(EVAL, "loadable weights are pickle (pytorch_model.bin;", damaged("model", pickle_beside_consolidated),
         id="eval-pickle-beside-consolidated-safetensors"),
    Case(EVAL + " --allow-pickle", "(torch's weights-only unpickler: Unsupported global: GLOBAL print",
         damaged("model", pickle_with_code), id="eval-pickle-with-code"),
    Case(CONVERT + " --allow-pickle", "(torch's weights-only unpickler: Unsupported global",
         damaged("model", pickle_with_code), id="convert-pickle-with-code", forbid="weights_only set to False"),
    # --- an index naming shards outside the folder (transformers refuses it: convert read them), or malformed
    *[Case(cmd, "names shard '../outside.safetensors', outside the checkpoint folder",
           damaged("model", index(shard_outside("../outside.safetensors"))), id=f"{cmd.split()[0]}-shard-outside")
      for cmd in (EVAL, CONVERT)],
    Case(CONVERT, "names shard '/etc/passwd', outside the checkpoint folder",
         damaged("model", index(shard_outside("/etc/passwd"))), id="convert-shard-absolute"),
    # an index naming itself, config.json or a name with a newline: "corrupt or truncated (header too large)", or a
    # message of two lines (helper M)
    *[Case(cmd, f"names shard {name!r}, which is not a weights file of this index's kind",
           damaged("model", index(shard_named(name))), id=f"{cmd.split()[0]}-shard-{tag}")
      for cmd in (EVAL, CONVERT)
      for name, tag in (("model.safetensors.index.json", "the-index"), ("config.json", "config"),
                        ("a\nb.safetensors", "newline"))],
    Case(EVAL, "has an empty or malformed weight_map", damaged("model", index(lambda i, f: {"weight_map": [1, 2]})),
         id="eval-index-list"),
    Case(EVAL, "cannot read the checkpoint index", damaged("model", index(lambda i, f: [])), id="eval-index-not-dict"),
    Case(EVAL, "its weights hold NaN/inf or absurd values",
         damaged("model", tensor("model.norm.weight", lambda t: torch.full_like(t, float("nan")))), id="eval-nan"),
    # --- a tensor in two listed shards: convert refused it, eval scored (and uptrain distilled from) one copy
    *[Case(cmd, "in both model-00001-of-", damaged("model", duplicated_tensor), id=f"{cmd.split()[0]}-tensor-twice")
      for cmd in (EVAL, CONVERT, TEACHER)],
    *[Case(cmd, "model.safetensors is a link to a missing file", damaged("model", dangling_single),
           id=f"{cmd.split()[0]}-dangling-link") for cmd in (EVAL, CONVERT)],
    # --- one edited number built a model at its size before any check (10**6 layers: 43 GB of Python objects in
    # convert's skeleton; vocab_size 10**7: 4.2 GB allocated by from_pretrained before the refusal; helper M)
    *[Case(cmd, "its config.json makes 1000000 decoder layers but the weights hold 4 (model.layers.0-3); restore "
           "the config.json", damaged("model", updated(num_hidden_layers=10**6)), id=f"{cmd.split()[0]}-layer-bomb")
      for cmd in (EVAL, CONVERT)],
    Case(EVAL, "its config.json makes a model of 960,083,376 parameters but its weights hold 114,096 values",
         damaged("model", updated(vocab_size=10**7)), id="eval-vocab-bomb"),
    # --- JSON nested past Python's recursion limit: a RecursionError traceback wherever it was read
    *[Case(cmd, "config.json nests its JSON deeper than can be read", damaged("model", config(
          lambda c: b"[" * 100_000 + b"]" * 100_000)), id=f"{cmd.split()[0]}-deep-json") for cmd in (EVAL, CONVERT)],
    # --- integer, bool or complex weights: cast by from_pretrained without a word, and the group mean cast back
    *[Case(cmd, f"tensor {K2} is stored as {shown}", damaged("model", tensor(K2, lambda t, d=dtype: t.to(d))),
           id=f"{cmd.split()[0]}-{shown}-weights")
      for cmd in (EVAL, CONVERT) for dtype, shown in ((torch.int64, "I64 (tensors not floating point: 1)"),
                                                      (torch.bool, "BOOL"))],
    # --- a config asking for a package clakit does not install: an ImportError traceback, exit 1 (helper M)
    *[Case(EVAL, "; its config.json asks for it (its quantization_config or attn_implementation): install it",
           damaged("model", updated(**change)), id=f"eval-needs-{name}")
      for name, change in (
          ("bitsandbytes", {"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}}),
          ("flash-attn", {"attn_implementation": "flash_attention_2"}))],
    # --- values no model runs with, which convert wrote and eval scored (Infinity: no rotation at all; helper M)
    *[Case(cmd, match, damaged("model", updated(**change)), id=f"{cmd.split()[0]}-{name}")
      for cmd in (EVAL, CONVERT) for name, change, match in (
          ("theta-inf", {"rope_parameters": {"rope_type": "default", "rope_theta": float("inf")}},
           "its config's rope_theta is inf, not a finite number"),
          ("eps-nan", {"rms_norm_eps": float("nan")}, "its config's rms_norm_eps is nan, not a finite number"),
          ("rope-factor", {"rope_scaling": {"rope_type": "linear", "factor": -8.0}},
           "its config's RoPE scaling factor is -8.0, not a positive number"))],
    # --- a tokenizer file linking outside the folder was copied into OUT (which users publish) as a plain file
    Case(CONVERT, "merges.txt links to", damaged("model", link_outside("merges.txt")), id="convert-link-outside"),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=str)
def test_refused(case, paths, tmp_path, tiny_cla_checkpoint):  # noqa: F811
    check(case, paths, watch=[tmp_path, tiny_cla_checkpoint])


def test_cla_from_pretrained_refuses_weights_its_layout_does_not_match(paths):  # noqa: F811
    """`from_pretrained` through clakit's CLA classes (registered, or as remote code) never initialises K/V at
    random; what the caller explicitly allows (ignore_mismatched_sizes) is let through."""
    damaged("cla", ALL_PRODUCERS)(paths)
    for kwargs in ({}, {"trust_remote_code": True}):
        with pytest.raises(WeightsMismatch, match="lacks 4 tensors its config.json needs"):
            AutoModelForCausalLM.from_pretrained(paths["bad"], **kwargs)
    model, info = AutoModelForCausalLM.from_pretrained(paths["cla"], output_loading_info=True)
    assert not info["missing_keys"] and model.config.kv_source_layers == [0, 0, 2, 2]


def test_eval_reads_pickle_weights_with_the_flag(paths):  # noqa: F811
    damaged("model", pickle_weights)(paths)
    run = run_clakit(*EVAL.format(**paths).split(), "--allow-pickle")
    assert run.code == 0, run.err
    assert json.loads(Path(paths["tmp"], "r.json").read_text())["perplexity"] > 1


def test_a_nan_loss_stops_training_and_publishes_nothing(paths, monkeypatch):  # noqa: F811
    """The loss turns NaN at step 3 (after the checkpoint at step 2): one line, no result, and the checkpoint
    written before it (finite weights) is all that stays."""
    real_loss, calls = trainer.uptrain_loss, []

    def diverging(*args):  # one call per step (no gradient accumulation in the tiny recipe)
        loss, parts = real_loss(*args)
        calls.append(len(calls) + 1)
        return (loss * float("nan") if len(calls) >= 3 else loss), parts

    monkeypatch.setattr(trainer, "uptrain_loss", diverging)
    run = run_clakit("uptrain", paths["recipe"], "-q", f"model.path={paths['cla']}")
    assert_clean_refusal(run, "the training loss is not finite (nan or inf) at step 3")
    # the advice was "Lower train.learning_rate ... then --resume", and the run kept "continue it with --resume":
    # a resume with another learning rate is refused as another recipe, with the same one it repeats the same loss
    assert "start over with --overwrite" in run.err and "continue it with --resume" not in run.err, run.err
    out = Path(yaml.safe_load(Path(paths["recipe"]).read_text())["train"]["output_dir"])
    assert f"its earlier checkpoints are kept in {out}" in run.err, run.err
    assert not (out / "model").exists()
    assert not list(out.glob("checkpoints/step-000003*"))


def test_lora_patterns_are_checked_before_any_model_is_loaded(paths, monkeypatch):  # noqa: F811
    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded before the recipe's patterns were checked")

    monkeypatch.setattr("clakit.uptrain.student.load_model", no_load)
    monkeypatch.setattr("clakit.convert.pipeline.load_model", no_load)
    base = ["uptrain", paths["recipe"], "-q"]
    source = [f"model.source={paths['model']}", "model.path=null", "model.convert.factor=2"]
    for overrides, match in (
        (["lora.target_modules=[nope]"], "lora.target_modules pattern 'nope' matches no linear module"),
        (["lora.full_train=[consumers.k_proj]"], "lora.full_train pattern 'consumers.k_proj' matches no linear"),
        ([*source, "lora.full_train=[model.layers.9.*]"], "pattern 'model.layers.9.*' matches no linear module"),
    ):
        assert_clean_refusal(run_clakit(*base, *overrides), match)
    assert not Path(paths["tmp"], "run").exists()


def test_stop_if_not_finite():
    class One:
        num_processes = 1

    trainer.stop_if_not_finite(3.5, 1, One())
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(Exception, match="at step 7"):
            trainer.stop_if_not_finite(bad, 7, One())


def _clakit(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clakit", *map(str, args)], capture_output=True, text=True)


def test_quiet_means_quiet(paths):  # noqa: F811
    """-q: no progress bar, "Loading weights", load report or library warning on stderr, for every command; the
    same eval without -q shows transformers' bar (so the check can fail)."""
    p = paths
    eval_args = ["eval", p["model"], "-o", p["tmp"] / "r.json", "--data", p["data"] / "heldout.txt", "--seq-len", 32,
                 "--max-tokens", 64, "--batch-size", 2]  # fmt: skip
    loud = _clakit(*eval_args)
    assert loud.returncode == 0 and "Loading weights" in loud.stderr, loud.stderr[-2000:]
    runs = [
        _clakit(*eval_args, "-q"),
        _clakit("convert", p["model"], p["tmp"] / "cla", "--init", "mean", "-q"),
        _clakit("report", p["tmp"] / "r.json", p["tmp"] / "r.json", "-o", p["tmp"] / "rep", "-q"),
        _clakit("uptrain", p["recipe"], "-q", "train.max_steps=1", "train.warmup_steps=0", f"model.path={p['cla']}"),
    ]
    for run in runs:
        assert run.returncode == 0 and run.stderr == "", (run.args, run.stderr[-2000:])


def test_non_float_buffers_the_load_drops_are_no_weights(tmp_path):
    """The integer/bool refusal read every tensor of the file: GPT-NeoX checkpoints that keep their bool
    attention.bias masks (Pythia's) were refused as an eval baseline (helper R). Only the model's parameters count."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from clakit.errors import ClakitError
    from clakit.sources import load_model, resolve_source

    config = GPTNeoXConfig(vocab_size=320, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=128)  # fmt: skip
    folder = tmp_path / "neox"
    GPTNeoXForCausalLM(config).save_pretrained(folder)
    tensors = load_file(folder / "model.safetensors")
    mask = torch.tril(torch.ones(128, 128, dtype=torch.bool))[None, None]
    save_file({**tensors, **{f"gpt_neox.layers.{i}.attention.bias": mask.clone() for i in range(2)}},
              folder / "model.safetensors", metadata={"format": "pt"})  # fmt: skip
    assert load_model(resolve_source(str(folder))).config.num_hidden_layers == 2
    weight = "gpt_neox.layers.0.attention.query_key_value.weight"  # a parameter stored as int8: refused
    save_file({**tensors, weight: tensors[weight].to(torch.int8)}, folder / "model.safetensors")
    with pytest.raises(ClakitError, match=f"tensor {weight} is stored as I8"):
        load_model(resolve_source(str(folder)))


def test_a_missing_package_imported_by_the_models_own_code_names_that_code(tmp_path):
    """An ImportError from a model's own modeling code (--trust-remote-code) was blamed on config.json's
    quantization_config or attn_implementation (helper R)."""
    from clakit.errors import ClakitError
    from clakit.sources import load_model, resolve_source

    folder = save_checkpoint(tiny_model("llama"), build_tokenizer(), tmp_path / "rc")
    (folder / "modeling_custom.py").write_text(
        "import clakit_no_such_package\nfrom transformers import LlamaForCausalLM\n\n\n"
        "class CustomForCausalLM(LlamaForCausalLM):\n    pass\n"
    )
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ClakitError, match="clakit_no_such_package.*its own modeling code \\(--trust-remote-code\\) "
                                          "imports it: install it"):  # fmt: skip
        load_model(resolve_source(str(folder)), trust_remote_code=True)
