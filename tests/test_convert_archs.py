"""`clakit convert` and the CLA classes across the Llama/Mistral variants users bring, against the stock model:
explicit head_dim, MHA/GQA/MQA, biases, tied embeddings, RoPE scaling, odd depths, 16-bit checkpoints, a Llama
config carrying `sliding_window`, and the same weights given as safetensors, .bin or GGUF (F32/F16/Q8_0)."""

import copy
import json

import numpy as np
import pytest
import torch
from conftest import save_checkpoint, tiny_model
from convert_fixtures import cached_logits, load, run_cli, safetensors_files
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from clakit.cli import main
from clakit.convert import autolayout
from clakit.convert.autolayout import layout_nll
from clakit.convert.inmemory import cla_model_from
from clakit.convert.reconstruct import attention_output
from clakit.sources import load_config, load_model, resolve_source


def ids(length: int = 24, batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, 300, (batch, length), generator=torch.Generator().manual_seed(seed))


def attention_io(model) -> dict[int, tuple]:
    """Hooks recording each layer's attention input and output: layer -> (x, y), (batch, seq, hidden) each."""
    seen = {}

    def recorder(i: int):
        return lambda module, args, kwargs, out: seen.update({i: (kwargs["hidden_states"], out[0])})

    for i, layer in enumerate(model.model.layers):
        layer.self_attn.register_forward_hook(recorder(i), with_kwargs=True)
    return seen


# --- a Llama config carrying sliding_window (llamafied Qwen2 and others) ----------------------------------------


@pytest.mark.parametrize("kind", ["llama", "mistral"])
@torch.no_grad()
def test_reconstructs_attention_is_the_models_with_a_sliding_window_key(kind):
    """Stock Llama attends to the whole past whatever config.sliding_window says; reconstruct's attention applied the
    window to any model whose config had the key, so on a Llama with sliding_window < --seq-len it fitted K/V, q_proj
    and o_proj to an attention the model does not compute (the producer's own weights did not reproduce its output).
    Mistral's window still applies (24 tokens > 8)."""
    model = tiny_model(kind, sliding_window=8)
    seen, attn = attention_io(model), model.model.layers[1].self_attn
    model(ids(24))
    (x, y), cos_sin = seen[1], model.model.rotary_emb(seen[1][0], torch.arange(24)[None])
    params = {"q": attn.q_proj.weight, "k": attn.k_proj.weight, "v": attn.v_proj.weight}
    torch.testing.assert_close(attention_output(model, 1, x, x, params, *cos_sin), y)


def test_attention_window_is_the_sliding_window_of_every_model_but_llama():
    """The one rule for what a config's sliding_window means (reconstruct, load_model and eval's cache figures read
    it): Mistral's and other models' (Qwen2's) are windows, a Llama's key is none."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    from clakit.modeling import LlamaCLAConfig, MistralCLAConfig, attention_window

    assert (
        attention_window(MistralConfig(sliding_window=8)) == attention_window(MistralCLAConfig(sliding_window=8)) == 8
    )
    assert attention_window(MistralConfig(sliding_window=None)) is None
    assert attention_window(Qwen2Config(use_sliding_window=True, sliding_window=8)) == 8
    assert (
        attention_window(LlamaConfig(sliding_window=8)) is attention_window(LlamaCLAConfig(sliding_window=8)) is None
    )
    assert LlamaCLAConfig(sliding_window=8).sliding_window is None  # nor do its caches keep a window


@pytest.mark.parametrize("layout", ["0,1,2,3", "0,0,2,2"])
def test_a_converted_llama_with_a_sliding_window_key_decodes_through_its_cache_as_its_full_forward(
    tokenizer, tmp_path, layout
):
    """The CLA Llama kept config.sliding_window: transformers' caches then held only the last 8 tokens' K/V while
    the full forward (and stock Llama's) attends to all of them, so generate() read another model than the one
    evaluated (logits off by ~3 past the window). Now its caches hold everything; the full forward is unchanged."""
    src = save_checkpoint(tiny_model("llama", sliding_window=8), tokenizer, tmp_path / "src")
    assert run_cli(src, tmp_path / "cla", "--kv-source-layers", layout, "-q") == 0
    cla, stock, x = load(tmp_path / "cla"), load(src), ids(24)
    with torch.no_grad():
        full = cla(x).logits
    torch.testing.assert_close(cached_logits(cla, x, prefill=4), full, rtol=1e-4, atol=1e-4)
    if layout == "0,1,2,3":
        with torch.no_grad():
            torch.testing.assert_close(full, stock(x).logits, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["llama", "mistral"])
@torch.no_grad()
def test_reconstructs_attention_of_consumers_is_the_cla_models(kind):
    """What reconstruct fits (its own attention of a consumer: queries of the layer, K/V of its producer's input) is
    what the CLA model computes, with a window (Mistral's applies, a Llama's key does not), biases, MQA and a
    head_dim other than hidden / heads."""
    model = tiny_model(kind, sliding_window=8, head_dim=16, num_key_value_heads=1, attention_bias=True)
    cla = cla_model_from(model, [0, 0, 2, 0], "mean")
    seen = attention_io(cla)
    cla(ids(24, batch=2))
    cos, sin = cla.model.rotary_emb(seen[0][0], torch.arange(24)[None])
    producer = cla.model.layers[0].self_attn
    for layer in (1, 3):
        attn = cla.model.layers[layer].self_attn
        params = {"q": attn.q_proj.weight, "k": producer.k_proj.weight, "v": producer.v_proj.weight}
        if kind == "llama":  # stock Mistral has no attention biases
            params |= {"q_bias": attn.q_proj.bias, "k_bias": producer.k_proj.bias, "v_bias": producer.v_proj.bias}
        out = attention_output(model, layer, seen[layer][0], seen[0][0], params, cos, sin)
        torch.testing.assert_close(out, seen[layer][1])


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_the_auto_layouts_scores_are_the_cla_models_losses(kind, monkeypatch):
    """--layout auto scores a layout with hooks on the stock model (no copy per candidate); the score is the loss
    of the CLA model of that layout (mean init), for non-adjacent groups, a window, biases, tied embeddings, MQA
    (every target weighed alike here: the weights of the scoring rows' repeats are tested with them)."""
    monkeypatch.setattr(autolayout, "REPEAT_WEIGHT", 1.0)
    model = tiny_model(kind, num_hidden_layers=5, sliding_window=8, head_dim=16, num_key_value_heads=1,
                       attention_bias=True, tie_word_embeddings=True)  # fmt: skip
    x = ids(40, batch=2)
    for layout in ([0, 0, 2, 0, 4], [0, 1, 1, 1, 0]):
        with torch.no_grad():
            loss = cla_model_from(model, layout, "mean")(x, labels=x).loss.item()
        assert layout_nll(model, layout, x) == pytest.approx(loss, abs=1e-5)


# --- variants: the identity layout is the stock model, a sharing layout the in-memory CLA model --------------------

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}  # fmt: skip
YARN_ROPE = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64}
VARIANTS = {
    "head_dim_16": dict(head_dim=16),  # Mistral-Nemo style: heads x head_dim != hidden (48)
    "mha": dict(num_key_value_heads=4),
    "mqa": dict(num_key_value_heads=1),
    "biases_tied": dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=True),
    "llama3_rope": dict(rope_parameters=LLAMA3_ROPE),
    "yarn_rope": dict(rope_parameters=YARN_ROPE),
    "fp16": dict(dtype=torch.float16),
    "bf16": dict(dtype=torch.bfloat16, num_hidden_layers=3),
}


def variant_checkpoint(kind: str, variant: str, tokenizer, folder):
    """A stock checkpoint of `variant` (4 layers unless it says), saved in its dtype over several shards."""
    overrides = dict(VARIANTS[variant])
    dtype = overrides.pop("dtype", torch.float32)
    layers = overrides.pop("num_hidden_layers", 4)
    return save_checkpoint(tiny_model(kind, num_hidden_layers=layers, **overrides).to(dtype), tokenizer, folder)


def written_dtypes(folder) -> set:
    dtypes = set()
    for path in safetensors_files(folder):
        with safe_open(str(path), "pt") as f:
            dtypes |= {f.get_slice(name).get_dtype() for name in f.keys()}
    return dtypes


@pytest.mark.parametrize("kind", ["llama", "mistral"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variants_convert_to_the_stock_model_and_to_the_in_memory_cla_model(tokenizer, tmp_path, kind, variant):
    """Per variant: every layer its own producer reproduces the stock logits exactly; a non-adjacent layout (layer
    2 reads layer 0) is the in-memory CLA model of the same weights, keeps the checkpoint's dtype, and decodes
    through its cache as its full forward (Mistral: 40 tokens past its window of 16)."""
    src = variant_checkpoint(kind, variant, tokenizer, tmp_path / "src")
    layers = json.loads((src / "config.json").read_text())["num_hidden_layers"]
    shared = [0, 1, 0, 3][:layers]
    for name, layout in (("own", range(layers)), ("shared", shared)):
        assert run_cli(src, tmp_path / name, "--kv-source-layers", ",".join(map(str, layout)), "-q") == 0
    stock, x = load(src), ids(40, batch=2)
    with torch.no_grad():
        torch.testing.assert_close(load(tmp_path / "own")(x).logits, stock(x).logits, rtol=0, atol=0)
        native = AutoModelForCausalLM.from_pretrained(src, dtype="auto")  # the group mean rounded to its dtype
        cla, reference = load(tmp_path / "shared"), cla_model_from(native, shared, "mean").float()
        full = cla(x).logits
    torch.testing.assert_close(full, reference(x).logits, rtol=0, atol=0)
    torch.testing.assert_close(cached_logits(cla, x, prefill=7), full, rtol=1e-4, atol=1e-4)
    names = {torch.float16: "F16", torch.bfloat16: "BF16"}
    assert written_dtypes(tmp_path / "shared") == {names.get(VARIANTS[variant].get("dtype"), "F32")}


def test_a_tied_model_saved_with_its_lm_head_alone_converts_as_transformers_loads_it(tokenizer, tmp_path, corpus_dir):
    """safetensors' save_model keeps one name of each shared tensor: a tied model's file holds lm_head.weight and no
    model.embed_tokens.weight, which transformers fills from it. convert refused it ("tensor
    model.embed_tokens.weight is missing from the checkpoint; it is incomplete, re-download it"); it now reads the
    embeddings from their twin: every layer its own producer gives the source's logits, and a data-aware init runs."""
    from safetensors.torch import save_model

    model = tiny_model("llama", tie_word_embeddings=True).eval()
    src = tmp_path / "src"
    model.config.save_pretrained(src)
    tokenizer.save_pretrained(src)
    save_model(model, str(src / "model.safetensors"))
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        assert "model.embed_tokens.weight" not in f.keys() and "lm_head.weight" in f.keys()
    assert run_cli(src, tmp_path / "own", "--kv-source-layers", "0,1,2,3", "-q") == 0
    x = ids(24, batch=2)
    with torch.no_grad():
        torch.testing.assert_close(load(tmp_path / "own")(x).logits, model(x).logits, rtol=0, atol=0)
    calib = ["--calib-data", str(corpus_dir / "calib.txt"), "--calib-tokens", "256", "--seq-len", "32"]
    assert run_cli(src, tmp_path / "fit", "--factor", "2", "--init", "calibrated", *calib, "-q") == 0


@pytest.mark.parametrize("kind", ["llama", "mistral"])
@torch.no_grad()
def test_the_in_memory_cla_model_of_a_16_bit_model_is_the_model(tmp_path, kind):
    """cla_model_from (the converter's in-memory reference, and the benchmarks' CLA model) cast the whole model to the
    source's dtype, RoPE's inv_freq included, which from_pretrained keeps fp32 in a bf16 model: with every layer its
    own producer the logits were 0.03 off the model's."""
    tiny_model(kind).to(torch.bfloat16).save_pretrained(tmp_path)
    model, x = AutoModelForCausalLM.from_pretrained(tmp_path, dtype="auto"), ids(40)
    torch.testing.assert_close(cla_model_from(model, [0, 1, 2, 3])(x).logits, model(x).logits, rtol=0, atol=0)


# --- sources: the same weights as safetensors, sharded safetensors, .bin, sharded .bin and GGUF ---------------------

GGUF_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
              "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}  # fmt: skip


def gguf_permuted(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's row order for q_proj/k_proj (rotary pairs interleaved), as convert_hf_to_gguf.py writes them."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(weight.shape)


def gguf_tensor_name(name: str) -> str:
    """HF name -> llama.cpp's: model.layers.3.self_attn.q_proj.weight -> blk.3.attn_q.weight."""
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}  # fmt: skip
    if name in fixed:
        return fixed[name]
    parts = name.split(".")
    return f"blk.{parts[2]}.{GGUF_NAMES['.'.join(parts[3:-1])]}.{parts[-1]}"


def write_gguf_metadata(writer, config, tokenizer) -> None:
    c = config
    for key, value in [("block_count", c.num_hidden_layers), ("context_length", c.max_position_embeddings),
                       ("embedding_length", c.hidden_size), ("feed_forward_length", c.intermediate_size),
                       ("head_count", c.num_attention_heads), ("head_count_kv", c.num_key_value_heads),
                       ("rope_dimension_count", c.head_dim), ("layer_norm_rms_eps", c.rms_norm_eps),
                       ("rope_freq_base", c.rope_parameters["rope_theta"]), ("vocab_size", c.vocab_size)]:  # fmt: skip
        getattr(writer, f"add_{key}")(value)
    tokens = sorted(tokenizer.get_vocab(), key=tokenizer.get_vocab().get)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * len(tokens))
    writer.add_token_merges([" ".join(m) for m in json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)


def write_gguf(model, tokenizer, path, qtype, name: str = "tiny", extra=None):
    """`model` as llama.cpp writes a Llama: its names, Q/K rows permuted, 2-D weights in `qtype` (F32, F16, Q8_0);
    `extra(writer)` adds more metadata or tensors."""
    import gguf

    writer, c = gguf.GGUFWriter(str(path), "llama"), model.config
    writer.add_name(name)
    write_gguf_metadata(writer, c, tokenizer)
    if extra is not None:
        extra(writer)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        array = tensor.float().numpy()
        if ".q_proj." in name or ".k_proj." in name:
            array = gguf_permuted(array, c.num_attention_heads if ".q_proj." in name else c.num_key_value_heads)
        if array.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(gguf_tensor_name(name), array)
        else:
            data = gguf.quants.quantize(array, qtype)
            writer.add_tensor(gguf_tensor_name(name), data, raw_shape=data.shape, raw_dtype=qtype)
    for step in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file):
        step()
    writer.close()
    return path


def source_model(**overrides):
    """A 4-layer Llama of hidden 64 (Q8_0 blocks are 32 values wide: 48 would not quantise)."""
    return tiny_model("llama", hidden_size=64, intermediate_size=96, **overrides)


def pickle_checkpoint(model, tokenizer, folder, shards: int):
    """`pytorch_model.bin` (shards 1) or `pytorch_model-0000i-of-0000n.bin` with their index, plus config/tokenizer."""
    model.config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if shards == 1:
        torch.save(state, folder / "pytorch_model.bin")
        return folder
    names, weight_map = list(state), {}
    for i in range(shards):
        file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        torch.save({n: state[n] for n in names[i::shards]}, folder / file)
        weight_map |= dict.fromkeys(names[i::shards], file)
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def weights_of(folder) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in safetensors_files(folder)}


def test_the_same_weights_from_every_source_convert_to_the_same_bytes(tokenizer, tmp_path):
    """Sharded safetensors, one model.safetensors, pytorch_model.bin, sharded .bin (--allow-pickle) and an F32 GGUF
    of one tied-embedding MQA Llama: the converted safetensors are byte-identical (the GGUF's Q/K rows un-permuted)."""
    import gguf

    model = source_model(num_key_value_heads=1, tie_word_embeddings=True)
    sources = {
        "sharded": save_checkpoint(model, tokenizer, tmp_path / "sharded", max_shard_size="60KB"),
        "single": save_checkpoint(model, tokenizer, tmp_path / "single", max_shard_size="1GB"),
        "bin": pickle_checkpoint(model, tokenizer, tmp_path / "bin", shards=1),
        "bin_sharded": pickle_checkpoint(model, tokenizer, tmp_path / "bin_sharded", shards=3),
        "gguf": write_gguf(model, tokenizer, tmp_path / "m.gguf", gguf.GGMLQuantizationType.F32),
    }
    assert len(safetensors_files(sources["sharded"])) > 1
    written = {}
    for name, src in sources.items():
        assert run_cli(src, tmp_path / f"out_{name}", "--factor", "2", "--allow-pickle", "-q") == 0
        written[name] = weights_of(tmp_path / f"out_{name}")
    assert all(files == written["sharded"] for files in written.values())


@pytest.mark.parametrize("qtype", ["F16", "Q8_0"])
def test_a_quantised_gguf_converts_as_its_dequantised_weights(tokenizer, tmp_path, qtype):
    """An F16/Q8_0 GGUF is dequantised whole: its conversion is that of a checkpoint of the dequantised weights."""
    import gguf

    model = source_model(head_dim=32)  # 4 heads x 32 != hidden 64, as Mistral-Nemo's
    path = write_gguf(model, tokenizer, tmp_path / "m.gguf", gguf.GGMLQuantizationType[qtype])
    dequantised = load_model(resolve_source(str(path)), torch.float32).state_dict()
    assert not torch.equal(dequantised["model.layers.0.mlp.up_proj.weight"], model.model.layers[0].mlp.up_proj.weight)
    model.load_state_dict(dequantised)
    folder = save_checkpoint(model, tokenizer, tmp_path / "dequantised")
    for name, src in (("gguf", path), ("safetensors", folder)):
        assert run_cli(src, tmp_path / name, "--kv-source-layers", "0,0,2,0", "-q") == 0
    assert weights_of(tmp_path / "gguf") == weights_of(tmp_path / "safetensors")


def test_a_gguf_too_big_for_memory_is_refused_before_it_is_read(tokenizer, tmp_path, capsys, monkeypatch):
    """A GGUF is dequantised whole to fp32 on the host: priced from its shapes and refused in one line when memory
    (MemAvailable) cannot hold it, before its sha256 pass and the load (minutes at 70B, then an OOM kill)."""
    import gguf

    from clakit.convert import pipeline

    path = write_gguf(source_model(), tokenizer, tmp_path / "m.gguf", gguf.GGMLQuantizationType.F32)
    need = sum(p.numel() * 4 for p in source_model().parameters())
    largest = max(p.numel() * 4 for p in source_model().parameters())
    read = []
    monkeypatch.setattr(pipeline, "file_sha256", lambda p: read.append(p) or "0" * 64)
    # the fp32 weights fit, but not with the load's peak above them (the largest tensor dequantised, twice)
    for free in (need // 2, need + largest):
        monkeypatch.setattr(pipeline, "_free_memory", lambda device, free=free: free)
        assert main(["convert", str(path), str(tmp_path / "out"), "-q"]) == 2
        err = capsys.readouterr().err
        assert "is read whole and dequantised to float32" in err and len(err.strip().splitlines()) == 1, err
        assert not read and not (tmp_path / "out").exists()
    monkeypatch.setattr(pipeline, "_free_memory", lambda device: need * 2)  # enough: converted as before
    assert main(["convert", str(path), str(tmp_path / "out"), "-q"]) == 0


def test_a_gguf_source_fits_in_bfloat16_as_its_safetensors_copy(tokenizer, corpus_dir, tmp_path, monkeypatch):
    """GGUF sources are held whole and were cast whole to the fits' dtype, RoPE's tables included; the same weights
    read layer by layer keep them fp32. With --dtype bfloat16 (a GPU's; let through on the CPU here) the fitted,
    reconstructed and distilled tensors then differed (by 0.014 on this model); now they are the same bytes."""
    import gguf

    from clakit.convert import pipeline

    monkeypatch.setattr(pipeline, "resolve_device", lambda device, dtype: torch.device("cpu"))
    model = source_model()
    sources = {"gguf": write_gguf(model, tokenizer, tmp_path / "m.gguf", gguf.GGMLQuantizationType.F32),
               "safetensors": save_checkpoint(model, tokenizer, tmp_path / "st")}  # fmt: skip
    args = ["--calib-data", corpus_dir / "calib.txt", "--calib-tokens", "128", "--seq-len", "64", "--dtype",
            "bfloat16", "--kv-source-layers", "0,0,2,2", "--reconstruct-steps", "2", "--distill-steps", "1",
            "--distill-tokens", "128", "-q"]  # fmt: skip
    for name, src in sources.items():
        assert run_cli(src, tmp_path / name, *args) == 0
    assert weights_of(tmp_path / "gguf") == weights_of(tmp_path / "safetensors")


def test_a_llama_gguf_named_mistral_is_refused_as_unreadable_not_as_damaged(tokenizer, tmp_path, capsys):
    """transformers reads a llama GGUF whose general.name is "mistral" as a Mistral and cannot map its tensors
    (NotImplementedError); the refusal said "check that its files are complete (download it again)"."""
    import gguf

    path = write_gguf(source_model(), tokenizer, tmp_path / "m.gguf", gguf.GGMLQuantizationType.F32, name="mistral")
    assert run_cli(path, tmp_path / "out", "-q") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "declares general.name mistral under llama, which transformers' GGUF reader" in err
    assert "download it again" not in err and not (tmp_path / "out").exists()


def linear_rope(writer) -> None:
    writer.add_rope_scaling_type(gguf_module().RopeScalingType.LINEAR)
    writer.add_rope_scaling_factor(4.0)


def llama3_rope(writer) -> None:  # llama.cpp's per-frequency factors for head_dim 16: 8 of them
    writer.add_tensor("rope_freqs.weight", np.linspace(1.0, 8.0, 8, dtype=np.float32))


def gguf_module():
    import gguf

    return gguf


def test_a_gguf_that_declares_no_rope_scaling_is_read(tokenizer, tmp_path):
    """`llama.rope.scaling.type none` (as llama.cpp may write for a plain-RoPE model) is plain RoPE: read as such."""
    gguf = gguf_module()

    def no_scaling(writer):
        writer.add_rope_scaling_type(gguf.RopeScalingType.NONE)

    path = write_gguf(source_model(), tokenizer, tmp_path / "m.gguf", gguf.GGMLQuantizationType.F32, extra=no_scaling)
    assert load_config(resolve_source(str(path))).rope_parameters["rope_type"] == "default"


@pytest.mark.parametrize("scaling", [linear_rope, llama3_rope], ids=["linear", "llama3"])
@pytest.mark.parametrize("command", ["convert", "eval"])
def test_a_gguf_whose_rope_scaling_transformers_drops_is_refused(tokenizer, corpus_dir, tmp_path, capsys, scaling,
                                                                  command):  # fmt: skip
    """llama.cpp writes a Llama's linear/yarn RoPE scaling as `llama.rope.scaling.*` and Llama 3.1+'s llama3 scaling
    as a `rope_freqs.weight` tensor; transformers' GGUF reader reads neither, so a Llama 3.2 GGUF was converted (or
    evaluated) with plain RoPE: another model than the one released, its RoPE written into the CLA config."""
    gguf = gguf_module()
    path = write_gguf(source_model(), tokenizer, tmp_path / "m.gguf", gguf.GGMLQuantizationType.F32, extra=scaling)
    out = tmp_path / "out"
    args = [path, out, "-q"] if command == "convert" else [path, "-o", out, "--data", corpus_dir / "heldout.txt"]
    assert main([command, *map(str, args)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "uses RoPE scaling" in err and "ignores" in err and not out.exists()


@pytest.mark.parametrize("command", ["convert", "eval"])
def test_a_gguf_holding_more_blocks_than_its_block_count_is_refused(tokenizer, corpus_dir, tmp_path, capsys, command):
    """transformers' GGUF reader builds `llama.block_count` layers and drops the tensors of later blocks without a
    word: a 4-block file saying 2 was converted (and evaluated) as a 2-layer model, exit 0."""
    gguf = gguf_module()
    model = source_model()
    assert model.config.num_hidden_layers == 4
    model.config.num_hidden_layers = 2  # the metadata says 2; the tensors written are all 4 layers'
    path = write_gguf(model, tokenizer, tmp_path / "m.gguf", gguf.GGMLQuantizationType.F32)
    out = tmp_path / "out"
    args = [path, out, "-q"] if command == "convert" else [path, "-o", out, "--data", corpus_dir / "heldout.txt"]
    assert main([command, *map(str, args)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds tensors of blocks blk.0-blk.3 but its llama.block_count is 2" in err
    assert not out.exists()


def test_a_gguf_whose_metadata_does_not_match_its_tensors_names_the_file_not_config_json(tokenizer, corpus_dir,
                                                                                        tmp_path, capsys):  # fmt: skip
    """A GGUF has no config.json to restore: its refusals said "restore the checkpoint's config.json"."""
    gguf = gguf_module()
    model = source_model()
    model.config.num_key_value_heads = 1  # the metadata says 1 KV head; k_proj/v_proj hold the model's 2
    path = write_gguf(model, tokenizer, tmp_path / "m.gguf", gguf.GGMLQuantizationType.F32)
    argv = ["eval", str(path), "-o", str(tmp_path / "r.json"), "--data", str(corpus_dir / "heldout.txt"), "-q"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "GGUF metadata does not match the weights" in err, err
    assert "config.json" not in err and err.strip().endswith("download it again, or export it again"), err


@pytest.mark.parametrize("problem", ["disk", "float16"])
def test_a_gguf_source_is_refused_before_the_model_runs(tokenizer, corpus_dir, tmp_path, capsys, monkeypatch,
                                                         problem):  # fmt: skip
    """A folder's output size and float16 range were checked before any work, a GGUF's only before the fits (after
    the dequantisation, the held-out evaluation and the whole layout search: 357 s on SmolLM2) or when writing (the
    float16 range, after the fits). Now the size is read from the stock model's shapes before the GGUF is read, the
    range once it is dequantised, before the model runs."""
    import clakit.convert.autolayout
    import clakit.convert.pipeline
    import clakit.outputs

    def no_run(*args, **kwargs):
        raise AssertionError("the model ran before the refusal")

    gguf = gguf_module()
    model = source_model()
    if problem == "float16":
        with torch.no_grad():
            model.model.layers[3].mlp.down_proj.weight[0, 0] = 1e5
    path = write_gguf(model, tokenizer, tmp_path / "m.gguf", gguf.GGMLQuantizationType.F32)
    monkeypatch.setattr(clakit.convert.pipeline._Conversion, "_perplexity", no_run)
    monkeypatch.setattr(clakit.convert.autolayout, "auto_layout", no_run)
    loads = []
    if problem == "disk":
        monkeypatch.setattr(clakit.outputs.shutil, "disk_usage", lambda path: type("U", (), {"free": 1000})())
        real = clakit.convert.pipeline._load_source_model
        monkeypatch.setattr(clakit.convert.pipeline, "_load_source_model", lambda *a: loads.append(a) or real(*a))
    calib = ["--calib-data", str(corpus_dir / "calib.txt"), "--calib-tokens", "256", "--seq-len", "64"]
    out = tmp_path / "out"
    args = [str(path), str(out), *calib, "--eval-data", str(corpus_dir / "heldout.txt"), "--output-dtype", "float16"]
    assert main(["convert", *args, "-q"]) == 2
    err = capsys.readouterr().err
    expected = {"disk": "not enough disk space", "float16": "beyond float16's range"}[problem]
    assert err.count("\n") == 1 and expected in err, err
    assert not out.exists() and loads == []  # the disk refused before the GGUF was read (dequantised) at all


@pytest.mark.parametrize("kind", ["llama", "mistral"])
@pytest.mark.parametrize("cache", [None, "static"])
def test_greedy_generate_of_a_converted_model_is_its_full_forward_argmax(tokenizer, tmp_path, kind, cache):
    """generate() (dynamic or static cache) of a conversion with a non-adjacent layout: every step's logits are the
    no-cache forward's over the generated sequence and every token their argmax, past Mistral's window of 16."""
    src = save_checkpoint(tiny_model(kind, num_hidden_layers=5, head_dim=16), tokenizer, tmp_path / "src")
    assert run_cli(src, tmp_path / "cla", "--kv-source-layers", "0,1,0,1,4", "-q") == 0
    model, prompt = load(tmp_path / "cla"), ids(12, batch=2)
    with torch.no_grad():
        settings = dict(do_sample=False, cache_implementation=cache, pad_token_id=0, eos_token_id=None)
        out = model.generate(prompt, max_new_tokens=14, output_logits=True, return_dict_in_generate=True, **settings)
        full = model(out.sequences, use_cache=False).logits[:, prompt.shape[1] - 1 : -1]  # (2, 14, vocab)
    torch.testing.assert_close(torch.stack(out.logits, 1), full, rtol=1e-4, atol=1e-4)
    assert torch.equal(out.sequences[:, prompt.shape[1] :], full.argmax(-1))


def test_named_chat_templates_travel_with_the_conversion(tokenizer, tmp_path):
    """transformers saves chat templates beyond the default as additional_chat_templates/NAME.jinja; the converter
    copied only chat_template.jinja, so a converted instruct model lost its tool_use (or rag) template. An overwrite
    of that output is still an overwrite of clakit's own folder."""
    from transformers import AutoTokenizer

    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = {
        "default": "{{ messages[0]['content'] }}",
        "tool_use": "TOOLS {{ messages[0]['content'] }}",
    }
    src = save_checkpoint(tiny_model("llama"), tokenizer, tmp_path / "src")
    assert (src / "additional_chat_templates" / "tool_use.jinja").is_file()
    for _ in range(2):
        assert run_cli(src, tmp_path / "out", "--factor", "2", "--overwrite", "-q") == 0
    assert AutoTokenizer.from_pretrained(tmp_path / "out").chat_template == tokenizer.chat_template


def test_a_tokenizer_shipped_as_code_travels_with_the_conversion(tokenizer, tmp_path):
    """A source whose tokenizer_config.json's auto_map names its own tokenizer module: the converter copied the
    auto_map but not the module, so AutoTokenizer(OUT, trust_remote_code=True) failed (no tok_x.py). The module and
    what it imports relatively travel; the CLA modeling files are never replaced by a source's file of that name."""
    from transformers import AutoTokenizer

    src = save_checkpoint(tiny_model("llama"), tokenizer, tmp_path / "src")
    (src / "tok_base.py").write_text("from transformers import PreTrainedTokenizerFast\n\nMARK = 7\n")
    (src / "tok_x.py").write_text(
        "from .tok_base import MARK, PreTrainedTokenizerFast\n\n\nclass XTok(PreTrainedTokenizerFast):\n"
        "    mark = MARK\n"
    )
    (src / "modeling_cla.py").write_text("raise RuntimeError('not the CLA modeling code')\n")
    config = json.loads((src / "tokenizer_config.json").read_text())
    config |= {"auto_map": {"AutoTokenizer": [None, "tok_x.XTok"]}, "tokenizer_class": "XTok"}
    (src / "tokenizer_config.json").write_text(json.dumps(config))
    assert run_cli(src, tmp_path / "out", "--factor", "2", "-q") == 0
    loaded = AutoTokenizer.from_pretrained(tmp_path / "out", trust_remote_code=True)
    assert type(loaded).__name__ == "XTok" and loaded.mark == 7
    assert loaded("the king said")["input_ids"] == tokenizer("the king said")["input_ids"]
    assert "not the CLA" not in (tmp_path / "out" / "modeling_cla.py").read_text()
    load(tmp_path / "out")  # the CLA model still loads through its own code


@pytest.mark.parametrize(("layers", "saving"), [(7, 0.3), (7, 0.8), (3, 0.34)])
def test_auto_layout_at_odd_savings_writes_the_cla_model_of_the_layout_it_records(
    tokenizer, corpus_dir, tmp_path, layers, saving
):
    """--layout auto at savings no uniform layout hits, on odd depths: the fewest producers that save at least the
    saving asked, a valid (possibly non-adjacent) layout, and the written model is that layout's CLA model."""
    from clakit.convert.autolayout import producers_for

    src = save_checkpoint(tiny_model("mistral", num_hidden_layers=layers, head_dim=16), tokenizer, tmp_path / "src")
    args = ["--calib-data", corpus_dir / "calib.txt", "--calib-tokens", "64", "--seq-len", "32", "--init", "mean"]
    assert run_cli(src, tmp_path / "cla", "--kv-saving", saving, *args, "-q") == 0
    settings = json.loads((tmp_path / "cla" / "clakit_convert.json").read_text())["settings"]
    layout = settings["kv_source_layers"]
    assert settings["layout"] == "auto" and len(set(layout)) == producers_for(layers, saving)
    assert settings["kv_saving"] >= saving and all(layout[source] == source <= i for i, source in enumerate(layout))
    with torch.no_grad():
        x = ids(40)
        torch.testing.assert_close(load(tmp_path / "cla")(x).logits, cla_model_from(load(src), layout)(x).logits)


def write_moe_gguf(tokenizer, path, experts: int = 2):
    """A Mixtral-style llama GGUF (as older llama.cpp wrote Mixtral): expert_count, a router and stacked experts."""
    gguf, model = gguf_module(), source_model(num_hidden_layers=2)
    writer = gguf.GGUFWriter(str(path), "llama")
    write_gguf_metadata(writer, model.config, tokenizer)
    writer.add_expert_count(experts)
    writer.add_expert_used_count(1)
    for name, tensor in model.state_dict().items():
        array, target = tensor.float().numpy(), gguf_tensor_name(name)
        if ".mlp." in name:  # blk.N.ffn_up.weight -> blk.N.ffn_up_exps.weight, one copy per expert
            array, target = np.stack([array] * experts), target.replace(".weight", "_exps.weight")
        elif ".q_proj." in name or ".k_proj." in name:
            array = gguf_permuted(array, 4 if ".q_proj." in name else 2)
        writer.add_tensor(target, array)
    for layer in range(2):
        writer.add_tensor(f"blk.{layer}.ffn_gate_inp.weight", np.zeros((experts, 64), np.float32))
    for step in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file):
        step()
    writer.close()
    return path


def test_a_mixtral_gguf_is_named_as_one_not_as_a_config_to_restore(tokenizer, tmp_path, capsys):
    """transformers reads a llama GGUF with experts as a dense Llama whose MLPs are missing; the refusal said to
    'restore the config.json written with these weights' (a GGUF has none). Now it names the experts."""
    path = write_moe_gguf(tokenizer, tmp_path / "moe.gguf")
    assert run_cli(path, tmp_path / "out", "-q") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "mixture of experts (llama.expert_count 2" in err and "config.json" not in err


def test_a_layout_that_shares_nothing_writes_the_sources_tensors_without_distilling(tokenizer, corpus_dir, tmp_path):
    """With every layer its own producer nothing is fitted, but the default end-to-end distillation still trained
    every attention projection (KL to the source 9.4e-7 -> 1.2e-3) while docs/convert.md says the source's tensors
    are written. It is now skipped, said, and recorded as 0 steps."""
    model = source_model()
    src = save_checkpoint(model, tokenizer, tmp_path / "src")
    args = ["--calib-data", corpus_dir / "calib.txt", "--calib-tokens", "128", "--seq-len", "64",
            "--kv-source-layers", "0,1,2,3", "--init", "reconstruct", "--reconstruct-steps", "2",
            "--distill-tokens", "128"]  # fmt: skip
    assert run_cli(src, tmp_path / "out", *args, "-q") == 0
    written = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True).state_dict()
    source = model.state_dict()
    assert all(torch.equal(written[name], source[name]) for name in source if "rotary" not in name)
    record = json.loads((tmp_path / "out" / "clakit_convert.json").read_text())
    assert record["settings"]["distill_steps"] == 0
    assert record["distill"] == {"steps": 0, "skipped": "no layer shares K/V in this layout"}  # why, not null
    card = (tmp_path / "out" / "README.md").read_text()
    assert "none (the default was skipped: no layer shares K/V in this layout)" in card


def test_a_gguf_too_big_for_the_gpu_is_refused_before_it_is_read(tokenizer, tmp_path, capsys, monkeypatch):
    """A GGUF source is copied whole to --device for the fits: host memory was checked, the GPU's not, and a CUDA
    out-of-memory after the sha256 pass and the dequantisation was a traceback (helper P, simulated). The copy is
    priced in the fits' dtype against the device's free memory (no GPU here: the device and its count are faked,
    and the refusal comes before anything touches CUDA)."""
    import gguf

    from clakit import outputs
    from clakit.convert import pipeline

    path = write_gguf(source_model(), tokenizer, tmp_path / "m.gguf", gguf.GGMLQuantizationType.F32)
    need = sum(p.numel() * 4 for p in source_model().parameters())
    monkeypatch.setattr(pipeline, "resolve_device", lambda device, dtype: torch.device("cuda", 0))
    monkeypatch.setattr(pipeline, "_free_memory", lambda device: need // 2 if device.type == "cuda" else need * 4)
    read = []
    monkeypatch.setattr(pipeline, "file_sha256", lambda p: read.append(p) or "0" * 64)
    assert main(["convert", str(path), str(tmp_path / "out"), "--init", "mean", "-q"]) == 2
    err = capsys.readouterr().err
    assert f"is read whole (GGUF) and copied whole to cuda:0 in float32 (~{outputs.size_text(need)})" in err, err
    assert "use --device cpu" in err and len(err.strip().splitlines()) == 1 and not read
    assert not (tmp_path / "out").exists()


def test_a_gguf_model_loads_with_one_read_of_its_config(tokenizer, tmp_path, monkeypatch):
    """transformers parses the whole GGUF header for a config: load_config, the size check and from_pretrained each
    asked (one 60 s load of the demo GGUF spent ~20 s on it). One read per version of the file now; the weights
    are the file's."""
    import gguf
    from transformers import PretrainedConfig

    model = source_model()
    path = write_gguf(model, tokenizer, tmp_path / "m.gguf", gguf.GGMLQuantizationType.F32)
    reads = []
    real = PretrainedConfig.get_config_dict.__func__
    monkeypatch.setattr(PretrainedConfig, "get_config_dict",
                        classmethod(lambda cls, *a, **k: reads.append(k.get("gguf_file")) or real(cls, *a, **k)))
    source = resolve_source(str(path))
    assert load_config(source).num_hidden_layers == model.config.num_hidden_layers
    loaded = load_model(source, torch.float32)
    assert reads == ["m.gguf"]
    assert torch.equal(loaded.model.layers[1].mlp.up_proj.weight, model.model.layers[1].mlp.up_proj.weight)
