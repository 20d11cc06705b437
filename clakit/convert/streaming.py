"""Which tensors the CLA checkpoint holds and how each is made from the source's, one tensor (or group) at a time.

Every CLA tensor is a source tensor copied as is, except a producer's k_proj/v_proj (and biases), which merges the
K/V of every layer in its group (`init`), or comes from `overrides` (K/V fitted on calibration data). Consumers'
K/V are read only to be merged, never written.
"""

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from clakit.convert.checkpoint import natural_key
from clakit.convert.inmemory import merge_kv
from clakit.convert.layout import KEY_TEMPLATES, KV_KEYS, groups
from clakit.errors import ClakitError


@dataclass(frozen=True)
class TensorPlan:
    names: list[str]  # output tensors, in the order they are written (layer by layer)
    sources: dict[str, list[str]]  # output name -> source tensors it is made from: itself, or its group's K/V
    dropped: list[str]  # source tensors the CLA model has no use for (e.g. a tied lm_head, rotary buffers)


def _group_sources(layout: list[int]) -> dict[str, list[str]]:
    """Producer K/V name -> the same tensor of every layer in its group (producer first)."""
    return {
        KEY_TEMPLATES[kind].format(producer): [KEY_TEMPLATES[kind].format(m) for m in members]
        for producer, members in groups(layout).items()
        for kind in KV_KEYS
    }


def plan_tensors(source_names: list[str], expected: set[str], tied: set[str], layout: list[int]) -> TensorPlan:
    """What to write, from the CLA model's own tensor names (`expected`) minus tied ones loaded from their twin."""
    present, group_sources = set(source_names), _group_sources(layout)
    names = sorted(expected - tied, key=natural_key)
    sources = {name: group_sources.get(name, [name]) for name in names}
    for name in names:
        for needed in sources[name]:
            if needed not in present:
                raise ClakitError(f"tensor {needed} is missing from the checkpoint; it is incomplete, re-download it")
    used = {s for group in sources.values() for s in group}
    return TensorPlan(names, sources, [n for n in source_names if n not in used])


def check_overrides(checkpoint, plan: TensorPlan, overrides: dict[str, torch.Tensor]) -> None:
    """Fitted tensors must replace tensors of the plan, shape for shape (a programming error otherwise)."""
    for name, tensor in overrides.items():
        if name not in plan.sources:
            raise ValueError(f"fitted tensor {name} is not a tensor of the CLA model")
        expected = tuple(checkpoint.get(plan.sources[name][0]).shape)  # lazy: reads the header only
        if tuple(tensor.shape) != expected:
            raise ValueError(f"fitted tensor {name} has shape {tuple(tensor.shape)}, expected {expected}")


def converted_tensors(
    checkpoint, plan: TensorPlan, init: str, overrides: dict | None = None, dtype: torch.dtype | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of the CLA checkpoint in write order; holds one group's K/V at a time.

    `init` is "producer" or "mean" (the base under any `overrides`); `dtype` casts floating tensors.
    """
    overrides = overrides or {}
    for name in plan.names:
        if name in overrides:  # fitted in the fits' dtype, maybe on a GPU: back to the checkpoint's, on the CPU
            tensor = overrides[name].detach().to("cpu", checkpoint.get(plan.sources[name][0]).dtype)
        elif len(plan.sources[name]) == 1 or init == "producer":
            tensor = checkpoint.get(plan.sources[name][0])
        else:  # the group's (kv_heads*head_dim, hidden) weights, or (kv_heads*head_dim,) biases, averaged
            tensor = merge_kv([checkpoint.get(s) for s in plan.sources[name]], init)
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        yield name, tensor


def output_nbytes(checkpoint, plan: TensorPlan, dtype: torch.dtype | None) -> int:
    """Bytes the CLA weights will take on disk (the shard headers aside); reads shapes and dtypes only."""
    total = 0
    for name in plan.names:
        tensor = checkpoint.get(plan.sources[name][0])
        itemsize = dtype.itemsize if dtype is not None and tensor.is_floating_point() else tensor.element_size()
        total += tensor.numel() * itemsize
    return total
