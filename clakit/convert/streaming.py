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
                raise ClakitError(f"tensor {needed} is missing from the checkpoint; {_missing_fix(needed, present)}")
    used = {s for group in sources.values() for s in group}
    return TensorPlan(names, sources, [n for n in source_names if n not in used])


def _missing_fix(needed: str, present: set[str]) -> str:
    """What to do about a missing tensor: a checkpoint saved from the bare decoder (LlamaModel: `layers.0...`, no
    `model.` prefix) holds it under another name, which transformers maps on loading; re-downloading would not help."""
    if needed.startswith("model.") and needed.removeprefix("model.") in present:
        return (
            f"it holds {needed.removeprefix('model.')} instead (saved without the 'model.' prefix): load it with "
            "transformers' AutoModelForCausalLM and save_pretrained it again, then convert that folder"
        )
    layer = _kv_layer(needed)
    projections = ("q_proj", "k_proj", "v_proj")
    held = {k for k in projections if layer is not None and KEY_TEMPLATES[k].format(layer) in present}
    if held == {"q_proj"}:
        # CLA: a layer with its queries and neither keys nor values is a CLA consumer: a CLA checkpoint under a
        # stock config (one of the two missing is a damaged download)
        return (
            "that layer holds q_proj but no k_proj/v_proj, as a CLA checkpoint's consumers do: its config.json "
            "names a stock model_type (edited?); restore the config.json clakit wrote (model_type ..._cla), and "
            "convert the stock model it came from, not the CLA checkpoint"
        )
    return "it is incomplete, re-download it"


def _kv_layer(name: str) -> int | None:
    """The layer whose k_proj/v_proj weight `name` is (by KEY_TEMPLATES), else None."""
    for kind in ("k_proj", "v_proj"):
        head, tail = KEY_TEMPLATES[kind].split("{}")
        middle = name.removeprefix(head).removesuffix(tail)
        if name.startswith(head) and name.endswith(tail) and middle.isdigit():
            return int(middle)
    return None


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
        if name in overrides:  # fitted in the fits' dtype, maybe on a GPU: on the CPU, rounded once to the written
            # dtype (via the checkpoint's bf16 first, a float32 output held bf16 values: 8 of fp32's 24 bits)
            written = dtype or checkpoint.get(plan.sources[name][0]).dtype
            tensor = _cast(name, overrides[name].detach().cpu(), written)
        elif len(plan.sources[name]) == 1 or init == "producer":
            tensor = checkpoint.get(plan.sources[name][0])
        else:  # the group's (kv_heads*head_dim, hidden) weights, or (kv_heads*head_dim,) biases, averaged in fp32
            weights = [checkpoint.get(s) for s in plan.sources[name]]
            tensor = _cast(name, merge_kv(weights, init, torch.float32), dtype or weights[0].dtype)
        if tensor.is_floating_point():
            _check_finite(name, tensor, fitted=name in overrides)
        if dtype is not None and tensor.is_floating_point():
            tensor = _cast(name, tensor, dtype)
        yield name, tensor


def _finite(flat: torch.Tensor) -> bool:
    """Whether the 1-D `flat` holds no NaN or inf. float8 has no aminmax kernel: its chunks of 16M are widened to
    float32 (64 MB) one at a time."""
    chunks = flat.split(1 << 24) if flat.dtype.itemsize == 1 else [flat]
    for chunk in chunks:
        lo, hi = torch.aminmax(chunk.float() if chunk.dtype.itemsize == 1 else chunk)
        if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
            return False
    return True


def _check_finite(name: str, tensor: torch.Tensor, fitted: bool) -> None:
    """A NaN or inf in a written tensor is refused: a source with one (a damaged file, a diverged run) converted
    into a model whose every logit is NaN, exit 0. Checked by the tensor's min and max (NaN propagates through
    both, an inf is one of them): no temporary of the tensor's size. The 16 MB flag chunks of `isfinite` left
    freed heap that glibc kept: RssAnon grew ~0.6x the bytes of the shard being written (+820 MB over a 1.37 GB
    shard)."""
    if not tensor.numel() or _finite(tensor.reshape(-1)):
        return
    if fitted:  # fitted from finite weights: the fit overflowed its dtype
        raise ClakitError(
            f"the fitted tensor {name} holds NaN or inf: fit in float32 (--dtype float32), raise --ridge, or use "
            "--init mean"
        )
    raise ClakitError(
        f"tensor {name} holds NaN or inf: the source checkpoint is damaged or comes from a diverged run; "
        "convert a healthy checkpoint"
    )


def _cast(name: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`tensor` in `dtype`; a finite value beyond its range (a bf16/fp32 weight over float16's 65504) is refused:
    the cast would silently write it as inf, and the model's logits turn to NaN."""
    cast = tensor.to(dtype)
    if cast.dtype != tensor.dtype and not _all_finite(cast) and _all_finite(tensor):
        largest = tensor.abs().max().item()
        raise ClakitError(
            f"tensor {name} holds values up to {largest:.4g}, beyond {str(dtype).removeprefix('torch.')}'s range "
            "(they would be written as inf): use --output-dtype bfloat16 or float32"
        )
    return cast


def _all_finite(tensor: torch.Tensor) -> bool:
    """torch has no isfinite for float8 (a float8 k_proj's group mean cast back was a NotImplementedError traceback):
    widened first; float8_e4m3fn has no inf, a value beyond its range becomes NaN."""
    return bool(torch.isfinite(tensor.float() if tensor.element_size() == 1 else tensor).all())


def check_castable(checkpoint, plan: TensorPlan, dtype: torch.dtype | None) -> None:
    """Before any work, every source tensor the output is made from fits `dtype` (float16's range is narrower than
    bf16's and fp32's): one read of the weights, done only for such a narrowing cast. The writer checks again
    (`_cast`): fitted tensors are known only then."""
    if dtype != torch.float16:
        return
    for name in {source for sources in plan.sources.values() for source in sources}:
        tensor = checkpoint.get(name)
        if tensor.is_floating_point() and tensor.dtype != dtype:
            _cast(name, tensor, dtype)


def output_nbytes(checkpoint, plan: TensorPlan, dtype: torch.dtype | None) -> int:
    """Bytes the CLA weights will take on disk (the shard headers aside); reads shapes and dtypes only."""
    total = 0
    for name in plan.names:
        tensor = checkpoint.get(plan.sources[name][0])
        itemsize = dtype.itemsize if dtype is not None and tensor.is_floating_point() else tensor.element_size()
        total += tensor.numel() * itemsize
    return total
