"""`reconstruct` init: local per-group reconstruction of attention outputs on cached calibration activations.

Starting from the closed-form `calibrated` fit, each group's shared k_proj/v_proj and its members' q_proj are
optimised with Adam so that every member layer's attention-block output (o_proj output) under sharing matches the one
the stock model computed, each output channel weighted by its diagonal Fisher weight (squared loss gradient w.r.t.
that output, from the same backward pass as the calibration statistics). One group at a time, on activations cached
by `collect_stats(keep=...)`: memory is bounded by those (shared layers x tokens x hidden x 2, fp32).

Never worse than its start on the calibration objective: the full-data objective is evaluated at the start and every
`EVAL_EVERY` steps, and the best weights seen are returned.
"""

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from clakit.convert.calibrate import KVStats, mean_shared, shared_to_overrides
from clakit.convert.layout import KEY_TEMPLATES, groups

DEFAULT_STEPS = 200  # SmolLM2, auto layout: 200 steps at lr 3e-3 gave held-out ppl 389 (20 steps at 3e-4: 641)
LEARNING_RATE = 3e-3  # Adam; measured better than 1e-3 and 3e-4 on SmolLM2
BATCH_SEQS = 2  # calibration sequences per Adam step
EVAL_EVERY = 20


def _attn(model, layer: int):
    return model.model.layers[layer].self_attn


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(batch, seq, heads*head_dim) -> (batch, heads, seq, head_dim)."""
    return x.view(*x.shape[:2], -1, head_dim).transpose(1, 2)


def attention_output(model, layer: int, x_own, x_kv, params: dict, cos, sin) -> torch.Tensor:
    """Layer `layer`'s attention-block output with queries from x_own (batch, seq, hidden) and K/V from x_kv.

    params: "q", "k", "v" weights (out, hidden) and optional "k_bias"/"v_bias"/"q_bias"; o_proj is the layer's own.
    Matches the stock attention (RoPE, GQA, causal mask, Mistral's sliding window) for x_kv == x_own.
    """
    attn = _attn(model, layer)
    d = attn.head_dim
    q = _heads(F.linear(x_own, params["q"], params.get("q_bias")), d)
    k = _heads(F.linear(x_kv, params["k"], params.get("k_bias")), d)
    v = _heads(F.linear(x_kv, params["v"], params.get("v_bias")), d)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    seq = x_own.shape[1]
    mask = torch.ones(seq, seq, dtype=torch.bool, device=x_own.device).tril()
    window = getattr(model.config, "sliding_window", None)
    if window:
        mask &= ~torch.ones_like(mask).tril(-window)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scaling, enable_gqa=True)
    o_bias = attn.o_proj.bias.detach() if attn.o_proj.bias is not None else None  # o_proj is not trained
    return F.linear(out.transpose(1, 2).reshape(*x_own.shape[:2], -1), attn.o_proj.weight.detach(), o_bias)


def _start_params(model, members: list[int], overrides: dict) -> dict[int, dict[str, torch.Tensor]]:
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


def _best_start(model, stats: KVStats, members: list[int], overrides: dict, cos, sin):
    """The closed-form fit or the plain group mean, whichever reproduces the attention outputs better."""
    mean = {}
    for kind in ("k_proj", "v_proj"):
        mean.update(shared_to_overrides(model, kind, members[0], mean_shared(model, kind, members)))
    starts = [_start_params(model, members, candidate) for candidate in (overrides, mean)]
    values = [_full_objective(model, stats, members, params, cos, sin) for params in starts]
    best = min(range(len(starts)), key=values.__getitem__)
    return starts[best], values[best], ("calibrated", "mean")[best]


def reconstruct_group(model, stats: KVStats, members: list[int], overrides: dict, steps: int, seed: int):
    """Optimised params of one group and its record: start and best full calibration objectives, start_from.

    The start is the better of the closed-form overrides and the group mean; the result is never worse than it.
    """
    seq = stats.acts[members[0]][0][0].shape[0]
    with torch.no_grad():
        cos, sin = model.model.rotary_emb(stats.acts[members[0]][0][0][None], torch.arange(seq)[None])
    params, start, origin = _best_start(model, stats, members, overrides, cos, sin)
    leaves = list({id(t): t for group in params.values() for t in group.values()}.values())
    gen = torch.Generator().manual_seed(seed + members[0])
    n = len(stats.acts[members[0]])
    best = start
    best_state = [t.detach().clone() for t in leaves]
    opt = torch.optim.Adam(leaves, lr=LEARNING_RATE)
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
    return out


def reconstruct_overrides(
    model, layout: list[int], stats: KVStats, overrides: dict, *, seed: int = 0, steps=None, progress=True, report=None
) -> dict[str, torch.Tensor]:
    """Closed-form `overrides` refined group by group; `report` (a dict), when given, gets each group's objectives."""
    from tqdm.auto import tqdm

    steps = DEFAULT_STEPS if steps is None else steps
    out = dict(overrides)
    shared = [members for members in groups(layout).values() if len(members) > 1]
    for members in tqdm(shared, desc="reconstruct", disable=not progress, leave=False):
        params, record = reconstruct_group(model, stats, members, overrides, steps, seed)
        if report is not None:
            report[f"{members[0]}-{members[-1]}"] = {"members": members, **record}
        out.update(_to_overrides(model, members, params))  # the best seen: never worse than either start
    return out
