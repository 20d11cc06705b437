"""A stock (or CLA) model whose decoder layers live in the checkpoint until used: the converter's fits hold one
layer (or one group) at a time, on the chosen device, as GPTQ-style quantizers do.

`LayerwiseModel.from_checkpoint` builds the model skeleton on the meta device (no weights, built once), materialises
the embedding, final norm, lm_head and rotary tables on `device`, and reads each decoder layer's tensors lazily from
the checkpoint (safetensors: memory-mapped, `safe_open` per tensor) when `loaded(...)` asks for it; leaving the
block sends the layer back to meta, releasing its memory. `offloaded()` does the same around every layer's forward,
so whole-model code (`model(ids)`) runs with one layer in memory. `LayerwiseModel.in_memory(model)` wraps a model
that is already whole in memory (every `loaded` is then a no-op), so the same fitting code serves both.
"""

import contextlib

import torch

from clakit import devices
from clakit.errors import ClakitError

LAYER_PREFIX = "model.layers.{}."


class LayerwiseModel:
    def __init__(self, model, checkpoint=None, device: torch.device | None = None, dtype: torch.dtype | None = None):
        self.model, self.checkpoint = model, checkpoint  # checkpoint None: every layer is resident
        first = next(model.parameters())
        self.device = torch.device(device) if device is not None else first.device
        self.dtype = dtype or first.dtype
        self._depth: dict[int, int] = {}  # layer -> how many open `loaded` blocks hold it
        self.reads = 0  # decoder layers read from the checkpoint so far (what the scoring's I/O is counted in)
        self.layers = list(model.model.layers)  # the modules themselves: code may slice model.model.layers
        if checkpoint is not None:
            model._layerwise = self  # lets `materialized(model, ...)` find its loader

    @classmethod
    def in_memory(cls, model) -> "LayerwiseModel":
        return getattr(model, "_layerwise", None) or cls(model)

    @classmethod
    def from_checkpoint(cls, config, checkpoint, device: torch.device, dtype: torch.dtype) -> "LayerwiseModel":
        """Skeleton of `config`'s causal LM with only the non-layer tensors read (embeddings, norm, lm_head)."""
        from transformers import AutoModelForCausalLM

        import clakit.modeling  # noqa: F401  (CLA configs resolve to the CLA classes)

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        model.eval().requires_grad_(False)
        _assign(model, "", checkpoint, _outside_layers(model), device, dtype)
        if config.tie_word_embeddings:  # as from_pretrained does: the lm_head is the embedding
            model.lm_head.weight = model.get_input_embeddings().weight
        fresh_rotary(model, device)
        return cls(model, checkpoint, device, dtype)

    @contextlib.contextmanager
    def loaded(self, *layers: int):
        """Decoder layers `layers` materialised on the device for the duration of the block."""
        fresh = [i for i in dict.fromkeys(layers) if self.checkpoint is not None and not self._depth.get(i)]
        for i in dict.fromkeys(layers):
            self._depth[i] = self._depth.get(i, 0) + 1
        try:
            for i in fresh:
                names = [n for n, _ in self.layers[i].named_parameters()]
                _assign(self.layers[i], LAYER_PREFIX.format(i), self.checkpoint, names, self.device, self.dtype)
                self.reads += 1
            yield
        finally:
            for i in dict.fromkeys(layers):
                self._depth[i] -= 1
            released = [i for i in fresh if not self._depth[i]]
            for i in released:
                self.layers[i].to("meta")  # releases the weights (the module and its hooks stay)
            if released:
                _return_freed_memory()

    @contextlib.contextmanager
    def offloaded(self):
        """Every decoder layer materialised only while its forward runs (no_grad use: autograd would keep the
        weights alive)."""
        stack = contextlib.ExitStack()

        def pre(i):
            def hook(module, args):
                stack.enter_context(self.loaded(i))

            return hook

        def post(module, args, output):
            stack.close()

        handles = []
        for i, layer in enumerate(self.layers):
            handles += [layer.register_forward_pre_hook(pre(i)), layer.register_forward_hook(post)]
        try:
            yield self.model
        finally:
            stack.close()
            for h in handles:
                h.remove()


def fresh_rotary(model, device: torch.device) -> None:
    """RoPE's tables (non-persistent buffers, never read from a checkpoint) computed afresh on `device`, in fp32 as
    from_pretrained leaves them in a 16-bit model: a skeleton built on meta holds none, and a model cast whole to
    bfloat16 has them rounded (its fits then saw other positions than the layer-by-layer model's)."""
    rotary = model.model.rotary_emb
    with torch.device(device):
        model.model.rotary_emb = type(rotary)(config=model.config)


def _return_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them by default: a layer's freed weights would stay in the
    process's RSS, and the next layer's could be placed elsewhere, so RSS would grow with depth)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc():
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc (macOS, musl): nothing to trim
        return None


_LIBC = _load_libc()


def _outside_layers(model) -> list[str]:
    tied = model.config.tie_word_embeddings
    return [
        n for n, _ in model.named_parameters(remove_duplicate=False)
        if not n.startswith("model.layers.") and not (tied and n == "lm_head.weight")
    ]  # fmt: skip


def _assign(module, prefix: str, checkpoint, names: list[str], device, dtype) -> None:
    """Replace `module`'s named (meta) parameters by the checkpoint's tensors `prefix + name`, cast to `dtype` on
    `device`."""
    state = {}
    for name in names:
        tensor = checkpoint.get(prefix + name)
        state[name] = tensor.to(device, dtype if tensor.is_floating_point() else tensor.dtype)
    module.load_state_dict(state, strict=False, assign=True)
    for name in names:
        module.get_parameter(name).requires_grad_(False)


def materialized(model, layers):
    """`loaded(layers)` when `model` is a LayerwiseModel's, else nothing to do (the model is whole)."""
    loader = getattr(model, "_layerwise", None)
    return loader.loaded(*layers) if loader is not None else contextlib.nullcontext()


def run_layers(model, hidden: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """The (batch, seq, hidden) residual stream entering layer `start` -> the one entering layer `stop` (before the
    final norm when `stop` is the last), computed by the model's own decoder loop (its masks, RoPE, sliding window)
    run over layers[start:stop]. Keeps autograd when `hidden` requires grad."""
    body = model.model
    full, captured = body.layers, {}
    handle = body.norm.register_forward_pre_hook(lambda module, args: captured.setdefault("h", args[0]))
    body.layers = full[start:stop]
    try:
        body(inputs_embeds=hidden, use_cache=False)
    finally:
        body.layers = full
        handle.remove()
    return captured["h"]


def resolve_device(name: str, dtype: str) -> torch.device:
    """`--device` / `--dtype` -> torch.device; one line naming the problem when the machine cannot do it. The device
    rule is clakit eval's too (`clakit.devices.resolve`); bfloat16 fits are convert's own rule."""
    device = devices.resolve(name)
    if dtype == "bfloat16" and device.type == "cpu":
        raise ClakitError(
            "--dtype bfloat16 fits need a GPU (--device cuda); on the CPU use --dtype float32 (--bf16 computes in "
            "bfloat16 over it)"
        )
    return device


def fit_autocast(bf16: bool, dtype: str) -> bool:
    """`--bf16`: whether the data stages compute in bfloat16 under torch.autocast over `dtype` weights; bf16 weights
    need none. Off by default, as uptrain's train.bf16: the same command then writes the same tensors on every
    machine, and on a CPU without native bf16 kernels a bf16 matmul is ~45x slower (`devices.slow_on_cpu`)."""
    return bf16 and dtype != "bfloat16"


def autocast(dtype: torch.dtype | None, device: torch.device):
    """torch.autocast to `dtype` (bf16, fp16), else (None, fp32) no context at all: an autocast(enabled=False)
    would switch off one a caller opened (`--bf16`'s stage-wide one, around the distillation's per-step one over
    bf16 weights). Its cast cache is off: a stage-wide context would keep the first bf16 copy of each trained fp32
    leaf until it exits, so every later step would see the weights of step 0 (the distillation's KL after equalled
    its KL before); within one step each weight is cast once anyway."""
    if dtype in (None, torch.float32):
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype, cache_enabled=False)
