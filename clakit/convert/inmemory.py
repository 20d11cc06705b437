"""Build a CLA model from an in-memory source model: the reference the streaming converter must match, and the
starting point for data-aware fitting (calibration, reconstruction, layout search)."""

import torch

from clakit.convert.layout import KEY_TEMPLATES, groups
from clakit.errors import ClakitError
from clakit.modeling import CLA_CLASSES


def cla_family(config) -> str:
    family = config.model_type.removesuffix("_cla")
    if family not in CLA_CLASSES:
        raise ClakitError(f"unsupported model type {config.model_type!r}; supported: {', '.join(CLA_CLASSES)}")
    return family


def cla_config(config, kv_source_layers: list[int]):
    """The CLA config for a Llama/Mistral (or CLA) config with a new layout."""
    family = cla_family(config)
    fields = config.to_dict()
    for key in ("model_type", "architectures", "auto_map", "kv_source_layers", "transformers_version"):
        fields.pop(key, None)
    if family == "mistral":  # Mistral (stock and CLA) has no attention or MLP biases whatever its config says: a
        # key that means nothing is not written into the CLA config, where a reader could take it for biases (vLLM's
        # Mistral reads both, and served zeros from the biases no checkpoint holds)
        fields.pop("attention_bias", None)
        fields.pop("mlp_bias", None)
    config_cls, _, lm_cls = CLA_CLASSES[family]
    return config_cls(**fields, kv_source_layers=list(kv_source_layers), architectures=[lm_cls.__name__])


def merge_kv(weights: list[torch.Tensor], init: str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """One group's shared k_proj (or v_proj) from its layers' own, producer first; (kv_heads*head_dim, hidden), in
    `dtype` (default the source's). The mean is taken in fp32 and rounded once, to the dtype written: via the source's
    bf16 first, a float32 output held the bf16 rounding of a mean of bf16 values (half a bf16 ulp off)."""
    if init == "producer":
        return weights[0].to(dtype or weights[0].dtype, copy=True)
    if init == "mean":
        return torch.stack([w.float() for w in weights]).mean(0).to(dtype or weights[0].dtype)
    raise ValueError(f"merge_kv handles 'producer' and 'mean', not {init!r}")


def shared_kv_tensors(state: dict, layout: list[int], init: str) -> dict[str, torch.Tensor]:
    """Producer K/V tensors (weights and biases, where present) merged over each group."""
    out = {}
    for members in groups(layout).values():
        for kind in ("k_proj", "v_proj", "k_bias", "v_bias"):
            names = [KEY_TEMPLATES[kind].format(i) for i in members]
            if names[0] in state:
                out[names[0]] = merge_kv([state[n] for n in names], init)
    return out


def cla_parts(model, kv_source_layers: list[int], init: str, overrides=None) -> tuple:
    """(CLA config, CLA causal-LM class, state dict) of `model` under a layout: the source's tensors (not copied),
    each group's K/V merged by `init`, then `overrides` (tensor name -> tensor) on top."""
    config = cla_config(model.config, kv_source_layers)
    config._attn_implementation = model.config._attn_implementation
    _, _, lm_cls = CLA_CLASSES[cla_family(model.config)]
    state = dict(model.state_dict())
    state.update(shared_kv_tensors(state, kv_source_layers, init))
    state.update({name: overrides[name] for name in overrides or {}})
    return config, lm_cls, state


def cla_model_from(model, kv_source_layers: list[int], init: str = "mean", overrides: dict | None = None):
    """A CLA model holding `model`'s weights: consumers' K/V dropped, producers' merged by `init`.

    `overrides` (tensor name -> tensor) replaces any resulting tensor, e.g. fitted K/V from calibration.
    """
    config, lm_cls, new_state = cla_parts(model, kv_source_layers, init, overrides)
    # built on the source's device (not meta: RoPE's non-persistent buffers must be computed), then overwritten;
    # its random init draws from a fork of the generators, not the caller's (a library call consumed them)
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.device(device):
        cla = lm_cls(config)
    expected = set(cla.state_dict())
    cla.load_state_dict({k: v for k, v in new_state.items() if k in expected}, strict=True)
    if config.tie_word_embeddings:
        cla.tie_weights()
    cla = cla.to(next(model.parameters()).dtype)
    keep_rotary_buffers(model, cla)
    return cla.eval()


def keep_rotary_buffers(source, built) -> None:
    """RoPE's non-persistent buffers of `built` (a model made from `source`'s config, then `.to(dtype)`) as `source`
    holds them: from_pretrained keeps inv_freq fp32 in a 16-bit model, and `.to(bf16)` rounds it (the identity layout
    of a bf16 model was 0.03 off its logits; an identity KV-head merge 0.047)."""
    for name, buffer in source.model.rotary_emb.named_buffers():
        setattr(built.model.rotary_emb, name, buffer.clone())
