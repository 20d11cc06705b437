"""`--layout auto`: choose which layers share K/V from calibration data, meeting a requested KV-cache saving.

Every candidate group (a run of 2..`max_group` adjacent layers led by its first) is scored by the increase of the
calibration NLL per token (`_score`: repeated tokens weighed less than prose) when that group alone shares its K/V
(group mean init), measured directly over at most `SCORE_TOKENS` calibration tokens (`scoring_rows`), the sharing
emulated with hooks on the stock model (no model copy): one sweep carries every candidate's residual stream through the
layers together (`sweep_costs`), each layer read once per chunk of candidates, where a forward per candidate read
layers quadratically in depth. Dynamic programming then picks the partition of the layers into at most `producers`
groups with the least total increase. Per-group damage does not add up exactly, so the chosen layout is re-measured
against uniform CLA-k with the same saving, and the better one is refined beyond adjacent runs: each consumer may move
to one of the 3 nearest other producers before it when that lowers the whole layout's measured NLL (no group growing
past `max_group`; without that cap the search formed a 6-layer group that reconstruction fitted worse: held-out 107.5
-> 112.2, against 104.2 with it). The best measured layout is returned, with every score and move.

(A Fisher-weighted estimate of each group's K/V error, free from the calibration statistics, was tried first and
ranked groups badly: it scored sharing layers 0-1 among the cheapest, while it is by far the most damaging.)
"""

import math

import torch
import torch.nn.functional as F

from clakit.convert.calibrate import _own_weight, as_projection, mean_shared
from clakit.convert.layerwise import LAYER_PREFIX, materialized, run_layers
from clakit.convert.layout import check_shareable, uniform_layout
from clakit.convert.layout import groups as layout_groups
from clakit.convert.layout import kv_saving as layout_saving
from clakit.copies import add_copies
from clakit.errors import ClakitError
from clakit.losses import causal_lm_loss

SCORE_TOKENS = 1024  # calibration tokens each candidate is scored on
# what a repeated token of a scoring row counts against a prose token in the score (`_score`); at 1 (stop 36) the
# repeats outweighed prose enough to cost SmolLM2 held-out perplexity at a 25% saving (docs/quality.md, stop 38)
REPEAT_WEIGHT = 0.25
REFINE_WINDOW = 3  # producers before a consumer that the refinement tries (the nearest ones)
REFINE_MIN_GAIN = 1e-3  # nats per token: smaller gains are noise on SCORE_TOKENS tokens
KINDS = ("k_proj", "v_proj")
# runs past their group that the sweep passes through a layer in one forward: the forward's overhead is shared, while
# its activations (at 70B the MLP's 28,672-wide intermediate, ~0.1 GB per 1,024 tokens) stay under ~1 GB
SWEEP_BATCH = 8


def scoring_rows(input_ids: torch.Tensor) -> torch.Tensor:
    """The rows every candidate is scored on: the first SCORE_TOKENS of the calibration windows, each row's second
    half made a repeat of its first (`add_copies` with a span of half the row), so that the score (`_score`) sees
    in-context retrieval. Scored on prose alone, the search shared SmolLM2's layers 16-18, where sharing any
    adjacent pair of layers 15-18 raises the loss on repeated tokens by 1.35-1.65 nats at mean init (every other pair
    but 0-1 by at most 0.41), and the converted model answered 0 of 90 passkeys (docs/quality.md, stop 36)."""
    ids = input_ids[: scored_rows(input_ids.shape)].clone()
    span = repeat_span(ids.shape[1])
    return add_copies(ids, 1.0, span) if span else ids


def scored_rows(shape) -> int:
    """How many of the (rows, tokens) calibration windows `scoring_rows` scores: SCORE_TOKENS' worth, at least one."""
    return min(shape[0], max(1, SCORE_TOKENS // shape[1]))


def repeat_span(row_tokens: int) -> int:
    """How many tokens at the end of a scoring row repeat its first ones (`scoring_rows`; the record says it)."""
    return row_tokens // 2


def producers_for(num_layers: int, saving: float) -> int:
    """Most producers a layout may keep and still save at least `saving` of the KV cache."""
    if not 0.0 <= saving < 1.0:
        raise ClakitError(f"--kv-saving must be in [0, 1) (e.g. 0.5 for half the KV cache), got {saving}")
    producers = math.floor(num_layers * (1.0 - saving) + 1e-9)  # the epsilon keeps 4 * (1 - 0.75) at 1
    if saving > 0:  # a saving below the epsilon (1e-10) still asks for one shared layer, not none
        producers = min(producers, num_layers - 1)
    check_shareable(num_layers)
    if producers < 1:
        raise ClakitError(f"--kv-saving {saving} leaves no producer layer in a {num_layers}-layer model; ask for less")
    return producers


@torch.no_grad()
def _nll(model, input_ids: torch.Tensor) -> float:
    """`_score` of (n_seq, seq) ids, all sequences in one batch: with a LayerwiseModel each layer is then read once
    per pass, not once per sequence."""
    return _score(model(input_ids, use_cache=False).logits, input_ids)


def _score(logits: torch.Tensor, input_ids: torch.Tensor) -> float:
    """Weighted mean next-token NLL of (n_seq, seq) ids from their (n_seq, seq, vocab) logits: the last
    `repeat_span(seq)` targets of each row (`scoring_rows`' repeat) count REPEAT_WEIGHT each, the others 1, so that
    losing retrieval costs a layout without drowning what it does to prose (equal weights: the plain mean loss)."""
    n, seq = input_ids.shape
    nll = causal_lm_loss(logits, input_ids, reduction="none")  # (n, seq - 1)
    weights = torch.ones(seq - 1, device=nll.device)  # target t + 1 of position t
    weights[seq - 1 - repeat_span(seq) :] = REPEAT_WEIGHT
    return (nll * weights).sum().item() / (weights.sum().item() * n)


def _share_hooks(model, members: list[int]) -> list:
    """Hooks making the stock model behave as if `members` shared the producer's K/V (mean init)."""
    attn = [model.model.layers[i].self_attn for i in members]
    with materialized(model, members):  # a LayerwiseModel's layers are read for the mean, then released
        dtype = attn[0].k_proj.weight.dtype
        shared = {kind: mean_shared(model, kind, members).T.to(dtype) for kind in KINDS}
    producer_input = {}
    return [h for k, a in enumerate(attn) for h in _member_hooks(a, shared, producer_input, producer=k == 0)]


def _member_hooks(attn, shared: dict, producer_input: dict, producer: bool) -> list:
    """Hooks on one group member's attention: the producer keeps its k_proj input (n_seq, seq, hidden: after its
    input norm) in `producer_input`; every member's k_proj/v_proj output becomes `shared`'s projection of it."""

    def keep_input(module, args):
        producer_input["x"] = args[0]

    def replace(kind):
        def hook(module, args, output):
            w = shared[kind]  # (out, hidden[+1]): the bias, if any, is the last column
            x = producer_input["x"]
            return F.linear(x, w[:, : x.shape[-1]], w[:, x.shape[-1]] if w.shape[1] > x.shape[-1] else None)

        return hook

    handles = [attn.k_proj.register_forward_pre_hook(keep_input)] if producer else []
    handles.append(attn.k_proj.register_forward_hook(replace("k_proj")))
    handles.append(attn.v_proj.register_forward_hook(replace("v_proj")))
    return handles


@torch.no_grad()
def layer_inputs(model, input_ids: torch.Tensor, layout: list[int] | None = None) -> tuple[list[torch.Tensor], float]:
    """Per decoder layer, the (n_seq, seq, hidden) residual stream entering it on `input_ids`, and the NLL
    (`_score`) of the same forward: the stock model's, or with `layout`'s sharing (mean init)."""
    layers = model.model.layers
    captured = [[] for _ in layers]
    hooks = [layer.register_forward_pre_hook(_keeper(captured[i])) for i, layer in enumerate(layers)]
    hooks += _layout_hooks(model, layout) if layout is not None else []
    try:
        nll = _nll(model, input_ids)  # one batch: each layer read once
    finally:
        for h in hooks:
            h.remove()
    # one batch: one tensor per layer, kept as is (a cat would copy every layer's: twice the cache at its peak)
    return [c[0] if len(c) == 1 else torch.cat(c) for c in captured], nll


def _keeper(store: list):
    return lambda module, args: store.append(args[0].detach())


@torch.no_grad()
def _tail_nll(model, start: int, hidden: torch.Tensor, input_ids: torch.Tensor) -> float:
    """NLL (`_score`) of a forward that starts at decoder layer `start` from its cached inputs `hidden` (n_seq, seq,
    hidden): the layers before a candidate group compute what the stock model does, so they are not rerun."""
    body = model.model
    full = body.layers
    body.layers = full[start:]
    try:
        return _score(model(inputs_embeds=hidden, use_cache=False).logits, input_ids)
    finally:
        body.layers = full


def group_cost(model, members: list[int], input_ids: torch.Tensor, base_nll: float, hidden=None) -> float:
    """Measured NLL increase per token when only `members` share K/V (mean init); 0 for a single layer.

    `hidden`: `layer_inputs(model, input_ids)[0]`, to start the forward at the group's producer (about twice faster).
    """
    if len(members) == 1:
        return 0.0
    handles = _share_hooks(model, members)
    try:
        nll = _nll(model, input_ids) if hidden is None else _tail_nll(model, members[0], hidden[members[0]], input_ids)
        return max(0.0, nll - base_nll)
    finally:
        for h in handles:
            h.remove()


def sweep_costs(
    model, runs: list[tuple[int, int]], input_ids, base_nll: float, hidden, chunk: int = 0, progress=False
) -> dict:
    """`group_cost` of every run (first, last) of adjacent layers, reading each decoder layer once per chunk of runs
    instead of once per run from its producer on (n_layers^2 * max_group / 2 reads -> about 2 * n_layers).

    Each run's residual stream is carried through the layers together with the others', so a chunk holds `chunk`
    streams of (n_seq, seq, hidden). Default chunk: as many runs as there are layers, so the streams take no more
    than the cache of layer inputs `hidden` held beside them (at 70B, 80 x 1,024 tokens x 8,192 x 2 bytes ~ 1.3 GB,
    not ~4 GB for all ~240 runs at once): the scoring's peak stays within about twice the per-run scoring's, and its
    reads stay linear (70B, max group 3: 159 runs in 2 chunks, 80 + 40 layer reads, not ~6,900)."""
    costs = {(i, j): 0.0 for i, j in runs if j == i}  # a single layer shares nothing
    shared = [r for r in runs if r[1] > r[0]]  # in producer order: a later chunk's sweep starts later
    chunk = chunk or len(hidden)
    for start in range(0, len(shared), chunk):
        costs.update(_sweep(model, shared[start : start + chunk], input_ids, base_nll, hidden, progress))
    return {r: costs[r] for r in runs}


@torch.no_grad()
def _sweep(model, runs: list[tuple[int, int]], input_ids, base_nll: float, hidden, progress=False) -> dict:
    """One pass over the layers from the chunk's first producer: at each layer, loaded once (as a LayerwiseModel's
    `offloaded()` forward loads it), every started run's stream goes through it; `group_cost` of each run."""
    from tqdm.auto import tqdm

    runs = sorted(runs, key=lambda r: (r[1], r[0]))  # by last member: the runs past their group are a prefix
    n = len(model.model.layers)
    streams = hidden[0].new_empty((len(runs), *hidden[0].shape))  # (runs, n_seq, seq, hidden)
    own, states = {}, {}  # layer -> its own K/V weights (lookahead); run -> (shared K/V, producer input)
    layers = range(min(i for i, _ in runs), n)
    for layer in tqdm(layers, desc="scoring groups", disable=not progress, leave=False):
        with materialized(model, [layer]):  # the one read of this layer in this sweep; the forwards below reuse it
            past = sum(j < layer for _, j in runs)
            for s in range(0, past, SWEEP_BATCH):  # the stock layer for them all, SWEEP_BATCH runs a forward
                part = streams[s : min(past, s + SWEEP_BATCH)]  # (runs, n_seq, seq, hidden)
                part.copy_(run_layers(model, part.flatten(0, 1), layer, layer + 1).view_as(part))
            for k in range(past, len(runs)):
                if runs[k][0] <= layer:
                    streams[k] = _group_layer(model, layer, runs[k], streams[k], hidden, own, states)
        own.pop(layer, None)
    return {r: max(0.0, _tail_nll(model, n, streams[k], input_ids) - base_nll) for k, r in enumerate(runs)}


def _group_layer(model, layer: int, run: tuple[int, int], stream, hidden, own: dict, states: dict):
    """`run`'s (n_seq, seq, hidden) stream through `layer`, one of its members, with `_share_hooks`' emulation:
    the producer keeps its k_proj input, every member's K/V is the group-mean projection of it."""
    first, last = run
    if layer == first:  # the run starts: the stock stream entering its producer, and its group means
        stream = hidden[first]
        members = list(range(first, last + 1))
        for m in members:
            own.setdefault(m, _own_kv(model, m))
        states[run] = (_group_means(model, members, own), {})
    shared, producer_input = states[run] if layer < last else states.pop(run)
    return _through_shared(model, layer, stream, shared, producer_input, producer=layer == first)


def _group_means(model, members: list[int], own: dict) -> dict:
    """{kind: the group's shared projection, (out, hidden[+1]) in the layers' dtype}, as `mean_shared` computes it,
    from `own` (member -> its `_own_kv`)."""
    dtype = model.model.layers[members[0]].self_attn.k_proj.weight.dtype
    return {kind: torch.stack([own[m][kind] for m in members]).mean(0).T.to(dtype) for kind in KINDS}


def _through_shared(model, layer: int, stream, shared: dict, producer_input: dict, producer: bool):
    """`stream` through `layer` with its K/V replaced by `shared`'s projection of the producer's input
    (`_member_hooks`), the hooks removed afterwards."""
    handles = _member_hooks(model.model.layers[layer].self_attn, shared, producer_input, producer)
    try:
        return run_layers(model, stream, layer, layer + 1)
    finally:
        for h in handles:
            h.remove()


def _own_kv(model, layer: int) -> dict:
    """{kind: `layer`'s own (hidden[+1], out) fp64 projection}, as `mean_shared` stacks them. A group's means are
    needed at its producer, before its later members' turn in the sweep: a LayerwiseModel's layer not in memory
    gives just its k/v tensors from the checkpoint (cast as `loaded` casts them; ~2% of a 70B layer's bytes), so
    the sweep still reads each whole layer once."""
    loader = getattr(model, "_layerwise", None)
    attn = model.model.layers[layer].self_attn
    if loader is None or not attn.k_proj.weight.is_meta:
        return {kind: _own_weight(model, kind, layer) for kind in KINDS}

    def read(kind: str, name: str) -> torch.Tensor:
        tensor = loader.checkpoint.get(LAYER_PREFIX.format(layer) + f"self_attn.{kind}.{name}")
        return tensor.to(loader.device, loader.dtype)  # as `loaded` casts it

    biased = {kind: getattr(attn, kind).bias is not None for kind in KINDS}
    return {kind: as_projection(read(kind, "weight"), read(kind, "bias") if biased[kind] else None) for kind in KINDS}


def _layout_hooks(model, layout: list[int], start: int = 0) -> list:
    """Sharing hooks for `layout`'s groups that have a member at or after layer `start`."""
    groups = [m for m in layout_groups(layout).values() if len(m) > 1 and m[-1] >= start]
    return [h for members in groups for h in _share_hooks(model, members)]


@torch.no_grad()
def layout_nll(model, layout: list[int], input_ids: torch.Tensor, start: int = 0, hidden=None) -> float:
    """Calibration NLL of `layout` (mean init), emulated with hooks on the stock model: no copy per candidate.

    With `hidden` (`layer_inputs` under a layout equal to this one before layer `start`), the forward starts at
    `start`; every group reaching `start` or later must then have its producer there or later (`_tail_start`)."""
    handles = _layout_hooks(model, layout, start)
    try:
        return _nll(model, input_ids) if hidden is None else _tail_nll(model, start, hidden[start], input_ids)
    finally:
        for h in handles:
            h.remove()


def _tail_start(layout: list[int], trial: list[int]) -> int:
    """First layer whose input may differ between two layouts: the producers of every group that changed (their
    mean K/V change), moved back to the producer of any group of `trial` reaching past it (its members need it),
    until none does: with interleaved groups a step back can bring in a layer that reads an earlier producer."""
    changed = [i for i, (a, b) in enumerate(zip(layout, trial, strict=True)) if a != b]
    start = min(min(layout[i], trial[i]) for i in changed)
    while (earliest := min(trial[start:])) < start:
        start = earliest
    return start


def refine_layout(
    model, layout: list[int], input_ids: torch.Tensor, window: int = REFINE_WINDOW, max_group: int = 0, progress=True
):
    """Greedy local search beyond runs of adjacent layers: each consumer in turn tries reading the K/V of each of the
    `window` nearest other producers before it (the producers and so the saving stay the same; with `max_group`,
    no group grows beyond it); a move is kept when it lowers the measured calibration NLL of the whole layout.
    Returns (layout, accepted moves).

    # CLA: a LayerwiseModel (layers read from the checkpoint) goes to `_refine_layerwise`: one pass over the layers
    per consumer. Here (a model in memory: nothing to read) each trial is a forward from the first layer it changes."""
    if getattr(model, "_layerwise", None) is not None:
        return _refine_layerwise(model, layout, input_ids, window, max_group, progress)
    from tqdm.auto import tqdm

    layout, moves = list(layout), []
    hidden, best = layer_inputs(model, input_ids, layout)  # each trial reruns only the layers it can change
    consumers = [c for c, p in enumerate(layout) if p != c]
    for c in tqdm(consumers, desc="refining layout", disable=not progress, leave=False):
        for p in _refine_options(layout, c, window, max_group):
            trial = layout[:c] + [p] + layout[c + 1 :]
            nll = layout_nll(model, trial, input_ids, _tail_start(layout, trial), hidden)
            if nll < best - REFINE_MIN_GAIN:
                moves.append({"layer": c, "from": layout[c], "to": p, "nll_gain": round(best - nll, 6)})
                layout, best = trial, nll
                del hidden  # the old layout's cache (layers x tokens x hidden) goes before the new one is built
                hidden, _ = layer_inputs(model, input_ids, layout)
    return layout, moves


def _refine_layerwise(model, layout: list[int], input_ids, window: int, max_group: int, progress: bool):
    """`refine_layout` reading each layer once per consumer: its trials share one pass (`_trial_nlls`, the group
    means cached across trials), and the cache of layer inputs is rebuilt in the next consumer's pass, from the first
    layer the last move changed (from the embeddings at the start): a forward per trial read every layer from the
    trial's start and every shared group's layers again for its means, ~15,000 reads of a 70B's 1.7 GB layers."""
    from tqdm.auto import tqdm

    layout, moves, means = list(layout), [], {}
    hidden = [model.get_input_embeddings()(input_ids)] + [None] * (len(layout) - 1)  # built in the first pass
    stale, best = (layout, 0), None  # the layout whose inputs `hidden` must be rebuilt for, from which layer
    consumers = [c for c, p in enumerate(layout) if p != c]
    for c in tqdm(consumers, desc="refining layout", disable=not progress, leave=False):
        trials = [layout[:c] + [p] + layout[c + 1 :] for p in _refine_options(layout, c, window, max_group)]
        if not trials:
            continue
        first = [stale] if stale else []  # the rebuild rides in this pass, ahead of the trials
        starts = [start for _, start in first] + [_tail_start(layout, trial) for trial in trials]
        nlls = _trial_nlls(model, [lay for lay, _ in first] + trials, starts, input_ids, hidden, means, bool(first))
        best = nlls[0] if best is None else best  # the first pass rebuilt the starting layout's: its NLL
        before, stale = layout, None
        for trial, nll in zip(trials, nlls[len(nlls) - len(trials) :], strict=True):
            if nll < best - REFINE_MIN_GAIN:  # each trial differs from `layout` (as it now is) at c alone
                moves.append({"layer": c, "from": layout[c], "to": trial[c], "nll_gain": round(best - nll, 6)})
                layout, best = trial, nll
        stale = (layout, _tail_start(before, layout)) if layout != before else None
        kept = {tuple(m) for m in layout_groups(layout).values()}  # the means of groups gone are not needed again
        means = {g: w for g, w in means.items() if g in kept}
    return layout, moves


def _refine_options(layout: list[int], c: int, window: int, max_group: int) -> list[int]:
    """The `window` nearest producers before consumer `c` other than its own, none holding `max_group` layers."""
    sizes = {p: layout.count(p) for p in set(layout)}
    options = [p for p in range(c) if layout[p] == p and p != layout[c]][-window:]
    return [p for p in options if not max_group or sizes[p] < max_group]


@torch.no_grad()
def _trial_nlls(model, trials, starts, input_ids, hidden, means: dict, rebuild: bool = False) -> list[float]:
    """`layout_nll` of each trial layout, starting at its layer `starts[k]` from the cache of layer inputs `hidden`,
    all in one pass: each layer read once, every trial's (n_seq, seq, hidden) stream through it with the trial's
    sharing emulated (`_member_hooks`; `means`: group members -> shared K/V, filled as needed). `rebuild`: the first
    trial's stream writes its layer inputs into `hidden` as it goes (the old tensors go as the new come), ahead of
    the other trials, which then start from them."""
    n = len(model.model.layers)
    groups = [layout_groups(trial) for trial in trials]
    streams, inputs = [None] * len(trials), [{} for _ in trials]  # per trial: producer -> its k_proj input
    for layer in range(min(starts), n):
        with materialized(model, [layer]):  # the one read of this layer for all the trials
            for k, trial in enumerate(trials):
                if starts[k] > layer:
                    continue
                streams[k] = hidden[layer] if streams[k] is None else streams[k]
                if rebuild and k == 0:
                    hidden[layer] = streams[k]  # the new layout's input of this layer
                streams[k] = _shared_layer(model, layer, groups[k][trial[layer]], streams[k], means, inputs[k])
    return [_tail_nll(model, n, stream, input_ids) for stream in streams]


def _shared_layer(model, layer: int, members: list[int], stream, means: dict, inputs: dict):
    """`stream` through `layer`, one of its group's `members`, the group sharing its producer's K/V (mean init)."""
    if len(members) == 1:
        return run_layers(model, stream, layer, layer + 1)
    if tuple(members) not in means:  # later members' k/v read ahead (`_own_kv`)
        means[tuple(members)] = _group_means(model, members, {m: _own_kv(model, m) for m in members})
    box = inputs.setdefault(members[0], {})
    return _through_shared(model, layer, stream, means[tuple(members)], box, producer=layer == members[0])


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


def auto_layout(
    model,
    input_ids: torch.Tensor,
    kv_saving: float,
    *,
    refine: bool = True,
    refine_max_group: int | None = None,
    progress: bool = True,
):
    """(layout, scores): a valid layout saving at least `kv_saving` of the KV cache, chosen from calibration data.

    `refine`: the local search beyond adjacent runs (`refine_layout`) after the DP, creating no group larger than
    `refine_max_group` (None: the scoring's largest group). Deterministic: no sampling is involved. `model` may be
    a `LayerwiseModel`'s inside its `offloaded()` block: every pass is a forward, one layer in memory at a time.
    """
    if input_ids.ndim != 2 or input_ids.shape[1] < 2:  # one token per row has no next token to score
        shape = tuple(input_ids.shape)
        raise ClakitError(f"the layout search needs (rows, tokens) ids of 2 or more tokens per row, got {shape}")
    input_ids = input_ids.to(model.get_input_embeddings().weight.device)  # a GPU model given CPU ids (library use)
    n = model.config.num_hidden_layers
    producers = producers_for(n, kv_saving)
    factor = math.ceil(n / producers)  # the uniform CLA-k meeting the saving
    while layout_saving(uniform_layout(n, factor)) < kv_saving - 1e-9:
        factor += 1
    max_group = min(n, max(3, factor + 1))
    ids = scoring_rows(input_ids)
    hidden, base = layer_inputs(model, ids)
    runs = [(i, j) for i in range(n) for j in range(i, min(n, i + max_group))]
    costs = sweep_costs(model, runs, ids, base, hidden, progress=progress)  # group_cost's, in a few layer passes
    del hidden  # layers x score tokens x hidden: the refinement caches its own (2.7 GB at 70B)
    candidates = {"dp": best_partition(costs, n, producers), f"uniform_cla{factor}": uniform_layout(n, factor)}
    measured = {name: layout_nll(model, lay, ids) - base for name, lay in candidates.items()}
    chosen = min(measured, key=measured.get)
    moves = []
    if refine:
        cap = refine_max_group or max_group
        refined, moves = refine_layout(model, candidates[chosen], ids, max_group=cap, progress=progress)
        if moves:
            candidates["refined"] = refined
            measured["refined"] = layout_nll(model, refined, ids) - base
            chosen = min(measured, key=measured.get)
    scores = {
        "method": "measured-dp",
        "kv_saving_requested": kv_saving,
        "kv_saving": layout_saving(candidates[chosen]),
        "max_group": max_group,
        "score_tokens": ids.numel(),
        "score_repeat_tokens": repeat_span(ids.shape[1]),  # per row (`scoring_rows`)
        "score_repeat_weight": REPEAT_WEIGHT,  # each counts that against a prose token (`_score`)
        "calibration_nll_original": round(base, 6),
        "group_nll_increase": {f"{i}-{j}": round(c, 6) for (i, j), c in costs.items() if j > i},
        "candidates": {
            name: {"layout": lay, "nll_increase_mean_init": round(measured[name], 6)}
            for name, lay in candidates.items()
        },
        "chosen": chosen,
        "refine_moves": moves,
    }
    return candidates[chosen], scores
