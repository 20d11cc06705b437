"""Layer-by-layer fitting equals the whole-model fit; one layer (group) in memory; --device/--dtype; ConvertConfig
as the single source of the CLI flags, the recipe section and the record."""

import dataclasses
import json

import pytest
import torch
from conftest import make_text
from convert_fixtures import load, read_json, run_cli
from transformers import AutoConfig

from clakit.cli import build_parser
from clakit.convert import ConvertConfig, convert
from clakit.convert.autolayout import auto_layout
from clakit.convert.calibrate import (
    calib_input_ids,
    calibrated_overrides,
    collect_stats,
    fit_kv,
    group_pairs,
    layer_stats,
)
from clakit.convert.checkpoint import SafetensorsCheckpoint
from clakit.convert.layerwise import LayerwiseModel
from clakit.convert.reconstruct import reconstruct_overrides
from clakit.corpus import Text
from clakit.errors import ClakitError

LAYOUT = [0, 0, 2, 0]  # a non-contiguous group (0, 1, 3) around a single layer: the general case


@pytest.fixture(scope="module")
def calib_ids(tokenizer):
    return calib_input_ids(tokenizer, [Text("calib", make_text(3000, seed=11))], 1024, 64)


def runner_for(folder) -> LayerwiseModel:
    config = AutoConfig.from_pretrained(folder)
    return LayerwiseModel.from_checkpoint(config, SafetensorsCheckpoint(folder), torch.device("cpu"), torch.float32)


def resident_layers(runner: LayerwiseModel) -> int:
    return sum(not next(layer.parameters()).is_meta for layer in runner.layers)


def watch_residency(runner: LayerwiseModel) -> list[int]:
    """Records how many decoder layers are in memory whenever one runs."""
    seen = []
    for layer in runner.layers:
        layer.register_forward_pre_hook(lambda module, args: seen.append(resident_layers(runner)))
    return seen


def assert_close_dicts(got: dict, expected: dict, **tol) -> None:
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], **tol, msg=lambda m, key=key: f"{key}: {m}")


def test_layer_stats_equal_the_full_model_backward(tiny_checkpoint, calib_ids, tmp_path):
    """Grams, Fisher weights (k/v/o, from the layer-by-layer backward), loss and kept activations equal those of one
    forward + backward of the whole model per sequence; the sweep holds one decoder layer at a time."""
    model = load(tiny_checkpoint)
    pairs, ids = group_pairs(LAYOUT), calib_ids[:6]
    expected = collect_stats(model, ids, pairs, keep=range(4), progress=False, keep_seqs=3)
    runner = runner_for(tiny_checkpoint)
    seen = watch_residency(runner)
    got = layer_stats(runner, ids, pairs, tmp_path, keep=range(4), progress=False, keep_seqs=3)
    assert_close_dicts(got.gram, expected.gram, rtol=1e-6, atol=1e-8)
    assert_close_dicts(got.fisher, expected.fisher, rtol=1e-4, atol=1e-12)
    assert got.loss == pytest.approx(expected.loss, rel=1e-6) and got.tokens == expected.tokens
    assert torch.equal(got.ids, expected.ids) and sorted(got.acts) == sorted(expected.acts)
    for layer in expected.acts:
        for (x, y), (ex, ey) in zip(got.acts[layer], expected.acts[layer], strict=True):
            torch.testing.assert_close(x, ex)
            torch.testing.assert_close(y, ey)
    assert seen and max(seen) == 1 and resident_layers(runner) == 0
    assert not list(tmp_path.glob("stream-*"))  # the per-layer streams are removed once used


def test_reconstructs_rows_are_spread_over_the_text(tiny_checkpoint, calib_ids, tmp_path):
    """`reconstruct` keeps the activations of RECONSTRUCT_SEQS rows; they were the first rows, in text order, so the
    default 64 windows fitted on the text's first eighth (helper W). Kept now: rows spread over all of them, in both
    statistics paths; the Grams (sums over rows) are those of every row either way."""
    model, ids = load(tiny_checkpoint), calib_ids[:12]
    spread = ids[torch.linspace(0, 11, 4).round().long()]
    whole = collect_stats(model, ids, group_pairs(LAYOUT), progress=False)
    kept = collect_stats(model, ids, group_pairs(LAYOUT), keep=[0, 1], progress=False, keep_seqs=4)
    layered = layer_stats(runner_for(tiny_checkpoint), ids, group_pairs(LAYOUT), tmp_path, keep=[0, 1],
                          progress=False, keep_seqs=4)  # fmt: skip
    assert torch.equal(kept.ids, spread) and torch.equal(layered.ids, spread)
    assert_close_dicts(kept.gram, whole.gram, rtol=1e-9, atol=1e-12)
    assert len(kept.acts[0]) == 4 and torch.equal(collect_stats(model, ids[:3], [(0, 0)], keep=[0], progress=False,
                                                                keep_seqs=8).ids, ids[:3])  # fmt: skip


@pytest.mark.parametrize("method", ["calibrated", "reconstruct"])
def test_layerwise_fit_equals_the_whole_model_fit(tiny_checkpoint, calib_ids, method):
    """fit_kv on a LayerwiseModel (layers read from the shards) == statistics of the whole model in memory (full
    backward) + the same fits; the fits hold at most one group's layers."""
    model, ids = load(tiny_checkpoint), calib_ids[:6]
    keep = [0, 1, 3] if method == "reconstruct" else ()
    stats = collect_stats(model, ids, group_pairs(LAYOUT), keep=keep, progress=False)
    expected = calibrated_overrides(model, LAYOUT, stats)
    if method == "reconstruct":
        expected = reconstruct_overrides(model, LAYOUT, stats, expected, steps=10, progress=False)
    runner = runner_for(tiny_checkpoint)
    seen = watch_residency(runner)
    got = fit_kv(runner.model, LAYOUT, ids, method, steps=10, progress=False)
    assert_close_dicts(got, expected, rtol=1e-4, atol=1e-5)
    assert max(seen) <= 3 and resident_layers(runner) == 0  # the group (0, 1, 3) at most


def test_auto_layout_layerwise_equals_whole_model(tiny_checkpoint, calib_ids):
    model, ids = load(tiny_checkpoint), calib_ids[:4]
    expected_layout, expected = auto_layout(model, ids, 0.5, progress=False)
    runner = runner_for(tiny_checkpoint)
    seen = watch_residency(runner)
    with runner.offloaded() as offloaded:
        layout, scores = auto_layout(offloaded, ids, 0.5, progress=False)
    assert layout == expected_layout and scores["chosen"] == expected["chosen"]
    assert scores["group_nll_increase"] == pytest.approx(expected["group_nll_increase"], abs=1e-5)
    assert max(seen) <= 3 and resident_layers(runner) == 0  # a group's means are read, then one layer runs


# --- device and dtype ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"device": "cuda:99" if torch.cuda.is_available() else "cuda"}, "CUDA"),
        ({"device": "tpu"}, "device"),
        ({"device": "cpu", "dtype": "bfloat16"}, "bfloat16 fits need a GPU"),
        ({"dtype": "float16"}, "--dtype"),
    ],
)
def test_unavailable_device_or_dtype_is_refused_before_any_work(tiny_llama_checkpoint, tmp_path, settings, message):
    with pytest.raises(ClakitError, match=message):
        convert(tiny_llama_checkpoint, tmp_path / "out", init="mean", **settings)
    assert list(tmp_path.iterdir()) == []


def test_cuda_refusal_on_the_command_line_is_one_line_exit_2(tiny_llama_checkpoint, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the refusal needs one without")
    assert run_cli(tiny_llama_checkpoint, tmp_path / "out", "--device", "cuda") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no CUDA GPU" in err and not (tmp_path / "out").exists()


# --- ConvertConfig: CLI, recipe, record ----------------------------------------------------------------------------


def convert_parser():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "==SUPPRESS==" and a.choices)
    return sub.choices["convert"]


def test_every_config_field_has_a_flag_and_every_flag_is_a_field():
    fields = {f.name for f in dataclasses.fields(ConvertConfig)}
    flags = {a.dest for a in convert_parser()._actions} - {"help", "src", "out"}
    run_options = {"overwrite", "quiet"}  # how to run, not what to make: not recorded as settings
    assert flags - run_options == fields
    for action in convert_parser()._actions:
        if action.dest in fields:
            assert action.option_strings[0] == f"--{action.dest.replace('_', '-')}" and action.help


def test_repeated_text_flags_keep_every_file():
    args = convert_parser().parse_args(["S", "O", "--calib-data", "a", "b", "--calib-data", "c", "--eval-data", "x"])
    args2 = convert_parser().parse_args(["S", "O", "--eval-data", "x", "--eval-data", "y"])
    assert args.calib_data == ["a", "b", "c"] and args.eval_data == ["x"] and args2.eval_data == ["x", "y"]
    from clakit.convert.config import config_from_args

    config = config_from_args(convert_parser().parse_args(["S", "O", "--kv-source-layers", "0,0,2,2", "--no-refine"]))
    assert config == ConvertConfig(kv_source_layers=[0, 0, 2, 2], refine=False)


def test_record_holds_the_whole_config_and_every_calibration_file(tiny_llama_checkpoint, corpus_dir, tmp_path):
    out = tmp_path / "cla"
    files = [corpus_dir / "calib.txt", corpus_dir / "train.txt"]
    args = ["--factor", "2", "--init", "calibrated", "--calib-tokens", "1024", "--device", "cpu", "--ridge", "0.01"]
    assert run_cli(tiny_llama_checkpoint, out, "--calib-data", files[0], "--calib-data", files[1], *args, "-q") == 0
    record = read_json(out / "clakit_convert.json")
    config = record["config"]
    assert set(config) == {f.name for f in dataclasses.fields(ConvertConfig)} | {"device_used", "bf16_used"}
    assert config["calib_data"] == [str(f) for f in files] and config["ridge"] == 0.01
    assert config["device"] == config["device_used"] == "cpu" and config["dtype"] == "float32"
    assert record["settings"]["calib_data"] == [str(f) for f in files]
    # the ridge reached the fit: a different ridge writes different K/V
    other = tmp_path / "cla2"
    assert run_cli(tiny_llama_checkpoint, other, "--calib-data", *files, *args[:-1], "0.001", "-q") == 0
    k = "model.layers.0.self_attn.k_proj.weight"
    assert not torch.equal(load(out).state_dict()[k], load(other).state_dict()[k])


def test_bad_config_values_are_refused_with_the_flag_name():
    with pytest.raises(ClakitError, match="--reconstruct-steps must be a positive number of steps"):
        ConvertConfig(reconstruct_steps=0)
    with pytest.raises(ClakitError, match="calib_tokens must be"):
        ConvertConfig(calib_tokens="many")
    with pytest.raises(ClakitError, match="refine-max-group"):
        ConvertConfig(refine_max_group=1)


def test_recipe_convert_section_is_parsed_into_a_convert_config(tmp_path):
    from clakit.uptrain.recipe import load_recipe

    recipe = tmp_path / "r.yaml"
    body = {
        "model": {"source": "x", "convert": {"factor": 2, "init": "calibrated", "device": "cpu", "ridge": 0.01}},
        "data": {"train": ["t.txt"]},
        "train": {"output_dir": "o"},
    }
    recipe.write_text(json.dumps(body))
    config = load_recipe(recipe).model.convert
    assert isinstance(config, ConvertConfig) and (config.factor, config.ridge, config.device) == (2, 0.01, "cpu")
    body["model"]["convert"]["refine_max"] = 3
    recipe.write_text(json.dumps(body))
    with pytest.raises(ClakitError, match="refine_max"):
        load_recipe(recipe)


def test_sequential_inputs_of_interleaved_groups_are_the_partially_converted_models(calib_ids):
    """Group (2, 4) runs between members of group (0, 1, 3): its inputs are those of the CLA model in which only
    group (0, 1, 3) is converted, with its fitted q/k/v/o (a real CLA model built for the check)."""
    from conftest import tiny_model

    from clakit.convert.inmemory import cla_model_from
    from clakit.convert.reconstruct import _ConvertedStream

    model, layout = tiny_model("llama", num_hidden_layers=6), [0, 0, 2, 0, 2, 5]
    stats = collect_stats(model, calib_ids[:3], group_pairs(layout), keep=[0, 1, 2, 3, 4], progress=False)
    fitted = reconstruct_overrides(model, layout, stats, calibrated_overrides(model, layout, stats), steps=3,
                                   progress=False, sequential=False)  # fmt: skip
    first = {k: v for k, v in fitted.items() if any(f".layers.{i}." in k for i in (0, 1, 3))}
    partial = cla_model_from(model, [0, 0, 2, 0, 4, 5], overrides=first)
    expected = {2: [], 4: []}
    for i in expected:
        partial.model.layers[i].self_attn.q_proj.register_forward_pre_hook(
            lambda m, a, i=i: expected[i].append(a[0][0])
        )
    with torch.no_grad():
        for row in stats.ids:
            partial(row[None])
    got = _ConvertedStream(model, layout, stats.ids).member_inputs([2, 4], fitted, {0, 1, 3})
    for i in expected:
        for g, e in zip(got[i], expected[i], strict=True):
            torch.testing.assert_close(g, e)
    assert not torch.allclose(got[4][0], stats.acts[4][0][0])  # not the stock model's


def test_bf16_fits_run_and_track_the_fp32_ones(tiny_checkpoint, calib_ids):
    """The GPU's `--dtype bfloat16` path (here on the CPU, below the device check): layers, streams and fitted
    tensors in bf16, statistics in fp64; the fit lands near the fp32 one."""
    config = AutoConfig.from_pretrained(tiny_checkpoint)
    ckpt = SafetensorsCheckpoint(tiny_checkpoint)
    runs = {}
    for dtype in (torch.float32, torch.bfloat16):
        runner = LayerwiseModel.from_checkpoint(config, ckpt, torch.device("cpu"), dtype)
        runs[dtype] = fit_kv(runner.model, LAYOUT, calib_ids[:4], "reconstruct", steps=3, progress=False)
    assert runs[torch.float32].keys() == runs[torch.bfloat16].keys()
    for name, ref in runs[torch.float32].items():
        got = runs[torch.bfloat16][name]
        assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
        assert (got.float() - ref).norm() <= 0.1 * ref.norm(), name
