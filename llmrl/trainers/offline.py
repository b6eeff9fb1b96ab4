"""The loop every offline trainer shares: examples from a dataset, AdamW on a schedule, gradient
accumulation, evaluation, checkpoints and resume. A subclass (DPO; the reward model can follow)
brings the model, the collated batches and `compute_loss`, which returns one loss per example.

    for each step: gradient_accumulation_steps micro-batches -> per-example losses
        -> their sum / (examples in the whole step, over every process) -> backward
        -> clip, optimizer step, schedule -> log the step's means -> [evaluate] -> [checkpoint]

Dividing by the step's example count, not by each micro-batch's, makes the update the mean over
the step's examples however they are split into micro-batches and processes. Training batches are
always full (drop_last), so that count is per_device_train_batch_size x accumulation x processes.
"""

from __future__ import annotations

import math
import time

import torch
from torch.utils.data import DataLoader

from llmrl.trainers.common import (
    TrainResult,
    adamw,
    loss_scale,
    lr_schedule,
    replay_batches,
)
from llmrl.trainers.guards import NonFiniteGuard, norm_value
from llmrl.trainers.saving import SavedRun
from llmrl.trainers.signals import StopOnSignal, stop_if_requested
from llmrl.trainers.tracking import RunLogger


class OfflineTrainer(SavedRun):
    """Trains `model` on `train_dataset` (already tokenized) with the loss of `compute_loss`.

    Subclasses build the accelerator, model and datasets, then call this `__init__`, and define
    `compute_loss(model, batch) -> (per_example_loss [B], {metric name: [B] tensor})`.
    """

    def __init__(self, args, model, tokenizer, train_dataset, eval_dataset, collate_fn, accelerator,
                 config: dict | None = None):
        self.args, self.tokenizer, self.accelerator = args, tokenizer, accelerator
        self.collate_fn = collate_fn
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        size, processes = args.per_device_train_batch_size, accelerator.num_processes
        if len(train_dataset) < size * processes:
            raise ValueError(f"train_dataset has {len(train_dataset)} examples, fewer than one micro-batch per process "
                             f"({size} x {processes} processes); lower per_device_train_batch_size.")
        # The generator alone orders the data: a resumed run replays it to stand where it stood.
        generator = torch.Generator().manual_seed(args.seed)
        loader = DataLoader(train_dataset, batch_size=size, shuffle=True, drop_last=True, generator=generator,
                            collate_fn=collate_fn)
        self.model, self.optimizer, self.loader = accelerator.prepare(model, adamw(model.parameters(), args), loader)
        self.examples_per_step = size * args.gradient_accumulation_steps * processes
        self.max_steps = args.max_steps if args.max_steps > 0 else math.ceil(
            args.num_train_epochs * len(self.loader) / args.gradient_accumulation_steps)
        self.scheduler = lr_schedule(self.optimizer, args, self.max_steps)
        self._config = config if config is not None else vars(args)
        self.logger: RunLogger | None = None
        self.guard = NonFiniteGuard(accelerator)
        self.global_step = 0
        self.batches_consumed = 0  # micro-batches drawn so far: the data position a resume restores

    def compute_loss(self, model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def _means(self, per_example: dict[str, list[torch.Tensor]], gather) -> dict[str, float]:
        """Each metric's mean over the examples of every process."""
        return {key: gather(torch.cat(values)).float().mean().item() for key, values in per_example.items()}

    def training_step(self, batches) -> dict:
        """One optimizer step over gradient_accumulation_steps micro-batches; returns its metrics."""
        args, start = self.args, time.perf_counter()
        accum = args.gradient_accumulation_steps
        per_example: dict[str, list[torch.Tensor]] = {}
        for _ in range(accum):
            self.batches_consumed, batch = next(batches)
            # accelerate's accumulation contract: gradients sync and the optimizer (DeepSpeed's
            # engine) steps on the step's last micro-batch only. Each loss is its share of the step.
            with self.accelerator.accumulate(self.model):
                losses, metrics = self.compute_loss(self.model, batch)
                self.accelerator.backward(losses.sum() / self.examples_per_step * loss_scale(self.accelerator))
            for key, value in {"loss": losses.detach(), **metrics}.items():
                per_example.setdefault(key, []).append(value)
        max_norm = args.max_grad_norm if args.max_grad_norm > 0 else float("inf")  # inf: measure, do not clip
        grad_norm = norm_value(self.accelerator.clip_grad_norm_(self.model.parameters(), max_norm))
        learning_rate = self.scheduler.get_last_lr()[0]
        term = self.guard.first_nonfinite(loss=torch.cat(per_example["loss"]), gradient=grad_norm)
        if term is None:
            self.guard.passed()
            self.optimizer.step()
        else:  # the weights and Adam's moments stay; the step count and the schedule move on
            self.guard.skipped(self.global_step + 1, term)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        norm = {} if grad_norm is None else {"grad_norm": float(grad_norm)}  # DeepSpeed may report none
        return {**self._means(per_example, self.accelerator.gather), "learning_rate": learning_rate, **norm,
                "step_time": time.perf_counter() - start}

    def _due(self, every: int) -> bool:
        return every > 0 and self.global_step % every == 0

    def train(self) -> TrainResult:
        """Train to `max_steps`; returns the log history (train and `eval/` records)."""
        args = self.args
        resumed = self._resume()
        skip = resumed["batches_consumed"] if resumed else 0
        self.logger = RunLogger(self.accelerator, args, self.max_steps, self._config, self.global_step)
        batches = replay_batches(self.loader, skip)
        self.model.train()
        with self.logger, StopOnSignal() as stop:
            while self.global_step < self.max_steps:
                self.logger.log(self.training_step(batches), self.global_step)
                if self.eval_dataset is not None and self._due(args.eval_steps):
                    self.evaluate()
                checkpoint = self.save_checkpoint() if self._due(args.save_steps) else None
                stop_if_requested(self, stop, checkpoint)
        if self.eval_dataset is not None and not self._due(args.eval_steps):
            self.evaluate()
        self.logger.close()
        self.save_model(args.output_dir)
        return TrainResult(self.log_history, self.global_step)

    def ordered_loader(self, dataset, batch_size: int):
        """`dataset` in order, split over the processes; `gather_for_metrics` on what each batch
        gives returns it in dataset order, without the rows padded in to even out the processes."""
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=self.collate_fn)
        return self.accelerator.prepare_data_loader(loader)

    @torch.no_grad()
    def evaluate(self, dataset=None) -> dict:
        """The metrics of `compute_loss` over `dataset` (default: the eval dataset), means over every
        example, prefixed `eval/`; logged when called during training."""
        dataset = dataset if dataset is not None else self.eval_dataset
        model = self.accelerator.unwrap_model(self.model)
        was_training = model.training
        model.eval()
        per_example: dict[str, list[torch.Tensor]] = {}
        for batch in self.ordered_loader(dataset, self.args.per_device_eval_batch_size):
            losses, metrics = self.compute_loss(model, batch)
            for key, value in {"loss": losses, **metrics}.items():
                per_example.setdefault(key, []).append(self.accelerator.gather_for_metrics(value))
        model.train(was_training)
        metrics = self._means(per_example, gather=lambda x: x)
        if self.logger is None:
            return {f"eval/{key}": value for key, value in metrics.items()}
        record = self.logger.log(metrics, self.global_step, prefix="eval/")
        return {key: value for key, value in record.items() if key != "step"}
