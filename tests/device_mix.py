"""CUDA's same-device check, emulated on a CPU-only machine: `meta` tensors stand for a GPU's, and any torch call
whose tensor operands (rank > 0) mix `meta` and `cpu` raises, as CUDA would ("Expected all tensors to be on the same
device"). Plain CPU torch lets meta and CPU operands meet, so without this such a bug only shows on a GPU."""

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

# moving or indexing across devices is legal on CUDA too
MOVES = {"to", "copy_", "cpu", "cuda", "__setitem__", "__getitem__", "__get__", "__set__", "detach", "clone"}
MOVES |= {"size", "dim", "numel", "element_size"}


class DeviceMixError(RuntimeError):
    pass


class DeviceMix(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") not in MOVES:
            flat, _ = tree_flatten((args, kwargs))
            devices = {t.device.type for t in flat if isinstance(t, torch.Tensor) and t.dim() > 0}
            if {"meta", "cpu"} <= devices:
                raise DeviceMixError(f"{getattr(func, '__name__', func)} mixes {sorted(devices)}")
        return func(*args, **kwargs)
