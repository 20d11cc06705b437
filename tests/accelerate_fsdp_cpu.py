"""`python -m clakit ...` under accelerate's own FSDP code on CPU processes (gloo), for the tests.

accelerate only switches to FSDP on accelerators ("no available devices" on CPU); this launcher joins the CPU
processes as accelerate does for `ACCELERATE_USE_CPU=1 torchrun ...` (MULTI_CPU), then turns that state into FSDP
with a plugin built from the environment, exactly as `accelerate launch --use_fsdp` would have configured it:
FSDP_VERSION (1 or 2), FSDP_CPU_RAM_EFFICIENT_LOADING, FSDP_USE_ORIG_PARAMS,
FSDP_TRANSFORMER_CLS_TO_WRAP. Everything after that (prepare, the
wrapping of each decoder layer, the rank-0 loading and broadcast, state dicts) is accelerate's and torch's code.
With FSDP_TEST_MAIN_LOADS_ONLY=true every process but the main one fails on any `from_pretrained` of a model (the
test that they never read a checkpoint).
Usage: torchrun --nproc_per_node 2 tests/accelerate_fsdp_cpu.py uptrain RECIPE [-q]
"""

import os
import sys

import accelerate
import torch
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

LAYER = "LlamaCLADecoderLayer"


def _fsdp_plugin() -> FullyShardedDataParallelPlugin:
    version = int(os.environ.get("FSDP_VERSION", "2"))
    ram_efficient = os.environ.get("FSDP_CPU_RAM_EFFICIENT_LOADING", "false") == "true"
    return FullyShardedDataParallelPlugin(
        fsdp_version=version,
        auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", LAYER).split(","),
        cpu_ram_efficient_loading=ram_efficient,
        sync_module_states=ram_efficient or None,
        use_orig_params=os.environ.get("FSDP_USE_ORIG_PARAMS", "true") == "true" if version == 1 else None,
    )


_original_init = accelerate.Accelerator.__init__


def _fsdp_init(self, *args, **kwargs):
    _original_init(self, *args, cpu=True, **kwargs)
    if self.state.distributed_type == DistributedType.MULTI_CPU:
        # as AcceleratorState.__init__ records FSDP: in its own state and in the process-wide PartialState, which
        # every later AcceleratorState() copies from
        self.state.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        self.state.fsdp_plugin = _fsdp_plugin()
        # accelerate names the CPU "cpu:0", FSDP1's parameters say "cpu" and it refuses the two as inconsistent
        self.state.device = PartialState._shared_state["device"] = torch.device("cpu")


def _refuse_loading(cls, *args, **kwargs):
    raise RuntimeError(f"process {os.environ.get('RANK')} loaded a checkpoint ({cls.__name__}.from_pretrained)")


if __name__ == "__main__":
    os.environ["ACCELERATE_USE_FSDP"] = "true"  # what accelerate launch exports: transformers reads it
    accelerate.Accelerator.__init__ = _fsdp_init
    if os.environ.get("FSDP_TEST_MAIN_LOADS_ONLY") == "true" and os.environ.get("RANK", "0") != "0":
        from transformers import PreTrainedModel

        PreTrainedModel.from_pretrained = classmethod(_refuse_loading)
    from clakit.cli import main

    sys.exit(main(sys.argv[1:]))
