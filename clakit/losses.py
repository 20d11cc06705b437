"""Token-level losses shared by convert and uptrain: the next-token cross-entropy, and the KL between a student's and
a teacher's logits, computed in row chunks.

`F.kl_div(log_softmax(s), log_softmax(t))` on (batch, seq, vocab) logits allocates several full-size fp32
temporaries (two log-softmaxes, their difference, exp, the gradient's), each ~400 MB for 2 x 1,024 tokens of a
49k vocabulary. On a CPU, touching fresh pages of that size dominated the step: measured in the conversion's
distillation on SmolLM2-135M (2 cores), the old KL took 6.2-9.1 s of a 13-23 s step, this one 0.4-1.4 s of 7.7-9.4 s,
the same value to 1e-7. Here each chunk of rows is at most ~16 MB (reused by the allocator), and the backward
recomputes the softmaxes from the saved logits: d KL / d s = (softmax(s / T) - softmax(t / T)) * T / N.
"""

import torch
import torch.nn.functional as F

CHUNK_ELEMENTS = 2**22  # floats per chunk (16 MB): below glibc's largest mmap threshold, so buffers are reused


def causal_lm_loss(logits: torch.Tensor, input_ids: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy; logits (batch, seq, vocab), input_ids (batch, seq). reduction "none": per token,
    (batch, seq - 1)."""
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten(), reduction=reduction)
    return loss.view(input_ids.shape[0], -1) if reduction == "none" else loss


def _row_slices(x: torch.Tensor):
    """Slices of at most CHUNK_ELEMENTS elements over the rows of x (N, vocab)."""
    rows = max(1, CHUNK_ELEMENTS // x.shape[-1])
    return (slice(a, a + rows) for a in range(0, len(x), rows))


class _ChunkedKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
        s, t = student.flatten(0, -2), teacher.flatten(0, -2)  # (N, vocab) each
        total = torch.zeros((), dtype=torch.float64, device=s.device)
        for rows in _row_slices(s):
            ls = F.log_softmax(s[rows].float() / temperature, -1)
            lt = F.log_softmax(t[rows].float() / temperature, -1)
            total += (lt.exp() * (lt - ls)).sum(dtype=torch.float64)
        ctx.save_for_backward(student, teacher)
        ctx.temperature = temperature
        return (total * temperature**2 / max(len(s), 1)).float()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        student, teacher = ctx.saved_tensors
        temp = ctx.temperature
        s, t = student.flatten(0, -2), teacher.flatten(0, -2)
        grad = torch.empty_like(s)
        scale = grad_out * temp / max(len(s), 1)
        for rows in _row_slices(s):
            grad[rows] = (F.softmax(s[rows].float() / temp, -1) - F.softmax(t[rows].float() / temp, -1)) * scale
        return grad.view_as(student), None, None


def token_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student) of the softened distributions, times T^2 (Hinton et al., so
    gradients keep their scale across temperatures); logits (..., vocab), the teacher's without gradient."""
    if teacher_logits.requires_grad:
        raise ValueError("token_kl: the teacher's logits must not require a gradient (compute them under no_grad)")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"token_kl: logits of shapes {tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    return _ChunkedKL.apply(student_logits, teacher_logits, float(temperature))
