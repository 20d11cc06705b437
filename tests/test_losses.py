"""The chunked token KL against the textbook formula: value and gradient, across chunk boundaries."""

import pytest
import torch
import torch.nn.functional as F

from clakit import losses
from clakit.losses import token_kl


def reference_kl(s: torch.Tensor, t: torch.Tensor, temp: float) -> torch.Tensor:
    ls, lt = F.log_softmax(s.float() / temp, -1), F.log_softmax(t.float() / temp, -1)
    return (lt.exp() * (lt - ls)).sum(-1).mean() * temp**2


@pytest.mark.parametrize("chunk", [losses.CHUNK_ELEMENTS, 7 * 13, 1])  # one chunk; 7 rows with a partial last; 1 row
@pytest.mark.parametrize("temp", [1.0, 2.0, 0.5])
def test_value_and_gradient_match_the_definition(monkeypatch, chunk, temp):
    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", chunk)
    gen = torch.Generator().manual_seed(0)
    s0 = torch.randn(3, 17, 13, generator=gen) * 3
    t = torch.randn(3, 17, 13, generator=gen) * 3
    s1, s2 = s0.clone().requires_grad_(), s0.clone().requires_grad_()
    got, want = token_kl(s1, t, temp), reference_kl(s2, t, temp)
    got.backward(torch.tensor(1.7))
    want.backward(torch.tensor(1.7))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-4, atol=1e-7)


def test_zero_for_equal_logits_positive_otherwise_and_bf16_teachers_work():
    s = torch.randn(2, 9, 40)
    assert token_kl(s, s).item() == pytest.approx(0.0, abs=1e-6)
    assert token_kl(s, s.flip(-1)).item() > 0.1
    half = token_kl(s, s.flip(-1).bfloat16())
    assert half.item() == pytest.approx(reference_kl(s, s.flip(-1).bfloat16(), 1.0).item(), rel=1e-5)


def test_a_teacher_with_a_gradient_or_another_shape_is_refused():
    s = torch.randn(2, 4, 8, requires_grad=True)
    with pytest.raises(ValueError, match="teacher"):
        token_kl(s, torch.randn(2, 4, 8, requires_grad=True))
    with pytest.raises(ValueError, match="shapes"):
        token_kl(s, torch.randn(2, 5, 8))
