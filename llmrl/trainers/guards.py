"""Non-finite numbers never reach the weights or the disk.

An overflowing reward, a loss or a gradient that is inf or NaN would, in one optimizer step, make
every weight NaN; the run would go on logging NaN, then save checkpoints of NaN weights (and with
save_total_limit delete the last good one). Instead the step that meets one is skipped (weights,
optimizer state and momentum unchanged; the step count and schedule move on), with a warning that
names the step and the first term that was not finite, and a few such steps in a row stop the run.
A save checks the weights first and writes nothing that is not finite.

Every check is a collective: every process takes the same decision, or they would desynchronise.
Under DeepSpeed the engine steps inside `backward`, before llmrl sees the gradient norm, so only
the reward, advantage and loss checks can skip a step there.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

NONFINITE_STEPS_TO_STOP = 3


class NonFiniteError(RuntimeError):
    """The run stopped: several optimizer steps in a row met a non-finite reward, loss or gradient,
    or the weights to save are not finite."""


def _any_nonfinite(accelerator, tensors: list[torch.Tensor]) -> list[bool]:
    flags = torch.stack([(~torch.isfinite(t.detach().float())).any().float() for t in tensors])
    return [flag > 0 for flag in accelerator.reduce(flags.to(accelerator.device), "sum").tolist()]


class NonFiniteGuard:
    """`first_nonfinite(reward=..., loss=...)` names the first term that is not finite on any
    process (None if all are); `skipped(step, term)` warns and stops the run after
    NONFINITE_STEPS_TO_STOP in a row; `passed()` resets the count."""

    def __init__(self, accelerator, limit: int = NONFINITE_STEPS_TO_STOP):
        self.accelerator, self.limit, self.in_a_row = accelerator, limit, 0

    def first_nonfinite(self, **terms) -> str | None:
        terms = {name: torch.as_tensor(value) for name, value in terms.items() if value is not None}
        flags = _any_nonfinite(self.accelerator, list(terms.values()))
        return next((name for name, flag in zip(terms, flags) if flag), None)

    def skipped(self, step: int, term: str) -> None:
        self.in_a_row += 1
        logger.warning("step %d: the %s is not finite (inf or NaN); skipping this optimizer step, the weights are "
                       "unchanged (%d such step(s) in a row).", step, term, self.in_a_row)
        if self.in_a_row >= self.limit:
            raise NonFiniteError(
                f"{self.in_a_row} optimizer steps in a row met a non-finite {term} (last at step {step}); the run stops "
                "here, with the weights and the checkpoints already written untouched. Lower learning_rate, check "
                "what the reward functions return for these completions, or set max_grad_norm.")

    def passed(self) -> None:
        self.in_a_row = 0


def _local(parameter: torch.Tensor) -> torch.Tensor:
    """This process's part of a parameter: an FSDP2 DTensor's shard, a ZeRO-3 partition, or itself."""
    if hasattr(parameter, "to_local"):
        return parameter.to_local()
    return getattr(parameter, "ds_tensor", parameter)


def weights_finite(accelerator, models) -> bool:
    """Whether every weight of `models` is finite on every process (a collective)."""
    tensors = [_local(p) for model in models if model is not None for p in model.parameters()]
    bad = torch.tensor(float(not all(bool(torch.isfinite(t).all()) for t in tensors if t.numel())))
    return accelerator.reduce(bad.to(accelerator.device), "sum").item() == 0


def checkpoint_is_finite(accelerator, models, step: int) -> bool:
    """Whether checkpoint-<step> may be written; if not, says so (the earlier checkpoints stay)."""
    if weights_finite(accelerator, models):
        return True
    logger.warning("step %d: the weights are not finite; checkpoint-%d not written (the earlier ones are kept).",
                   step, step)
    return False


def require_finite_for_save(accelerator, models, output_dir) -> None:
    """The final save: non-finite weights stop the run with nothing written."""
    if not weights_finite(accelerator, models):
        raise NonFiniteError(f"The trained weights are not finite, so nothing was saved to {output_dir}; the "
                             "checkpoints written before are intact. Lower learning_rate and resume from one.")


def norm_value(norm):
    """A gradient norm as a plain tensor: FSDP2's clipping returns a DTensor (every process calls this)."""
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
