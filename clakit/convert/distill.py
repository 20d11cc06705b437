"""End-to-end distillation of a conversion's fitted tensors (`--distill-steps`), after the per-group fits.

The per-group fits (`reconstruct`) each match one group's attention outputs; what they cannot see is how the groups'
errors add up through the rest of the network. This stage trains the CLA model as a whole, on the calibration
tokens, to reproduce the stock model's next-token distributions: KL(teacher || student) per token, the teacher's
logits computed once by the stock model before the student is built. Trained: every layer's attention projections
(`TRAINED`: the producers' shared K/V, every layer's q_proj/o_proj, the unshared layers' K/V too); everything else
stays the source's. Adam, cosine decay from `lr` over `steps` steps of `BATCH_SEQS` sequences.

Measured on SmolLM2-135M (the default auto layout at half the cache, held-out 8,192 tokens, original 43.99;
docs/quality.md): after 100 reconstruct steps per group 104.22; + 100 steps of this training the fitted layers'
projections only 77.33, every layer's 75.70; after 200 reconstruct steps 90.09 -> 70.70.

Memory: unlike the fits, this stage needs the whole student on the device (its weights shared with the stock model,
not copied) plus fp32 copies, gradients and Adam state of the trained tensors, and the teacher's logits (bf16, on
the CPU). `distill_bytes` estimates it; the converter checks it against the device before any work starts.
"""

import math

import torch

from clakit.convert.inmemory import cla_parts
from clakit.convert.layerwise import autocast, fresh_rotary
from clakit.losses import token_kl

TRAINED = ("q_proj", "k_proj", "v_proj", "o_proj")  # the attention projections, in every layer that has them
TRAINED_PATHS = [["self_attn", t] for t in TRAINED]  # model.layers.<i>.self_attn.<t>.(weight|bias)
BATCH_SEQS = 2  # calibration sequences per Adam step
KL_BATCHES = 4  # batches the recorded KL before/after is measured on
LOGITS_DTYPE = torch.bfloat16  # the stored teacher logits: half the memory of fp32, KL unchanged to ~1e-3


def trained_names(names) -> list[str]:
    """The tensors this stage trains: attention projections (weights and biases) of every layer; every layer's
    measured better than only the shared layers' (SmolLM2: 75.70 vs 77.33)."""
    return [n for n in names if n.startswith("model.layers.") and n.split(".")[3:5] in TRAINED_PATHS]


def distill_bytes(config, layout: list[int], dtype: torch.dtype, seq_len: int, n_seqs: int) -> int:
    """Estimated peak memory of the stage: weights in `dtype`, trained tensors x 4 fp32 (copy, grad, Adam's two),
    teacher logits in bf16, and the activations of one batch (per layer ~ 16 tensors of seq x hidden, fp32)."""
    hidden, vocab, layers = config.hidden_size, config.vocab_size, config.num_hidden_layers
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    attn = hidden * head_dim * heads * 2 + hidden * head_dim * kv_heads * 2  # q, o, k, v of one layer
    mlp = 3 * hidden * config.intermediate_size
    weights = layers * (attn + mlp) + vocab * hidden * (1 if config.tie_word_embeddings else 2)
    trained = sum(attn if layout[i] == i else attn - hidden * head_dim * kv_heads * 2 for i in range(layers))
    tokens = BATCH_SEQS * seq_len
    activations = tokens * (layers * (16 * hidden + 2 * config.intermediate_size) + 3 * vocab) * 4
    logits = n_seqs * seq_len * vocab * 2
    return weights * torch.finfo(dtype).bits // 8 + trained * 16 + activations + logits


def teacher_logits(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """The stock model's logits per batch of BATCH_SEQS rows: (batch, seq, vocab) bf16 on the CPU."""
    out = []
    with torch.no_grad():
        for start in range(0, len(ids), BATCH_SEQS):
            out.append(model(ids[start : start + BATCH_SEQS], use_cache=False).logits.to("cpu", LOGITS_DTYPE))
    return out


def cla_student(model, layout: list[int], overrides) -> torch.nn.Module:
    """The CLA model of `layout` whose weights are `model`'s own tensors (no copy; built on meta, then assigned),
    with the fitted `overrides` and, for groups without them, the group mean. `model` must be whole in memory."""
    config, lm_cls, state = cla_parts(model, layout, "mean", overrides)
    with torch.device("meta"):
        student = lm_cls(config)
    expected = student.state_dict()
    student.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=True, assign=True)
    if config.tie_word_embeddings:
        student.tie_weights()
    fresh_rotary(student, next(model.parameters()).device)  # non-persistent buffers: computed, not loaded
    # CLA: eval mode, also while training (`distill`): a module is built in train mode, and a source config's
    # attention_dropout would then drop attention weights drawn from the global RNG, which --seed does not set
    return student.requires_grad_(False).eval()


def distill(student, ids: torch.Tensor, logits: list[torch.Tensor], *, steps: int, lr: float, seed: int,
            progress: bool = True) -> tuple[dict[str, torch.Tensor], dict]:  # fmt: skip
    """Train the student's `trained_names` tensors (fp32 leaves) for `steps` Adam steps; returns the trained tensors
    (in the student's dtype) and a record: the KL before and after (on KL_BATCHES batches), the losses seen.
    The student stays in eval mode (no dropout): the teacher's logits have none, and the batches are the only
    randomness, drawn from `seed`."""
    from tqdm.auto import tqdm

    dtype = next(student.parameters()).dtype
    names = trained_names(dict(student.named_parameters()))
    params = _fp32_leaves(student, names)
    opt = torch.optim.Adam(params.values(), lr=lr)
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    gen = torch.Generator().manual_seed(seed)
    record = {"kl_before": _measured_kl(student, ids, logits), "losses": []}
    for _ in tqdm(range(steps), desc="distilling", disable=not progress, leave=False):
        b = int(torch.randint(len(logits), (1,), generator=gen))
        with _autocast(student, dtype):
            out = student(ids[b * BATCH_SEQS : (b + 1) * BATCH_SEQS], use_cache=False).logits
            loss = token_kl(out, logits[b].to(out.device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        decay.step()
        record["losses"].append(round(loss.item(), 5))
    record["kl_after"] = _measured_kl(student, ids, logits)
    return {n: p.detach().to(dtype) for n, p in params.items()}, record


def _fp32_leaves(student, names: list[str]) -> dict[str, torch.nn.Parameter]:
    """Replace each named parameter by a trainable fp32 copy (the source's tensors stay untouched)."""
    out = {}
    for name in names:
        module_name, _, attr = name.rpartition(".")
        module = student.get_submodule(module_name)
        out[name] = torch.nn.Parameter(getattr(module, attr).detach().float().clone())
        setattr(module, attr, out[name])
    return out


def _autocast(student, dtype: torch.dtype):
    """bf16 weights with fp32 trained leaves (GPU fits): autocast runs the matmuls in bf16; fp32 weights need
    nothing of their own (no context, so the caller's `--bf16` one stays on)."""
    return autocast(dtype, next(student.parameters()).device)


def _batch_kl(student, ids: torch.Tensor, logits: list[torch.Tensor], b: int) -> float:
    """KL on batch b; the teacher's logits wait on the CPU (teacher_logits) and move to the student's device here."""
    out = student(ids[b * BATCH_SEQS : (b + 1) * BATCH_SEQS], use_cache=False).logits
    return float(token_kl(out, logits[b].to(out.device)))


def _measured_kl(student, ids, logits) -> float:
    """Mean KL over at most KL_BATCHES batches spread evenly over the calibration set (the record, not the training:
    every batch would cost two extra passes over all of them, ~45 s of a ~10 min SmolLM2 conversion on 2 cores)."""
    dtype = student.model.embed_tokens.weight.dtype
    picks = torch.linspace(0, len(logits) - 1, min(KL_BATCHES, len(logits))).round().long().tolist()
    with torch.no_grad(), _autocast(student, dtype):
        values = [_batch_kl(student, ids, logits, i) for i in picks]
    return sum(values) / len(values)
