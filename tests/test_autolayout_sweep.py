"""`--layout auto`'s scoring sweep: every candidate group's cost from one pass over the layers per chunk of
candidates, equal to the per-group forwards (`group_cost`) it replaced, which read layers quadratically in depth."""

import pytest
import torch
from conftest import make_text, save_checkpoint, tiny_model
from transformers import AutoConfig

from clakit.convert import autolayout
from clakit.convert.autolayout import auto_layout, group_cost, layer_inputs, sweep_costs
from clakit.convert.calibrate import calib_input_ids
from clakit.convert.checkpoint import SafetensorsCheckpoint
from clakit.convert.layerwise import LayerwiseModel
from clakit.corpus import Text
from clakit.errors import ClakitError

LAYERS, MAX_GROUP = 6, 3
RUNS = [(i, j) for i in range(LAYERS) for j in range(i, min(LAYERS, i + MAX_GROUP))]
MODELS = {"llama": {}, "mistral": {}, "llama-bias": {"attention_bias": True}}  # mistral: sliding window 16 < seq


@pytest.fixture(scope="module")
def calib_ids(tokenizer):
    return calib_input_ids(tokenizer, [Text("calib", make_text(3000, seed=11))], 1024, 64)[:4]


def model_for(name: str):
    return tiny_model(name.split("-")[0], num_hidden_layers=LAYERS, **MODELS[name])


@pytest.fixture(scope="module", params=list(MODELS))
def checkpoint(request, tokenizer, tmp_path_factory):
    path = save_checkpoint(model_for(request.param), tokenizer, tmp_path_factory.mktemp(request.param))
    return request.param, path


def runner_for(folder) -> LayerwiseModel:
    config = AutoConfig.from_pretrained(folder)
    return LayerwiseModel.from_checkpoint(config, SafetensorsCheckpoint(folder), torch.device("cpu"), torch.float32)


def per_group_costs(model, ids, base, hidden) -> dict:
    """The scoring before the sweep: one forward per candidate, from its producer to the last layer."""
    return {(i, j): group_cost(model, list(range(i, j + 1)), ids, base, hidden) for i, j in RUNS}


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("chunk", [0, 1, 4, len(RUNS)])  # 0: the default (as many candidates as layers)
def test_the_sweeps_costs_equal_group_cost_for_every_candidate(name, chunk, calib_ids):
    model = model_for(name)
    hidden, _ = layer_inputs(model, calib_ids)
    # base 0: each cost is then the candidate's whole NLL (a random tiny model's sharing often lowers it: the costs
    # would be mostly clamped zeros, equal whatever the sweep computed)
    expected = per_group_costs(model, calib_ids, 0.0, hidden)
    got = sweep_costs(model, RUNS, calib_ids, 0.0, hidden, chunk=chunk)
    assert list(got) == RUNS and all(c > 1 for (i, j), c in expected.items() if j > i)
    assert got == pytest.approx(expected, rel=1e-6, abs=1e-9)


def test_the_sweep_through_a_layerwise_model_reads_each_layer_once_per_chunk(checkpoint, calib_ids):
    name, folder = checkpoint
    runner = runner_for(folder)
    one_layer = []
    for layer in runner.layers:  # how many decoder layers are in memory whenever one runs
        layer.register_forward_pre_hook(lambda module, args: one_layer.append(resident(runner)))
    with runner.offloaded() as offloaded:
        hidden, _ = layer_inputs(offloaded, calib_ids)
        base = 0.0  # the costs are the whole NLLs (see above)
        runner.reads = 0
        before = per_group_costs(offloaded, calib_ids, base, hidden)
        per_group_reads, runner.reads = runner.reads, 0
        one_sweep = sweep_costs(offloaded, RUNS, calib_ids, base, hidden, chunk=len(RUNS))
        one_sweep_reads, runner.reads = runner.reads, 0
        chunked = sweep_costs(offloaded, RUNS, calib_ids, base, hidden, chunk=4)
        chunked_reads = runner.reads
    # before: each candidate read its group for the means, then every layer from its producer on
    assert per_group_reads == sum((j - i + 1) + (LAYERS - i) for i, j in RUNS if j > i) == 60
    assert one_sweep_reads == LAYERS  # one chunk: each layer once
    shared = [r for r in RUNS if r[1] > r[0]]  # chunks of 4 in producer order, each swept from its first producer
    assert chunked_reads == sum(LAYERS - shared[k][0] for k in range(0, len(shared), 4)) == 6 + 4 + 2
    assert max(one_layer) == 1 and resident(runner) == 0  # a forward one layer in memory at a time
    in_memory = model_for(name)
    hidden, _ = layer_inputs(in_memory, calib_ids)
    expected = per_group_costs(in_memory, calib_ids, base, hidden)
    for costs in (before, one_sweep, chunked):
        assert costs == pytest.approx(expected, rel=1e-6, abs=1e-9)


def resident(runner: LayerwiseModel) -> int:
    return sum(not next(layer.parameters()).is_meta for layer in runner.layers)


@pytest.mark.parametrize("name", ["llama", "mistral"])
@pytest.mark.parametrize("saving", [0.5, 0.67])
def test_auto_layout_picks_the_same_layout_and_scores_as_the_per_group_scoring(name, saving, calib_ids, monkeypatch):
    model = model_for(name)
    layout, scores = auto_layout(model, calib_ids, saving, progress=False)
    monkeypatch.setattr(
        autolayout,
        "sweep_costs",
        lambda model, runs, ids, base, hidden, progress=False: {
            (i, j): group_cost(model, list(range(i, j + 1)), ids, base, hidden) for i, j in runs
        },
    )
    old_layout, old_scores = auto_layout(model, calib_ids, saving, progress=False)
    assert layout == old_layout and scores["chosen"] == old_scores["chosen"]
    assert scores["group_nll_increase"] == pytest.approx(old_scores["group_nll_increase"], abs=2e-6)
    assert scores["candidates"] == old_scores["candidates"] and scores["refine_moves"] == old_scores["refine_moves"]


def test_layouts_are_scored_on_rows_whose_second_half_repeats_their_first(calib_ids):
    """The scoring rows see in-context retrieval: each row's second half repeats its first, so a layout that loses
    retrieval (SmolLM2: sharing layers 15-18) pays for it; the caller's windows stay as they were. The repeated
    targets count REPEAT_WEIGHT each in the score, the prose targets 1."""
    given = calib_ids.clone()
    rows = autolayout.scoring_rows(calib_ids)
    half = rows.shape[1] // 2
    assert torch.equal(calib_ids, given) and len(rows) == min(len(given), autolayout.SCORE_TOKENS // rows.shape[1])
    assert torch.equal(rows[:, :half], given[: len(rows), :half])
    assert torch.equal(rows[:, half : 2 * half], rows[:, :half])
    model = model_for("llama")
    _, scores = auto_layout(model, calib_ids, 0.5, progress=False)
    with torch.no_grad():
        logits = model(rows).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), rows[:, 1:], reduction="none")  # (rows, seq - 1)
    prose, repeat = nll[:, : rows.shape[1] - 1 - half], nll[:, rows.shape[1] - 1 - half :]  # targets 1.., half..
    w = autolayout.REPEAT_WEIGHT
    assert 0 < w < 1 and repeat.shape[1] == half
    scored = (prose.sum() + w * repeat.sum()).item() / (prose.numel() + w * repeat.numel())
    assert scores["calibration_nll_original"] == pytest.approx(scored, abs=1e-5)
    assert scores["calibration_nll_original"] != pytest.approx(nll.mean().item(), abs=1e-3)  # not the plain mean
    assert scores["score_repeat_tokens"] == half and scores["score_repeat_weight"] == w


@pytest.mark.parametrize("shape", [(4, 1), (64,)])
def test_rows_without_a_next_token_are_refused_in_one_line(shape):
    with pytest.raises(ClakitError, match="2 or more tokens"):
        auto_layout(model_for("llama"), torch.zeros(shape, dtype=torch.long), 0.5, progress=False)
