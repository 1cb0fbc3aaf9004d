"""Run train_cat_lora.py sharded with FSDP2 on the CPU, for the tests: ``torchrun --nproc_per_node 2 tests/fsdp_cpu.py
<train_cat_lora.py flags>``.

accelerate does not shard on the CPU: with processes that share the CPU it prepares DDP, and ``accelerate launch
--cpu --use_fsdp`` is refused. So this runner lets accelerate build its usual multi-CPU state (gloo process group,
ranks), then turns that state into an FSDP2 one (distributed type and plugin, the plugin read from the same FSDP_*
environment variables ``accelerate launch --use_fsdp`` exports) right after the script creates its ``Accelerator``.
From there on everything is the script's and accelerate's own code: ``prepare`` shards with ``fully_shard``,
``save_state``/``load_state`` take their FSDP branches, and the script gathers the LoRA itself. Driving
``fully_shard`` by hand instead would test a path no user runs.

``FSDP_CPU_RUN=SCRIPT``: run that script (e.g. benchmarks/fsdp_step.py) with the flags instead, the same way.
``FSDP_CPU_SIGTERM_AT=<n>:<class name>``: the main process sends itself SIGTERM when a module of that class starts
its n-th forward pass (the test of an interrupted, resumed sharded run).
"""

import os
import runpy
import signal
import sys

import torch

import accelerate
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

import train_cat_lora

original_init = accelerate.Accelerator.__init__


def init_as_fsdp(self, *args, **kwargs):
    original_init(self, *args, **kwargs)
    # Both shared states: prepare() reads the partial state's type again and would undo a change of the other alone.
    PartialState().distributed_type = DistributedType.FSDP
    AcceleratorState().distributed_type = DistributedType.FSDP
    AcceleratorState().fsdp_plugin = FullyShardedDataParallelPlugin()


def shard_like_accelerate_launch() -> None:
    """Every Accelerator created from now on in this process is an FSDP2 one."""
    os.environ.setdefault("FSDP_VERSION", "2")
    os.environ.setdefault("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP")
    accelerate.Accelerator.__init__ = init_as_fsdp


def sigterm_at(spec: str) -> None:
    count, class_name = spec.split(":")
    calls = []

    def count_calls(module, args):
        if type(module).__name__.removeprefix("FSDP") == class_name:  # fully_shard renames the class FSDP<name>
            calls.append(1)
            if len(calls) == int(count) and int(os.environ.get("RANK", 0)) == 0:
                os.kill(os.getpid(), signal.SIGTERM)

    torch.nn.modules.module.register_module_forward_pre_hook(count_calls)


if __name__ == "__main__":
    shard_like_accelerate_launch()
    if os.environ.get("FSDP_CPU_SIGTERM_AT"):
        sigterm_at(os.environ["FSDP_CPU_SIGTERM_AT"])
    if os.environ.get("FSDP_CPU_RUN"):
        sys.argv = [os.environ["FSDP_CPU_RUN"], *sys.argv[1:]]
        runpy.run_path(sys.argv[0], run_name="__main__")
    else:
        sys.exit(train_cat_lora.cli(sys.argv[1:]))
