"""Throughput at a batch size: prefill (one forward over batch x seq_len tokens into a fresh cache) and decode
(one new token per sequence per step, greedy, reading that cache), each the median of a few passes."""

import os
import statistics
import time

import torch

from clakit import devices
from clakit.eval import kvcache


def fit_window(length: int, decode_steps: int, window: int | None) -> tuple[int, int]:
    """(prefill length, decode steps) whose positions stay inside the model's `window`: decoding past it indexes a
    learned position table out of range (GPT-2 at --seq-len = its window: IndexError) or times positions the model
    never saw; the prefill gives up the last tokens first."""
    if not window or length + decode_steps <= window:
        return length, decode_steps
    steps = min(decode_steps, window - 1)
    return min(length, window - steps), steps


def _one_pass(model, inputs: torch.Tensor, decode_steps: int) -> tuple[float, float]:
    """Seconds of one prefill of `inputs` (B, L) into a fresh cache and of `decode_steps` greedy steps after it."""
    cache = kvcache.new_cache(model)
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
    return prefill_s, time.perf_counter() - start


def throughput(
    model, ids: torch.Tensor, batch_size: int, decode_steps: int = 16, window: int | None = None, repeats: int = 3
) -> dict:
    """Tokens/s of prefill and decode, each the median of `repeats` passes: one pass on a busy machine could read a
    pause of the OS as the model's speed (a tiny model's prefill: 426 tok/s in one report, 103,003 in the next row).
    `ids` (L,) is repeated over the batch (the cost does not depend on content). `window`: the model's context
    window, which prefill + decode stay inside (`fit_window`)."""
    length, decode_steps = fit_window(len(ids), decode_steps, window)
    ids = ids[:length]
    device = next(model.parameters()).device
    inputs = ids.to(device).unsqueeze(0).expand(batch_size, -1).contiguous()  # (B, L)
    with torch.inference_mode():
        model(input_ids=inputs[:, :8], use_cache=False)  # warm-up: first-call allocations are not throughput
        devices.synchronize(model)
        cpu, wall = time.process_time(), time.perf_counter()
        passes = [_one_pass(model, inputs, decode_steps) for _ in range(repeats)]
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    prefill_s, decode_s = (statistics.median(times) for times in zip(*passes, strict=True))
    return {
        "batch_size": batch_size,
        "prefill_tokens": inputs.numel(),
        "prefill_length": length,
        "prefill_tokens_per_s": inputs.numel() / prefill_s,
        "decode_steps": decode_steps,
        "decode_tokens_per_s": batch_size * decode_steps / decode_s,
        "repeats": repeats,
        # how far the measurement can be trusted: every pass (a spread of 5x is a busy machine, not the model), and
        # the share of its threads' time the process got while timed (1.0: all of it; on a CPU whose other jobs
        # outnumber its cores, 0.25 and a 10x slower decode were measured) with the load average then
        "passes_s": [[round(p, 6), round(d, 6)] for p, d in passes],
        "cpu_share": round(cpu / (wall * torch.get_num_threads()), 3) if wall > 0 else None,
        "load_average": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
    }
