"""What every trainer shares about processes, devices and the order of its data."""

from __future__ import annotations

import math

import torch
from transformers import get_scheduler

# The run's processes and Accelerator live in launch.py; every trainer imports them from here.
from llmrl.trainers.launch import gathered_state_dict, make_accelerator, process_state  # noqa: F401


def loss_scale(accelerator) -> int:
    """What a micro-batch loss normalised by the whole step's counts is multiplied by before
    `accelerator.backward`. Such a loss is already that micro-batch's share of the step's loss
    over every process; but the backends average gradients over processes, and accelerate's
    backward (DeepSpeed's engine, under DeepSpeed) divides by gradient_accumulation_steps."""
    return accelerator.num_processes * accelerator.gradient_accumulation_steps


def to_device(model, accelerator):
    """`model` on the run's device, where `prepare()` puts the policy: a frozen model that is not
    prepared (a reference copy, a given ref_model) must be moved by hand. Quantised weights stay
    where they were loaded (they cannot move)."""
    if not hasattr(model, "hf_device_map"):
        model.to(accelerator.device)
    return model


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


def lr_schedule(optimizer, args, max_steps: int):
    """The config's schedule for a prepared `optimizer` over `max_steps` optimizer steps (warmup
    from warmup_steps, else warmup_ratio). Checkpoints keep its state as JSON (checkpoint.py)."""
    warmup = args.warmup_steps or math.ceil(args.warmup_ratio * max_steps)
    return get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=warmup, num_training_steps=max_steps)


def reduce_metrics(accelerator, metrics: dict) -> dict[str, float]:
    """Each metric's mean over the processes, in one collective. The names are agreed first: a
    name only some processes logged (a reward function's `log_metric` on some batches) is the mean
    of the processes that logged it, and no process waits on a collective the others never make."""
    if accelerator.num_processes == 1:
        return {key: float(value) for key, value in metrics.items()}
    from accelerate.utils import gather_object

    names = sorted(set(gather_object(list(metrics))))
    values = torch.tensor([[float(metrics.get(name, math.nan)) for name in names]], device=accelerator.device)
    return dict(zip(names, accelerator.gather(values).nanmean(dim=0).tolist()))


def trainer_state(trainer):
    """A trainer's progress as transformers' `TrainerState` (global_step, max_steps, epoch,
    log_history, ...): what TRL's trainers expose as `trainer.state` and pass reward functions as
    `trainer_state`. Made on each read, from the trainer's own counters."""
    from transformers import TrainerState

    per_epoch = max(1, len(trainer.loader))
    return TrainerState(global_step=trainer.global_step, max_steps=trainer.max_steps,
                        epoch=trainer.batches_consumed / per_epoch, num_train_epochs=trainer.args.num_train_epochs,
                        log_history=trainer.log_history, train_batch_size=trainer.args.per_device_train_batch_size,
                        is_world_process_zero=trainer.accelerator.is_main_process,
                        is_local_process_zero=trainer.accelerator.is_local_main_process)


class TrainResult(list):
    """What `train()` returns: the log history (a list of records, train and eval), which also
    answers as TRL's `TrainOutput` does: `global_step`, `training_loss` (the mean of the logged
    losses) and `metrics` (the last record)."""

    def __init__(self, history: list[dict], global_step: int, training_loss: float | None = None):
        super().__init__(history)
        self.global_step = global_step
        losses = [record["loss"] for record in history if "loss" in record]
        self.training_loss = training_loss if training_loss is not None else (
            sum(losses) / len(losses) if losses else math.nan)
        self.metrics = dict(history[-1]) if history else {}
