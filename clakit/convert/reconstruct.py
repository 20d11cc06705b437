"""`reconstruct` init: local per-group reconstruction of attention outputs on cached calibration activations.

Starting from the closed-form `calibrated` fit, each group's shared k_proj/v_proj and its members' q_proj and o_proj
are optimised with Adam so that every member layer's attention-block output (o_proj output) under sharing matches
the one the stock model computed, each output channel weighted by its diagonal Fisher weight (squared loss gradient
w.r.t. that output, from the same backward pass as the calibration statistics). One group at a time, in layer order,
on activations cached by `collect_stats(keep=...)`: memory is bounded by those (shared layers x tokens x hidden x 2,
fp32). Sequential (as GPTQ): each group's inputs are recomputed by the model with the earlier groups already
converted, so a group also learns to absorb what the earlier ones lost; the targets stay the original outputs.

Measured on SmolLM2-135M (auto layout at half the KV cache, 4096 calibration tokens, held-out 8192 tokens, original
43.99; benchmarks/reconstruct_variants.py): 100 steps of K/V + q_proj 163; + o_proj 113; + sequential inputs 107.5.

Never worse than its start on the calibration objective: the full-data objective is evaluated at the start and every
`EVAL_EVERY` steps, and the best weights seen are returned.
"""

from dataclasses import replace

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from clakit.convert.calibrate import KVStats, mean_shared, shared_to_overrides
from clakit.convert.config import ConvertConfig
from clakit.convert.layerwise import LayerwiseModel, materialized, run_layers
from clakit.convert.layout import KEY_TEMPLATES, groups
from clakit.modeling import attention_window

# the defaults live in ConvertConfig: Adam's learning rate (3e-3 measured better than 1e-3 and 3e-4 on SmolLM2),
# o_proj trained, sequential inputs; steps per group: `default_steps`
LEARNING_RATE = ConvertConfig.reconstruct_lr
# steps per group at half the cache (SmolLM2 CLA2 layout, before distillation: 100 -> 200 -> 300 steps read 104.2 ->
# 90.1 -> 86.5), and the most `default_steps` gives a layout sharing fewer layers (docs/quality.md, stops 17 and 39)
BASE_STEPS, MAX_DEFAULT_STEPS = 200, 300
BATCH_SEQS = 2  # calibration sequences per Adam step
EVAL_EVERY = 20


def default_steps(layout: list[int]) -> int:
    """Adam steps per group when --reconstruct-steps is not given. A step's cost grows with the layers that share,
    so a layout with fewer consumers than half its layers (a saving below half the cache) gets proportionally more
    steps than BASE_STEPS, about the half-cache fit's time, up to MAX_DEFAULT_STEPS. SmolLM2 at 25% (8 consumers of
    30): 300 steps, held-out 50.95 -> 50.46 (1.158x -> 1.147x), the fit 180 s -> 247 s (docs/quality.md, stop 39)."""
    consumers = sum(source != layer for layer, source in enumerate(layout))
    scaled = round(BASE_STEPS * (len(layout) // 2) / consumers) if consumers else BASE_STEPS  # none: nothing to fit
    return min(MAX_DEFAULT_STEPS, max(BASE_STEPS, scaled))


def _attn(model, layer: int):
    return model.model.layers[layer].self_attn


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(batch, seq, heads*head_dim) -> (batch, heads, seq, head_dim)."""
    return x.view(*x.shape[:2], -1, head_dim).transpose(1, 2)


def attention_output(model, layer: int, x_own, x_kv, params: dict, cos, sin) -> torch.Tensor:
    """Layer `layer`'s attention-block output with queries from x_own (batch, seq, hidden) and K/V from x_kv.

    params: "q", "k", "v" weights (out, hidden), optional "o" (hidden, heads*head_dim; else the layer's own o_proj)
    and optional "q_bias"/"k_bias"/"v_bias"/"o_bias".
    Matches the stock attention (RoPE, GQA, causal mask, Mistral's sliding window) for x_kv == x_own.
    """
    attn = _attn(model, layer)
    d = attn.head_dim
    q = _heads(F.linear(x_own, params["q"], params.get("q_bias")), d)
    k = _heads(F.linear(x_kv, params["k"], params.get("k_bias")), d)
    v = _heads(F.linear(x_kv, params["v"], params.get("v_bias")), d)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    seq = x_own.shape[1]
    window = attention_window(model.config)  # a Llama's sliding_window key is no window: fitting one fit another model
    if window and window < seq:  # Mistral: causal and within the window (an explicit mask: the slower kernel)
        mask = torch.ones(seq, seq, dtype=torch.bool, device=x_own.device).tril()
        mask &= ~torch.ones_like(mask).tril(-window)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scaling, enable_gqa=True)
    else:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=attn.scaling, enable_gqa=True)
    own_o = attn.o_proj  # the member's own o_proj unless it is trained (in the fitting dtype: to fp32)
    o_weight = params.get("o", own_o.weight.detach().to(x_own.dtype))
    o_bias = params.get("o_bias", own_o.bias.detach().to(x_own.dtype) if own_o.bias is not None else None)
    return F.linear(out.transpose(1, 2).reshape(*x_own.shape[:2], -1), o_weight, o_bias)


def _start_params(model, members: list[int], overrides: dict, train_o: bool) -> dict[int, dict[str, torch.Tensor]]:
    """Per member: its q (and bias) plus the group's shared k/v (from the closed-form overrides), fp32 leaves."""
    p = members[0]
    shared = {}
    for kind, key in (("k", "k_proj"), ("v", "v_proj"), ("k_bias", "k_bias"), ("v_bias", "v_bias")):
        name = KEY_TEMPLATES[key].format(p)
        tensor = overrides.get(name)
        if tensor is None:  # no bias, or a group left as it was
            proj = getattr(_attn(model, p), key.replace("bias", "proj"))
            tensor = proj.weight if key.endswith("proj") else proj.bias
        if tensor is not None:
            shared[kind] = tensor.detach().float().clone().requires_grad_()
    out = {}
    for m in members:
        q_proj = _attn(model, m).q_proj
        own = {"q": q_proj.weight.detach().float().clone().requires_grad_()}
        if q_proj.bias is not None:
            own["q_bias"] = q_proj.bias.detach().float().clone().requires_grad_()
        if train_o:
            own["o"] = _attn(model, m).o_proj.weight.detach().float().clone().requires_grad_()
        out[m] = {**own, **shared}
    return out


def _objective(model, stats: KVStats, members, params, seqs, cos, sin) -> torch.Tensor:
    """Fisher-weighted squared error of every member's attention output over the given sequences (a scalar)."""
    p = members[0]
    total = 0.0
    for m in members:
        x_own = torch.stack([stats.acts[m][i][0] for i in seqs])
        y = torch.stack([stats.acts[m][i][1] for i in seqs])
        x_kv = torch.stack([stats.acts[p][i][0] for i in seqs])
        err = (attention_output(model, m, x_own, x_kv, params[m], cos, sin) - y).pow(2).sum((0, 1))  # (hidden,)
        total = total + (stats.fisher[("o_proj", m)].float() * err).sum()
    return total


def _full_objective(model, stats, members, params, cos, sin) -> float:
    with torch.no_grad():
        n = len(stats.acts[members[0]])
        return sum(float(_objective(model, stats, members, params, [i], cos, sin)) for i in range(n))


def _best_start(model, stats: KVStats, members: list[int], overrides: dict, cos, sin, train_o: bool):
    """The closed-form fit or the plain group mean, whichever reproduces the attention outputs better."""
    mean = {}
    for kind in ("k_proj", "v_proj"):
        mean.update(shared_to_overrides(model, kind, members[0], mean_shared(model, kind, members)))
    starts = [_start_params(model, members, candidate, train_o) for candidate in (overrides, mean)]
    values = [_full_objective(model, stats, members, params, cos, sin) for params in starts]
    best = min(range(len(starts)), key=values.__getitem__)
    return starts[best], values[best], ("calibrated", "mean")[best]


def reconstruct_group(
    model,
    stats: KVStats,
    members: list[int],
    overrides: dict,
    steps: int,
    seed: int,
    train_o: bool = ConvertConfig.train_o_proj,
    lr: float = LEARNING_RATE,
):
    """Optimised params of one group and its record: start and best full calibration objectives, start_from.

    The start is the better of the closed-form overrides and the group mean; the result is never worse than it.
    The members' layers must be in memory (`materialized`).
    """
    x0 = stats.acts[members[0]][0][0]  # (seq, hidden)
    with torch.no_grad():
        cos, sin = model.model.rotary_emb(x0[None], torch.arange(x0.shape[0], device=x0.device)[None])
    params, start, origin = _best_start(model, stats, members, overrides, cos, sin, train_o)
    leaves = list({id(t): t for group in params.values() for t in group.values()}.values())
    gen = torch.Generator().manual_seed(seed + members[0])
    n = len(stats.acts[members[0]])
    best = start
    best_state = [t.detach().clone() for t in leaves]
    opt = torch.optim.Adam(leaves, lr=lr)
    for step in range(1, steps + 1):
        seqs = torch.randperm(n, generator=gen)[: min(BATCH_SEQS, n)].tolist()
        opt.zero_grad()
        _objective(model, stats, members, params, seqs, cos, sin).backward()
        opt.step()
        if step % EVAL_EVERY == 0 or step == steps:
            value = _full_objective(model, stats, members, params, cos, sin)
            if value < best:
                best, best_state = value, [t.detach().clone() for t in leaves]
    with torch.no_grad():
        for t, b in zip(leaves, best_state, strict=True):
            t.copy_(b)
    return params, {"start": start, "start_from": origin, "best": best}


def _to_overrides(model, members: list[int], params: dict) -> dict[str, torch.Tensor]:
    dtype = _attn(model, members[0]).q_proj.weight.dtype
    p = members[0]
    out = {}
    for kind, key in (("k", "k_proj"), ("v", "v_proj"), ("k_bias", "k_bias"), ("v_bias", "v_bias")):
        if kind in params[p]:
            out[KEY_TEMPLATES[key].format(p)] = params[p][kind].detach().to(dtype)
    for m in members:
        out[KEY_TEMPLATES["q_proj"].format(m)] = params[m]["q"].detach().to(dtype)
        if "q_bias" in params[m]:
            out[KEY_TEMPLATES["q_proj"].format(m).replace(".weight", ".bias")] = params[m]["q_bias"].detach().to(dtype)
        if "o" in params[m]:
            out[KEY_TEMPLATES["o_proj"].format(m)] = params[m]["o"].detach().to(dtype)
    return out


class _ConvertedStream:
    """The kept calibration rows run through the model as converted so far, one decoder layer at a time.

    Groups are fitted in producer order. When group G (producer p) is fitted, every layer before p belongs to an
    earlier group, so the stream entering p is the final converted model's (`self.streams`, at `self.at`). From p to
    G's last member, layers of earlier groups are converted (fitted q/o; shared K/V computed from their producer's
    attention input in this stream, `self.sources`) and all others are stock: the inputs G is fitted on.
    """

    def __init__(self, model, layout: list[int], ids: torch.Tensor):
        self.model, self.layout, self.at = model, layout, 0
        self.runner = LayerwiseModel.in_memory(model)
        with torch.no_grad():
            self.streams = [model.get_input_embeddings()(row[None]) for row in ids]  # (1, seq, hidden) per row
        self.sources: dict[int, list[torch.Tensor]] = {}  # producer -> its attention input per row

    def member_inputs(self, members: list[int], fitted: dict, done: set[int]) -> dict[int, list[torch.Tensor]]:
        """Per member, per row: its (seq, hidden) fp32 attention input with the groups in `done` converted."""
        self._advance(members[0], fitted, done)
        streams, out = self.streams, {}
        for layer in range(self.at, members[-1] + 1):
            streams, x = self._layer(layer, streams, fitted if layer in done else None)
            if layer in members:
                out[layer] = [row[0].float() for row in x]
        return out

    def _advance(self, to: int, fitted: dict, done: set[int]) -> None:
        for layer in range(self.at, to):
            self.streams, x = self._layer(layer, self.streams, fitted if layer in done else None)
            if self.layout[layer] == layer:
                self.sources[layer] = x
        self.at = to
        for p in [p for p in self.sources if all(m < to for m, s in enumerate(self.layout) if s == p)]:
            del self.sources[p]  # no member of its group is left ahead

    @torch.no_grad()
    def _layer(self, layer: int, streams: list, fitted: dict | None) -> tuple[list, list]:
        """One layer over every row, converted (with `fitted`) or stock (None); returns (outputs, attention inputs)."""
        xs = []
        with self.runner.loaded(layer):
            attn = self.model.model.layers[layer].self_attn
            handles = [attn.q_proj.register_forward_pre_hook(lambda m, a: xs.append(a[0]))]
            if fitted is not None:
                handles += _converted_hooks(attn, layer, self.layout[layer], fitted, xs, self.sources)
            try:
                streams = [run_layers(self.model, h, layer, layer + 1) for h in streams]
            finally:
                for h in handles:
                    h.remove()
        return streams, xs


def _converted_hooks(attn, layer: int, producer: int, fitted: dict, xs: list, sources: dict) -> list:
    """Forward hooks giving `attn` its fitted q/o and its group's shared K/V, computed from the producer's attention
    input (`xs[-1]`, the current row's, for the producer itself; `sources[producer][row]` for a consumer)."""

    def weights(name: str):
        return fitted.get(name), fitted.get(name.replace(".weight", ".bias"))

    def replace_output(name: str, source):
        w, b = weights(name)
        return lambda module, args, out: F.linear(source(args[0]), w, b) if w is not None else out

    def from_producer(x):
        return xs[-1] if producer == layer else sources[producer][len(xs) - 1]

    own = lambda x: x  # noqa: E731
    return [
        attn.q_proj.register_forward_hook(replace_output(KEY_TEMPLATES["q_proj"].format(layer), own)),
        attn.o_proj.register_forward_hook(replace_output(KEY_TEMPLATES["o_proj"].format(layer), own)),
        attn.k_proj.register_forward_hook(replace_output(KEY_TEMPLATES["k_proj"].format(producer), from_producer)),
        attn.v_proj.register_forward_hook(replace_output(KEY_TEMPLATES["v_proj"].format(producer), from_producer)),
    ]


def _group_view(stats: KVStats, members: list[int]) -> KVStats:
    """`stats` with only the group's activations, in memory (they may be read from disk)."""
    return replace(stats, acts={m: stats.acts[m] for m in members})


def _with_inputs(stats: KVStats, members: list[int], converted: dict) -> KVStats:
    """A view of `stats` whose members' cached attention inputs come from the partially converted model; the
    targets stay the original model's attention outputs. (Targets that restore the original residual stream,
    y + h_original - h_converted, were tried: SmolLM2 held-out perplexity 607 against 108.)"""
    acts = dict(stats.acts)
    for m in members:
        acts[m] = [(x, y) for x, (_, y) in zip(converted[m], stats.acts[m], strict=True)]
    return replace(stats, acts=acts)


def reconstruct_overrides(
    model,
    layout: list[int],
    stats: KVStats,
    overrides: dict,
    *,
    seed: int = 0,
    steps=None,
    progress=True,
    report=None,
    train_o: bool = ConvertConfig.train_o_proj,
    sequential: bool = ConvertConfig.sequential,
    lr: float = LEARNING_RATE,
    out=None,
) -> dict[str, torch.Tensor]:
    """Closed-form `overrides` refined group by group; `report` (a dict), when given, gets each group's objectives.

    `out`: the mapping the results go into (default a copy of `overrides`); it may be `overrides` itself: a group's
    closed-form start is read before the group's own tensors are replaced.

    `sequential`: groups are fitted in layer order, each on the inputs the model computes once the earlier groups
    are converted (GPTQ-style), against the original model's outputs, so each group also absorbs upstream error.
    """
    from tqdm.auto import tqdm

    steps = default_steps(layout) if steps is None else steps
    out = dict(overrides) if out is None else out
    shared = [members for members in groups(layout).values() if len(members) > 1]
    if not shared:  # a layout sharing nothing (0,1,2,3) keeps no calibration rows (stats.ids): nothing to fit
        return out
    done: set[int] = set()
    stream = _ConvertedStream(model, layout, stats.ids) if sequential else None
    for members in tqdm(shared, desc="reconstruct", disable=not progress, leave=False):
        view = _group_view(stats, members)
        if stream is not None and done:
            view = _with_inputs(view, members, stream.member_inputs(members, out, done))
        with materialized(model, members):
            params, record = reconstruct_group(model, view, members, overrides, steps, seed, train_o, lr)
        if report is not None:
            report[f"{members[0]}-{members[-1]}"] = {"members": members, **record}
        out.update(_to_overrides(model, members, params))  # the best seen: never worse than either start
        done |= set(members)
    return out
