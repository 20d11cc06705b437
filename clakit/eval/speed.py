"""Throughput at a batch size: prefill (one forward over batch x seq_len tokens into a fresh cache) and decode
(one new token per sequence per step, greedy, reading that cache)."""

import time

import torch

from clakit import devices


def fit_window(length: int, decode_steps: int, window: int | None) -> tuple[int, int]:
    """(prefill length, decode steps) whose positions stay inside the model's `window`: decoding past it indexes a
    learned position table out of range (GPT-2 at --seq-len = its window: IndexError) or times positions the model
    never saw; the prefill gives up the last tokens first."""
    if not window or length + decode_steps <= window:
        return length, decode_steps
    steps = min(decode_steps, window - 1)
    return min(length, window - steps), steps


def throughput(model, ids: torch.Tensor, batch_size: int, decode_steps: int = 16, window: int | None = None) -> dict:
    """Tokens/s of prefill and decode; `ids` (L,) is repeated over the batch (the cost does not depend on content).
    `window`: the model's context window, which prefill + decode stay inside (`fit_window`)."""
    from transformers import DynamicCache

    length, decode_steps = fit_window(len(ids), decode_steps, window)
    ids = ids[:length]
    device = next(model.parameters()).device
    inputs = ids.to(device).unsqueeze(0).expand(batch_size, -1).contiguous()  # (B, L)
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(input_ids=inputs[:, :8], use_cache=False)  # warm-up: first-call allocations are not throughput
        devices.synchronize(model)
        start = time.perf_counter()
        out = model(input_ids=inputs, cache=cache, use_cache=True, logits_to_keep=1)
        devices.synchronize(model)
        prefill_s = time.perf_counter() - start
        token = out.logits[:, -1:].argmax(-1)  # (B, 1)
        start = time.perf_counter()
        for _ in range(decode_steps):
            out = model(input_ids=token, cache=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
        devices.synchronize(model)
        decode_s = time.perf_counter() - start
    return {
        "batch_size": batch_size,
        "prefill_tokens": inputs.numel(),
        "prefill_length": length,
        "prefill_tokens_per_s": inputs.numel() / prefill_s,
        "decode_steps": decode_steps,
        "decode_tokens_per_s": batch_size * decode_steps / decode_s,
    }
