"""Copies in training windows: a share of the windows end with a repeat of an earlier span of the same window.

Used by the conversion's end-to-end distillation (`--distill-copy-fraction`) and by uptrain (`data.copy_fraction`).
The teacher predicts a repeat once its first tokens appear (induction); the KL on those tokens teaches a CLA student,
whose consumers read another layer's K/V, to find and copy across the window: the skill passkey retrieval measures
(docs/quality.md, stop 21: uptrain's passkeys 0.30 -> 0.80 of 90 with copies in half the windows).
"""

import torch


def add_copies(windows: torch.Tensor, fraction: float, span: int, seed: int = 0) -> torch.Tensor:
    """(n, L) token windows, changed in place (a large budget is not held twice): round(fraction * n) seeded rows
    end with a repeat of `span` tokens taken from an earlier, non-overlapping place in the same row (distance
    span..L - span). Needs 1 <= span <= L // 2 when any row is picked."""
    n, length = windows.shape
    k = round(fraction * n)
    if k == 0:
        return windows
    if not 1 <= span <= length // 2:
        raise ValueError(f"copy span {span} must be between 1 and half the window ({length // 2})")
    g = torch.Generator().manual_seed(seed * 7_919 + 17)
    rows = torch.randperm(n, generator=g)[:k]
    starts = torch.randint(0, length - 2 * span + 1, (k,), generator=g)  # the source ends before the copy begins
    cols, rows = torch.arange(span), rows.unsqueeze(1)
    source = windows[rows, starts.unsqueeze(1) + cols]  # (k, span), gathered before the write; ends before the tail
    windows[rows, length - span + cols] = source
    return windows
