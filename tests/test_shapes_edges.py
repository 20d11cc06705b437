"""Model shapes at the edges, end to end: the Llama/Mistral config knobs users bring (depth, heads, head_dim,
RoPE variants, windows, biases, dtypes) through the CLA classes, the converter's in-memory tools and the vLLM plugin,
against the stock model where a layout with every layer its own producer must equal it."""

import json
import shutil
import tempfile

import pytest
import torch
from conftest import save_checkpoint, tiny_model
from convert_fixtures import cached_logits
from serving_vllm_fixtures import hf_greedy, run_engines, vllm_python  # noqa: F401  (fixture)
from transformers import AutoModelForCausalLM

from clakit.convert import convert
from clakit.convert.inmemory import cla_model_from
from clakit.convert.kvheads import merge_kv_heads

# vLLM's CPU attention takes head sizes 32, 64, ...: hidden 128 over 4 heads
SERVED = dict(num_hidden_layers=6, hidden_size=128, intermediate_size=256, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=1024)  # fmt: skip


def ids(length: int = 40, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, 300, (batch, length), generator=torch.Generator().manual_seed(seed))


def saved_and_loaded(model, dtype: torch.dtype):
    """`model` in `dtype` as from_pretrained gives it back (inv_freq kept fp32 in a 16-bit model)."""
    with tempfile.TemporaryDirectory() as folder:
        model.to(dtype).save_pretrained(folder)
        return AutoModelForCausalLM.from_pretrained(folder, dtype="auto").eval()


# --- the CLA classes at the edges of the config space -------------------------------------------------------------

# name -> (kind, tiny_model overrides); hidden 48, 4 heads, 2 KV heads, 4 layers unless said
EDGES = {
    "1-layer": ("llama", dict(num_hidden_layers=1)),
    "2-layer": ("mistral", dict(num_hidden_layers=2)),
    "5-layer": ("llama", dict(num_hidden_layers=5)),
    "3-heads-mqa": ("llama", dict(num_attention_heads=3, num_key_value_heads=1)),
    "6-heads-3-kv": ("mistral", dict(num_attention_heads=6, num_key_value_heads=3)),
    "head-dim-256": ("llama", dict(head_dim=256)),
    "head-dim-8": ("mistral", dict(head_dim=8)),
    "5-heads-of-8-mha": ("mistral", dict(num_attention_heads=5, num_key_value_heads=5, head_dim=8)),  # 40 != 48
    "linear-rope": ("llama", dict(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0})),
    "theta-1e9": ("mistral", dict(rope_parameters={"rope_type": "default", "rope_theta": 1e9})),
    "window-4-mlp-bias": ("mistral", dict(sliding_window=4, mlp_bias=True)),
    "biases-eps-pad": ("llama", dict(attention_bias=True, mlp_bias=True, rms_norm_eps=0.5, pad_token_id=311)),
}


@pytest.mark.parametrize("edge", list(EDGES))
@torch.no_grad()
def test_at_each_config_edge_the_own_layout_is_the_stock_model_and_one_producer_decodes_as_its_forward(edge):
    """Every layer its own producer: the stock logits exactly. One producer for every layer (the deepest sharing):
    cached decoding, 33 tokens past a prefill of 7, is its own full forward."""
    kind, overrides = EDGES[edge]
    model, x = tiny_model(kind, **overrides), ids()
    layers = model.config.num_hidden_layers
    torch.testing.assert_close(cla_model_from(model, list(range(layers)))(x).logits, model(x).logits, rtol=0, atol=0)
    shared = cla_model_from(model, [0] * layers)
    assert len(shared.model.layers) == layers
    torch.testing.assert_close(cached_logits(shared, x, prefill=7), shared(x).logits, rtol=1e-4, atol=1e-4)


# --- KV-head merging ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "mistral"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_merging_kv_heads_into_as_many_heads_is_the_model(kind, dtype):
    """merge_kv_heads to the model's own KV-head count merges nothing (mean of one head): the model, bit for bit.
    It built the merged model then `.to(dtype)`, which rounded a bf16 model's fp32 RoPE inv_freq: 0.047 off."""
    model = saved_and_loaded(tiny_model(kind, head_dim=8, num_attention_heads=6, num_key_value_heads=3), dtype)
    merged = merge_kv_heads(model, 3, "mean")
    x = ids()
    torch.testing.assert_close(merged(x).logits, model(x).logits, rtol=0, atol=0)
    assert merged.model.rotary_emb.inv_freq.dtype == model.model.rotary_emb.inv_freq.dtype == torch.float32


# --- serving ------------------------------------------------------------------------------------------------------


def served(python, folders: list, prompts: list[list[int]], max_tokens: int, cwd) -> list[dict]:
    """Each folder in one vLLM process (fp32, the same 64 MiB KV cache): its greedy tokens and KV capacity."""
    engine = {"kv_cache_memory_bytes": 1 << 26, "max_model_len": 512}
    runs = [dict(model=str(f), prompts=prompts, max_tokens=max_tokens, engine=engine) for f in folders]
    results = run_engines(python, runs, cwd)
    assert not [r for r in results if "error" in r], results
    return results


@pytest.mark.slow
def test_vllm_serves_a_cla_llama_whose_config_keeps_a_sliding_window_without_the_window(
    vllm_python,  # noqa: F811
    tokenizer,
    tmp_path,
):
    """A llama_cla config.json carrying `sliding_window` (clakit wrote the source's key before 9a9d236: a llamafied
    Qwen2's) is a Llama, which attends to the whole past in transformers. The plugin's config kept the key and vLLM
    windowed every layer: its capacity fell to 34,918 tokens from 43,648 and its tokens left transformers' after the
    window (8, shorter than the second prompt)."""
    stock = save_checkpoint(tiny_model("llama", **SERVED, sliding_window=8), tokenizer, tmp_path / "stock")
    cla = convert(stock, tmp_path / "cla", kv_source_layers=[0, 0, 2, 2, 4, 4], init="mean", quiet=True)
    keyed = shutil.copytree(cla, tmp_path / "keyed")
    config = json.loads((cla / "config.json").read_text())
    assert config["sliding_window"] is None
    (keyed / "config.json").write_text(json.dumps({**config, "sliding_window": 8}))
    prompts = [tokenizer(t).input_ids for t in ("The king said unto", "He shall hack the system and the user file "
                                                "of the machine, and they said unto him")]  # fmt: skip
    assert len(prompts[1]) > 8
    with_key, without = served(vllm_python, [keyed, cla], prompts, 12, tmp_path)
    assert hf_greedy(keyed, prompts, 12) == hf_greedy(cla, prompts, 12)
    assert with_key["tokens"][0] == hf_greedy(keyed, prompts, 12)
    assert with_key["kv_cache_tokens"] == without["kv_cache_tokens"], (with_key, without)


# name -> (kind, overrides of SERVED, layout): shapes served nowhere else, each against transformers' tokens
SERVED_EDGES = {
    # one producer for every layer: 6x the stock capacity
    "mqa-one-producer": ("llama", dict(num_key_value_heads=1), [0, 0, 0, 0, 0, 0]),
    # Mistral-Nemo style heads x head_dim (128) != hidden (64), a window of 8 shorter than the second prompt
    "nemo-head-dim": ("mistral", dict(hidden_size=64, head_dim=32, sliding_window=8), [0, 1, 0, 1, 4, 4]),
    "2-layer-biases": ("llama", dict(num_hidden_layers=2, attention_bias=True, mlp_bias=True), [0, 0]),
    # 5 heads of 32 over hidden 64, MHA; the last producer (3) shares with two consumers, layer 2 with none
    "5-heads-mha": (
        "mistral",
        dict(hidden_size=64, num_attention_heads=5, num_key_value_heads=5, head_dim=32, sliding_window=8),
        [0, 0, 2, 3, 3, 3],
    ),  # fmt: skip
}


@pytest.mark.slow
def test_vllm_serves_edge_shapes_with_transformers_tokens_and_the_layouts_capacity(
    vllm_python,  # noqa: F811
    tokenizer,
    tmp_path,
):
    """Each shape's CLA checkpoint: vLLM's greedy tokens are transformers', and its KV capacity is the stock
    checkpoint's times layers / producers (within 2%: block rounding, a window's blocks)."""
    prompts = [tokenizer(t).input_ids for t in ("The king said unto", "He shall hack the system and the user file "
                                                "of the machine, and they said unto him")]  # fmt: skip
    folders = []
    for name, (kind, overrides, layout) in SERVED_EDGES.items():
        stock = save_checkpoint(tiny_model(kind, **{**SERVED, **overrides}), tokenizer, tmp_path / name / "stock")
        folders += [convert(stock, tmp_path / name / "cla", kv_source_layers=layout, init="mean", quiet=True), stock]
    results = served(vllm_python, folders, prompts, 12, tmp_path)
    for i, (name, (_, _, layout)) in enumerate(SERVED_EDGES.items()):
        cla, stock = results[2 * i], results[2 * i + 1]
        assert cla["tokens"][0] == hf_greedy(folders[2 * i], prompts, 12), name
        ratio = cla["kv_cache_tokens"] / stock["kv_cache_tokens"]
        assert ratio == pytest.approx(len(layout) / len(set(layout)), rel=0.02), (name, cla, stock)


# --- Mistral's stray bias keys -------------------------------------------------------------------------------------


def test_a_mistral_with_stray_bias_keys_converts_to_a_config_without_them(tokenizer, tmp_path):
    """transformers' Mistral has no attention or MLP biases whatever its config says; the converter dropped a stray
    attention_bias but wrote mlp_bias: true into the mistral_cla config.json, which vLLM's Mistral reads."""
    model = tiny_model("mistral", **SERVED, mlp_bias=True, attention_bias=True)
    stock = save_checkpoint(model, tokenizer, tmp_path / "stock")
    assert json.loads((stock / "config.json").read_text())["mlp_bias"] is True
    cla = convert(stock, tmp_path / "cla", kv_source_layers=[0, 0, 2, 2, 4, 4], init="mean", quiet=True)
    config = json.loads((cla / "config.json").read_text())
    assert "mlp_bias" not in config and "attention_bias" not in config, config


@pytest.mark.slow
def test_vllm_serves_a_mistral_cla_whose_config_has_bias_keys_without_biases(vllm_python, tokenizer, tmp_path):  # noqa: F811
    """A mistral_cla config.json with mlp_bias / attention_bias true (as clakit wrote mlp_bias before, or edited):
    vLLM's Mistral layers built biases the checkpoint lacks and served every greedy token as 0; the plugin's config
    now drops them as transformers' Mistral ignores them."""
    stock = save_checkpoint(tiny_model("mistral", **SERVED), tokenizer, tmp_path / "stock")
    cla = convert(stock, tmp_path / "cla", kv_source_layers=[0, 0, 2, 2, 4, 4], init="mean", quiet=True)
    config = json.loads((cla / "config.json").read_text())
    (cla / "config.json").write_text(json.dumps({**config, "mlp_bias": True, "attention_bias": True}))
    prompts = [tokenizer("He shall hack the system and the user file").input_ids]
    (result,) = served(vllm_python, [cla], prompts, 12, tmp_path)
    assert result["tokens"][0] == hf_greedy(cla, prompts, 12)


# --- configs transformers builds no runnable model of ---------------------------------------------------------------

# case -> (tiny_model overrides, config.json changes, the one line's words)
UNRUNNABLE = {
    # transformers builds the model; its every forward fails (repeat_kv: 4 x (6 // 4) heads for 6 queries)
    "6-heads-over-4-kv": (dict(num_attention_heads=6, num_key_value_heads=4), {},
                          "num_attention_heads 6 is not a multiple of num_key_value_heads 4"),
    # a pad token added to the tokenizer, the embeddings never resized: torch asserts building the embedding
    "pad-id-past-the-vocab": ({}, dict(pad_token_id=320), "pad_token_id 320 is not a token of its 320-token"),
    # no such activation in transformers: a KeyError building the MLP (convert: traceback; eval: "download it again")
    "unknown-activation": ({}, dict(hidden_act="swiglu"), "hidden_act 'swiglu' is no activation transformers has"),
    # NaN logits: convert wrote the model, its held-out perplexity "nan -> nan", exit 0
    "negative-rope-theta": ({}, dict(rope_parameters={"rope_type": "default", "rope_theta": -5.0}),
                            "rope_theta -5.0 (not above 0) makes NaN outputs"),
    "negative-eps": ({}, dict(rms_norm_eps=-1.0), "rms_norm_eps -1.0 (not 0 or more) makes NaN outputs"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(UNRUNNABLE))
@pytest.mark.parametrize("command", ["convert", "eval"])
def test_a_config_no_model_can_run_is_refused_in_one_line(tokenizer, corpus_dir, tmp_path, capsys, command, case):
    """Configs transformers accepts and builds no runnable model of (see UNRUNNABLE): convert wrote a checkpoint or
    ended in a traceback, eval ended in one or blamed the download. Now one line, exit 2, before any work, nothing
    written."""
    from clakit.cli import main

    overrides, changes, words = UNRUNNABLE[case]
    src = save_checkpoint(tiny_model("llama", **overrides), tokenizer, tmp_path / "s")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, **changes}))
    out = tmp_path / "out"
    args = {"convert": ["convert", src, out, "-q", "--eval-data", corpus_dir / "heldout.txt", "--seq-len", "32",
                        "--eval-tokens", "128"],
            "eval": ["eval", src, "-o", out, "--data", corpus_dir / "heldout.txt", "--seq-len", "32", "--no-speed",
                     "-q"]}[command]  # fmt: skip
    capsys.readouterr()  # save_pretrained's progress bar
    assert main([str(a) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and "\n" not in err, err
    assert not out.exists()
