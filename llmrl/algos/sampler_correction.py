"""Importance weights for completions sampled by another engine than the trainer's model (vLLM).

vLLM samples from its own copy of the weights with its own kernels, so the probability it gave a
token, pi_sampler(y_t), is not exactly the trainer's pi_old(y_t) for the same weights: the rollout
is slightly off-policy. The policy-gradient terms are reweighted by

    rho_t = pi_old(y_t) / pi_sampler(y_t) = exp(logp_old_t - logp_sampler_t)          (token_*)
    rho   = prod_t rho_t = exp(sum_t (logp_old_t - logp_sampler_t)), for every token    (sequence_*)

bounded to [clip_min, clip_max]: `*_truncate` clamps rho into the bounds (truncated importance
sampling, Yao et al. 2025); `*_mask` sets weights outside them to 0 (the token or the sequence is
dropped from the gradient). The weights carry no gradient; they multiply the per-token policy loss
(the KL term is not weighted). Names and meaning follow TRL's `vllm_importance_sampling_mode`.
"""

from __future__ import annotations

import math

import torch

SAMPLER_CORRECTIONS = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def sampler_correction(logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, mask: torch.Tensor, mode: str,
                       clip_min: float | None = None, clip_max: float | None = 3.0) -> tuple[torch.Tensor, dict]:
    """`(weights [N, C], stats)`: the importance weight of each completion token (0 on padding).

    `logprobs`: the trainer's log-probs of the sampled tokens (pi_old, no gradient needed);
    `sampler_logprobs`: the sampler's; `mask`: 1.0 on real completion tokens. A sampler log-prob
    that is not finite (the sampler could not score the token) gives that token no correction
    (rho_t = 1). Bounds of None are open. `stats` (tensors): the mean and max |logp_old -
    logp_sampler| over real tokens, the min / mean / max weight (over tokens, or sequences in
    the sequence modes) before masking zeroes any, and the share of them outside the bounds."""
    if mode not in SAMPLER_CORRECTIONS:
        raise ValueError(f"vllm_importance_sampling_mode={mode!r} is not one of {list(SAMPLER_CORRECTIONS)}.")
    real = mask.bool()
    diff = torch.where(real & torch.isfinite(sampler_logprobs), logprobs.detach() - sampler_logprobs, 0.0)
    if mode.startswith("sequence"):
        sequences = real.any(-1)
        ratio = diff.sum(-1, keepdim=True).exp()
        ratio_values = ratio[sequences, 0]
    else:
        ratio = diff.exp()
        ratio_values = ratio[real]
    low = -math.inf if clip_min is None else clip_min
    high = math.inf if clip_max is None else clip_max
    outside = (ratio < low) | (ratio > high)
    if mode.endswith("truncate"):
        weights = ratio if clip_min is None and clip_max is None else ratio.clamp(min=clip_min, max=clip_max)
    else:
        weights = ratio.masked_fill(outside, 0.0)
    weights = weights.expand_as(mask) * mask
    gap = diff.abs()[real]
    zero = torch.zeros((), device=mask.device)
    stats = {
        "logp_diff_mean": gap.mean() if gap.numel() else zero,
        "logp_diff_max": gap.max() if gap.numel() else zero,
        "ratio_min": ratio_values.min() if ratio_values.numel() else zero,
        "ratio_mean": ratio_values.mean() if ratio_values.numel() else zero,
        "ratio_max": ratio_values.max() if ratio_values.numel() else zero,
        "outside_bounds": ((ratio_values < low) | (ratio_values > high)).float().mean() if ratio_values.numel() else zero,
    }
    return weights, stats
