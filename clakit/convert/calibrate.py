"""Data-aware initialisation of each CLA group's shared K/V projections.

Under CLA a group's members all read the producer's K/V, computed from the *producer's* attention input x_p. The
`calibrated` fit picks the shared W (per output channel c) minimising, over the calibration tokens,

    sum_l  F[l, c] * || x_p w_c - x_l w^l_c ||^2   (+ ridge)

where l runs over the group's members, w^l is layer l's own k_proj (or v_proj) and F[l, c] is a diagonal Fisher
weight: the squared gradient of the LM loss with respect to layer l's K (or V) output channel c, summed over tokens.
Channels the loss is sensitive to are matched first. The ridge is absolute (scaled by the mean Fisher weight), so
channels the loss hardly sees are shrunk towards zero rather than fitted to noise.

Everything is computed from per-layer Gram matrices X_l^T X_m (hidden x hidden, fp64) accumulated over the data,
so memory does not grow with the number of calibration tokens. Keys are fitted pre-RoPE, in k_proj output space:
RoPE is the same rotation for every layer at a given position, so matching pre-RoPE keys matches rotated ones.
"""

import shutil
from collections.abc import Iterable, Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from clakit.convert.layerwise import LayerwiseModel, materialized, run_layers
from clakit.convert.layout import KEY_TEMPLATES, check_layout, groups
from clakit.corpus import Text, head, spread
from clakit.errors import ClakitError

METHODS = ("calibrated", "reconstruct")
DEFAULT_RIDGE = 1e-3  # relative to the mean Fisher weight times the mean diagonal of the producer's Gram
RECONSTRUCT_SEQS = 8  # sequences whose activations reconstruct caches (8 x 512 tokens x 30 layers x 2: ~0.5 GB fp32)
SCRATCH_FILE_BYTES = 4096  # torch.save's zip headers and alignment, per scratch file (measured: 1-2 KB)
CHARS_PER_TOKEN_CAP = 64  # read at most this many characters per wanted token: bounds tokenisation of huge corpora



def calib_input_ids(tokenizer, texts: list[Text], calib_tokens: int, seq_len: int) -> torch.Tensor:
    """(n_seq, seq_len) token ids: n_seq = calib_tokens // seq_len non-overlapping windows spread evenly over the text.

    Spreading the windows (rather than taking the first tokens) samples more of a corpus made of several documents.
    A text of up to CHARS_PER_TOKEN_CAP characters per wanted token is tokenised whole and cut into windows; a longer
    one (a corpus of GBs) is read only in n_seq spans spread evenly over all of it, a window from each.
    """
    if seq_len <= 0 or calib_tokens < seq_len:
        raise ClakitError(f"--calib-tokens ({calib_tokens}) must be at least the sequence length ({seq_len})")
    cap = CHARS_PER_TOKEN_CAP * calib_tokens
    text = head(texts, cap + 1)  # read no further: one more character tells whether there is more
    if len(text) > cap:
        return _spread_windows(tokenizer, texts, calib_tokens // seq_len, seq_len)
    ids = _token_ids(tokenizer, text)
    available = len(ids) // seq_len
    if available == 0:
        raise _too_short(len(ids), seq_len)
    windows = torch.tensor(ids[: available * seq_len], dtype=torch.long).view(available, seq_len)
    n_seq = min(calib_tokens // seq_len, available)
    picks = torch.linspace(0, available - 1, n_seq).round().long()
    return windows[picks].clone()


def _spread_windows(tokenizer, texts: list[Text], n_seq: int, seq_len: int) -> torch.Tensor:
    """(<= n_seq, seq_len): the first seq_len tokens of each of n_seq spans spread over the whole text (before, the
    windows were spread over its first CHARS_PER_TOKEN_CAP * calib_tokens characters only: 2 MB of a 30 GB corpus,
    38% of the demo's calib.txt at --calib-tokens 4096); a span too short for a window (the text's end) gives none."""
    spans = spread(texts, n_seq, CHARS_PER_TOKEN_CAP * seq_len)
    rows = [ids[:seq_len] for ids in (_token_ids(tokenizer, s) for s in spans) if len(ids) >= seq_len]
    if not rows:
        raise _too_short(max(len(_token_ids(tokenizer, s)) for s in spans), seq_len)
    return torch.tensor(rows, dtype=torch.long)


def _token_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"] if text.strip() else []


def _too_short(tokens: int, seq_len: int) -> ClakitError:
    return ClakitError(
        f"calibration text is too short: {tokens} tokens, need at least one sequence of {seq_len}; "
        "give more text with --calib-data, or a shorter --seq-len"
    )


def scratch_bytes(config, layout: list[int], tokens: int, seq_len: int, method: str, dtype, distill: bool):
    """(peak of the fits' scratch files, of which the fitted tensors) in bytes, from shapes alone: what `fit_kv`
    writes beside OUT. At the end of the forward sweep every layer's input stream (tokens x hidden, `dtype`), every
    Gram ((hidden+1)^2 fp64 per `group_pairs` pair) and the kept activations (`reconstruct`: RECONSTRUCT_SEQS rows
    of each shared layer, input and output, fp32) are on disk; the streams go during the backward sweep while the
    fitted tensors come (`dtype`: shared producers' K/V, `reconstruct` its members' q/o, `distill` every layer's
    attention projections), which then wait for the writer beside the output. At 70B (hidden 8192, 80 layers,
    CLA2, the default 32,768 tokens of 512, fp32): streams 86 GB, Grams 64 GB, activations 21 GB, fitted 48 GB."""
    hidden, n = config.hidden_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    kv, q = 2 * config.num_key_value_heads * head_dim * hidden, config.num_attention_heads * head_dim * hidden
    shared = [i for members in groups(layout).values() if len(members) > 1 for i in members]
    producers = len([m for m in groups(layout).values() if len(m) > 1])
    rows = min(RECONSTRUCT_SEQS, tokens // seq_len) if method == "reconstruct" else 0
    streams = n * tokens * hidden * dtype.itemsize
    grams = len(group_pairs(layout)) * (hidden + 1) ** 2 * 8
    acts = len(shared) * rows * seq_len * hidden * 2 * 4
    fits = (producers * kv + (len(shared) * 2 * q if method == "reconstruct" else 0)) * dtype.itemsize
    fitted = n * (kv + 2 * q) * dtype.itemsize if distill else fits  # the distillation's come after fit_kv's files
    files = (n + len(group_pairs(layout)) + 5 * n) * SCRATCH_FILE_BYTES  # streams, Grams, acts + <= 4 fitted a layer
    return grams + acts + max(streams, fits) + files, fitted + 4 * n * SCRATCH_FILE_BYTES


# --- statistics --------------------------------------------------------------------------------------------------


@dataclass
class KVStats:
    """Calibration statistics of a stock model.

    gram[(l, m)]: X_l^T X_m over all tokens, (hidden[+1], hidden[+1]) fp64, X_l = layer l's attention input (after
    input_layernorm; with a ones column when the projections have a bias). Kept for l <= m within `pairs`.
    fisher[(kind, l)]: (out,) fp64, sum over tokens of d loss / d (layer l's `kind` output)^2, kind "k_proj"/"v_proj"
    (and "o_proj", the attention-block output, for kept layers).
    acts[l]: per sequence, (attention input (seq, hidden), attention output (seq, hidden)) in fp32, for kept layers.
    """

    gram: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    fisher: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)
    tokens: int = 0
    loss: float = 0.0  # mean LM loss of the model on the data (nats/token)
    acts: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)  # see collect_stats
    eig: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # cache of eigh(gram[(l, l)])
    ids: torch.Tensor | None = None  # (kept sequences, seq) token ids of the sequences whose `acts` are kept

    def cross(self, a: int, b: int) -> torch.Tensor:
        return self.gram[(a, b)] if a <= b else self.gram[(b, a)].T


def _attn(model, layer: int):
    return model.model.layers[layer].self_attn


def _has_bias(model) -> bool:
    return _attn(model, 0).k_proj.bias is not None


def _augment(x: torch.Tensor, bias: bool) -> torch.Tensor:
    """(tokens, hidden) -> fp64, plus a ones column when the projection has a bias (fitted as an extra input)."""
    x = x.reshape(-1, x.shape[-1]).double()
    return torch.cat([x, torch.ones_like(x[:, :1])], 1) if bias else x


def group_pairs(layout: list[int]) -> set[tuple[int, int]]:
    """The (l, m) Gram pairs a layout's fit needs: each member with itself and with its producer."""
    pairs = set()
    for producer, members in groups(layout).items():
        for m in members:
            pairs |= {(producer, producer), (m, m), (min(producer, m), max(producer, m))}
    return pairs


def kept_first(n: int, keep: int) -> torch.Tensor:
    """(n,) a row order putting `keep` rows spread evenly over all n first: the calibration rows are in text order
    (`calib_input_ids`), and the kept rows were the first `keep`, so with the default 32,768 tokens (64 windows)
    `reconstruct` fitted on the text's first eighth (11% of the demo's calib.txt; helper W, stop 49). The Grams,
    Fisher weights and loss are sums over rows: the order changes their rounding only."""
    if keep >= n:
        return torch.arange(n)
    first = torch.linspace(0, n - 1, keep).round().long()
    rest = torch.ones(n, dtype=torch.bool)
    rest[first] = False
    return torch.cat([first, torch.arange(n)[rest]])


def collect_stats(
    model,
    input_ids: torch.Tensor,
    pairs: Iterable[tuple[int, int]],
    keep: Iterable[int] = (),
    progress: bool = True,
    keep_seqs: int | None = None,
) -> KVStats:
    """One forward + backward pass per calibration sequence over the stock model; Grams and Fisher accumulated.

    `keep`: layers whose attention inputs/outputs (and the Fisher of the outputs) are also kept, for `reconstruct`,
    for `keep_seqs` sequences spread over all of them (default RECONSTRUCT_SEQS; `kept_first`).
    """
    keep_seqs = RECONSTRUCT_SEQS if keep_seqs is None else keep_seqs
    keep = sorted(set(keep))
    if keep:
        input_ids = input_ids[kept_first(len(input_ids), keep_seqs)]
    input_ids = input_ids.to(model.get_input_embeddings().weight.device)  # a GPU model given CPU ids (library use)
    from tqdm.auto import tqdm

    pairs = sorted({(min(a, b), max(a, b)) for a, b in pairs})
    layers_needed = sorted({i for p in pairs for i in p} | set(keep))
    bias = _has_bias(model)
    stats = KVStats(acts={i: [] for i in keep})
    inputs: dict[int, torch.Tensor] = {}
    handles = []
    for i in range(model.config.num_hidden_layers):
        attn = _attn(model, i)
        handles.append(attn.k_proj.register_forward_hook(_kv_hook(stats, inputs, "k_proj", i, i in layers_needed)))
        handles.append(attn.v_proj.register_forward_hook(_kv_hook(stats, inputs, "v_proj", i, False)))
        if i in keep:
            handles.append(attn.o_proj.register_forward_hook(_output_hook(stats, inputs, i)))
    # gradients are wanted w.r.t. activations only: params frozen, the embedding output made a graph leaf
    handles.append(model.get_input_embeddings().register_forward_hook(lambda m, a, out: out.requires_grad_()))
    requires = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    try:
        for row in tqdm(input_ids, desc="calibration statistics", disable=not progress, leave=False):
            inputs.clear()
            out = model(row[None], labels=row[None], use_cache=False)
            out.loss.backward()
            stats.loss += out.loss.item() * (row.numel() - 1)
            stats.tokens += row.numel()
            xs = {i: _augment(inputs[i], bias) for i in layers_needed}
            for a, b in pairs:
                stats.gram[(a, b)] = stats.gram.get((a, b), 0) + xs[a].T @ xs[b]
            if keep and len(stats.acts[keep[0]]) < keep_seqs:
                stats.ids = row[None] if stats.ids is None else torch.cat([stats.ids, row[None]])
                for i in keep:
                    stats.acts[i].append((inputs[i][0].float(), inputs[("y", i)][0].float()))
    finally:
        for h in handles:
            h.remove()
        for p, r in zip(model.parameters(), requires, strict=True):
            p.requires_grad_(r)
    stats.loss /= max(1, stats.tokens - len(input_ids))
    return stats


def _kv_hook(stats: KVStats, inputs: dict, kind: str, layer: int, capture: bool):
    """Forward hook on k_proj/v_proj: keep the input (shared by q/k/v) and register the output's Fisher hook."""

    def hook(module, args, output):
        if capture:
            inputs[layer] = args[0].detach()
        if output.requires_grad:
            output.register_hook(_fisher_hook(stats, kind, layer))

    return hook


def _output_hook(stats: KVStats, inputs: dict, layer: int):
    def hook(module, args, output):
        inputs[("y", layer)] = output.detach()
        if output.requires_grad:
            output.register_hook(_fisher_hook(stats, "o_proj", layer))

    return hook


def _fisher_hook(stats: KVStats, kind: str, layer: int):
    def hook(grad):
        g2 = grad.detach().double().pow(2).reshape(-1, grad.shape[-1]).sum(0)  # (out,)
        stats.fisher[(kind, layer)] = stats.fisher.get((kind, layer), 0) + g2

    return hook


def save_scratch(obj, path: Path) -> None:
    """torch.save into the scratch folder beside OUT. A failed write is one line: on a full disk torch raises a
    RuntimeError ('[enforce fail at inline_container.cc] . unexpected pos ...'), otherwise an OSError; either was a
    traceback after the calibration had run for a while (the streams take tokens x hidden x 4 B per layer)."""
    try:
        torch.save(obj, path)
    except (OSError, RuntimeError) as e:
        path.unlink(missing_ok=True)
        free = shutil.disk_usage(path.parent).free
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ClakitError(
            f"cannot write the calibration scratch file {path} ({free / 1e6:.0f} MB free there; {reason}): free disk "
            "space beside the output folder, or put OUT on a disk with room for the calibration streams"
        ) from None


class SpilledGrams(dict):
    """`KVStats.gram` whose finished entries live on disk (`spill`), read back when a fit asks for them: the Grams
    of a deep model ((hidden+1)^2 fp64 per pair, ~3 pairs per CLA2 group: 6 GB for an 8B model) never sit in memory
    together."""

    def __init__(self, folder: Path, device: torch.device):
        super().__init__()
        self.folder, self.device, self.on_disk = folder, device, set()

    def _path(self, key: tuple[int, int]) -> Path:
        return self.folder / f"gram-{key[0]}-{key[1]}.pt"

    def spill(self, keys) -> None:
        for key in keys:
            save_scratch(super().pop(key), self._path(key))
            self.on_disk.add(key)

    def __getitem__(self, key):
        if key in self.on_disk:
            return torch.load(self._path(key), map_location=self.device, weights_only=True)
        return super().__getitem__(key)

    def __contains__(self, key) -> bool:
        return key in self.on_disk or super().__contains__(key)

    def keys(self):
        return set(super().keys()) | self.on_disk


class SpilledTensors(MutableMapping):
    """Tensor name -> tensor, each kept in its own file under `folder` and read back when asked for: the fitted
    tensors of a deep model wait for the writer on disk, not in memory."""

    def __init__(self, folder: Path, device: torch.device):
        self.folder, self.device, self.names = folder, device, []
        folder.mkdir(parents=True, exist_ok=True)

    def _path(self, name: str) -> Path:
        return self.folder / f"{name}.pt"

    def __setitem__(self, name: str, tensor: torch.Tensor) -> None:
        save_scratch(tensor.detach().clone(), self._path(name))  # clone: a view would save its whole base
        if name not in self.names:
            self.names.append(name)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.names:
            raise KeyError(name)
        return torch.load(self._path(name), map_location=self.device, weights_only=True)

    def __delitem__(self, name: str) -> None:
        self.names.remove(name)
        self._path(name).unlink()

    def __iter__(self):
        return iter(list(self.names))

    def __len__(self) -> int:
        return len(self.names)


class SpilledActs(Mapping):
    """`KVStats.acts` written to disk by `layer_stats`, one file per layer, read back when a group needs them."""

    def __init__(self, folder: Path, layers: list[int], device: torch.device):
        self.folder, self.layers, self.device = folder, layers, device

    def path(self, layer: int) -> Path:
        return self.folder / f"acts-{layer}.pt"

    def __getitem__(self, layer: int):
        if layer not in self.layers:
            raise KeyError(layer)
        return torch.load(self.path(layer), map_location=self.device, weights_only=True)

    def __iter__(self):
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)


def layer_stats(
    runner: LayerwiseModel,
    input_ids: torch.Tensor,
    pairs: Iterable[tuple[int, int]],
    scratch: Path,
    keep: Iterable[int] = (),
    progress: bool = True,
    keep_seqs: int | None = None,
) -> KVStats:
    """`collect_stats`, one decoder layer at a time: the same Grams, Fisher weights, loss and kept activations.

    A forward sweep carries every calibration row's residual stream (n_seq, seq, hidden) from layer to layer,
    accumulating the Grams and writing each layer's input stream to `scratch` (and the kept activations); the loss
    gradient w.r.t. the last stream is then carried back down, layer by layer, each layer recomputed from its saved
    input, and the squared gradients of k/v (and o) outputs accumulated: the full-model backward's, to rounding.
    """
    keep_seqs = RECONSTRUCT_SEQS if keep_seqs is None else keep_seqs
    pairs = sorted({(min(a, b), max(a, b)) for a, b in pairs})
    keep = sorted(set(keep))
    stats = KVStats(gram=SpilledGrams(scratch, runner.device), acts=SpilledActs(scratch, keep, runner.device))
    if keep:
        input_ids = input_ids[kept_first(len(input_ids), keep_seqs)]
    ids = input_ids.to(runner.device)
    stats.ids = ids[: min(keep_seqs, len(ids))] if keep else None
    requires = [p.requires_grad for p in runner.model.parameters()]
    runner.model.requires_grad_(False)  # gradients w.r.t. activations only
    try:
        streams = _forward_sweep(stats, runner, ids, pairs, keep, scratch, progress)
        grads = _loss_grads(stats, runner.model, streams, ids)
        _backward_sweep(stats, runner, grads, keep, scratch, progress)
    finally:
        for p, r in zip(runner.model.parameters(), requires, strict=True):
            p.requires_grad_(r)
    return stats


def _forward_sweep(stats: KVStats, runner, ids, pairs: list, keep: list, scratch: Path, progress: bool) -> list:
    """Every row's residual stream carried through the layers, each layer's input stream saved to `scratch`;
    returns the last streams, per row (1, seq, hidden)."""
    from tqdm.auto import tqdm

    model = runner.model
    with torch.no_grad():
        streams = [model.get_input_embeddings()(row[None]) for row in ids]
    xs: dict[int, list[torch.Tensor]] = {}  # attention inputs of the layers later pairs still need
    layers = range(model.config.num_hidden_layers)
    for i in tqdm(layers, desc="statistics: forward", disable=not progress, leave=False):
        save_scratch(streams, scratch / f"stream-{i}.pt")
        with runner.loaded(i):
            streams = _forward_layer(stats, model, i, streams, xs, i in keep)
        _add_grams(stats, pairs, xs, i, _has_bias(model))
    return streams


def _backward_sweep(stats: KVStats, runner, grads: list, keep: list, scratch: Path, progress: bool) -> None:
    """The loss gradient carried from the last layer to the first; each saved stream is removed once used."""
    from tqdm.auto import tqdm

    layers = reversed(range(runner.model.config.num_hidden_layers))
    for i in tqdm(layers, desc="statistics: backward", disable=not progress, leave=False):
        streams = torch.load(scratch / f"stream-{i}.pt", map_location=runner.device, weights_only=True)
        (scratch / f"stream-{i}.pt").unlink()
        with runner.loaded(i):
            grads = _backward_layer(stats, runner.model, i, streams, grads, i in keep)


@torch.no_grad()
def _forward_layer(stats, model, i: int, streams: list, xs: dict, keep: bool) -> list:
    """Layer i over every row; its attention inputs go to `xs[i]`, kept rows' (input, output) to disk."""
    captured: dict = {"x": [], "y": []}
    attn = _attn(model, i)
    handles = [attn.q_proj.register_forward_pre_hook(lambda m, a: captured["x"].append(a[0]))]
    if keep:
        handles.append(attn.o_proj.register_forward_hook(lambda m, a, out: captured["y"].append(out)))
    try:
        streams = [run_layers(model, h, i, i + 1) for h in streams]
    finally:
        for h in handles:
            h.remove()
    xs[i] = captured["x"]
    if keep:
        n_keep = len(stats.ids)  # the first rows: (seq, hidden) fp32 attention input and o_proj output
        acts = [(x[0].float(), y[0].float()) for x, y in zip(captured["x"][:n_keep], captured["y"], strict=False)]
        save_scratch(acts, stats.acts.path(i))
    return streams


def _add_grams(stats: KVStats, pairs: list, xs: dict, i: int, bias: bool) -> None:
    """Grams of the pairs (a, i) ending at layer i, summed over rows in order, then written to disk; inputs no later
    pair needs go."""
    finished = [(a, b) for a, b in pairs if b == i]
    for a, b in finished:
        for xa, xb in zip(xs[a], xs[b], strict=True):
            stats.gram[(a, b)] = stats.gram.get((a, b), 0) + _augment(xa, bias).T @ _augment(xb, bias)
    stats.gram.spill(finished)
    for a in [a for a in xs if not any(p == a and q > i for p, q in pairs)]:
        del xs[a]


def _loss_grads(stats: KVStats, model, streams: list, ids: torch.Tensor) -> list[torch.Tensor]:
    """d (each row's mean LM loss) / d (its last residual stream), (1, seq, hidden) per row; the loss recorded."""
    grads = []
    for h, row in zip(streams, ids, strict=True):
        h = h.detach().requires_grad_()
        logits = model.lm_head(model.model.norm(h))  # (1, seq, vocab)
        loss = F.cross_entropy(logits[0, :-1].float(), row[1:])
        loss.backward()
        grads.append(h.grad)
        stats.loss += loss.item() * (row.numel() - 1)
        stats.tokens += row.numel()
    stats.loss /= max(1, stats.tokens - len(ids))
    return grads


def _backward_layer(stats: KVStats, model, i: int, streams: list, grads: list, keep: bool) -> list:
    """Layer i recomputed from its saved inputs and back-propagated; Fisher weights accumulated by the hooks."""
    attn = _attn(model, i)
    handles = [
        attn.k_proj.register_forward_hook(_kv_hook(stats, {}, "k_proj", i, False)),
        attn.v_proj.register_forward_hook(_kv_hook(stats, {}, "v_proj", i, False)),
    ]
    if keep:
        handles.append(attn.o_proj.register_forward_hook(_output_hook(stats, {}, i)))
    below = []
    try:
        for h, grad in zip(streams, grads, strict=True):
            h = h.detach().requires_grad_()
            run_layers(model, h, i, i + 1).backward(grad)
            below.append(h.grad)
    finally:
        for handle in handles:
            handle.remove()
    return below


# --- closed-form fit ---------------------------------------------------------------------------------------------


def _own_weight(model, kind: str, layer: int) -> torch.Tensor:
    """Layer's own projection as (hidden[+1], out) fp64 (as_projection)."""
    proj = getattr(_attn(model, layer), kind)
    return as_projection(proj.weight, proj.bias)


def as_projection(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A projection's (out, hidden) weight and (out,) bias (or None) as the (hidden[+1], out) fp64 the fits solve
    for: the transposed weight, the bias as a last row (a ones column on the input carries it)."""
    w = weight.detach().double().T
    return torch.cat([w, bias.detach().double()[None]], 0) if bias is not None else w


def _member_weights(stats: KVStats, kind: str, members: list[int], out: int, fisher: bool, device) -> torch.Tensor:
    """(members, out) per-(layer, channel) error weights: Fisher, or ones when `fisher` is False."""
    if not fisher:
        return torch.ones(len(members), out, dtype=torch.float64, device=device)
    return torch.stack([stats.fisher[(kind, m)] for m in members])


def _eigh(stats: KVStats, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-decomposition of a layer's input Gram, cached: every candidate group led by it reuses it."""
    if layer not in stats.eig:
        stats.eig[layer] = torch.linalg.eigh(stats.cross(layer, layer))
    return stats.eig[layer]


def fit_group(
    model, stats: KVStats, kind: str, members: list[int], ridge: float = DEFAULT_RIDGE, fisher: bool = True
) -> torch.Tensor:
    """Shared (hidden[+1], out) fp64 projection of one group (producer first) by weighted ridge least squares.

    Per channel c, with F[l, c] the error weights and F_c = sum_l F[l, c]:
        (F_c G_pp + lam I) w_c = sum_l F[l, c] G_pl w^l_c,   lam = ridge * mean_c(F_c) * mean(diag G_pp).
    The ridge is absolute, not per channel: channels the loss hardly sees are shrunk towards zero (less noise in the
    attention logits/values) while the important ones are fitted closely. One eigh of G_pp serves every channel.
    """
    p = members[0]
    s, u = _eigh(stats, p)
    own = [_own_weight(model, kind, m) for m in members]
    f = _member_weights(stats, kind, members, own[0].shape[1], fisher, s.device)  # (members, out)
    rhs = sum(stats.cross(p, m) @ (w * f[i]) for i, (m, w) in enumerate(zip(members, own, strict=True)))
    f_c = f.sum(0)  # (out,)
    lam = ridge * f_c.mean() * s.mean().clamp_min(1e-12)  # mean eigenvalue = mean diagonal
    # a Gram's negative eigenvalues are rounding, and a ridge below fp64's resolution of the Gram (--ridge 1e-30 on
    # a rank-deficient Gram: one repeated token) divided rounding noise by 1e-300: inf weights, refused only when
    # written, naming --dtype (helper W)
    lam = torch.maximum(lam, 1e-12 * f_c.mean() * s.max().clamp_min(1e-12))
    return u @ ((u.T @ rhs) / (s.clamp_min(0)[:, None] * f_c[None] + lam).clamp_min(1e-300))


def group_error(model, stats: KVStats, kind: str, members: list[int], shared: torch.Tensor) -> float:
    """Fisher-weighted squared error sum_l sum_c F[l,c] ||X_p w_c - X_l w^l_c||^2 of a shared projection (fp64)."""
    p = members[0]
    total = 0.0
    for m in members:
        w_m = _own_weight(model, kind, m)
        f = stats.fisher[(kind, m)]
        # per channel: w^T G_pp w - 2 w^T G_pm w_m + w_m^T G_mm w_m
        err = (
            (shared * (stats.cross(p, p) @ shared)).sum(0)
            - 2 * (shared * (stats.cross(p, m) @ w_m)).sum(0)
            + (w_m * (stats.cross(m, m) @ w_m)).sum(0)
        )
        total += float((f * err.clamp_min(0)).sum())
    return total


def mean_shared(model, kind: str, members: list[int]) -> torch.Tensor:
    return torch.stack([_own_weight(model, kind, m) for m in members]).mean(0)


def shared_to_overrides(model, kind: str, producer: int, shared: torch.Tensor) -> dict[str, torch.Tensor]:
    """(hidden[+1], out) fp64 -> checkpoint tensors (weight (out, hidden), bias (out,)) in the model's dtype."""
    dtype = _attn(model, producer).k_proj.weight.dtype
    hidden = model.config.hidden_size
    out = {KEY_TEMPLATES[kind].format(producer): shared[:hidden].T.contiguous().to(dtype)}
    if shared.shape[0] > hidden:
        out[KEY_TEMPLATES[kind.replace("proj", "bias")].format(producer)] = shared[hidden].contiguous().to(dtype)
    return out


def calibrated_overrides(
    model, layout: list[int], stats: KVStats, ridge: float = DEFAULT_RIDGE, fisher: bool = True, out=None
) -> MutableMapping[str, torch.Tensor]:
    """Closed-form fitted K/V of every shared group (groups of one keep their own weights: nothing to fit), added to
    `out` (default a new dict; the converter's `SpilledTensors` keeps them on disk)."""
    out = {} if out is None else out
    for producer, members in groups(layout).items():
        if len(members) == 1:
            continue
        with materialized(model, members):  # a LayerwiseModel's layers: one group at a time
            for kind in ("k_proj", "v_proj"):
                shared = fit_group(model, stats, kind, members, ridge, fisher)
                out.update(shared_to_overrides(model, kind, producer, shared))
        stats.eig.pop(producer, None)  # each producer leads one group here: its decomposition is not needed again
    return out


# --- entry point -------------------------------------------------------------------------------------------------


def fit_kv(
    model,
    layout: list[int],
    input_ids: torch.Tensor,
    method: str,
    *,
    seed: int = 0,
    steps=None,
    progress=True,
    ridge: float = DEFAULT_RIDGE,
    scratch: Path | None = None,
    store: MutableMapping | None = None,
    **reconstruct_options,
) -> MutableMapping[str, torch.Tensor]:
    """Tensor-name -> tensor overrides for `cla_model_from(model, layout, overrides=...)` / the streaming converter.

    `model` is the stock (non-CLA) source model, whole in memory or a `LayerwiseModel`'s (decoder layers read from
    the checkpoint on demand); the statistics are collected layer by layer either way (`layer_stats`), the
    per-layer streams written to `scratch` (default: a temporary folder). `input_ids` (n_seq, seq_len) from
    `calib_input_ids`. `reconstruct` caches activations of at most `RECONSTRUCT_SEQS` sequences and runs `steps`
    Adam steps per group (default `reconstruct.default_steps(layout)`); `reconstruct_options`: `lr`, `train_o`,
    `sequential` of `reconstruct_overrides`. `store`: where the fitted tensors go (default a new dict).
    """
    import tempfile

    check_layout(layout, model.config.num_hidden_layers)
    if method not in METHODS:
        raise ClakitError(f"unknown data-aware init {method!r}; choose one of {', '.join(METHODS)}")
    if input_ids.numel() == 0:
        raise ClakitError("no calibration tokens; give more text with --calib-data")
    shared = [i for members in groups(layout).values() if len(members) > 1 for i in members]
    keep = shared if method == "reconstruct" else ()
    with tempfile.TemporaryDirectory(prefix=".clakit-calib.", dir=scratch) as folder:
        stats = layer_stats(LayerwiseModel.in_memory(model), input_ids, group_pairs(layout), Path(folder), keep,
                            progress=progress)  # fmt: skip
        overrides = calibrated_overrides(model, layout, stats, ridge, out=store)
        if method == "reconstruct":
            from clakit.convert.reconstruct import reconstruct_overrides

            overrides = reconstruct_overrides(
                model, layout, stats, overrides, seed=seed, steps=steps, progress=progress, out=overrides,
                **reconstruct_options,
            )  # fmt: skip
    return overrides
