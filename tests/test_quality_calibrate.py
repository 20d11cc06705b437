"""Calibration data and the closed-form `calibrated` K/V fit on tiny random models."""

import pytest
import torch
from conftest import make_text, tiny_model

from clakit.convert.calibrate import (
    calib_input_ids,
    calibrated_overrides,
    collect_stats,
    fit_group,
    fit_kv,
    group_error,
    group_pairs,
    mean_shared,
)
from clakit.convert.inmemory import cla_model_from
from clakit.convert.layout import KEY_TEMPLATES, uniform_layout
from clakit.corpus import Text
from clakit.errors import ClakitError


@pytest.fixture(scope="module")
def calib_ids(tokenizer):
    return calib_input_ids(tokenizer, [Text("calib", make_text(3000, seed=11))], 1024, 64)


def kl_to(reference, model, input_ids) -> float:
    """Mean per-token KL(reference || model): how far a converted model's predictions moved."""
    with torch.no_grad():
        ref = reference(input_ids).logits.log_softmax(-1)
        new = model(input_ids).logits.log_softmax(-1)
    return float((ref.exp() * (ref - new)).sum(-1).mean())


def test_calib_input_ids_windows_come_from_the_text(tokenizer):
    text = make_text(2000, seed=3)
    ids = calib_input_ids(tokenizer, [Text("a", text)], 300, 32)
    assert ids.shape == (9, 32) and ids.dtype == torch.long
    stream = tokenizer(text, add_special_tokens=False)["input_ids"]
    # every row is a 32-aligned window of the token stream, and the rows are spread out (first and last differ a lot)
    starts = [next(s for s in range(0, len(stream), 32) if stream[s : s + 32] == r.tolist()) for r in ids]
    assert starts == sorted(starts) and starts[-1] - starts[0] > len(stream) // 2


def test_calib_input_ids_refuses_too_little_text(tokenizer):
    with pytest.raises(ClakitError, match="too short"):
        calib_input_ids(tokenizer, [Text("a", "just a few words")], 512, 128)
    with pytest.raises(ClakitError, match="calib-tokens"):
        calib_input_ids(tokenizer, [Text("a", make_text(500, 1))], 16, 64)


def test_gram_error_matches_direct_computation(calib_ids):
    """The Gram-matrix form of the weighted error equals the error computed from the activations themselves."""
    model = tiny_model("llama")
    layout = uniform_layout(4, 2)
    stats = collect_stats(model, calib_ids[:4], group_pairs(layout), progress=False)
    xs = {}
    hooks = [
        model.model.layers[i].self_attn.k_proj.register_forward_hook(
            lambda m, a, o, i=i: xs.setdefault(i, []).append(a[0][0].double())
        )
        for i in range(4)
    ]
    with torch.no_grad():
        for r in calib_ids[:4]:
            model(r[None])
    for h in hooks:
        h.remove()
    x = {i: torch.cat(v) for i, v in xs.items()}
    shared = mean_shared(model, "v_proj", [2, 3])
    direct = 0.0
    for m in (2, 3):
        err = (x[2] @ shared - x[m] @ model.model.layers[m].self_attn.v_proj.weight.double().T).pow(2).sum(0)
        direct += float((stats.fisher[("v_proj", m)] * err.detach()).sum())
    assert group_error(model, stats, "v_proj", [2, 3], shared) == pytest.approx(direct, rel=1e-6)


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_calibrated_beats_mean(kind, calib_ids):
    model = tiny_model(kind)
    layout = uniform_layout(4, 2)
    stats = collect_stats(model, calib_ids, group_pairs(layout), progress=False)
    for members in ([0, 1], [2, 3]):
        for proj in ("k_proj", "v_proj"):
            fitted = fit_group(model, stats, proj, members)
            assert group_error(model, stats, proj, members, fitted) < group_error(
                model, stats, proj, members, mean_shared(model, proj, members)
            )
    overrides = fit_kv(model, layout, calib_ids, "calibrated", progress=False)
    assert set(overrides) == {KEY_TEMPLATES[p].format(i) for p in ("k_proj", "v_proj") for i in (0, 2)}
    calibrated = cla_model_from(model, layout, init="mean", overrides=overrides)
    assert kl_to(model, calibrated, calib_ids) < kl_to(model, cla_model_from(model, layout, init="mean"), calib_ids)


def test_identical_members_are_recovered(calib_ids):
    """If every member already has the same projection and input, the fit returns it (up to the small ridge)."""
    model = tiny_model("llama")
    stats = collect_stats(model, calib_ids[:4], group_pairs([0, 0, 2, 3]), progress=False)
    stats.gram[(1, 1)] = stats.gram[(0, 1)] = stats.gram[(0, 0)]  # pretend layer 1 sees layer 0's input
    layer1 = model.model.layers[1].self_attn.k_proj
    with torch.no_grad():
        layer1.weight.copy_(model.model.layers[0].self_attn.k_proj.weight)
    fitted = fit_group(model, stats, "k_proj", [0, 1], ridge=1e-8)
    torch.testing.assert_close(fitted.T.float(), layer1.weight, atol=1e-4, rtol=1e-3)


def test_bias_is_fitted_and_unshared_layouts_need_nothing(calib_ids):
    model = tiny_model("llama", attention_bias=True)
    layout = [0, 0, 2, 3]
    overrides = fit_kv(model, layout, calib_ids[:4], "calibrated", progress=False)
    assert set(overrides) == {KEY_TEMPLATES[p].format(0) for p in ("k_proj", "v_proj", "k_bias", "v_bias")}
    assert kl_to(model, cla_model_from(model, layout, overrides=overrides), calib_ids) < kl_to(
        model, cla_model_from(model, layout), calib_ids
    )
    assert fit_kv(model, list(range(4)), calib_ids[:2], "calibrated", progress=False) == {}


def test_fit_kv_refuses_bad_input(calib_ids):
    model = tiny_model("llama")
    with pytest.raises(ClakitError, match="unknown"):
        fit_kv(model, uniform_layout(4, 2), calib_ids, "magic", progress=False)
    with pytest.raises(ClakitError, match="kv_source_layers"):
        fit_kv(model, [0, 0, 1, 2], calib_ids, "calibrated", progress=False)


def test_model_is_left_as_it_was(calib_ids):
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fit_kv(model, uniform_layout(4, 2), calib_ids[:2], "calibrated", progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters()) and all(p.grad is None for p in model.parameters())


# --- reconstruct ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_attention_output_matches_the_stock_layer(kind, calib_ids):
    from clakit.convert.reconstruct import attention_output

    model = tiny_model(kind)
    stats = collect_stats(model, calib_ids[:2], [], keep=[1], progress=False)
    x, y = stats.acts[1][0]
    attn = model.model.layers[1].self_attn
    params = {"q": attn.q_proj.weight, "k": attn.k_proj.weight, "v": attn.v_proj.weight}
    cos, sin = model.model.rotary_emb(x[None], torch.arange(x.shape[0])[None])
    with torch.no_grad():
        torch.testing.assert_close(attention_output(model, 1, x[None], x[None], params, cos, sin)[0], y)


def test_reconstruct_never_increases_the_objective_and_is_deterministic(calib_ids):
    from clakit.convert.reconstruct import reconstruct_overrides

    model = tiny_model("llama")
    layout = uniform_layout(4, 2)
    stats = collect_stats(model, calib_ids[:6], group_pairs(layout), keep=range(4), progress=False)
    closed = calibrated_overrides(model, layout, stats)
    runs = []
    for _ in range(2):
        report = {}
        runs.append(reconstruct_overrides(model, layout, stats, closed, steps=30, progress=False, report=report))
        assert set(report) == {"0-1", "2-3"}
        assert all(r["best"] <= r["start"] for r in report.values())
        assert any(r["best"] < 0.99 * r["start"] for r in report.values())  # it does optimise
    assert runs[0].keys() == runs[1].keys() and all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert KEY_TEMPLATES["q_proj"].format(1) in runs[0]
    fitted = cla_model_from(model, layout, overrides=runs[0])
    assert kl_to(model, fitted, calib_ids[:6]) < kl_to(
        model, cla_model_from(model, layout, overrides=closed), calib_ids[:6]
    )


def test_reconstruct_trains_o_proj_and_fits_later_groups_on_propagated_inputs(calib_ids):
    from clakit.convert.reconstruct import _ConvertedStream, reconstruct_overrides

    model = tiny_model("llama")
    layout = uniform_layout(4, 2)
    stats = collect_stats(model, calib_ids[:4], group_pairs(layout), keep=range(4), progress=False)
    closed = calibrated_overrides(model, layout, stats)
    run = {seq: reconstruct_overrides(model, layout, stats, closed, steps=10, progress=False, sequential=seq)
           for seq in (False, True)}  # fmt: skip
    assert {KEY_TEMPLATES["o_proj"].format(i) for i in range(4)} <= set(run[True])
    first = [k for k in run[True] if ".layers.0." in k or ".layers.1." in k]
    assert all(torch.equal(run[True][k], run[False][k]) for k in first)  # nothing before the first group
    assert not torch.equal(run[True][KEY_TEMPLATES["q_proj"].format(3)], run[False][KEY_TEMPLATES["q_proj"].format(3)])
    # the second group's inputs are those of the model in which only the first group is converted
    expected = []
    partial = cla_model_from(model, [0, 0, 2, 3], overrides={k: run[True][k] for k in first})
    hook = partial.model.layers[3].self_attn.q_proj.register_forward_pre_hook(lambda m, a: expected.append(a[0][0]))
    with torch.no_grad():
        for row in stats.ids:
            partial(row[None])
    hook.remove()
    got = _ConvertedStream(model, layout, stats.ids).member_inputs([2, 3], run[True], {0, 1})[3]
    assert len(got) == len(stats.ids) and all(torch.allclose(g, e) for g, e in zip(got, expected, strict=True))
    assert not torch.allclose(got[0], stats.acts[3][0][0])  # and they differ from the stock model's


# --- auto layout ---------------------------------------------------------------------------------------------------


def test_best_partition_avoids_expensive_groups():
    from clakit.convert.autolayout import best_partition

    costs = {(i, j): (0.0 if i == j else 1.0) for i in range(6) for j in range(i, min(6, i + 3))}
    costs[(0, 1)] = costs[(0, 2)] = 50.0  # layer 0 must not share
    costs[(3, 5)] = 0.5  # one cheap run of three
    layout = best_partition(costs, 6, 3)
    assert layout == [0, 1, 1, 3, 3, 3]


@pytest.mark.parametrize("saving", [0.25, 0.5, 0.67])
def test_auto_layout_meets_the_saving_and_is_valid(saving, calib_ids):
    from clakit.convert.autolayout import auto_layout
    from clakit.convert.layout import check_layout, kv_saving

    model = tiny_model("llama", num_hidden_layers=6)
    layout, scores = auto_layout(model, calib_ids[:4], saving, progress=False)
    check_layout(layout, 6)
    assert kv_saving(layout) >= saving - 1e-9 and scores["kv_saving"] == kv_saving(layout)
    measured = {name: c["nll_increase_mean_init"] for name, c in scores["candidates"].items()}
    assert scores["candidates"][scores["chosen"]]["layout"] == layout
    assert measured[scores["chosen"]] == min(measured.values())
    assert max(layout.count(p) for p in set(layout)) <= scores["max_group"]  # the refinement respects the cap
    again, scores_again = auto_layout(model, calib_ids[:4], saving, progress=False)
    assert again == layout and scores_again == scores


def test_auto_layout_refuses_impossible_savings(calib_ids):
    from clakit.convert.autolayout import auto_layout

    for saving in (1.0, -0.1):
        with pytest.raises(ClakitError, match="kv-saving"):
            auto_layout(tiny_model("llama"), calib_ids[:2], saving, progress=False)


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_scoring_hooks_match_the_cla_model(kind, calib_ids):
    """A candidate group is scored on the stock model with hooks: same logits as the real CLA model."""
    from clakit.convert.autolayout import _share_hooks

    model = tiny_model(kind, num_hidden_layers=6, attention_bias=kind == "llama")
    expected = cla_model_from(model, [0, 1, 1, 1, 4, 5], init="mean")
    handles = _share_hooks(model, [1, 2, 3])
    try:
        with torch.no_grad():
            torch.testing.assert_close(model(calib_ids[:2]).logits, expected(calib_ids[:2]).logits)
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():  # and the hooks are gone
        assert not torch.allclose(model(calib_ids[:2]).logits, expected(calib_ids[:2]).logits)


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_scoring_from_cached_layer_inputs_matches_the_full_forward(kind, calib_ids):
    """Candidates are scored from the producer's cached input: the same NLL as a forward from the start."""
    from clakit.convert.autolayout import _nll, _share_hooks, _tail_nll, layer_inputs

    model = tiny_model(kind, num_hidden_layers=6)
    ids = calib_ids[:2]
    hidden, base = layer_inputs(model, ids)
    assert base == pytest.approx(_nll(model, ids), rel=1e-6)  # the same forward's NLL
    for members in ([1, 2], [3, 4, 5], [0, 1]):
        handles = _share_hooks(model, members)
        try:
            full = _nll(model, ids)
            assert full != pytest.approx(base, rel=1e-4)  # the candidate does change the model
            assert _tail_nll(model, members[0], hidden[members[0]], ids) == pytest.approx(full, rel=1e-5)
        finally:
            for h in handles:
                h.remove()
    assert len(model.model.layers) == 6  # the stack is restored


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_refinement_trials_from_cached_inputs_match_the_full_forward(kind, calib_ids):
    """A trial (one consumer moved) reruns only the layers from `_tail_start`: the same NLL as the whole model, also
    when a group of the trial reaches back past the changed producers (layer 5 reading layer 0's K/V)."""
    from clakit.convert.autolayout import _nll, _tail_start, layer_inputs, layout_nll

    model = tiny_model(kind, num_hidden_layers=8)
    ids = calib_ids[:2]
    cases = {  # layout: [(consumer, new producer, expected start), ...]
        (0, 1, 1, 3, 3, 5, 6, 6): [(7, 5, 5), (4, 1, 1), (2, 0, 0), (7, 3, 3)],
        (0, 1, 1, 3, 3, 0, 6, 6): [(4, 1, 0), (7, 3, 0)],  # layer 5 reads layer 0: every tail starts at 0
        # interleaved groups: moving back to layer 2 (5 reads it) brings in layer 3, which reads layer 1
        (0, 1, 2, 1, 4, 2, 6, 4): [(7, 6, 1)],
    }
    for layout, trials in cases.items():
        layout = list(layout)
        hidden, nll = layer_inputs(model, ids, layout)
        assert nll == pytest.approx(_nll(cla_model_from(model, layout, init="mean"), ids), rel=1e-5)
        for c, p, start in trials:
            trial = layout[:c] + [p] + layout[c + 1 :]
            assert _tail_start(layout, trial) == start
            want = _nll(cla_model_from(model, trial, init="mean"), ids)
            assert layout_nll(model, trial, ids, start, hidden) == pytest.approx(want, rel=1e-5)


def test_tail_start_leaves_no_group_reaching_back_before_it():
    """On random interleaved layouts and moves: every layer from the start reads a producer from the start on, and
    no layer before it changes (else the trial's forward would need a producer input it never computes)."""
    import random

    from clakit.convert.autolayout import _tail_start

    rng = random.Random(0)
    for _ in range(2000):
        n = rng.randint(3, 24)
        layout = [0]
        for i in range(1, n):
            producers = [p for p in range(i) if layout[p] == p]
            layout.append(i if rng.random() < 0.4 else rng.choice(producers))
        consumers = [c for c in range(n) if layout[c] != c]
        if not consumers:
            continue
        c = rng.choice(consumers)
        options = [p for p in range(c) if layout[p] == p and p != layout[c]]
        if not options:
            continue
        trial = layout[:c] + [rng.choice(options)] + layout[c + 1 :]
        start = _tail_start(layout, trial)
        assert all(trial[i] >= start for i in range(start, n)), (layout, trial, start)
        assert layout[:start] == trial[:start] and layout[c] >= start  # the old producer's mean K/V changes too


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_layout_nll_emulates_any_layout_including_non_adjacent_groups(kind, calib_ids):
    from clakit.convert.autolayout import _nll, layout_nll

    model = tiny_model(kind, num_hidden_layers=6)
    for layout in ([0, 0, 2, 0, 4, 2], [0, 1, 1, 3, 1, 3], [0, 0, 2, 2, 4, 4]):
        expected = _nll(cla_model_from(model, layout, init="mean"), calib_ids[:2])
        assert layout_nll(model, layout, calib_ids[:2]) == pytest.approx(expected, rel=1e-5)


def test_refinement_keeps_the_producers_and_only_lowers_the_nll(calib_ids):
    """The local search beyond adjacent runs: valid moves only (a consumer re-pointed to an earlier producer), the
    same producers (so the same saving), each kept move lowering the measured NLL; deterministic."""
    from clakit.convert.autolayout import layout_nll, refine_layout
    from clakit.convert.layout import check_layout

    model = tiny_model("llama", num_hidden_layers=8, seed=3)
    ids, start = calib_ids[:4], [0, 0, 0, 3, 3, 5, 5, 5]
    refined, moves = refine_layout(model, start, ids, progress=False)
    assert moves  # on this model some consumers do better reading a producer that is not their run's
    check_layout(refined, 8)
    assert {p for p in refined} == {p for p in start}
    assert layout_nll(model, refined, ids) <= layout_nll(model, start, ids)
    layout = list(start)
    for m in moves:
        assert layout[m["layer"]] == m["from"] and m["to"] < m["layer"] and m["nll_gain"] > 0
        layout[m["layer"]] = m["to"]
    assert layout == refined
    assert refine_layout(model, start, ids, progress=False) == (refined, moves)
