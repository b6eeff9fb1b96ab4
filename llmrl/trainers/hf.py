"""What the trainers built on `transformers.Trainer` (through TRL's SFT and reward trainers) share:
one mapping from llmrl's `TrainConfig` to `TrainingArguments`, and the run around `Trainer.train`.

    hf_args = training_arguments(args, model_config, trl.SFTConfig, max_length=512)

`HFRunMixin.train()` gives these trainers the same life as `RLTrainer.train()`: resume from
`resume_from_checkpoint` ('true' = the newest `checkpoint-<step>` in output_dir, or a path), a
final evaluation when the last step did not evaluate, the final model as a plain `save_pretrained`
folder (model or adapter, plus tokenizer) in output_dir, and the log history as the return value.
Checkpoints are the Trainer's own `checkpoint-<step>` folders (model or adapter, tokenizer,
optimizer, scheduler, RNG states, trainer_state.json), written under a temporary name and renamed
when complete, like every llmrl save (`llmrl.trainers.checkpoint`); SIGINT/SIGTERM end the run with
one, as in the other trainers (`llmrl.trainers.signals`).
"""

from __future__ import annotations

import dataclasses
import shutil
import signal
from pathlib import Path

import torch
from peft import PeftModel
from transformers import TrainerCallback

from llmrl.adapters import policy_export, starting_adapters
from llmrl.config import ModelConfig, TrainConfig
from llmrl.models import resolve_dtype
from llmrl.trainers.checkpoint import (
    PREFIX,
    TMP,
    claim_output_dir,
    publish_checkpoint,
    reporting_full_disk,
    resolve_resume,
    save_final,
)
from llmrl.trainers.common import TrainResult
from llmrl.trainers.launch import checked_precision
from llmrl.trainers.signals import RunInterrupted, StopOnSignal
from llmrl.trainers.tracking import logging_dir, tracker_names


def training_arguments(args: TrainConfig, model_config: ModelConfig, hf_class, *, has_eval_data: bool = False,
                       **fields):
    """`hf_class` (`TrainingArguments` or a TRL config such as `trl.SFTConfig`) holding `args`'s
    optimisation, batching, logging and checkpoint settings; `fields` are the trainer's own
    (max_length, packing, ...). Without eval data, `eval_steps` is ignored (as in `RLTrainer`).

    Precision: `mixed_precision` when set (bf16 autocasts on the CPU too; fp16 needs CUDA), else
    bf16 autocast when the weights load as bfloat16 on a CUDA GPU, float32 otherwise; without CUDA
    the run is forced onto the CPU (`use_cpu`). `eval_steps: 0` and `save_steps: 0` turn periodic evaluation and checkpoints off
    (`HFRunMixin.train` evaluates once at the end and always saves the final model).
    """
    on_gpu = torch.cuda.is_available()
    if args.mixed_precision is not None:
        checked_precision(args.mixed_precision)
    # transformers 5.23 renamed gradient_checkpointing to activation_checkpointing (old name deprecated).
    renamed = "activation_checkpointing" in {f.name for f in dataclasses.fields(hf_class)}
    checkpointing = "activation_checkpointing" if renamed else "gradient_checkpointing"
    eval_steps = args.eval_steps if has_eval_data else 0
    return hf_class(
        output_dir=args.output_dir,
        run_name=args.run_name,
        seed=args.seed,
        learning_rate=args.learning_rate,
        lr_scheduler_type=args.lr_scheduler_type,
        # transformers 5 reads a float below 1 as a ratio of the total steps.
        warmup_steps=args.warmup_steps if args.warmup_steps > 0 else args.warmup_ratio,
        weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2,
        adam_epsilon=args.adam_epsilon,
        max_grad_norm=args.max_grad_norm,
        num_train_epochs=args.num_train_epochs,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.per_device_train_batch_size,
        per_device_eval_batch_size=args.per_device_eval_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        logging_steps=args.logging_steps,
        eval_strategy="steps" if eval_steps > 0 else "no",
        eval_steps=eval_steps if eval_steps > 0 else None,
        save_strategy="steps" if args.save_steps > 0 else "no",
        save_steps=args.save_steps if args.save_steps > 0 else 500,
        save_total_limit=args.save_total_limit,
        report_to=tracker_names(args.report_to) or "none",
        disable_tqdm=args.disable_tqdm,
        use_cpu=not on_gpu,
        bf16=args.mixed_precision == "bf16" or (args.mixed_precision is None and on_gpu
                                                 and resolve_dtype(model_config.dtype) == torch.bfloat16),
        fp16=args.mixed_precision == "fp16",
        **{checkpointing: model_config.gradient_checkpointing,
           # The reentrant variant breaks with frozen inputs (LoRA) and DDP; models.load_policy agrees.
           f"{checkpointing}_kwargs": {"use_reentrant": False}},
        **fields,
    )


class HFRunMixin:
    """Put before a `transformers.Trainer` subclass: `train()` resumes, evaluates, saves, returns
    the log history. The subclass sets `self.train_config` (the llmrl config) in its `__init__`
    and calls `self._use_logging_dir()` after the Trainer's."""

    train_config: TrainConfig

    def _use_logging_dir(self) -> None:
        """Point the tensorboard callback at llmrl's `logging_dir` (default output_dir/runs);
        transformers 5 reads it only from an environment variable."""
        from transformers.integrations import TensorBoardCallback

        for callback in self.callback_handler.callbacks:
            if isinstance(callback, TensorBoardCallback):
                callback.logging_dir = logging_dir(self.train_config)

    def train(self, resume_from_checkpoint=None, **kwargs) -> TrainResult:
        """Train; returns `trainer.state.log_history` (train records, then `eval_*` records), with
        TRL's `TrainOutput` attributes (`TrainResult`).

        `resume_from_checkpoint` None means "as the config says"; True or a path as in
        `transformers.Trainer.train`. A SIGINT/SIGTERM ends the run after the current step with a
        checkpoint of it (`RunInterrupted`).
        """
        if resume_from_checkpoint is None:
            claim_output_dir(self.train_config, self.accelerator)
            resume = resolve_resume(self.train_config.resume_from_checkpoint, self.args.output_dir)
            resume_from_checkpoint = str(resume) if resume is not None else None
        with StopOnSignal() as stop:
            on_signal = _StopAndSave(self, stop)
            self.add_callback(on_signal)
            try:
                output = super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
            finally:
                self.remove_callback(on_signal)
        if on_signal.signum:
            checkpoint = Path(self.args.output_dir) / f"{PREFIX}{self.state.global_step}"
            raise RunInterrupted(f"stopped by {signal.Signals(on_signal.signum).name} after step "
                                 f"{self.state.global_step}: {checkpoint} written; continue with "
                                 "resume_from_checkpoint: true.", on_signal.signum)
        evaluated_last_step = self.args.eval_strategy == "steps" and self.state.global_step % self.args.eval_steps == 0
        if self.eval_dataset is not None and not evaluated_last_step:
            self.evaluate()
        # Every process saves (a sharded model gathers); the main process writes the files.
        save_final(self.accelerator, self.args.output_dir, self.save_model, main_only=False)
        return TrainResult(self.state.log_history, self.state.global_step, output.training_loss)

    _staging: str | None = None

    def _get_output_dir(self, trial) -> str:
        return self._staging or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's checkpoint, written into `.tmp-checkpoint-<step>/` and renamed to
        `checkpoint-<step>` once complete (a kill mid-save leaves no broken newest checkpoint), the
        oldest then removed beyond `save_total_limit`; a full disk is reported as such."""
        run_dir = Path(super()._get_output_dir(trial))
        name = f"{PREFIX}{self.state.global_step}"
        staging = run_dir / f"{TMP}{name}"
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self._staging = str(staging)
        try:
            with reporting_full_disk(staging, name, run_dir):
                super()._save_checkpoint(model, trial)
        finally:
            self._staging = None
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            publish_checkpoint(staging / name, run_dir / name, self.args.save_total_limit)
            staging.rmdir()
        self.accelerator.wait_for_everyone()

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The Trainer's save; a final folder (not a checkpoint) of a model that started from adapter
        folders then holds the one adapter on the true base that `llmrl.adapters` combines. Checkpoints
        keep the Trainer's own adapter, the one its resume loads back onto the merged start."""
        super().save_model(output_dir, _internal_call=_internal_call)
        model = self.accelerator.unwrap_model(self.model)
        if not _internal_call and self.args.should_save and isinstance(model, PeftModel) and starting_adapters(model):
            policy_export(model).save_pretrained(output_dir or self.args.output_dir)


class _StopAndSave(TrainerCallback):
    """After each optimizer step: once any process got a signal (`StopOnSignal.requested`, a
    collective every process reaches at the same step), save this step and stop training."""

    def __init__(self, trainer, stop: StopOnSignal):
        self.trainer, self.stop, self.signum = trainer, stop, 0

    def on_step_end(self, args, state, control, **kwargs):
        self.signum = self.stop.requested(self.trainer.accelerator)
        if self.signum:
            control.should_save = True
            control.should_training_stop = True
        return control
