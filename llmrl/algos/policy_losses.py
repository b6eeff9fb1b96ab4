"""Policy-gradient surrogates (per token, before aggregation) and the clipped value loss.

Every loss in ``POLICY_LOSSES`` takes the keywords
``logprobs, old_logprobs, advantages, mask, epsilon, epsilon_high, dual_clip`` (all tensors
``[N, T]``) and returns ``(per_token_loss [N, T], metrics)``. The loss is 0 on padding; reduce it with
:func:`llmrl.algos.aggregate_loss`.

``metrics`` has the same keys for every loss, each a detached 0-dim tensor (so the trainer can stack
and all-reduce them in one call, and ``.item()`` only when it logs), each a mean over the real tokens
of this batch (0 on a batch with none):

- ``clipfrac_low``: ratio < 1 - epsilon with A < 0 (the clip that stops pushing a token down);
- ``clipfrac_high``: ratio > 1 + epsilon_high with A > 0 (the clip DAPO's clip-higher widens);
- ``clipfrac_dual``: ratio > dual_clip with A < 0;
- ``approx_kl``: KL(pi_old || pi) by Schulman's k3, ``r - 1 - log r`` with ``r = pi / pi_old``
  (unbiased and >= 0, unlike ``-log r`` or ``(log r)^2 / 2``), always from the token ratios;
- ``ratio_mean``, ``ratio_max``: of the importance ratio the loss uses (the sequence ratio for gspo).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .aggregate import lookup, masked_mean, zero_padding
from .kl import k3, safe_exp


class ClipBounds(NamedTuple):
    """The importance-ratio bounds of a clipped surrogate."""

    low: float  # 1 - epsilon
    high: float  # 1 + epsilon_high
    dual: float | None  # dual-clip bound c > 1 for A < 0, or None


def clip_bounds(epsilon: float, epsilon_high: float | None, dual_clip: float | None) -> ClipBounds:
    """Check and convert the clip settings; ``epsilon_high=None`` means the symmetric ``epsilon``."""
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    if epsilon < 0 or epsilon_high < 0:
        raise ValueError(f"epsilon and epsilon_high must be >= 0, got {epsilon} and {epsilon_high}")
    if dual_clip is not None and dual_clip <= 1:
        raise ValueError(
            f"dual_clip must be > 1 (it bounds the loss of a negative advantage at -A * dual_clip, "
            f"Ye et al. 2020; verl uses 3), or None to disable it; got {dual_clip}"
        )
    return ClipBounds(1.0 - epsilon, 1.0 + epsilon_high, dual_clip)


def clipped_surrogate(
    ratio: torch.Tensor, advantages: torch.Tensor, bounds: ClipBounds
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``max(-A r, -A clip(r, low, high))``, then ``min(., -A c)`` where ``A < 0`` (dual-clip).

    PPO's clipped surrogate (Schulman et al. 2017) with DAPO's decoupled range (arXiv 2503.14476) and
    the dual clip of Ye et al. 2020 (arXiv 1912.09729). The dual clip applies to negative advantages
    only, as in the paper and verl: with A > 0 the standard clip already bounds the loss above, with
    A < 0 a huge ratio would make ``-A r`` unbounded. Returns the loss and the boolean masks of where
    each clip is active (its gradient is 0 there).
    """
    loss = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(bounds.low, bounds.high))
    active = {
        "clipfrac_low": (ratio < bounds.low) & (advantages < 0),
        "clipfrac_high": (ratio > bounds.high) & (advantages > 0),
        "clipfrac_dual": torch.zeros_like(ratio, dtype=torch.bool),
    }
    if bounds.dual is not None:
        negative = advantages < 0
        loss = torch.where(negative, torch.minimum(loss, -advantages * bounds.dual), loss)
        active["clipfrac_dual"] = (ratio > bounds.dual) & negative
    return loss, active


def _metrics(logprobs, old_logprobs, ratio, valid, active) -> dict[str, torch.Tensor]:
    """The metrics of the module docstring, from the clip masks ``active`` of the loss."""
    with torch.no_grad():
        metrics = {name: masked_mean(hit.to(ratio.dtype), valid) for name, hit in active.items()}
        metrics["approx_kl"] = masked_mean(k3(old_logprobs, logprobs), valid)
        metrics["ratio_mean"] = masked_mean(ratio, valid)
        metrics["ratio_max"] = zero_padding(ratio, valid).max()  # ratios are > 0, so 0 = "no token"
    return {name: value.detach() for name, value in metrics.items()}


def _inputs(mask, *tensors):
    """``(valid, *tensors with padding zeroed)``: zeroed inputs give a loss of exactly 0 on padding,
    and no inf or NaN put there by the caller can reach the loss, the metrics or the gradient."""
    valid = mask.bool()
    return (valid, *(zero_padding(x, valid) for x in tensors))


def ppo_clip(*, logprobs, old_logprobs, advantages, mask, epsilon, epsilon_high, dual_clip):
    """PPO's clipped surrogate per token, ``r_t = pi(y_t) / pi_old(y_t)``: :func:`clipped_surrogate`.

    The log-ratio is clamped to +-20 before ``exp`` so extreme inputs stay finite (beyond that, a
    step no clip range would allow, the gradient is 0).
    """
    valid, logprobs, old_logprobs, advantages = _inputs(mask, logprobs, old_logprobs, advantages)
    ratio = safe_exp(logprobs - old_logprobs)
    loss, active = clipped_surrogate(ratio, advantages, clip_bounds(epsilon, epsilon_high, dual_clip))
    return loss, _metrics(logprobs, old_logprobs, ratio, valid, active)


def vanilla_pg(*, logprobs, old_logprobs, advantages, mask, epsilon, epsilon_high, dual_clip):
    """REINFORCE (Williams 1992): ``-A_t log pi(y_t)``; the clip settings are ignored.

    Uses the log-probabilities only, so it is unbiased only on-policy (one update per batch);
    ``old_logprobs`` serves the metrics, and all clip fractions are 0.
    """
    valid, logprobs, old_logprobs, advantages = _inputs(mask, logprobs, old_logprobs, advantages)
    ratio = safe_exp(logprobs - old_logprobs).detach()
    never = torch.zeros_like(valid)
    active = {"clipfrac_low": never, "clipfrac_high": never, "clipfrac_dual": never}
    return -advantages * logprobs, _metrics(logprobs, old_logprobs, ratio, valid, active)


def gspo(*, logprobs, old_logprobs, advantages, mask, epsilon, epsilon_high, dual_clip):
    """GSPO (Zheng et al. 2025, arXiv 2507.18071), in its token form GSPO-token.

    Sequence ratio ``s_i = exp(mean_t (log pi - log pi_old))`` over the real tokens of sequence i;
    token ratio ``s_{i,t} = sg[s_i] * pi(y_t) / sg[pi(y_t)]``: its value is ``s_i`` and its gradient is
    ``s_i * grad log pi(y_t)``; then the clipped surrogate with ``epsilon`` / ``epsilon_high`` (the
    paper uses ranges near 3e-4 / 4e-4, far smaller than PPO's). With one advantage per sequence and
    ``seq_mean_token_mean`` aggregation this is exactly GSPO's sequence-level gradient.
    """
    valid, logprobs, old_logprobs, advantages = _inputs(mask, logprobs, old_logprobs, advantages)
    sequence_ratio = safe_exp(masked_mean(logprobs - old_logprobs, valid, dim=-1)).detach()
    ratio = sequence_ratio[:, None] * torch.exp(logprobs - logprobs.detach())
    loss, active = clipped_surrogate(ratio, advantages, clip_bounds(epsilon, epsilon_high, dual_clip))
    return loss, _metrics(logprobs, old_logprobs, ratio, valid, active)


POLICY_LOSSES = {"ppo_clip": ppo_clip, "vanilla_pg": vanilla_pg, "gspo": gspo}


def policy_loss(
    name: str,
    *,
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    dual_clip: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(per_token_loss [N, T], metrics)`` of the policy loss ``name`` in ``POLICY_LOSSES``.

    ``logprobs`` (with gradient), ``old_logprobs`` (the sampling policy's), ``advantages``, ``mask``:
    all ``[N, T]``. ``epsilon_high=None`` means ``epsilon``; ``dual_clip`` is a bound > 1 or None.
    """
    fn = lookup(POLICY_LOSSES, name, "policy loss")
    return fn(
        logprobs=logprobs,
        old_logprobs=old_logprobs,
        advantages=advantages,
        mask=mask,
        epsilon=epsilon,
        epsilon_high=epsilon_high,
        dual_clip=dual_clip,
    )


def _value_errors(values, old_values, returns, clip_range):
    """``((V - R)^2, (clip(V, V_old +- c) - R)^2)``; with ``clip_range=None`` both are unclipped."""
    unclipped = (values - returns).square()
    if clip_range is None:
        return unclipped, unclipped
    clipped_values = old_values + (values - old_values).clamp(-clip_range, clip_range)
    return unclipped, (clipped_values - returns).square()


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float | None = 0.2,
) -> torch.Tensor:
    """Clipped value loss ``0.5 max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2)``, ``[N, T]``.

    PPO's value clipping (as in OpenAI baselines, verl, TRL's PPOTrainer): the pessimistic maximum
    keeps the critic from moving more than ``c`` from the values it had at rollout. 0 on padding.
    """
    _, values, old_values, returns = _inputs(mask, values, old_values, returns)
    return 0.5 * torch.maximum(*_value_errors(values, old_values, returns, clip_range))


def value_loss_metrics(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float | None = 0.2,
) -> dict[str, torch.Tensor]:
    """``{"vf_clipfrac"}``: the fraction of real tokens whose clipped error is the larger (the clip
    binds and the token gives no gradient), a detached 0-dim tensor like the policy metrics."""
    valid, values, old_values, returns = _inputs(mask, values, old_values, returns)
    with torch.no_grad():
        unclipped, clipped = _value_errors(values, old_values, returns, clip_range)
        return {"vf_clipfrac": masked_mean((clipped > unclipped).to(values.dtype), valid)}
