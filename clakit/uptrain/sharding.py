"""Models under FSDP without a whole copy per process: read on the main process only, sharded before any process
holds the whole of it on its device.

* `load_on_main`: the main process loads the checkpoint (into host memory); the others build the same model with
  uninitialised CPU storage (`torch.empty`: address space, not pages, until written) and read nothing. FSDP then
  broadcasts the main process's values: accelerate does for the student when `fsdp_cpu_ram_efficient_loading` is
  set (FSDP1's sync_module_states, FSDP2's full-state-dict load), `shard_frozen` does for the teacher.
* `shard_frozen`: a frozen model (the teacher, or the original scored once) sharded with FSDP2 (`fully_shard` per
  decoder layer, then the root, as accelerate wraps the student), its weights broadcast from the main process one
  tensor at a time. Every process then holds 1/N of it on its device, and a forward gathers one layer at a time. A
  frozen model needs no flat-parameter compatibility with the student's FSDP version, so FSDP2 serves both.
"""

import torch

from clakit.sources import Source, load_config, load_model


def ram_efficient(acc) -> bool:
    """Whether accelerate broadcasts the student's weights from the main process (`fsdp_cpu_ram_efficient_loading`,
    which implies sync_module_states): only then may the other processes skip reading it."""
    from clakit.uptrain.checkpoint import fsdp_plugin

    return bool(getattr(fsdp_plugin(acc), "cpu_ram_efficient_loading", False))  # None: not sharded


def load_on_main(source: Source, dtype: torch.dtype, acc, trust_remote_code: bool = False, allow_pickle: bool = False):
    """The model on the main process; on the others an empty one of the same structure (no file read), whose
    values the caller's FSDP broadcast from the main process provides."""
    if acc.is_main_process:
        return load_model(source, dtype=dtype, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    return empty_model(source, dtype, trust_remote_code)


def empty_model(source: Source, dtype: torch.dtype, trust_remote_code: bool = False):
    """The model of `source`'s config with uninitialised weights on the CPU and real buffers (RoPE's inv_freq is
    computed, not loaded: FSDP broadcasts parameters and persistent buffers, so it must be right already)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    import clakit.modeling  # noqa: F401  (registers llama_cla / mistral_cla)

    config = load_config(source, trust_remote_code)
    with init_empty_weights(include_buffers=False):  # parameters on the meta device, buffers real
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    _materialise(model)
    model.tie_weights()  # from_config leaves lm_head untied from the embeddings where the config ties them
    model.config.use_cache = False
    return model.eval()


def _materialise(model) -> None:
    """Replace every meta parameter by uninitialised CPU storage of its shape and dtype, keeping tied parameters
    tied (one new Parameter per original object, e.g. lm_head.weight is embed_tokens.weight)."""
    new: dict[int, torch.nn.Parameter] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if p.device.type != "meta":
            continue
        if id(p) not in new:
            new[id(p)] = torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype), requires_grad=p.requires_grad)
        module_name, _, leaf = name.rpartition(".")
        model.get_submodule(module_name)._parameters[leaf] = new[id(p)]


def decoder_layers(model) -> list[torch.nn.Module]:
    """The decoder layers of a transformers causal LM (model.model.layers)."""
    return list(model.get_decoder().layers)


def shard_frozen(model, acc):
    """`model` (frozen; the main process's holds the values, the others' may be empty) sharded with FSDP2 over
    acc's processes on acc's device: every decoder layer its own unit, then the root (embeddings, final norm,
    lm_head); the values are then broadcast from the main process tensor by tensor (one whole tensor on the device
    at a time). Returns the same module, now an FSDPModule."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model.requires_grad_(False)
    model.config.use_cache = False  # it teaches or is scored on whole windows: no KV cache
    full = model.state_dict() if acc.is_main_process else {}  # CPU tensors: views, no copy
    mesh = init_device_mesh(acc.device.type, (acc.num_processes,))
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    # the root too (embeddings, lm_head: GBs at 70B): by default FSDP2 reshards a root only in the backward, which
    # a frozen model never runs
    fully_shard(model, mesh=mesh, reshard_after_forward=True)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=True)
    set_model_state_dict(model, full, options=options)
    if hasattr(model, "reset_iter_state"):  # torch >= 2.13
        model.register_forward_hook(_forget_forward)
    return model.eval()


def _forget_forward(model, _args, _output) -> None:
    """FSDP2 records every forward for the backward's prefetching and forgets them in the backward, which a frozen
    model never runs: without this the records grow by ~80 entries per teacher forward at 70B, for the whole run."""
    model.reset_iter_state()
