"""Reductions over padded tensors: masked statistics, and the loss aggregation modes.

This is the one home for every mean or variance over a mask, so the advantage estimators, the
policy-loss metrics and the loss reduction all treat padding the same way: a padded position is
selected out with ``torch.where`` (never multiplied by 0, so inf/NaN garbage on padding cannot leak),
and every division by a count is guarded so an all-padding input gives 0, not NaN.

Masks may be bool or float (1.0 real token, 0.0 padding).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

import torch

Entry = TypeVar("Entry")


def lookup(registry: Mapping[str, Entry], name: str, what: str) -> Entry:
    """``registry[name]``, or a ValueError that names ``what`` was asked for and lists the valid names."""
    try:
        return registry[name]
    except (KeyError, TypeError):
        valid = ", ".join(repr(key) for key in registry)
        raise ValueError(f"unknown {what} {name!r}; valid names are: {valid}") from None


def zero_padding(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x`` with padded positions set to 0, whatever they held (inf and NaN included).

    ``torch.where`` rather than ``x * mask``: ``inf * 0`` is NaN, and the gradient reaching a padded
    position is an exact 0 instead of ``0 * (something that may be inf)``.
    """
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``x`` over the positions where ``mask`` is set (over ``dim``, or everything)."""
    picked = zero_padding(x, mask)
    return picked.sum() if dim is None else picked.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over the masked positions; 0 where there are none (instead of 0/0 = NaN)."""
    count = masked_sum(torch.ones_like(x), mask, dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over all masked positions (a 0-dim tensor).

    Unbiased (Bessel's n-1) by default, as ``torch.var`` and verl's ``masked_var``. With fewer than
    two valid positions the variance is 0: one sample says nothing about spread, and 0 keeps
    everything downstream finite.
    """
    valid = mask.bool()
    count = valid.sum()
    centred = x - masked_mean(x, valid)
    sum_sq = masked_sum(centred.square(), valid)
    return sum_sq / (count - 1 if unbiased else count).clamp(min=1)


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """``(x - mean) / (std + eps)`` over the masked positions; padding is set to 0.

    Statistics are over every valid position of the whole tensor (e.g. all tokens of a batch).
    ``std`` is the unbiased one (see :func:`masked_var`); ``eps`` is added to the std, not the
    variance, the same placement as the GRPO group normalisation so there is one convention.
    ``shift_mean=False`` rescales but keeps the mean (as verl/TRL's ``whiten(..., shift_mean=False)``).
    """
    valid = mask.bool()
    mean = masked_mean(x, valid)
    scaled = (x - mean) / (masked_var(x, valid).sqrt() + eps)
    if not shift_mean:
        scaled = scaled + mean
    return zero_padding(scaled, valid)


def loss_counts(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(num_tokens, num_seqs)`` of a ``[N, T]`` mask, as :func:`aggregate_loss` counts them.

    ``num_seqs`` counts rows with at least one real token: an all-padding row is not a sequence
    (it is filler, e.g. to give every process the same batch size) and must not dilute the mean.
    The trainer sums these over micro-batches and processes to get the whole step's counts.
    """
    valid = mask.bool()
    return valid.sum(), valid.any(dim=-1).sum()


def _divide(total: torch.Tensor, count) -> torch.Tensor:
    # Counts are whole numbers, so clamping at 1 only changes the 0/0 of an empty step, into 0.
    return total / torch.as_tensor(count, dtype=total.dtype, device=total.device).clamp(min=1)


def token_mean(per_token_loss, mask, *, num_tokens, num_seqs, max_len):
    """``sum_{i,t} loss * mask / num_tokens``: every token weighs the same (DAPO, PPO)."""
    return _divide(masked_sum(per_token_loss, mask), num_tokens)


def seq_mean_token_mean(per_token_loss, mask, *, num_tokens, num_seqs, max_len):
    """``sum_i (sum_t loss * mask / len_i) / num_seqs``: every sequence weighs the same (GRPO)."""
    per_seq = masked_mean(per_token_loss, mask, dim=-1)
    return _divide(per_seq.sum(), num_seqs)


def seq_mean_token_sum(per_token_loss, mask, *, num_tokens, num_seqs, max_len):
    """``sum_{i,t} loss * mask / num_seqs``: a sequence weighs by its length."""
    return _divide(masked_sum(per_token_loss, mask), num_seqs)


def seq_mean_token_sum_norm(per_token_loss, mask, *, num_tokens, num_seqs, max_len):
    """``sum_{i,t} loss * mask / (num_seqs * max_len)``: Dr. GRPO (arXiv 2503.20783), TRL's "dr_grpo".

    ``max_len`` must be a constant of the run (the generation budget), not this batch's padded width:
    dividing by the width would make the gradient depend on how the batch was padded and split.
    """
    if max_len is None:
        raise ValueError(
            "loss aggregation 'seq_mean_token_sum_norm' needs max_len: Dr. GRPO divides by a constant "
            "length (the maximum completion length of the run); pass max_len=<max completion tokens>"
        )
    return _divide(masked_sum(per_token_loss, mask), num_seqs) / max_len


LOSS_AGG_MODES = {
    "token_mean": token_mean,
    "seq_mean_token_mean": seq_mean_token_mean,
    "seq_mean_token_sum": seq_mean_token_sum,
    "seq_mean_token_sum_norm": seq_mean_token_sum_norm,
}


def aggregate_loss(
    per_token_loss: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    *,
    num_tokens=None,
    num_seqs=None,
    max_len: int | None = None,
) -> torch.Tensor:
    """Reduce a ``[N, T]`` per-token loss to a scalar with the aggregation ``mode`` (``LOSS_AGG_MODES``).

    ``num_tokens`` / ``num_seqs`` are the counts over the WHOLE optimizer step (all micro-batches,
    accumulation steps and processes, see :func:`loss_counts`); they default to this batch's counts.
    With the step's counts, the summed gradients of the micro-batches equal the gradient of the
    whole step however it is split or padded. An all-padding batch gives 0.
    """
    fn = lookup(LOSS_AGG_MODES, mode, "loss aggregation mode")
    batch_tokens, batch_seqs = loss_counts(mask)
    return fn(
        per_token_loss,
        mask,
        num_tokens=batch_tokens if num_tokens is None else num_tokens,
        num_seqs=batch_seqs if num_seqs is None else num_seqs,
        max_len=max_len,
    )


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``1 - Var[returns - values] / Var[returns]`` over the masked positions (a 0-dim tensor).

    1 = the critic predicts the returns perfectly, 0 = no better than their mean, < 0 = worse. NaN
    when the returns do not vary (nothing to explain).
    """
    return 1.0 - masked_var(returns - values, mask) / masked_var(returns, mask)
