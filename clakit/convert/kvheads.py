"""KV-head merging: fewer key/value heads per layer (GQA/MQA uptraining's start, Ainslie et al. 2023), the
per-layer alternative to CLA's sharing across layers; both cut the KV cache and they compose.

A model with `n` KV heads becomes one with `m` (m divides n): KV heads `j*r .. j*r+r-1` (r = n/m) merge into head
`j`, and the query heads that read any of them read head `j` (adjacent grouping keeps transformers' GQA mapping,
query head i -> KV head i // (heads/m)).

* `mean` (no data): K and V projections (and biases) are the mean over the merged heads, as in GQA uptraining.
* `fitted` (calibration data, closed forms). K: RoPE rotates each pair of key dimensions (f, f + head_dim/2) by an
  angle, i.e. multiplies the complex number k_f + i k_{f+d/2} by e^{i w_f t}; the only maps of the key basis the query
  side can undo through RoPE are complex scalars per frequency, so per frequency the merged key is the top principal
  component of the merged heads' complex keys on the calibration inputs and each query head's q_proj rows absorb
  its complex coefficient (`_fit_keys`; HF's rotate_half layout). V: the rank-`head_dim` principal subspace of the
  merged heads' values on the calibration inputs, and each query head's block of `o_proj` absorbs the map back to
  the value of the head it read. For the stacked values `y = W_s x` ((r*head_dim) per token) with input second moment
  `S = E[x x^T]`, `U` = top-`head_dim` eigenvectors of `W_s S W_s^T`: merged `W_v = U^T W_s`, and query head i that
  read old head p of the group gets `o_proj[:, i] @ U_p` (U_p: rows p*head_dim.. of U), so its output is
  `W_o,i U_p U^T y ~= W_o,i y_p`: the best rank-`head_dim` reconstruction of the group's values (Eckart-Young),
  exact when the merged heads' values span at most `head_dim` dimensions.

Works on a stock in-memory Llama/Mistral model (a CLA checkpoint: merge first, then convert); returns a new model of
the same class whose config has `num_key_value_heads = m`.
"""

import copy

import torch

from clakit.convert.inmemory import keep_rotary_buffers
from clakit.errors import ClakitError

METHODS = ("mean", "fitted")


def check(config, num_kv_heads: int, method: str = "mean") -> int:
    """The merge ratio r = kv_heads / num_kv_heads; refuses what cannot be merged, before any work."""
    n = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    if method not in METHODS:
        raise ClakitError(f"KV-head merging method must be one of {', '.join(METHODS)}, got {method!r}")
    if getattr(config, "kv_source_layers", None) is not None:
        raise ClakitError("merge KV heads on the stock model, then convert it to CLA (this is a CLA model)")
    if not isinstance(num_kv_heads, int) or num_kv_heads <= 0 or n % num_kv_heads:
        raise ClakitError(f"--kv-heads must be a positive divisor of the model's {n} KV heads, got {num_kv_heads}")
    return n // num_kv_heads


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _mean_heads(weight: torch.Tensor, r: int, d: int) -> torch.Tensor:
    """(n*d, ...) -> (n/r*d, ...): the mean over each run of r heads of d rows."""
    return weight.reshape(-1, r, d, *weight.shape[1:]).mean(1).reshape(-1, *weight.shape[1:])


@torch.no_grad()
def input_moments(model, calib_ids: torch.Tensor) -> list[torch.Tensor]:
    """Per layer, E[x x^T] (hidden x hidden, fp64) of the attention inputs (after input_layernorm) over `calib_ids`
    (n, L): one forward of the stock model with hooks, memory independent of the number of tokens."""
    layers, device, h = model.model.layers, next(model.parameters()).device, model.config.hidden_size
    # on the model's device: the attention inputs arrive there (a GPU), and x.T @ x is the heavy part
    sums = [torch.zeros(h, h, dtype=torch.float64, device=device) for _ in layers]
    count = [0]

    def hook(i):
        def accumulate(_module, args, kwargs):
            x = (args[0] if args else kwargs["hidden_states"]).reshape(-1, model.config.hidden_size).double()
            sums[i].add_(x.T @ x)
            count[0] += x.shape[0] if i == 0 else 0

        return accumulate

    handles = [layer.self_attn.register_forward_pre_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        for row in calib_ids:
            model(input_ids=row[None].to(device), use_cache=False, logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
    return [s / count[0] for s in sums]


def _fit_values(wv, bv, wo, moment, r: int, d: int, heads_per_kv: int):
    """Merged v_proj weight/bias and the new o_proj (see the module docstring); shapes: wv (n*d, h), wo (h, H*d)."""
    wv64, groups, moment = wv.double(), wv.shape[0] // (r * d), moment.to(wv.device)
    new_v, new_b, new_o = [], [], wo.double().clone()
    for j in range(groups):
        ws = wv64[j * r * d : (j + 1) * r * d]  # (r*d, h): the group's stacked value projections
        _, vecs = torch.linalg.eigh(ws @ moment @ ws.T)  # ascending eigenvalues
        u = vecs[:, -d:]  # (r*d, d): the principal subspace of the group's values
        new_v.append(u.T @ ws)
        if bv is not None:
            new_b.append(u.T @ bv.double()[j * r * d : (j + 1) * r * d])
        for p in range(r):  # query heads that read old KV head g = j*r + p
            g = j * r + p
            for i in range(g * heads_per_kv, (g + 1) * heads_per_kv):
                new_o[:, i * d : (i + 1) * d] = wo.double()[:, i * d : (i + 1) * d] @ u[p * d : (p + 1) * d]
    bias = torch.cat(new_b).to(wv.dtype) if bv is not None else None
    return torch.cat(new_v).to(wv.dtype), bias, new_o.to(wo.dtype)


def _fit_keys(wk, bk, wq, bq, moment, r: int, d: int, heads_per_kv: int):
    """Merged k_proj and the new q_proj (see the module docstring): per group and RoPE frequency f, the complex keys
    z_p = k[p, f] + i k[p, f + d/2] of the r merged heads are replaced by z' = sum_p conj(u_p) z_p, u the top
    eigenvector of their (Hermitian) covariance, and a query head that read head p is multiplied by conj(u_p), so
    its logit Re(q conj(z_p)) ~= Re(q conj(u_p z')). A complex scalar per frequency commutes with the rotation."""
    half, groups, moment = d // 2, wk.shape[0] // (r * d), moment.to(wk.device)
    cov = wk.double() @ moment @ wk.double().T  # (n*d, n*d): second moment of the pre-RoPE keys
    new_k, new_q = wk.double().clone()[: groups * d], wq.double().clone()
    new_bk = bk.double().clone()[: groups * d] if bk is not None else None
    new_bq = bq.double().clone() if bq is not None else None
    for j in range(groups):
        for f in range(half):
            xs = [(j * r + p) * d + f for p in range(r)]  # real parts of the r heads' frequency-f keys
            ys = [x + half for x in xs]
            c = torch.complex(cov[xs][:, xs] + cov[ys][:, ys], cov[ys][:, xs] - cov[xs][:, ys])  # E[z z^H], (r, r)
            u = torch.linalg.eigh(c)[1][:, -1]  # (r,) complex, the top eigenvector
            a, b = u.real, u.imag
            x_out, y_out = j * d + f, j * d + f + half
            new_k[x_out] = a @ wk.double()[xs] + b @ wk.double()[ys]
            new_k[y_out] = a @ wk.double()[ys] - b @ wk.double()[xs]
            if bk is not None:
                new_bk[x_out] = a @ bk.double()[xs] + b @ bk.double()[ys]
                new_bk[y_out] = a @ bk.double()[ys] - b @ bk.double()[xs]
            for p in range(r):
                for i in range((j * r + p) * heads_per_kv, (j * r + p + 1) * heads_per_kv):
                    qx, qy = i * d + f, i * d + f + half
                    for w in (new_q, new_bq) if new_bq is not None else (new_q,):
                        src = (wq if w is new_q else bq).double()
                        w[qx], w[qy] = a[p] * src[qx] + b[p] * src[qy], a[p] * src[qy] - b[p] * src[qx]
    bias_k = new_bk.to(wk.dtype) if new_bk is not None else None
    bias_q = new_bq.to(wq.dtype) if new_bq is not None else None
    return new_k.to(wk.dtype), bias_k, new_q.to(wq.dtype), bias_q


def merged_state(model, num_kv_heads: int, moments: list[torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """Tensor name -> merged tensor for every k_proj/v_proj (and o_proj when fitted); other tensors are unchanged."""
    config = model.config
    r, d = check(config, num_kv_heads), _head_dim(config)
    heads_per_kv = config.num_attention_heads // (config.num_key_value_heads or config.num_attention_heads)
    out = {}
    for i, layer in enumerate(model.model.layers):
        attn, prefix = layer.self_attn, f"model.layers.{i}.self_attn."
        for name in ("k_proj", "v_proj"):
            for kind in ("weight", "bias"):
                t = getattr(getattr(attn, name), kind)
                if t is not None:
                    out[f"{prefix}{name}.{kind}"] = _mean_heads(t.detach(), r, d)
        if moments is not None:
            bias = attn.v_proj.bias.detach() if attn.v_proj.bias is not None else None
            wv, bv, wo = _fit_values(attn.v_proj.weight.detach(), bias, attn.o_proj.weight.detach(), moments[i],
                                     r, d, heads_per_kv)  # fmt: skip
            out[f"{prefix}v_proj.weight"], out[f"{prefix}o_proj.weight"] = wv, wo
            if bv is not None:
                out[f"{prefix}v_proj.bias"] = bv
            bk, bq = (p.bias.detach() if p.bias is not None else None for p in (attn.k_proj, attn.q_proj))
            wk, bk, wq, bq = _fit_keys(attn.k_proj.weight.detach(), bk, attn.q_proj.weight.detach(), bq, moments[i],
                                       r, d, heads_per_kv)  # fmt: skip
            out[f"{prefix}k_proj.weight"], out[f"{prefix}q_proj.weight"] = wk, wq
            out |= {f"{prefix}k_proj.bias": bk, f"{prefix}q_proj.bias": bq} if bk is not None else {}
    return out


@torch.no_grad()
def merge_kv_heads(model, num_kv_heads: int, method: str = "mean", calib_ids: torch.Tensor | None = None):
    """A new model of `model`'s class with `num_kv_heads` KV heads per layer (`method`: "mean" or "fitted", which
    needs `calib_ids` (n, L) token ids). The input model is not changed."""
    check(model.config, num_kv_heads, method)
    if method == "fitted" and calib_ids is None:
        raise ClakitError("KV-head merging 'fitted' needs calibration data (calib_ids)")
    moments = input_moments(model, calib_ids) if method == "fitted" else None
    merged = merged_state(model, num_kv_heads, moments)
    config = copy.deepcopy(model.config)
    config.num_key_value_heads = num_kv_heads
    dtype = next(model.parameters()).dtype
    new = type(model)(config).to(dtype)
    state = {**model.state_dict(), **merged}
    new.load_state_dict(state, strict=True)
    keep_rotary_buffers(model, new)  # `.to(dtype)` rounded a 16-bit model's fp32 inv_freq
    return new.to(next(model.parameters()).device).eval()
