"""The run's processes and its Accelerator: what the launch config asks for is what runs.

`accelerate launch --config_file recipes/accelerate/{ddp,fsdp2,zero2,zero3}.yaml` tells each
process what to run through environment variables; accelerate 1.15 then builds the backend, but
only on GPUs. On CPU processes (this project's tests, a laptop without CUDA) it needs help, and
without it each config silently runs something else:

- plain `Accelerator()` on CPU processes believes each is alone (DistributedType.NO) and they
  train apart, so llmrl passes `cpu=True` (DDP over gloo, DistributedType.MULTI_CPU);
- but `cpu=True` drops an FSDP config (AcceleratorState turns only MULTI_GPU-like states into
  FSDP) and DDP runs instead: llmrl finishes what AcceleratorState does on a GPU, and torch's
  `fully_shard` then shards over a CPU device mesh with gloo;
- and `cpu=True` drops DeepSpeed too (selected only with cpu=False), while cpu=False on a machine
  without CUDA finds no backend (one process, and DeepSpeed's batch-size check fails): llmrl passes
  cpu=False with the gloo backend named, and DeepSpeed's CPU accelerator runs ZeRO over gloo.

Whatever the machine, the backend that runs is checked against the one the launch asked for, and a
mismatch (or a config that cannot run here) stops the run with the reason.
"""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import (
    DistributedType,
    FullyShardedDataParallelPlugin,
    GradientAccumulationPlugin,
    InitProcessGroupKwargs,
)

from llmrl.recipe import RecipeError


def _env_true(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def _cpu_processes() -> bool:
    """Several processes and no CUDA (`accelerate launch --multi_gpu` or torchrun on a CPU machine)."""
    return not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1


def requested_backend() -> DistributedType | None:
    """What `accelerate launch` asked for through its environment: DEEPSPEED, FSDP, or None (DDP / one process)."""
    if _env_true("ACCELERATE_USE_DEEPSPEED"):
        return DistributedType.DEEPSPEED
    if _env_true("ACCELERATE_USE_FSDP"):
        return DistributedType.FSDP
    return None


def _deepspeed_on_cpu() -> None:
    """DeepSpeed on CPU processes: its CPU accelerator, over gloo (no oneCCL needed). Its CPU comm
    backend would also JIT-compile a shared-memory all-reduce at start-up (C++, minutes on a small
    machine, and a failure without a compiler); gloo alone does the collectives."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed.ops
    except ImportError as error:
        raise RuntimeError("This launch config asks for DeepSpeed, which is not installed: "
                           "pip install 'llmrl[deepspeed]' (or launch with recipes/accelerate/ddp.yaml).") from error
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def _state_kwargs() -> dict:
    """How this process's PartialState must be made (see the module docstring)."""
    if not _cpu_processes():
        return {}
    if requested_backend() == DistributedType.DEEPSPEED:
        _deepspeed_on_cpu()
        return {"cpu": False, "backend": "gloo"}
    return {"cpu": True}


def process_state() -> PartialState:
    """The process group this run belongs to (created on first use)."""
    return PartialState(**_state_kwargs())


def _cpu_fsdp_plugin(kwargs: dict) -> FullyShardedDataParallelPlugin | None:
    """The FSDP plugin a CPU launch asks for (a `fsdp_plugin=` argument, else the launcher's
    FSDP_* environment), None for data parallel; refuses what FSDP2 cannot do on CPU processes."""
    plugin = kwargs.pop("fsdp_plugin", None)
    if plugin is None and PartialState._shared_state.get("distributed_type") == DistributedType.FSDP:
        from accelerate.state import AcceleratorState

        plugin = AcceleratorState._shared_state.get("fsdp_plugin")  # a second Accelerator here: the first's
    if plugin is None and requested_backend() == DistributedType.FSDP:
        plugin = FullyShardedDataParallelPlugin()  # reads FSDP_VERSION, FSDP_AUTO_WRAP_POLICY, ... from the env
    if plugin is None:
        return None
    if plugin.fsdp_version != 2:
        raise RuntimeError("FSDP1 does not run on CPU processes: set `fsdp_version: 2` in the launch config "
                           "(recipes/accelerate/fsdp2.yaml).")
    from torch.distributed.fsdp import CPUOffloadPolicy

    if isinstance(plugin.cpu_offload, CPUOffloadPolicy):
        raise RuntimeError("fsdp_offload_params: true cannot run on CPU processes (FSDP2 pins the offloaded memory, "
                           "which needs an accelerator, and the parameters are on the CPU already): set "
                           "fsdp_offload_params: false in the launch config.")
    return plugin


def _cpu_accelerator(kwargs: dict) -> Accelerator:
    state = _state_kwargs()
    if "backend" in state:  # DeepSpeed: cpu=False, gloo named
        handlers = list(kwargs.pop("kwargs_handlers", None) or [])
        if not any(isinstance(h, InitProcessGroupKwargs) for h in handlers):
            handlers.append(InitProcessGroupKwargs(backend=state["backend"]))
        return Accelerator(cpu=False, kwargs_handlers=handlers, **kwargs)
    plugin = _cpu_fsdp_plugin(kwargs)
    accelerator = Accelerator(cpu=True, **kwargs)  # a gloo group over the CPU processes (MULTI_CPU)
    if plugin is not None:
        # What AcceleratorState.__init__ does for FSDP on a GPU, and skips for MULTI_CPU.
        state = accelerator.state
        if state.mixed_precision != "no":
            plugin.set_mixed_precision(state.mixed_precision)
        state.fsdp_plugin = plugin
        state.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        os.environ["ACCELERATE_USE_FSDP"] = "true"  # as Accelerator does when given a plugin
    return accelerator


def _fill_deepspeed_config(accelerator: Accelerator, args) -> None:
    """Under DeepSpeed the engine clips inside its step (`clip_grad_norm_` only reads the norm), and
    accelerate fills an 'auto' gradient_clipping with 1.0: the config gets max_grad_norm (0 = off).
    llmrl's micro-batches come from rollouts and its own loaders, so the micro-batch size DeepSpeed
    wants for its bookkeeping is named here instead of read from a prepared loader."""
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    if args is not None and config.get("gradient_clipping", "auto") == "auto":
        config["gradient_clipping"] = float(args.max_grad_norm or 0.0)
    if config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        config["train_micro_batch_size_per_gpu"] = getattr(args, "per_device_train_batch_size", 1) or 1


def make_accelerator(args=None, **kwargs) -> Accelerator:
    """The run's Accelerator; with a trainer config `args`, its `report_to` trackers write to
    `logging_dir` (default output_dir/runs), it accumulates `gradient_accumulation_steps`
    micro-batches per optimizer step, and autocasts as `mixed_precision` says (when set; else as
    the launcher says).

    Accumulation goes through accelerate's own contract (`accumulate()` sets `sync_gradients` on
    the last micro-batch of each step only), because each backend acts on it: DDP and FSDP skip
    the gradient all-reduce before it, the prepared optimizer steps only then, and DeepSpeed's
    engine (which steps inside `backward`) steps once per optimizer step instead of per
    micro-batch. The count is kept by llmrl's loops, not the data loader: an online step's
    micro-batches come from a rollout, not from a loader's batches."""
    if args is not None:
        from llmrl.trainers.tracking import logging_dir, tracker_names

        trackers = tracker_names(args.report_to)
        if trackers:
            kwargs.setdefault("log_with", trackers)
            kwargs.setdefault("project_dir", logging_dir(args))
        kwargs.setdefault("gradient_accumulation_plugin", GradientAccumulationPlugin(
            num_steps=args.gradient_accumulation_steps, sync_with_dataloader=False))
        if getattr(args, "mixed_precision", None) is not None:
            kwargs.setdefault("mixed_precision", checked_precision(args.mixed_precision))
    accelerator = _cpu_accelerator(kwargs) if _cpu_processes() else Accelerator(**kwargs)
    asked = requested_backend()
    if asked is not None and accelerator.distributed_type != asked:
        raise RuntimeError(f"The launch config asks for {asked.value}, but accelerate set up "
                           f"{accelerator.distributed_type.value} here; llmrl stops rather than train with another "
                           "backend. Check the config's distributed_type and num_processes.")
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        _fill_deepspeed_config(accelerator, args)
    return accelerator


def checked_precision(mixed_precision: str) -> str:
    """fp16 autocast needs CUDA (torch has no fp16 autocast on the CPU, accelerate would fail later)."""
    if mixed_precision == "fp16" and not torch.cuda.is_available():
        raise RecipeError("mixed_precision: fp16 (TRL's fp16: true) needs a CUDA GPU and none is visible; use bf16, "
                         "which the CPU autocasts too, or no.")
    return mixed_precision


def zero3(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED and accelerator.state.deepspeed_plugin.zero_stage == 3


def sharded(accelerator: Accelerator) -> bool:
    """Are the prepared models' parameters split over the processes (FSDP, DeepSpeed ZeRO-3)?"""
    return accelerator.distributed_type == DistributedType.FSDP or zero3(accelerator)


def gathered_state_dict(accelerator: Accelerator, model) -> dict | None:
    """The full state dict of a prepared `model` when its parameters are sharded (FSDP, DeepSpeed
    ZeRO-3), else None (the unwrapped model saves itself). Every process must call it: gathering
    the shards is a collective; the main process receives the tensors."""
    return accelerator.get_state_dict(model) if sharded(accelerator) else None


def refuse_unsharded_copies(accelerator: Accelerator, roles: list[str]) -> None:
    """DeepSpeed ZeRO-3 partitions every model built after the Accelerator, and only the prepared
    engine gathers its parameters for a forward: a frozen copy (a reference copied from the policy,
    a reward model) would hold empty partitions. `roles` names the frozen models a run holds."""
    if zero3(accelerator) and roles:
        raise ValueError(
            f"DeepSpeed ZeRO-3 cannot hold the {' and the '.join(roles)} llmrl keeps beside the policy (ZeRO-3 partitions "
            "them, and only the policy's engine gathers weights). Launch with recipes/accelerate/zero2.yaml or "
            "fsdp2.yaml, or use LoRA (use_peft: the reference is then the policy with its adapter off), or drop the "
            "KL term (beta: 0) / reward model.")
