"""Where models run: one rule for `--device` (convert, eval) and for the devices a loaded model spans."""

import torch

from clakit.errors import ClakitError

DEVICES_HELP = "cpu, cuda, cuda:N or auto (the first GPU, else the CPU)"


def resolve(name: str) -> torch.device:
    """`--device` -> torch.device; one line naming the problem when this machine cannot run there."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ClakitError(f"unknown --device {name!r}; use {DEVICES_HELP}") from None
    if device.type not in ("cpu", "cuda"):
        raise ClakitError(f"--device {name} is not supported; use {DEVICES_HELP}")
    if device.type == "cpu" and device.index not in (None, 0):  # torch accepts cpu:3 and runs on the one CPU
        raise ClakitError(f"--device {name}: the CPU has no index; use --device cpu")
    if device.type == "cpu":  # cpu:0 is the CPU, but torch.load(map_location=cpu:0) cannot restore tensors there
        return torch.device("cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ClakitError(f"--device {name}: this machine has no CUDA GPU (or torch is a CPU build); use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ClakitError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device


def spanned(model) -> list[torch.device]:
    """The devices holding `model`'s parameters, in the order the forward reaches them (one unless it was loaded
    with a device_map spreading its layers)."""
    seen: dict[torch.device, None] = {}
    for p in model.parameters():
        seen.setdefault(p.device, None)
    return list(seen)


def placement(model) -> list[str]:
    """Where `model`'s weights are, in the order the forward reaches them, for the record: `spanned`, except that
    a device map beyond the GPUs' memory leaves the layers accelerate offloads ("cpu", "disk") holding meta tensors,
    which hf_device_map names and `spanned` would call "meta"."""
    device_map = getattr(model, "hf_device_map", None)
    if not device_map:
        return [str(d) for d in spanned(model)]
    return list(dict.fromkeys(f"cuda:{v}" if isinstance(v, int) else str(v) for v in device_map.values()))


def synchronize(model) -> None:
    """Wait for every GPU the model spans (timing a model spread over several GPUs must wait for the last)."""
    for device in spanned(model):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
