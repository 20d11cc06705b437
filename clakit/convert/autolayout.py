"""`--layout auto`: choose which layers share K/V from calibration data, meeting a requested KV-cache saving.

Every candidate group (a run of up to `max_group` adjacent layers led by its first) is scored by the Fisher-weighted
K/V error left after its closed-form `calibrated` fit, turned into an estimate of the per-token NLL increase (second
order: 1/2 * sum F * err^2, see `estimated_nats`). Scores come from one statistics pass (Gram matrices of layer inputs
within the window, diagonal Fisher of every K/V output), so all ~layers*max_group candidates cost one linear solve
each. Dynamic programming then picks the partition of the layers into at most `producers` groups with the least total
score. Per-group damage does not add up exactly, so the chosen layout is re-measured against uniform CLA-k with the
same saving on calibration text (each with its calibrated fit) and the better one is returned, with every score.
"""

import math

import torch

from clakit.convert.calibrate import (
    KVStats,
    calibrated_overrides,
    collect_stats,
    fit_group,
    group_error,
    remember_stats,
)
from clakit.convert.inmemory import cla_model_from
from clakit.convert.layout import kv_saving as layout_saving
from clakit.convert.layout import uniform_layout
from clakit.errors import ClakitError

REMEASURE_SEQS = 4  # calibration sequences used to compare the DP layout with uniform CLA-k


def producers_for(num_layers: int, saving: float) -> int:
    """Most producers a layout may keep and still save at least `saving` of the KV cache."""
    if not 0.0 <= saving < 1.0:
        raise ClakitError(f"--kv-saving must be in [0, 1) (e.g. 0.5 for half the KV cache), got {saving}")
    producers = math.floor(num_layers * (1.0 - saving) + 1e-9)
    if producers < 1:
        raise ClakitError(f"--kv-saving {saving} leaves no producer layer in a {num_layers}-layer model; ask for less")
    return producers


def estimated_nats(stats: KVStats, seq_len: int, error: float) -> float:
    """Second-order estimate of the mean NLL increase per token from a Fisher-weighted squared K/V error.

    Fisher sums (d mean-loss-of-a-sequence / d activation)^2 over tokens; per-token losses are seq_len times larger,
    and the error and Fisher are both sums over the N calibration tokens: 1/2 * seq_len^2 * error / N^2.
    """
    return 0.5 * seq_len**2 * error / max(1, stats.tokens) ** 2


def group_cost(model, stats: KVStats, members: list[int], seq_len: int) -> float:
    if len(members) == 1:
        return 0.0
    kinds = ("k_proj", "v_proj")
    error = sum(group_error(model, stats, k, members, fit_group(model, stats, k, members)) for k in kinds)
    return estimated_nats(stats, seq_len, error)


def best_partition(costs: dict[tuple[int, int], float], num_layers: int, producers: int) -> list[int]:
    """Layout from the cheapest split of 0..n-1 into <= `producers` runs; costs[(first, last)] of each allowed run."""
    inf = float("inf")
    # best[k][j]: least cost of covering layers [0, j) with k runs; back[k][j]: where the last run starts
    best = [[inf] * (num_layers + 1) for _ in range(producers + 1)]
    back = [[-1] * (num_layers + 1) for _ in range(producers + 1)]
    best[0][0] = 0.0
    for k in range(1, producers + 1):
        for j in range(1, num_layers + 1):
            for (first, last), cost in costs.items():
                if last == j - 1 and best[k - 1][first] + cost < best[k][j]:
                    best[k][j], back[k][j] = best[k - 1][first] + cost, first
    k = min(range(1, producers + 1), key=lambda k: (best[k][num_layers], -k))
    if best[k][num_layers] == inf:
        raise ClakitError("no layout meets the requested KV saving with the allowed group sizes")
    layout, j = [0] * num_layers, num_layers
    while j > 0:
        first = back[k][j]
        layout[first:j] = [first] * (j - first)
        j, k = first, k - 1
    return layout


def _calibration_nll(model, layout: list[int], stats: KVStats, input_ids: torch.Tensor) -> float:
    cla = cla_model_from(model, layout, init="mean", overrides=calibrated_overrides(model, layout, stats))
    with torch.no_grad():
        losses = [cla(row[None], labels=row[None], use_cache=False).loss.item() for row in input_ids]
    return sum(losses) / len(losses)


def auto_layout(model, input_ids: torch.Tensor, kv_saving: float, *, seed: int = 0, progress: bool = True):
    """(layout, scores): a valid layout saving at least `kv_saving` of the KV cache, chosen from calibration data.

    Deterministic: no sampling is involved (`seed` is accepted for a uniform interface with `fit_kv`).
    """
    n = model.config.num_hidden_layers
    producers = producers_for(n, kv_saving)
    factor = math.ceil(n / producers)  # the uniform CLA-k meeting the saving
    while layout_saving(uniform_layout(n, factor)) < kv_saving - 1e-9:
        factor += 1
    max_group = min(n, max(3, factor + 1))
    pairs = [(i, j) for i in range(n) for j in range(i, min(n, i + max_group))]
    stats = collect_stats(model, input_ids, pairs, progress=progress)
    remember_stats(model, input_ids, stats)
    seq_len = input_ids.shape[1]
    costs = {
        (i, j): group_cost(model, stats, list(range(i, j + 1)), seq_len)
        for i in range(n)
        for j in range(i, min(n, i + max_group))
    }
    candidates = {"dp": best_partition(costs, n, producers), f"uniform_cla{factor}": uniform_layout(n, factor)}
    subset = input_ids[: min(REMEASURE_SEQS, len(input_ids))]
    measured = {name: _calibration_nll(model, lay, stats, subset) for name, lay in candidates.items()}
    chosen = min(measured, key=measured.get)
    scores = {
        "method": "fisher-dp",
        "kv_saving_requested": kv_saving,
        "kv_saving": layout_saving(candidates[chosen]),
        "max_group": max_group,
        "calibration_nll_original": stats.loss,
        "group_estimated_nats": {f"{i}-{j}": round(c, 6) for (i, j), c in costs.items() if j > i},
        "candidates": {
            name: {"layout": lay, "calibration_nll": round(measured[name], 6)} for name, lay in candidates.items()
        },
        "chosen": chosen,
    }
    return candidates[chosen], scores
