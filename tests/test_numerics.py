"""Numerics and precision end to end: fp32, bf16 and fp16 sources, the dtypes written, the rounding done on the way.

The sources are tiny Llama/Mistral models with a few residual outlier channels (~350, as real LLMs carry), saved in
bf16 or fp16. References are exact where the arithmetic is (a mean of two 16-bit values is exact in fp32), else
float64.
"""

import json
from pathlib import Path

import pytest
import torch
from conftest import make_text, save_checkpoint, tiny_model
from convert_fixtures import TOKENS
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from clakit.cli import main
from clakit.convert import convert

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
OUTLIERS = (3, 17)  # residual channels carried at ~350 through every layer


def outlier_model(kind: str, dtype: torch.dtype, scale: float = 350.0):
    """A stock tiny model whose embeddings put `scale` into a few channels; the norms give those channels small
    weights, as trained LLMs do, so the layers still see ordinary inputs."""
    model = tiny_model(kind)
    with torch.no_grad():
        for ch in OUTLIERS:
            model.model.embed_tokens.weight[:, ch] *= scale / model.model.embed_tokens.weight[:, ch].abs().max()
            for layer in model.model.layers:
                layer.input_layernorm.weight[ch] = layer.post_attention_layernorm.weight[ch] = 0.01
            model.model.norm.weight[ch] = 0.01
    return model.to(dtype)


@pytest.fixture(scope="module", params=[(k, d) for k in ("llama", "mistral") for d in DTYPES], ids="-".join)
def source(request, tokenizer, tmp_path_factory) -> Path:
    kind, dtype = request.param
    folder = tmp_path_factory.mktemp(f"{kind}_{dtype}")
    return save_checkpoint(outlier_model(kind, DTYPES[dtype]), tokenizer, folder)


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            out.update({name: f.get_tensor(name) for name in f.keys()})
    return out


def config_dtype(folder: Path) -> str:
    return json.loads((folder / "config.json").read_text())["dtype"]


# --- the written tensors ------------------------------------------------------------------------------------------


def test_unchanged_tensors_are_the_sources_bit_for_bit_and_the_dtype_is_kept(source, tmp_path):
    """CLA2 by mean: every tensor but the producers' K/V is the source's own bytes (no fp32 round trip), and the
    written K/V are the fp32 mean of the group's 16-bit values rounded once."""
    src, out = tensors(source), tensors(convert(source, tmp_path / "cla", factor=2, init="mean", quiet=True))
    dtype = src["model.embed_tokens.weight"].dtype
    assert {t.dtype for t in out.values()} == {dtype} and config_dtype(tmp_path / "cla") == str(dtype)[6:]
    for name, tensor in out.items():
        if ".k_proj." in name or ".v_proj." in name:
            layer = int(name.split(".")[2])
            other = name.replace(f"layers.{layer}.", f"layers.{layer + 1}.")
            assert torch.equal(tensor, ((src[name].float() + src[other].float()) / 2).to(dtype)), name
        else:
            assert torch.equal(tensor, src[name]), name


def test_the_identity_layout_is_the_stock_model_bit_for_bit(source, tmp_path):
    """Every layer its own producer: the stock model, loaded both in the checkpoint's dtype ("auto")."""
    out = convert(source, tmp_path / "cla", kv_source_layers=[0, 1, 2, 3], init="mean", quiet=True)
    stock, cla = (AutoModelForCausalLM.from_pretrained(f).eval() for f in (source, out))
    assert cla.dtype == stock.dtype != torch.float32
    with torch.no_grad():
        assert torch.equal(cla(TOKENS).logits, stock(TOKENS).logits)


def _exact_in(tensor: torch.Tensor, dtype: torch.dtype) -> float:
    """Share of `tensor`'s values that `dtype` holds exactly (a 16-bit rounding leaves 1.0)."""
    return (tensor.to(dtype).to(tensor.dtype) == tensor).float().mean().item()


@pytest.mark.parametrize("init", ["mean", "calibrated"])
def test_a_float32_output_of_a_16_bit_source_is_rounded_once(source, corpus_dir, tmp_path, init):
    """--output-dtype float32 from a bf16/fp16 source: the merged or fitted K/V (computed in fp32/fp64) were first
    rounded to the source's dtype, then widened: a float32 file holding 16-bit values. Before the fix every value
    of the fitted k_proj was bf16/fp16-exact (share 1.0), and the mean was off the fp32 mean by up to half an ulp."""
    calib = {"calib_data": [str(corpus_dir / "calib.txt")], "calib_tokens": 512, "seq_len": 64, "distill_steps": 0}
    args = calib if init != "mean" else {}
    src = tensors(source)
    out = tensors(convert(source, tmp_path / "cla", factor=2, init=init, output_dtype="float32", quiet=True, **args))
    source_dtype, name = src["model.embed_tokens.weight"].dtype, "model.layers.0.self_attn.k_proj.weight"
    assert {t.dtype for t in out.values()} == {torch.float32}
    if init == "mean":  # exact: the mean of two 16-bit values fits fp32's mantissa
        other = name.replace("layers.0.", "layers.1.")
        assert torch.equal(out[name], (src[name].float() + src[other].float()) / 2)
    else:  # a fitted fp32 value is 16-bit exact with probability ~2^-13 (fp16) or 2^-16 (bf16)
        assert _exact_in(out[name], source_dtype) < 0.05
    q_proj = "model.layers.0.self_attn.q_proj.weight"  # not fitted: the source's values, widened
    assert torch.equal(out[q_proj], src[q_proj].float())


@pytest.mark.parametrize("init", ["mean", "calibrated"])  # calibrated: the fits' fp32 skeletons ran on the config
def test_the_converted_config_loads_in_the_dtype_the_source_loads_in(tokenizer, corpus_dir, tmp_path, init):
    """A config naming bfloat16 over fp32 tensors (a hand-made or re-saved export): from_pretrained's "auto" loads
    the source in bf16. Its identity-layout conversion wrote config.json's dtype from the tensors, float32, and
    loaded in fp32: other logits than the stock model's, twice the memory. The record still names the tensors."""
    src = save_checkpoint(tiny_model("llama"), tokenizer, tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))
    calib = {"calib_data": [str(corpus_dir / "calib.txt")], "calib_tokens": 512, "seq_len": 64}
    args = calib if init != "mean" else {}
    out = convert(src, tmp_path / "cla", kv_source_layers=[0, 1, 2, 3], init=init, quiet=True, **args)
    stock, cla = (AutoModelForCausalLM.from_pretrained(f).eval() for f in (src, out))
    assert (stock.dtype, cla.dtype) == (torch.bfloat16, torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(cla(TOKENS).logits, stock(TOKENS).logits)
    assert {t.dtype for t in tensors(out).values()} == {torch.float32}
    assert json.loads((out / "clakit_convert.json").read_text())["settings"]["dtype"] == "float32"


def test_the_record_says_how_many_threads_ran_the_fits(tiny_llama_checkpoint, corpus_dir, tmp_path):
    """The fits' sums split over torch's threads: the same conversion on 1 and 2 threads wrote tensors up to one
    bf16 ulp apart (12 of 35 tensors of a hidden-512 model), and clakit_convert.json did not say how many ran
    (`clakit eval`'s report does: provenance.torch_threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        args = {"calib_data": [str(corpus_dir / "calib.txt")], "calib_tokens": 256, "seq_len": 64, "distill_steps": 0}
        out = convert(tiny_llama_checkpoint, tmp_path / "cla", factor=2, init="calibrated", quiet=True, **args)
    finally:
        torch.set_num_threads(threads)
    assert json.loads((out / "clakit_convert.json").read_text())["provenance"]["torch_threads"] == 1


# --- evaluation in a narrower dtype -------------------------------------------------------------------------------


def test_eval_in_float16_of_weights_beyond_its_range_is_refused_naming_the_dtype(tokenizer, tmp_path, capsys):
    """A bf16 checkpoint with one weight of 1e5 scored with --dtype float16: the cast made it inf, every logit NaN,
    and the eval said "its weights hold NaN/inf or absurd values (a diverged training run, or a damaged
    checkpoint)" of a healthy checkpoint. Now one line naming the tensor, float16's range and the dtypes to use;
    bfloat16 scores it."""
    model = outlier_model("llama", torch.float32)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = 1e5
    src = save_checkpoint(model.to(torch.bfloat16), tokenizer, tmp_path / "src")
    (tmp_path / "text.txt").write_text(make_text(1500, 3))
    common = ["--data", str(tmp_path / "text.txt"), "--seq-len", "64", "--max-tokens", "256", "-q"]
    capsys.readouterr()  # save_pretrained's progress bar
    assert main(["eval", str(src), "-o", str(tmp_path / "fp16.json"), *common, "--dtype", "float16"]) == 2
    err = capsys.readouterr().err.strip()
    assert "model.layers.0.mlp.up_proj.weight" in err and "float16's range (65504)" in err, err
    assert "--dtype bfloat16" in err and len(err.splitlines()) == 1 and not (tmp_path / "fp16.json").exists()
    assert main(["eval", str(src), "-o", str(tmp_path / "bf16.json"), *common, "--dtype", "bfloat16"]) == 0


def test_eval_in_float16_whose_activations_overflow_names_float16_not_the_checkpoint(tokenizer, tmp_path, capsys):
    """Weights within float16's range whose activations pass 65504 (an embedding channel of 60,000 and an o_proj row
    of 2,000 feeding it, as outlier channels of real models grow): the float16 forward gave NaN logits and the eval
    said "its weights hold NaN/inf or absurd values (a diverged training run, or a damaged checkpoint)" of a model
    bfloat16 scores (helper D, round 7). The line now names float16 and the dtypes to use."""
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 3] = 60000.0
        model.model.layers[0].self_attn.o_proj.weight[3, :] = 2000.0
    src = save_checkpoint(model.to(torch.bfloat16), tokenizer, tmp_path / "src")
    (tmp_path / "text.txt").write_text(make_text(1500, 3))
    common = ["--data", str(tmp_path / "text.txt"), "--seq-len", "64", "--max-tokens", "256", "-q"]
    capsys.readouterr()
    assert main(["eval", str(src), "-o", str(tmp_path / "fp16.json"), *common, "--dtype", "float16"]) == 2
    err = capsys.readouterr().err.strip()
    assert "in float16 its activations may pass 65504" in err and "--dtype bfloat16 or float32" in err, err
    assert len(err.splitlines()) == 1 and "damaged checkpoint" not in err and not (tmp_path / "fp16.json").exists()
    assert main(["eval", str(src), "-o", str(tmp_path / "bf16.json"), *common, "--dtype", "bfloat16"]) == 0


def test_the_closed_form_fit_on_1_and_2_threads_agrees_within_a_stated_tolerance(tokenizer, corpus_dir, tmp_path):
    """The thread count changes the order of the fp32 forward's sums, so the layers' inputs differ by ~1 fp32 ulp,
    and the ridge solve (fp64 Grams) amplifies that by its conditioning: measured up to 1.3e-7 on weights up to
    0.066 (2e-6 relative, 6 ulps; 3 of 35 tensors differed at all in another run). Tolerance 1e-5 of the largest
    weight: 5x that, and 400x below bf16's resolution, so a bf16 output differs at most by one rounding flip.
    Hidden 512: threads split its matmuls (hidden 48 runs on one)."""
    shapes = dict(hidden_size=512, intermediate_size=1024, num_attention_heads=8, initializer_range=0.05)
    src = save_checkpoint(tiny_model("llama", **shapes).to(torch.bfloat16), tokenizer, tmp_path / "src", "5MB")
    args = {"calib_data": [str(corpus_dir / "calib.txt")], "calib_tokens": 1024, "seq_len": 128, "distill_steps": 0}
    args.update(factor=2, init="calibrated", output_dtype="float32", quiet=True)
    threads, written = torch.get_num_threads(), []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            written.append(tensors(convert(src, tmp_path / f"t{n}", **args)))
    finally:
        torch.set_num_threads(threads)
    for name, one in written[0].items():
        assert (one - written[1][name]).abs().max() <= 1e-5 * one.abs().max(), name


# --- the CLA model in low precision -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_consumers_add_no_error_of_their_own_in_bf16_and_fp16(kind):
    """A consumer rotates its queries with the model's cos/sin in the model's dtype, as the stock attention does,
    and attends to its producer's cached K/V: against a float64 reference of the same layout, a CLA layout's 16-bit
    logits are as far off as the stock model's (measured 4.6e-4..7.0e-4 bf16, 5.6e-5..8.1e-5 fp16 for every layout,
    logits ~0.1). Bound: twice the identity layout's error."""
    from clakit.convert.inmemory import cla_model_from

    reference = outlier_model(kind, torch.float64)
    ids = torch.randint(0, 320, (2, 48), generator=torch.Generator().manual_seed(0))
    for dtype in DTYPES.values():
        errors = {}
        for layout in ([0, 1, 2, 3], [0, 0, 2, 2], [0, 0, 0, 0], [0, 1, 0, 1]):
            exact = cla_model_from(reference, layout)
            with torch.no_grad():
                want, got = exact(ids).logits, cla_model_from(reference, layout).to(dtype)(ids).logits.double()
            errors[tuple(layout)] = (got - want).abs().max().item()
        assert max(errors.values()) <= 2 * errors[(0, 1, 2, 3)], (dtype, errors)
