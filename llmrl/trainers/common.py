"""What every trainer shares about processes, devices and the order of its data."""

from __future__ import annotations

import math
import os

import torch
from accelerate import Accelerator, PartialState
from transformers import get_scheduler


def _cpu_processes() -> bool:
    """Several processes and no CUDA: accelerate must be told to run them on the CPU. Without
    `cpu=True` each process of `accelerate launch --multi_gpu` / torchrun on a CPU machine
    believes it is alone (DistributedType.NO), and they silently train apart."""
    return not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1


def process_state() -> PartialState:
    """The process group this run belongs to (created on first use)."""
    return PartialState(cpu=_cpu_processes())


def make_accelerator(args=None, **kwargs) -> Accelerator:
    """The run's Accelerator; with a trainer config `args`, its `report_to` trackers write to
    `logging_dir` (default output_dir/runs)."""
    if args is not None:
        from llmrl.trainers.tracking import logging_dir, tracker_names

        trackers = tracker_names(args.report_to)
        if trackers:
            kwargs.setdefault("log_with", trackers)
            kwargs.setdefault("project_dir", logging_dir(args))
    return Accelerator(cpu=_cpu_processes(), **kwargs)


def replay_batches(loader, skip: int = 0):
    """`(position, batch)` pairs without end (each pass over `loader` reshuffles), after replaying
    the first `skip` batches: the shuffling generator then stands where it stood, so a resumed run
    sees the batches an uninterrupted one would. `position` counts the batches drawn so far, the
    data position a checkpoint records."""
    drawn = 0
    while True:
        for batch in loader:
            drawn += 1
            if drawn > skip:
                yield drawn, batch


def adamw(parameters, args, lr: float | None = None) -> torch.optim.AdamW:
    """AdamW over the trainable `parameters`, with the config's betas, epsilon and weight decay;
    `lr` default: `args.learning_rate`."""
    return torch.optim.AdamW([p for p in parameters if p.requires_grad], lr=lr or args.learning_rate,
                             betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
                             weight_decay=args.weight_decay)


def lr_schedule(accelerator, optimizer, args, max_steps: int):
    """The config's schedule for a prepared `optimizer` over `max_steps` optimizer steps (warmup
    from warmup_steps, else warmup_ratio), registered so that checkpoints save it."""
    warmup = args.warmup_steps or math.ceil(args.warmup_ratio * max_steps)
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=warmup, num_training_steps=max_steps)
    accelerator.register_for_checkpointing(scheduler)
    return scheduler
