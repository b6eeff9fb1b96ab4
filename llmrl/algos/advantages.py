"""Advantage estimators: per-token rewards (and values) in, per-token advantages and returns out.

Every estimator in ``ADVANTAGE_ESTIMATORS`` takes the same keywords
``token_rewards, mask, group_ids, values, gamma, lam, scale_rewards, eps`` and ignores those it does
not need, and returns ``(advantages [N, T], returns [N, T])``, both 0 on padding.

Shared conventions:

- ``token_rewards [N, T]`` holds the sequence reward on the last real token plus any per-token terms
  (KL-in-reward). The sequence reward R_i of the group estimators is its sum over the mask.
- Padding is transparent: the recursions run over the real tokens only (a masked position inside a
  row, e.g. a tool output, is skipped, not treated as the end of the sequence), so garbage on padding
  never reaches an output.
- A row with no real token is not a sample: it gets advantage 0 and stays out of every group and
  batch statistic (the same rule as ``num_seqs`` in :mod:`llmrl.algos.aggregate`).
- Standard deviations are unbiased (n-1) and ``eps`` is added to the std (TRL's and verl's GRPO both
  use ``torch.std``, i.e. unbiased, and ``/(std + eps)``); a group of one has std 0.
- ``returns``: for ``gae`` the lambda-return ``A + V`` (the critic's target); for every critic-free
  estimator the Monte-Carlo reward-to-go ``G_t = r_t + gamma * G_{t+1}`` of ``token_rewards`` (the
  target a value head would fit, and with gamma=1 on the first token equal to R_i), so ``returns``
  means the same thing whichever estimator produced it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .aggregate import lookup, masked_sum, masked_var, masked_whiten, zero_padding


def _discounted_scan(
    rewards: torch.Tensor, values: torch.Tensor, valid: torch.Tensor, gamma: float, lam: float
) -> torch.Tensor:
    """GAE over the real tokens of each row: ``A_t = delta_t + gamma * lam * A_{t+1}``, ``[N, T]``.

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` where ``t+1`` is the next REAL token (V = 0 past the
    last one). With ``values = 0`` and ``lam = 1`` this is the discounted reward-to-go, so one loop
    serves both. The loop runs over T (the recursion is sequential in time), vectorised over N.
    """
    next_value = next_advantage = torch.zeros_like(rewards[:, 0])
    advantages = []
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        # where() rather than arithmetic with the mask: a skipped position carries the state through
        # untouched, even if it holds inf.
        next_advantage = torch.where(valid[:, t], advantage, next_advantage)
        next_value = torch.where(valid[:, t], values[:, t], next_value)
        advantages.append(advantage)
    return zero_padding(torch.stack(advantages[::-1], dim=1), valid)


def _reward_to_go(token_rewards: torch.Tensor, valid: torch.Tensor, gamma: float) -> torch.Tensor:
    """``G_t = r_t + gamma * G_{t+1}`` over the real tokens, ``[N, T]``."""
    return _discounted_scan(token_rewards, torch.zeros_like(token_rewards), valid, gamma, 1.0)


class GroupStats(NamedTuple):
    """Statistics of each row's group, gathered back to the rows: every field is ``[N]``."""

    mean: torch.Tensor
    std: torch.Tensor
    size: torch.Tensor


def group_stats(rewards: torch.Tensor, group_ids: torch.Tensor, members: torch.Tensor) -> GroupStats:
    """Mean, unbiased std and size of each row's group, with ``index_add`` (no loop over groups).

    ``rewards [N]``, ``group_ids [N]`` (any integers, in any order), ``members [N]`` bool: rows that
    count (non-members take no part in any statistic). A group of one has std 0.
    """
    ids, index = torch.unique(group_ids, return_inverse=True)
    num_groups = ids.numel()

    def per_group(x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(num_groups, dtype=rewards.dtype, device=rewards.device).index_add_(
            0, index, zero_padding(x, members)
        )

    size = per_group(torch.ones_like(rewards))
    mean = per_group(rewards) / size.clamp(min=1)
    sum_sq = per_group((rewards - mean[index]).square())
    std = (sum_sq / (size - 1).clamp(min=1)).sqrt()
    return GroupStats(mean[index], std[index], size[index])


def _grouped_rewards(token_rewards, mask, group_ids, estimator):
    """``(R [N], members [N], valid [N, T], stats)``: what every group estimator starts from."""
    if group_ids is None:
        raise ValueError(
            f"advantage estimator {estimator!r} needs group_ids [N]: the index of the prompt each "
            "sequence answers, because its baseline is computed over the completions of the same prompt"
        )
    group_ids = torch.as_tensor(group_ids, device=token_rewards.device)
    if group_ids.shape != token_rewards.shape[:1]:
        raise ValueError(
            f"group_ids has shape {tuple(group_ids.shape)}; advantage estimator {estimator!r} needs one "
            f"id per sequence, shape ({token_rewards.shape[0]},)"
        )
    valid = mask.bool()
    members = valid.any(dim=-1)
    rewards = masked_sum(token_rewards, valid, dim=-1)
    return rewards, members, valid, group_stats(rewards, group_ids, members)


def _broadcast(per_sequence: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``[N]`` -> ``[N, T]``: the sequence's value on each of its real tokens, 0 on padding."""
    return zero_padding(per_sequence[:, None].expand(valid.shape), valid)


def gae(*, token_rewards, mask, group_ids, values, gamma, lam, scale_rewards, eps):
    """Generalised advantage estimation (Schulman et al. 2016), the PPO-RLHF estimator.

    ``delta_t = r_t + gamma V_{t+1} - V_t``, ``A_t = delta_t + gamma lam A_{t+1}`` over the real
    tokens, V = 0 after the last one. Returns ``(A, A + V)``. Not whitened: whitening is the trainer's
    switch (:func:`llmrl.algos.masked_whiten`).
    """
    if values is None:
        raise ValueError(
            "advantage estimator 'gae' needs values [N, T]: the critic's value of each completion "
            "position, for delta_t = r_t + gamma * V_{t+1} - V_t"
        )
    valid = mask.bool()
    values = zero_padding(values, valid)
    advantages = _discounted_scan(token_rewards, values, valid, gamma, lam)
    return advantages, advantages + values


# GRPO's scale_rewards settings: each maps (rewards [N], members [N], group std [N], eps) to the
# denominator of the advantage ([N] or broadcastable). The keys are the valid settings.
REWARD_SCALES = {
    "group": lambda rewards, members, group_std, eps: group_std + eps,
    "batch": lambda rewards, members, group_std, eps: masked_var(rewards, members).sqrt() + eps,
    "none": lambda rewards, members, group_std, eps: torch.ones_like(group_std),
}


def grpo(*, token_rewards, mask, group_ids, values, gamma, lam, scale_rewards, eps):
    """GRPO outcome advantages (Shao et al. 2024, arXiv 2402.03300), broadcast over each sequence.

    ``A_i = (R_i - mean_g) / (std_g + eps)`` with ``scale_rewards="group"``; ``"batch"`` divides by the
    std of all rewards of the batch (TRL's choice; the group mean is kept); ``"none"`` is Dr. GRPO's
    ``R_i - mean_g`` (arXiv 2503.20783). A group of one, or of equal rewards, gets A = 0.
    """
    rewards, members, valid, stats = _grouped_rewards(token_rewards, mask, group_ids, "grpo")
    scale = lookup(REWARD_SCALES, scale_rewards, "scale_rewards")(rewards, members, stats.std, eps)
    advantages = _broadcast((rewards - stats.mean) / scale, valid)
    return advantages, _reward_to_go(token_rewards, valid, gamma)


def rloo(*, token_rewards, mask, group_ids, values, gamma, lam, scale_rewards, eps):
    """REINFORCE leave-one-out (Ahmadian et al. 2024): ``A_i = R_i - mean_{j in g, j != i} R_j``.

    Equal to ``n/(n-1) (R_i - mean_g)``. A group of one has no other sample to form a baseline; it
    gets A = 0 (as GRPO's ``R_i - mean_g``), rather than verl's unbaselined ``R_i``, which would mix
    a differently scaled signal into the batch.
    """
    rewards, members, valid, stats = _grouped_rewards(token_rewards, mask, group_ids, "rloo")
    others_mean = (stats.mean * stats.size - rewards) / (stats.size - 1).clamp(min=1)
    advantages = torch.where(stats.size > 1, rewards - others_mean, torch.zeros_like(rewards))
    return _broadcast(advantages, valid), _reward_to_go(token_rewards, valid, gamma)


def reinforce_pp(*, token_rewards, mask, group_ids, values, gamma, lam, scale_rewards, eps):
    """REINFORCE++ (Hu 2025, arXiv 2501.03262): the reward-to-go, whitened over the whole batch.

    ``G_t = r_t + gamma G_{t+1}`` of the per-token rewards (which carry the KL-in-reward terms),
    then ``(G - mean) / (std + eps)`` over every real token of the batch. Returns ``(A, G)``.
    """
    valid = mask.bool()
    returns = _reward_to_go(token_rewards, valid, gamma)
    return masked_whiten(returns, valid, eps=eps), returns


def reinforce_pp_baseline(*, token_rewards, mask, group_ids, values, gamma, lam, scale_rewards, eps):
    """REINFORCE++-baseline (arXiv 2501.03262): ``R_i - mean_g`` broadcast, then whitened over the batch.

    The group mean removes the prompt's difficulty; the batch-wide whitening (over real tokens, so a
    long sequence weighs more, as in OpenRLHF) sets the scale without GRPO's per-group std.
    """
    rewards, members, valid, stats = _grouped_rewards(
        token_rewards, mask, group_ids, "reinforce_pp_baseline"
    )
    centred = _broadcast(rewards - stats.mean, valid)
    return masked_whiten(centred, valid, eps=eps), _reward_to_go(token_rewards, valid, gamma)


ADVANTAGE_ESTIMATORS = {
    "gae": gae,
    "grpo": grpo,
    "rloo": rloo,
    "reinforce_pp": reinforce_pp,
    "reinforce_pp_baseline": reinforce_pp_baseline,
}


@torch.no_grad()
def compute_advantages(
    estimator: str,
    *,
    token_rewards: torch.Tensor,
    mask: torch.Tensor,
    group_ids: torch.Tensor | None = None,
    values: torch.Tensor | None = None,
    gamma: float = 1.0,
    lam: float = 1.0,
    scale_rewards: str = "group",
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(advantages [N, T], returns [N, T])`` with ``estimator`` in ``ADVANTAGE_ESTIMATORS``.

    ``token_rewards [N, T]``, ``mask [N, T]`` (bool or 1.0/0.0), ``group_ids [N]`` for the group
    estimators (grpo, rloo, reinforce_pp_baseline), ``values [N, T]`` for gae. Outputs carry no
    gradient and are 0 on padding; see the module docstring for what ``returns`` is.
    """
    fn = lookup(ADVANTAGE_ESTIMATORS, estimator, "advantage estimator")
    return fn(
        token_rewards=token_rewards,
        mask=mask,
        group_ids=group_ids,
        values=values,
        gamma=gamma,
        lam=lam,
        scale_rewards=scale_rewards,
        eps=eps,
    )
