"""`clakit eval --device / --dtype / --device-map`: where and in what dtype a checkpoint is evaluated.

This machine has no GPU: a GPU device is refused in one line before anything is read; a device map (what a 70B
needs: its layers spread over several GPUs) runs here with every layer on the CPU and must give the same numbers as
the default placement; --dtype changes the weights and the cache the report counts.
"""

import json

import pytest
import torch
from test_eval_cli import assert_refused, run_cli

from clakit import sources


@pytest.fixture
def no_load(monkeypatch):
    """Any model load fails loudly: a refusal must come before the weights are read."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(sources, "load_model", refuse)


def base_args(checkpoint, corpus_dir, out):
    text = corpus_dir / "heldout.txt"
    return ["eval", checkpoint, "-o", out, "--data", text, "--seq-len", 32, "--max-tokens", 200, "--no-speed", "-q"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--device", "cuda"], "--device cuda: this machine has no CUDA GPU"),
        (["--device", "cuda:3"], "--device cuda:3: this machine has no CUDA GPU"),
        (["--device", "nonsense"], "unknown --device 'nonsense'"),
        (["--device", "mps"], "--device mps is not supported"),
        (["--device", "cpu:3"], "--device cpu:3: the CPU has no index"),
    ],
)
def test_a_device_this_machine_lacks_is_refused_before_loading(
    capsys, tmp_path, tiny_llama_checkpoint, corpus_dir, no_load, flags, needle
):
    out = tmp_path / "r.json"
    assert_refused(capsys, [*base_args(tiny_llama_checkpoint, corpus_dir, out), *flags], needle, out)


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--device", "cpu", "--device-map", "auto"], "not allowed with argument"),
        (["--device-map", "everywhere"], "invalid choice: 'everywhere'"),
        (["--dtype", "int8"], "invalid choice: 'int8'"),
    ],
)
def test_bad_placement_flags_are_refused(capsys, tmp_path, tiny_llama_checkpoint, corpus_dir, no_load, flags, needle):
    out = tmp_path / "r.json"
    assert_refused(capsys, [*base_args(tiny_llama_checkpoint, corpus_dir, out), *flags], needle, out)


def test_library_placement_settings_are_checked_before_loading(tiny_llama_checkpoint, corpus_dir, no_load):
    from clakit.errors import ClakitError
    from clakit.eval import evaluate

    kwargs = dict(data=[str(corpus_dir / "heldout.txt")], seq_len=32, max_tokens=200, speed=False, quiet=True)
    for bad, needle in [
        (dict(device="cpu", device_map="auto"), "give --device or --device-map, not both"),
        (dict(device_map="everywhere"), "--device-map must be one of auto"),
        (dict(dtype="half"), "--dtype must be one of float32"),
    ]:
        with pytest.raises(ClakitError, match=needle):
            evaluate(tiny_llama_checkpoint, **kwargs, **bad)


def evaluated(capsys, tmp_path, checkpoint, corpus_dir, name, *flags) -> dict:
    out = tmp_path / f"{name}.json"
    code, _, err = run_cli(capsys, *base_args(checkpoint, corpus_dir, out), "--task", "passkey",
                           "--passkey-lengths", 240, "--passkey-samples", 1, *flags)  # fmt: skip
    assert code == 0, err
    return json.loads(out.read_text())


def test_a_device_map_gives_the_default_placements_numbers(capsys, tmp_path, tiny_llama_checkpoint, corpus_dir):
    default = evaluated(capsys, tmp_path, tiny_llama_checkpoint, corpus_dir, "default")
    mapped = evaluated(capsys, tmp_path, tiny_llama_checkpoint, corpus_dir, "mapped", "--device-map", "auto")
    assert mapped["perplexity"] == default["perplexity"]
    assert mapped["passkey"]["accuracy"] == default["passkey"]["accuracy"]
    assert mapped["kv_cache"]["bytes_per_token"] == default["kv_cache"]["bytes_per_token"]
    assert (mapped["provenance"]["device_map"], mapped["provenance"]["device"]) == ("auto", "cpu")
    assert (default["provenance"]["device_map"], default["provenance"]["device"]) == (None, "cpu")


def test_dtype_sets_the_weights_and_the_cache_counted(capsys, tmp_path, tiny_llama_checkpoint, corpus_dir):
    fp32 = evaluated(capsys, tmp_path, tiny_llama_checkpoint, corpus_dir, "fp32")
    bf16 = evaluated(capsys, tmp_path, tiny_llama_checkpoint, corpus_dir, "bf16", "--dtype", "bfloat16")
    assert (fp32["provenance"]["dtype"], bf16["provenance"]["dtype"]) == ("float32", "bfloat16")
    assert (fp32["kv_cache"]["dtype"], bf16["kv_cache"]["dtype"]) == ("float32", "bfloat16")
    assert bf16["kv_cache"]["bytes_per_token"] * 2 == fp32["kv_cache"]["bytes_per_token"]
    # the same model, rounded: close but not the same number
    assert bf16["perplexity"] != fp32["perplexity"]
    assert bf16["perplexity"] == pytest.approx(fp32["perplexity"], rel=0.05)


@pytest.mark.parametrize("layout", [[0, 0, 2, 2], [0, 1, 0, 1]])
def test_a_cla_model_under_per_layer_device_hooks_gives_the_same_logits_and_tokens(tokenizer, tmp_path, layout):
    """What a multi-GPU device map installs: an accelerate hook on every module moving its inputs (the consumers'
    KVSharingDict among them) to the module's device. On one CPU the hooks run but move nothing, so the result must
    equal the plain model's, prefill and cached decoding alike."""
    from accelerate import dispatch_model
    from conftest import save_checkpoint, tiny_model
    from transformers import AutoModelForCausalLM

    from clakit.convert import convert

    stock = save_checkpoint(tiny_model("llama", num_hidden_layers=4), tokenizer, tmp_path / "stock")
    cla = convert(stock, tmp_path / "cla", kv_source_layers=layout, init="mean", quiet=True)
    plain = AutoModelForCausalLM.from_pretrained(cla).eval()
    hooked = AutoModelForCausalLM.from_pretrained(cla).eval()
    modules = ["model.embed_tokens", *(f"model.layers.{i}" for i in range(4)), "model.norm", "model.rotary_emb"]
    device_map = dict.fromkeys([*modules, "lm_head"], "cpu")
    hooked = dispatch_model(hooked, device_map, force_hooks=True, skip_keys=hooked._skip_keys_device_placement)
    assert all(hasattr(layer, "_hf_hook") for layer in hooked.model.layers)
    ids = torch.tensor([tokenizer("The king said unto the people of the machine").input_ids])
    with torch.no_grad():
        torch.testing.assert_close(hooked(ids).logits, plain(ids).logits, rtol=0, atol=0)
        greedy = dict(max_new_tokens=8, do_sample=False)
        assert torch.equal(hooked.generate(ids, **greedy), plain.generate(ids, **greedy))


def test_layers_offloaded_by_a_device_map_are_recorded_where_they_are(tokenizer, corpus_dir, tmp_path):
    """A device map beyond the GPUs' memory offloads layers to "cpu" or "disk", where accelerate leaves meta tensors
    in the model: the report's device read "cpu, meta" (and device_name "cpu, cpu" for a meta device)."""
    from accelerate import dispatch_model
    from conftest import save_checkpoint, tiny_model
    from transformers import AutoModelForCausalLM

    from clakit.convert import convert
    from clakit.eval import evaluate

    stock = save_checkpoint(tiny_model("llama", num_hidden_layers=4), tokenizer, tmp_path / "stock")
    cla = AutoModelForCausalLM.from_pretrained(convert(stock, tmp_path / "cla", factor=2, quiet=True)).eval()
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    device_map |= {f"model.layers.{i}": "disk" if i in (1, 2) else "cpu" for i in range(4)}
    cla = dispatch_model(cla, device_map=device_map, offload_dir=str(tmp_path / "offload"))
    assert {p.device.type for p in cla.parameters()} == {"cpu", "meta"}
    report = evaluate(cla, tokenizer=tokenizer, data=[str(corpus_dir / "heldout.txt")], seq_len=32, max_tokens=64,
                      speed=False, quiet=True)
    assert report["provenance"]["device"] == "cpu, disk"
    assert report["provenance"]["device_name"] == "cpu"


def test_cpu_0_is_the_cpu_everywhere_a_device_is_used():
    """torch accepts cpu:0, but torch.load(map_location=cpu:0) cannot restore tensors there: a calibrated conversion
    with --device cpu:0 died in its backward sweep with a traceback (`don't know how to restore data location`)."""
    import io

    from clakit.devices import resolve

    device = resolve("cpu:0")
    assert device == torch.device("cpu")
    buffer = io.BytesIO()
    torch.save(torch.arange(3.0), buffer)
    buffer.seek(0)
    assert torch.load(buffer, map_location=device).tolist() == [0.0, 1.0, 2.0]


def test_a_device_map_where_no_gpu_is_says_every_layer_runs_on_the_cpu(capsys, tiny_llama_checkpoint, corpus_dir):
    """--device-map auto on a machine without a GPU ran on the CPU without a word (helper 50e); said now, unless
    quiet, and run as asked."""
    from clakit.eval import evaluate

    kwargs = dict(data=[str(corpus_dir / "heldout.txt")], seq_len=32, max_tokens=64, speed=False, device_map="auto")
    evaluate(str(tiny_llama_checkpoint), **kwargs)
    assert "--device-map auto found no GPU here: every layer runs on the CPU" in capsys.readouterr().err
    evaluate(str(tiny_llama_checkpoint), quiet=True, **kwargs)
    assert "found no GPU" not in capsys.readouterr().err
