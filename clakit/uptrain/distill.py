"""Self-distillation: the original model (full KV, frozen) teaches the CLA student.

Memory: the teacher is loaded once, then every teacher tensor equal to a frozen student tensor is replaced by the
student's own Parameter object. With LoRA the student's base weights are frozen copies of the original, so the
teacher ends up owning only what CLA changed (its per-layer k_proj/v_proj) and whatever `full_train` trains:
for SmolLM2-135M that is ~7M of 135M parameters. LoRA never modifies the base weights in place while training,
so the shared tensors stay the original's until the final merge (after the teacher's last use).
"""

import torch

from clakit.errors import ClakitError
from clakit.eval import kvcache
from clakit.losses import causal_lm_loss, token_kl
from clakit.sources import Source, load_config, load_model, load_tokenizer
from clakit.uptrain.student import PEFT_PREFIX


def _student_base_params(student) -> dict[str, torch.nn.Parameter]:
    """Frozen student tensors by their name in a stock checkpoint (peft's prefixes and `.base_layer` removed)."""
    out = {}
    for name, p in student.named_parameters(remove_duplicate=False):
        if p.requires_grad or "lora_" in name:
            continue
        out[name.removeprefix(PEFT_PREFIX).replace(".base_layer.", ".")] = p
    return out


def share_frozen_weights(teacher, student) -> int:
    """Point the teacher's parameters at identical frozen student parameters; returns how many were shared."""
    base = _student_base_params(student)
    shared = 0
    for name, p in list(teacher.named_parameters(remove_duplicate=False)):
        s = base.get(name)
        # compared where the teacher was loaded (CPU); the student may already sit on the GPU
        if s is None or s.shape != p.shape or s.dtype != p.dtype or not torch.equal(s.detach().to(p.device), p):
            continue
        module_name, _, leaf = name.rpartition(".")
        teacher.get_submodule(module_name)._parameters[leaf] = s
        shared += 1
    return shared


def check_stock(original, role: str, trust_remote_code: bool = False):
    """The original model's config; a CLA checkpoint (the student itself, or another) is refused: as the teacher it
    would teach the student its own loss, as the "original" baseline it would compare CLA against CLA."""
    config = load_config(original, trust_remote_code)
    layout = getattr(config, "kv_source_layers", None) or []
    if any(source != i for i, source in enumerate(layout)):
        raise ClakitError(
            f"{role} {original.spec} is a CLA checkpoint (its layers share K/V), not the original model: "
            "give as model.original the stock model the student was converted from"
        )
    return config


def check_teacher_fits(original, student_config, teacher: bool = True, trust_remote_code: bool = False) -> None:
    """The original model is the one the student was converted from (conversion keeps the vocabulary, the layers
    and the width): the teacher scores the student's tokens and, with hidden_mse_weight, matches its hidden states
    layer by layer; the "original" baseline is the card's "vs original". Another model (a deeper or wider one) is
    refused from the configs, before any model is loaded, instead of a shape error at the first step or a baseline
    that is not the original. `original` is its resolved Source; `teacher`: whether it teaches (else baseline only)."""
    role = "the teacher" if teacher else "the original model"
    config = check_stock(original, role, trust_remote_code)
    why = "distillation needs" if teacher else "the 'original' baseline is"
    kvcache.check_converted_from(
        student_config, config, f"{role} {original.spec}", "the student",
        f"{why} the model the student was converted from; set model.original to it",
    )  # fmt: skip


def check_same_tokenizer(original: Source, tokenizer, trust_remote_code: bool = False) -> None:
    """The original's logits (the teacher's KL targets, the baseline's score) are read by the student's token ids: a
    tokenizer of the same size that maps tokens to other ids (Mistral's and Llama 2's: 32000 each) passes the
    vocab_size check and would teach noise silently. An original without tokenizer files cannot be compared."""
    try:
        theirs = load_tokenizer(original, trust_remote_code).get_vocab()
    except ClakitError:
        return
    ours = tokenizer.get_vocab()
    odd = sorted(t for t in set(ours) | set(theirs) if ours.get(t) != theirs.get(t))
    if odd:
        raise ClakitError(
            f"the original model {original.spec} has another tokenizer than the student (token {odd[0]!r}: id "
            f"{theirs.get(odd[0])} there, {ours.get(odd[0])} in the student; {len(odd)} tokens differ): its logits "
            "would be read by the wrong token ids; set model.original to the model the student was converted from"
        )


def load_teacher(source: Source, dtype: torch.dtype, student, **load):
    """The original model (a resolved Source), frozen, in eval mode, sharing the student's frozen tensors (under
    FSDP the teacher is sharded instead: clakit.uptrain.sharding); `load`: load_model's trust_remote_code and
    allow_pickle."""
    teacher = load_model(source, dtype=dtype, **load)
    teacher.requires_grad_(False)
    teacher.config.use_cache = False
    share_frozen_weights(teacher, student)
    return teacher.eval()


def unique_bytes(*models) -> int:
    """Bytes of distinct parameter storage over the models (shared tensors counted once)."""
    seen, total = set(), 0
    for m in models:
        for p in m.parameters():
            key = p.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += p.untyped_storage().nbytes()
    return total


# --- losses ---------------------------------------------------------------------------------------------------------


def kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) of the softened distributions, per token, times T^2 (Hinton et al.) so gradients keep
    their scale across temperatures; logits (batch, seq, vocab)."""
    return token_kl(student_logits, teacher_logits, temperature)  # chunked: no full-size fp32 temporaries


def hidden_mse(student_hidden, teacher_hidden) -> torch.Tensor:
    """Mean over layers and sequences of ||h_s - h_t||^2 / ||h_t||^2 (relative, so layers with large activations do
    not dominate); each hidden state (batch, seq, hidden); index 0 (the embeddings, identical) is skipped. Per
    sequence, so the loss of a batch is the mean of its sequences' and equal micro-batches (processes, accumulation
    steps) train what one batch does: a ratio of whole-batch means made 2 processes of batch 1 train other weights
    than 1 of batch 2 (3e-3 apart, helper-measured)."""
    terms = [
        (s.float() - t.float()).pow(2).mean(dim=(1, 2)) / t.float().pow(2).mean(dim=(1, 2)).clamp_min(1e-12)
        for s, t in zip(student_hidden[1:], teacher_hidden[1:], strict=True)
    ]  # each (batch,)
    return torch.stack(terms).mean()


def uptrain_loss(student, teacher, input_ids: torch.Tensor, distill) -> tuple[torch.Tensor, dict[str, float]]:
    """weight * KL * T^2 + (1 - weight) * CE + hidden_mse_weight * MSE, and its parts for logging."""
    want_hidden = distill.hidden_mse_weight > 0
    out = student(input_ids=input_ids, output_hidden_states=want_hidden)
    ce = causal_lm_loss(out.logits, input_ids)
    parts = {"ce": ce.detach().item()}
    if teacher is None:
        return ce, parts
    with torch.no_grad():
        t_out = teacher(input_ids=input_ids, output_hidden_states=want_hidden)
    loss = (1 - distill.weight) * ce
    if distill.weight > 0:
        kl = kl_loss(out.logits, t_out.logits, distill.temperature)
        loss = loss + distill.weight * kl
        parts["kl"] = kl.detach().item()
    if want_hidden:
        mse = hidden_mse(out.hidden_states, t_out.hidden_states)
        loss = loss + distill.hidden_mse_weight * mse
        parts["hidden_mse"] = mse.detach().item()
    return loss, parts
