"""The CLA model classes against the stock Llama/Mistral, cache behaviour, checkpointing, remote-code loading."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import tiny_kwargs, tiny_model
from transformers import AutoModelForCausalLM, DynamicCache, StaticCache

from clakit.convert.inmemory import cla_model_from
from clakit.eval.kvcache import cache_bytes
from clakit.modeling import LlamaCLAConfig, LlamaCLAForCausalLM, MistralCLAConfig, MistralCLAForCausalLM

LAYOUTS = {
    "cla2": [0, 0, 2, 2, 4, 4],
    "cla3": [0, 0, 0, 3, 3, 3],
    "nonuniform": [0, 1, 1, 3, 3, 3],
}
KINDS = ["llama", "mistral"]


def cla_pair(kind: str, layout: list[int], attn: str = "sdpa"):
    """(stock model, CLA model) with the same weights; consumers' K/V are the group mean."""
    model = tiny_model(kind, num_hidden_layers=len(layout), attn_implementation=attn)
    return model, cla_model_from(model, layout, init="mean")


def ids(batch: int = 2, length: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, 300, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_all_producer_layout_reproduces_stock_logits(kind, attn):
    model = tiny_model(kind, attn_implementation=attn)
    cla_cls = LlamaCLAForCausalLM if kind == "llama" else MistralCLAForCausalLM
    config_cls = LlamaCLAConfig if kind == "llama" else MistralCLAConfig
    config = config_cls(**model.config.to_diff_dict() | {"model_type": config_cls.model_type})
    config._attn_implementation = attn
    cla = cla_cls(config).eval()
    cla.load_state_dict(model.state_dict())
    x = ids(length=40)  # longer than Mistral's sliding window (16)
    with torch.no_grad():
        torch.testing.assert_close(cla(x).logits, model(x).logits, rtol=0, atol=0)


def test_consumers_hold_no_kv_projections():
    _, cla = cla_pair("llama", LAYOUTS["nonuniform"])
    has_kv = [hasattr(layer.self_attn, "k_proj") for layer in cla.model.layers]
    assert has_kv == [True, True, False, True, False, False]
    kv_layers = {int(k.split(".")[2]) for k in cla.state_dict() if ".k_proj." in k or ".v_proj." in k}
    assert kv_layers == {0, 1, 3}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_incremental_decoding_equals_full_forward(kind, layout, attn):
    _, cla = cla_pair(kind, LAYOUTS[layout], attn)
    x = ids(length=30)
    with torch.no_grad():
        full = cla(x).logits
        cache = DynamicCache(config=cla.config)
        parts = [cla(x[:, :20], cache=cache, use_cache=True).logits]
        for t in range(20, 30):  # one token at a time, past the sliding window for Mistral
            parts.append(cla(x[:, t : t + 1], cache=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_generation_with_cache_equals_without(kind, layout):
    _, cla = cla_pair(kind, LAYOUTS[layout])
    x = ids(batch=2, length=12)
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(x))
    with torch.no_grad():
        cached = cla.generate(x, **kwargs)
        uncached = cla.generate(x, use_cache=False, **kwargs)
        static = cla.generate(x, cache_implementation="static", **kwargs)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, static)


def test_sampling_and_beam_search_run_and_match_without_cache():
    _, cla = cla_pair("llama", LAYOUTS["cla2"])
    x = ids(batch=1, length=8)
    with torch.no_grad():
        beams = [cla.generate(x, num_beams=3, max_new_tokens=8, do_sample=False, use_cache=c) for c in (True, False)]
        torch.manual_seed(0)
        a = cla.generate(x, do_sample=True, top_k=20, max_new_tokens=8)
        torch.manual_seed(0)
        b = cla.generate(x, do_sample=True, top_k=20, max_new_tokens=8, use_cache=False)
    assert torch.equal(beams[0], beams[1])
    assert torch.equal(a, b)


@pytest.mark.parametrize("kind", KINDS)
def test_left_padded_batch_generates_like_unpadded(kind):
    _, cla = cla_pair(kind, LAYOUTS["cla2"])
    short, long = ids(1, 6, seed=2), ids(1, 10, seed=3)
    batch = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), short], 1), long])
    mask = torch.cat([torch.cat([torch.zeros(1, 4), torch.ones(1, 6)], 1), torch.ones(1, 10)]).long()
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        padded = cla.generate(batch, attention_mask=mask, **kwargs)
        alone = cla.generate(short, attention_mask=torch.ones_like(short), **kwargs)
    assert torch.equal(padded[0, 4:], alone[0])


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_cache_holds_only_producers(layout):
    model, cla = cla_pair("llama", LAYOUTS[layout])
    x = ids(length=32)
    with torch.no_grad():
        ref = cache_bytes(model(x, use_cache=True).cache)
        got = cache_bytes(cla(x, use_cache=True).cache)
        static = StaticCache(config=cla.config, max_cache_len=32)
        cla(x, cache=static, use_cache=True)
    producers = len(set(LAYOUTS[layout]))
    assert got * len(LAYOUTS[layout]) == ref * producers
    static_ref = StaticCache(config=model.config, max_cache_len=32)
    with torch.no_grad():
        model(x, cache=static_ref, use_cache=True)
    assert cache_bytes(static) * len(LAYOUTS[layout]) == cache_bytes(static_ref) * producers


def grads(model, x, checkpointing: bool) -> dict:
    model.train()
    model.zero_grad()
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.activation_checkpointing_disable()
    model(x, labels=x).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("layout", ["cla2", "nonuniform"])
def test_gradient_checkpointing_gives_the_same_gradients(layout):
    _, cla = cla_pair("llama", LAYOUTS[layout])
    x = ids(length=16)
    plain, ckpt = grads(cla, x, False), grads(cla, x, True)
    assert plain.keys() == ckpt.keys()
    # producers' K/V get gradient from their consumers too: the consumer->producer path is intact
    assert "model.layers.0.self_attn.k_proj.weight" in ckpt
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)


def test_reentrant_checkpointing_is_refused():
    _, cla = cla_pair("llama", LAYOUTS["cla2"])
    with pytest.raises(ValueError, match="non-reentrant"):
        cla.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(ValueError, match="non-reentrant"), pytest.warns(FutureWarning):  # the deprecated spelling
        cla.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})


def test_old_transformers_fails_at_import_naming_the_version():
    script = "import transformers; transformers.__version__ = '5.1.0'; import clakit"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode != 0
    assert "ImportError" in out.stderr and "transformers>=5.24.0" in out.stderr


@pytest.mark.parametrize(
    "layout, message",
    [
        ([0, 0, 2], "has 3 entries"),
        ([1, 1, 2, 2], "layer 0 must be a producer"),
        ([0, 2, 2, 2], "from a later layer"),
        ([0, 0, 1, 1], "itself a consumer"),
        ([0, -1, 2, 2], "layer index >= 0"),
    ],
)
def test_config_validation_errors(layout, message):
    with pytest.raises(ValueError, match=message):
        LlamaCLAConfig(**tiny_kwargs(4), kv_source_layers=layout)


def test_omitted_layout_means_every_layer_is_a_producer():
    config = LlamaCLAConfig(**tiny_kwargs(4))
    assert config.kv_source_layers == [0, 1, 2, 3]
    assert LlamaCLAConfig.from_dict(config.to_dict()).kv_source_layers == [0, 1, 2, 3]


REMOTE_LOAD = """
import json, sys, torch
from transformers import AutoModel, AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
base = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True).eval()  # embeddings, features
assert sys.modules.get("clakit") is None, "remote code must not need clakit"
x = torch.tensor(json.loads(sys.argv[2]))
with torch.no_grad():
    print(json.dumps({"cls": type(model).__name__, "logits": model(x).logits.tolist(),
                      "base_cls": type(base).__name__, "hidden": base(x).last_hidden_state.tolist()}))
"""


@pytest.mark.parametrize("kind", KINDS)
def test_remote_code_load_without_clakit_gives_identical_logits(kind, tmp_path):
    _, cla = cla_pair(kind, LAYOUTS["nonuniform"])
    cla.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == f"{kind}_cla" and "AutoModelForCausalLM" in config["auto_map"]
    assert {"configuration_cla.py", "modeling_cla.py"} <= {p.name for p in tmp_path.iterdir()}
    x = ids(1, 12)
    # a fresh interpreter where clakit cannot be imported: isolated mode, cwd outside the repo, no PYTHONPATH
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    script = "import sys; sys.modules['clakit'] = None\n" + REMOTE_LOAD
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path), json.dumps(x.tolist())],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        check=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["cls"] == type(cla).__name__
    # AutoModel too (config.json's auto_map named the causal LM alone: "Unrecognized configuration class")
    assert result["base_cls"] == type(cla.model).__name__
    with torch.no_grad():
        torch.testing.assert_close(torch.tensor(result["logits"]), cla(x).logits, rtol=0, atol=0)
        torch.testing.assert_close(torch.tensor(result["hidden"]), cla.model(x).last_hidden_state, rtol=0, atol=0)


def test_cla_checkpoint_does_not_load_silently_without_clakit(tmp_path):
    _, cla = cla_pair("llama", LAYOUTS["cla2"])
    cla.save_pretrained(tmp_path)
    script = (
        "import sys; sys.modules['clakit'] = None\n"
        "from transformers import AutoModelForCausalLM\n"
        f"AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}, trust_remote_code=False)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode != 0 and "trust_remote_code" in out.stderr


def test_auto_classes_load_with_clakit_imported(tmp_path):
    _, cla = cla_pair("mistral", LAYOUTS["cla2"])
    cla.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is MistralCLAForCausalLM
    x = ids(1, 20)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, cla(x).logits, rtol=0, atol=0)


# --- construction (built once), legacy checkpointing flag, visible forward signature ------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_cla_model_is_built_once_with_no_throwaway_modules(kind, monkeypatch):
    """Every nn.Linear/Embedding constructed while building the CLA model is one the model keeps (the stock
    constructors would build a whole stock decoder stack first, then replace it)."""
    built = []
    for cls in (torch.nn.Linear, torch.nn.Embedding):
        original = cls.__init__

        def record(self, *args, _original=original, **kwargs):
            built.append(self)
            _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "__init__", record)
    config_cls, lm_cls = (
        (LlamaCLAConfig, LlamaCLAForCausalLM) if kind == "llama" else (MistralCLAConfig, MistralCLAForCausalLM)
    )
    model = lm_cls(config_cls(**tiny_kwargs(6), kv_source_layers=LAYOUTS["cla2"]))
    kept = [m for m in model.modules() if isinstance(m, torch.nn.Linear | torch.nn.Embedding)]
    assert len(built) == len(kept) and {id(m) for m in built} == {id(m) for m in kept}
    assert sum(hasattr(layer.self_attn, "k_proj") for layer in model.model.layers) == 3


@pytest.mark.parametrize("kind", KINDS)
def test_legacy_gradient_checkpointing_config_reaches_the_cla_layers(kind):
    """transformers' test_gradient_checkpointing_backward_compatibility: `config.gradient_checkpointing = True`
    turns checkpointing on at construction, in every (CLA) decoder layer."""
    config_cls, lm_cls = (
        (LlamaCLAConfig, LlamaCLAForCausalLM) if kind == "llama" else (MistralCLAConfig, MistralCLAForCausalLM)
    )
    config = config_cls(**tiny_kwargs(4), kv_source_layers=[0, 0, 2, 2])
    config.gradient_checkpointing = True
    model = lm_cls(config)
    assert model.is_gradient_checkpointing
    assert all(layer.gradient_checkpointing for layer in model.model.layers)


@pytest.mark.parametrize("kind", KINDS)
def test_forward_signature_is_the_stock_one_and_inputs_embeds_work(kind):
    """transformers' test_model_main_input_name: the first forward argument is `input_ids` (Trainer's
    remove_unused_columns inspects it); inputs_embeds gives the same logits as input_ids."""
    import inspect

    model, cla = cla_pair(kind, LAYOUTS["cla2"])
    for module in (cla, cla.model):
        params = list(inspect.signature(module.forward).parameters)
        assert params[0] == module.main_input_name == "input_ids" and "inputs_embeds" in params
    x = ids()
    with torch.no_grad():
        by_ids = cla(input_ids=x).logits
        by_embeds = cla(inputs_embeds=cla.get_input_embeddings()(x)).logits
    torch.testing.assert_close(by_embeds, by_ids)
