"""Inputs a reviewer tried in order to break `clakit convert`: each was mishandled once (see the test's docstring)."""

import json
from pathlib import Path

import pytest
import torch
from conftest import make_text, save_checkpoint, tiny_model
from convert_fixtures import copy_checkpoint, fingerprint, load, logits, run_cli
from safetensors.torch import load_file, save_file
from test_convert_bad_input import assert_refused

import clakit.convert.checkpoint
import clakit.convert.pipeline
from clakit.convert.autolayout import producers_for
from clakit.convert.checkpoint import StateDictCheckpoint
from clakit.convert.layout import KEY_TEMPLATES
from clakit.convert.streaming import converted_tensors, plan_tensors
from clakit.errors import ClakitError


@pytest.fixture
def src(tiny_llama_checkpoint, tmp_path) -> Path:
    return copy_checkpoint(tiny_llama_checkpoint, tmp_path / "src")


@pytest.fixture
def no_model(monkeypatch):
    """Any model loaded fails the test: the refusal must come before the slow stages."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the refusal")

    monkeypatch.setattr(clakit.convert.pipeline.LayerwiseModel, "from_checkpoint", refuse)


def test_a_one_layer_model_without_a_layout_names_the_model_not_a_factor_never_given(tokenizer, tmp_path, capsys):
    """`clakit convert ONE_LAYER OUT` was refused as '--factor must be between 1 and the number of layers (1), got 2':
    a flag the user never gave (the default)."""
    src = save_checkpoint(tiny_model("llama", num_hidden_layers=1), tokenizer, tmp_path / "src")
    capsys.readouterr()  # save_pretrained's progress bar
    match = "a 1-layer model has no other layer to share its K/V with"
    assert_refused(capsys, src, tmp_path / "out", match=match)
    assert run_cli(src, tmp_path / "out1", "--factor", "1", "-q") == 0  # asked for explicitly: a plain copy


@pytest.mark.parametrize("extra", [[], ["--eval-data", "{calib}", "--factor", "2"]])
def test_seq_len_1_is_refused_before_any_model_runs(src, tmp_path, capsys, no_model, extra):
    """A window of one token has no next token: the calibration NLL was NaN (written into clakit_convert.json as a
    bare `NaN`, which is not JSON), the layout was chosen on NaN scores and the fits saw no gradient; exit 0."""
    calib = tmp_path / "calib.txt"
    calib.write_text(make_text(2000, 1))
    args = [a.format(calib=calib) for a in extra] or ["--calib-data", calib, "--calib-tokens", "64"]
    assert_refused(capsys, src, tmp_path / "out", *args, "--seq-len", "1", match="--seq-len 1 leaves no next token")


def test_eval_tokens_1_names_the_flag_not_the_text(src, tmp_path, capsys):
    """--eval-tokens 1 over plenty of held-out text was refused as 'the --eval-data text is shorter than two tokens;
    give more held-out text': the text was not the problem."""
    heldout = tmp_path / "heldout.txt"
    heldout.write_text(make_text(2000, 1))
    args = ["--eval-data", heldout, "--eval-tokens", "1"]
    assert_refused(capsys, src, tmp_path / "out", *args, match="--eval-tokens 1 leaves no next token to predict")


@pytest.mark.parametrize("problem", ["text", "write"])
def test_a_failed_conversion_leaves_no_folders_it_created_above_out(src, tmp_path, capsys, monkeypatch, problem):
    """OUT in folders that do not exist yet (runs/a/b/out): a refusal after the scratch or staging folder was made
    beside OUT left the new runs/a/b behind, empty."""
    calib = tmp_path / "calib.txt"
    calib.write_text("too short" if problem == "text" else make_text(2000, 1))
    if problem == "write":

        def disk_full(*args, **kwargs):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(clakit.convert.checkpoint, "save_file", disk_full)
    args = ["--calib-data", calib, "--calib-tokens", "64", "--seq-len", "64", "--reconstruct-steps", "1"]
    match = "calibration text is too short" if problem == "text" else "No space left on device"
    (tmp_path / "runs").mkdir()
    assert run_cli(src, tmp_path / "runs" / "a" / "b" / "out", *args, "--distill-steps", "0", "-q") == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("clakit: error: ") and match in lines[0], lines
    assert list((tmp_path / "runs").iterdir()) == []  # runs/ was the user's: kept


def test_reconstruct_on_a_layout_sharing_nothing_writes_the_source(src, tmp_path):
    """--init reconstruct with --kv-source-layers 0,1,2,3 (no group to fit) crashed with a TypeError traceback."""
    calib = tmp_path / "calib.txt"
    calib.write_text(make_text(2000, 1))
    out = tmp_path / "out"
    args = ["--calib-data", calib, "--calib-tokens", "64", "--seq-len", "64", "--distill-steps", "0", "-q"]
    assert run_cli(src, out, "--kv-source-layers", "0,1,2,3", "--init", "reconstruct", *args) == 0
    torch.testing.assert_close(logits(load(out)), logits(load(src)), rtol=0, atol=0)


@pytest.mark.parametrize("saving", [1e-10, 1e-12])
def test_a_tiny_kv_saving_still_shares_a_layer(saving):
    """--kv-saving 1e-10 kept every layer a producer (the rounding epsilon swallowed it): the auto layout shared
    nothing, saved 0% where a saving was asked for, and reconstruct then crashed with a traceback."""
    assert producers_for(4, saving) == 3
    assert producers_for(4, 0.0) == 4 and producers_for(4, 0.75) == 1 and producers_for(3, 0.5) == 1


def test_output_dtype_float16_refuses_weights_beyond_its_range(tokenizer, tmp_path, capsys, no_model):
    """A bf16 checkpoint with a weight above float16's 65504, converted with --output-dtype float16, was written with
    that weight as inf (exit 0; every logit NaN). Refused before any model runs or anything is written."""
    model = tiny_model("llama").to(torch.bfloat16)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = 1e5
    src = save_checkpoint(model, tokenizer, tmp_path / "src")
    capsys.readouterr()
    match = "tensor model.layers.1.mlp.down_proj.weight holds values up to 9.984e+04, beyond float16's range"
    calib = tmp_path / "calib.txt"
    calib.write_text(make_text(2000, 1))
    args = ["--output-dtype", "float16", "--calib-data", calib, "--eval-data", calib]
    assert_refused(capsys, src, tmp_path / "out", *args, match=match)
    assert run_cli(src, tmp_path / "out", "--output-dtype", "bfloat16", "-q") == 0


def test_the_writer_refuses_a_fitted_tensor_beyond_float16s_range():
    """The writer's own check: fitted K/V (known only after the fits) out of float16's range are not written as inf."""
    name = KEY_TEMPLATES["k_proj"].format(0)
    checkpoint = StateDictCheckpoint({name: torch.zeros(2, 2), "model.norm.weight": torch.ones(2)})
    plan = plan_tensors(checkpoint.names, set(checkpoint.names), set(), [0])
    written = dict(converted_tensors(checkpoint, plan, "mean", {}, torch.float16))
    assert written[name].dtype == torch.float16
    with pytest.raises(ClakitError, match=f"tensor {name} holds values up to 7e\\+04, beyond float16's range"):
        list(converted_tensors(checkpoint, plan, "mean", {name: torch.full((2, 2), 7e4)}, torch.float16))
    fp16 = StateDictCheckpoint({k: v.half() for k, v in checkpoint._state.items()})  # fitted, back to the source's
    with pytest.raises(ClakitError, match="beyond float16's range"):
        list(converted_tensors(fp16, plan, "mean", {name: torch.full((2, 2), 7e4)}))


@pytest.mark.parametrize("size", ["0.4", "0.0001KB", "0.5B"])
def test_a_max_shard_size_rounding_to_0_bytes_is_refused(src, tmp_path, capsys, size):
    """'--max-shard-size 0.4' passed the > 0 check and became a limit of 0 bytes (exit 0, recorded as 0)."""
    assert_refused(capsys, src, tmp_path / "out", "--max-shard-size", size, match="--max-shard-size must be a size")


@pytest.mark.parametrize("data", ["--calib-data", "--eval-data"])
def test_a_tokenizer_bigger_than_the_models_vocabulary_is_refused_before_any_model_runs(
    tokenizer, tmp_path, capsys, no_model, data
):
    """Another model's tokenizer (320 tokens) beside weights of vocab_size 200: the first forward failed with
    'IndexError: index out of range in self' and a traceback."""
    src = save_checkpoint(tiny_model("llama", vocab_size=200), tokenizer, tmp_path / "src")
    capsys.readouterr()
    text = tmp_path / "text.txt"
    text.write_text(make_text(2000, 1))
    extra = ["--factor", "2"] if data == "--eval-data" else ["--calib-tokens", "64"]  # what each text's stage reads
    args = [data, text, "--seq-len", "64", *extra]
    match = f"turns the {data} text into token id"
    assert_refused(capsys, src, tmp_path / "out", *args, match=match)


def test_a_full_disk_under_the_calibration_streams_is_one_line(src, tmp_path, capsys, monkeypatch):
    """The calibration streams (tokens x hidden x 4 B per layer) go to a scratch folder beside OUT; on a full disk
    torch.save raises 'RuntimeError: [enforce fail at inline_container.cc:672] . unexpected pos ...' (seen on a 1 MB
    tmpfs), which escaped as a traceback (exit 1). The fixed layout's output fits: only the streams do not."""
    real_save, saved = torch.save, []

    def full_disk(obj, path, *args, **kwargs):
        if saved:  # the first stream file fits, the second does not
            Path(path).write_bytes(b"partial")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 5056 vs 4950")
        saved.append(path)
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    calib = tmp_path / "calib.txt"
    calib.write_text(make_text(2000, 1))
    args = ["--calib-data", calib, "--calib-tokens", "128", "--seq-len", "64", "--kv-source-layers", "0,0,2,2"]
    match = "cannot write the calibration scratch file"
    assert_refused(capsys, src, tmp_path / "out", *args, "--distill-steps", "0", match=match)


def test_a_checkpoint_saved_without_the_model_prefix_is_named_as_such(src, tmp_path, capsys):
    """Tensors named layers.0... (no 'model.' prefix: a bare LlamaModel's save, which transformers maps on loading)
    were refused as 'missing from the checkpoint; it is incomplete, re-download it': a download would not help."""
    index_path = src / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    for shard in sorted(src.glob("model-*.safetensors")):
        tensors = load_file(shard)
        save_file({k.removeprefix("model."): v for k, v in tensors.items()}, shard, metadata={"format": "pt"})
    index["weight_map"] = {k.removeprefix("model."): v for k, v in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    match = "holds embed_tokens.weight instead (saved without the 'model.' prefix)"
    assert_refused(capsys, src, tmp_path / "out", match=match)


@pytest.mark.parametrize("args", [[], ["--output-dtype", "float16"]])
def test_the_record_names_the_written_dtype_when_the_output_is_evaluated(tokenizer, tmp_path, args):
    """With --eval-data the written model is read back in the fits' dtype (float32), and clakit_convert.json and the
    model card then recorded float32 for bf16 (or --output-dtype float16) weights."""
    src = save_checkpoint(tiny_model("llama").to(torch.bfloat16), tokenizer, tmp_path / "src")
    heldout, out = tmp_path / "heldout.txt", tmp_path / "out"
    heldout.write_text(make_text(2000, 1))
    assert run_cli(src, out, "--eval-data", heldout, "--eval-tokens", "256", *args, "-q") == 0
    written = "float16" if args else "bfloat16"
    assert json.loads((out / "config.json").read_text())["dtype"] == written
    assert json.loads((out / "clakit_convert.json").read_text())["settings"]["dtype"] == written
    assert f"| dtype | {written} |" in (out / "README.md").read_text()
    assert json.loads((out / "clakit_convert.json").read_text())["settings"]["seq_len"] > 1  # the windows read


def test_a_mixed_dtype_source_is_recorded_as_the_dtypes_written_and_no_window_without_text(tokenizer, tmp_path):
    """bf16 weights with fp32 norms are written as they are; the record and card said the first tensor's dtype
    alone ("bfloat16"). And `settings.seq_len` named a window (512) for an --init mean conversion that read no text."""
    model = tiny_model("llama").to(torch.bfloat16)
    for name, module in model.named_modules():
        if name.endswith("norm"):  # 4 layers x 2 + the final norm: 9 fp32 tensors, the rest bf16
            module.float()
    src, out = save_checkpoint(model, tokenizer, tmp_path / "src"), tmp_path / "out"
    assert run_cli(src, out, "--factor", "2", "--init", "mean", "-q") == 0
    written = {t.dtype for shard in out.glob("*.safetensors") for t in load_file(shard).values()}
    assert written == {torch.bfloat16, torch.float32}
    settings = json.loads((out / "clakit_convert.json").read_text())["settings"]
    assert settings["dtype"] == "bfloat16+float32" and settings["seq_len"] is None
    assert "| dtype | bfloat16+float32 |" in (out / "README.md").read_text()


def test_a_cla_checkpoint_under_a_stock_config_is_named_not_called_incomplete(src, tmp_path, capsys):
    """A CLA output whose config.json was edited to the stock model_type was refused as "k_proj ... missing from the
    checkpoint; it is incomplete, re-download it": its consumers hold q_proj and no K/V, which no download mends."""
    cla = tmp_path / "cla"
    assert run_cli(src, cla, "--factor", "2", "--init", "mean", "-q") == 0
    config = json.loads((cla / "config.json").read_text())
    config.update(model_type="llama", architectures=["LlamaForCausalLM"])
    config.pop("auto_map", None)
    (cla / "config.json").write_text(json.dumps(config))
    match = "holds q_proj but no k_proj/v_proj, as a CLA checkpoint's consumers do"
    assert_refused(capsys, cla, tmp_path / "again", "--factor", "2", "--init", "mean", match=match)
    # a stock download that lost one of the two is damaged, not a CLA checkpoint: re-downloading mends it
    lost = "model.layers.1.self_attn.k_proj.weight"
    for shard in src.glob("*.safetensors"):
        tensors = load_file(shard)
        if lost in tensors:
            save_file({k: v for k, v in tensors.items() if k != lost}, shard, metadata={"format": "pt"})
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"].pop(lost)
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    match = f"tensor {lost} is missing from the checkpoint; it is incomplete, re-download it"
    assert_refused(capsys, src, tmp_path / "out", "--factor", "2", "--init", "mean", match=match)


def test_a_conversion_inside_another_clakit_output_is_refused_before_any_work(src, tmp_path, capsys, no_model):
    """`clakit convert SRC first/inner` wrote a checkpoint into a finished conversion (or a run's model/): files that
    output did not write, which then blocked its --overwrite (uptrain already refused this; convert did not)."""
    first = tmp_path / "first"
    assert run_cli(src, first, "--factor", "2", "--quiet") == 0
    before = fingerprint(first)
    assert_refused(capsys, src, first / "inner", "--factor", "2", match=f"is inside {first}, a clakit convert output")
    assert run_cli(src, first / "deeper" / "inner", "--factor", "2", "--quiet") == 2
    assert "clakit does not write into another output" in capsys.readouterr().err
    assert fingerprint(first) == before and not (first / "deeper").exists()


def test_a_tiny_ridge_on_one_repeated_token_fits_finite_weights(tiny_checkpoint, tmp_path):
    """One repeated token makes layer 0's Gram rank one; --ridge 1e-30 (below fp64's resolution of the Gram)
    divided its rounding noise by ~1e-300: inf K/V, refused only when written, naming --dtype float32 for a fit
    that was float32 already (helper W). The ridge is floored at the Gram's resolution now: finite weights."""
    text = tmp_path / "one_token.txt"
    text.write_text("x" * 5000)
    out = tmp_path / "out"
    args = ["--factor", "2", "--init", "calibrated", "--calib-data", text, "--calib-tokens", "1024", "--seq-len",
            "64", "--distill-steps", "0", "--ridge", "1e-30", "-q"]  # fmt: skip
    assert run_cli(tiny_checkpoint, out, *args) == 0
    weights = load_file(out / "model.safetensors") if (out / "model.safetensors").exists() else {
        k: v for f in out.glob("*.safetensors") for k, v in load_file(f).items()}  # fmt: skip
    assert all(torch.isfinite(w).all() for w in weights.values())
