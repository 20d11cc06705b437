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


# oneDNN's check for native 16-bit matmuls on this CPU (AVX512-BF16 or AMX for bf16; AVX512-FP16 or AMX-FP16 for
# fp16). Without them torch computes 16-bit matmuls in a scalar fallback.
_NATIVE_CHECK = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}
_NATIVE_ISA = {torch.bfloat16: "AVX512-BF16 or AMX", torch.float16: "AVX512-FP16 or AMX-FP16"}


def native_on_cpu(dtype: torch.dtype) -> bool:
    """Whether this CPU runs `dtype` matmuls natively. fp32 always does; a 16-bit dtype needs oneDNN's kernels for
    it (a torch without the check is assumed native)."""
    check = getattr(torch.ops.mkldnn, _NATIVE_CHECK[dtype], None) if dtype in _NATIVE_CHECK else None
    return check is None or bool(check())


def slow_on_cpu(dtype, what: str, device) -> str | None:
    """A line for a 16-bit run on a CPU without native kernels for it, else None (also on a GPU, and for fp32 or a
    dtype left to the checkpoint). Such a run is slower than fp32, not faster: a bf16 forward + backward of a
    (1024 x 576) @ (576 x 1536) linear took 745 ms against fp32's 16.5 ms on 2 cores with oneDNN held to AVX2
    (ONEDNN_MAX_CPU_ISA=AVX2), and 4.6 ms on the same AMX CPU unheld. The one check convert, uptrain and eval use."""
    if torch.device(device).type != "cpu" or dtype not in _NATIVE_CHECK or native_on_cpu(dtype):
        return None
    name = str(dtype).removeprefix("torch.")
    return (
        f"{what}: this CPU has no native {name} kernels ({_NATIVE_ISA[dtype]}), so {name} runs slower than float32 "
        "here, not faster; use float32 on this machine"
    )


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
