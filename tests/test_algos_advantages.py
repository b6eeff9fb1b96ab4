"""Advantage estimators: values worked out by hand, properties on random batches, edge cases."""

import math
import statistics

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmrl.algos import (
    ADVANTAGE_ESTIMATORS,
    compute_advantages,
    masked_mean,
    masked_var,
)

GROUP_ESTIMATORS = ["grpo", "rloo", "reinforce_pp_baseline"]
EPS = 1e-6


def right_padded(lengths, width):
    """``[N, width]`` float mask with ``lengths[i]`` leading ones in row i."""
    return (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).double()


def outcome_rewards(rewards, lengths, width):
    """Each sequence's reward on its last real token, as the trainer writes them."""
    token_rewards = torch.zeros(len(rewards), width, dtype=torch.float64)
    for i, (reward, length) in enumerate(zip(rewards, lengths)):
        if length:
            token_rewards[i, length - 1] = reward
    return token_rewards


def advantages_of(estimator, token_rewards, mask, **kwargs):
    return compute_advantages(estimator, token_rewards=token_rewards, mask=mask, **kwargs)


# Groups 7 and 3 interleaved: ids need be neither contiguous nor sorted.
REWARDS = [1.0, 0.0, 2.0, 3.0, 4.0]
GROUPS = torch.tensor([7, 3, 7, 3, 7])
LENGTHS = [2, 3, 1, 4, 3]
WIDTH = 5


def test_grpo_group_scaling_by_hand():
    mask = right_padded(LENGTHS, WIDTH)
    adv, _ = advantages_of("grpo", outcome_rewards(REWARDS, LENGTHS, WIDTH), mask, group_ids=GROUPS)
    mean7 = (1 + 2 + 4) / 3
    std7 = math.sqrt(((1 - mean7) ** 2 + (2 - mean7) ** 2 + (4 - mean7) ** 2) / (3 - 1))
    mean3 = (0 + 3) / 2
    std3 = math.sqrt(((0 - mean3) ** 2 + (3 - mean3) ** 2) / (2 - 1))
    expected = [
        (1 - mean7) / (std7 + EPS),
        (0 - mean3) / (std3 + EPS),
        (2 - mean7) / (std7 + EPS),
        (3 - mean3) / (std3 + EPS),
        (4 - mean7) / (std7 + EPS),
    ]
    for i, (value, length) in enumerate(zip(expected, LENGTHS)):
        assert torch.allclose(adv[i, :length], torch.full((length,), value, dtype=torch.float64))
        assert torch.all(adv[i, length:] == 0)


def test_grpo_batch_and_none_scaling_by_hand():
    mask = right_padded(LENGTHS, WIDTH)
    token_rewards = outcome_rewards(REWARDS, LENGTHS, WIDTH)
    batch, _ = advantages_of("grpo", token_rewards, mask, group_ids=GROUPS, scale_rewards="batch")
    none, _ = advantages_of("grpo", token_rewards, mask, group_ids=GROUPS, scale_rewards="none")
    batch_std = statistics.stdev(REWARDS)  # sample (n-1) std of all five rewards
    mean7, mean3 = (1 + 2 + 4) / 3, (0 + 3) / 2
    centred = [1 - mean7, 0 - mean3, 2 - mean7, 3 - mean3, 4 - mean7]
    assert torch.allclose(none[:, 0], torch.tensor(centred, dtype=torch.float64))
    assert torch.allclose(batch[:, 0], torch.tensor(centred, dtype=torch.float64) / (batch_std + EPS))


def test_rloo_by_hand():
    mask = right_padded(LENGTHS, WIDTH)
    adv, _ = advantages_of("rloo", outcome_rewards(REWARDS, LENGTHS, WIDTH), mask, group_ids=GROUPS)
    expected = [1 - (2 + 4) / 2, 0 - 3, 2 - (1 + 4) / 2, 3 - 0, 4 - (1 + 2) / 2]
    assert torch.allclose(adv[:, 0], torch.tensor(expected, dtype=torch.float64))


def test_gae_by_hand_skips_padding_and_holes():
    gamma, lam = 0.9, 0.8
    # Row 0: two real tokens then padding. Row 1: a masked hole in the middle (e.g. a tool output).
    token_rewards = torch.tensor([[0.0, 1.0, 5.0], [0.0, 9.0, 2.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 0.2, 7.0], [0.3, 8.0, 0.4]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]], dtype=torch.bool)
    adv, returns = advantages_of("gae", token_rewards, mask, values=values, gamma=gamma, lam=lam)
    a01 = 1.0 + gamma * 0 - 0.2
    a00 = (0.0 + gamma * 0.2 - 0.5) + gamma * lam * a01
    a12 = 2.0 + gamma * 0 - 0.4
    a10 = (0.0 + gamma * 0.4 - 0.3) + gamma * lam * a12  # the hole is skipped: V_next is V_2
    expected = torch.tensor([[a00, a01, 0.0], [a10, 0.0, a12]], dtype=torch.float64)
    assert torch.allclose(adv, expected)
    assert torch.allclose(returns, expected + torch.tensor([[0.5, 0.2, 0.0], [0.3, 0.0, 0.4]]).double())


def test_reinforce_pp_by_hand():
    gamma = 0.5
    token_rewards = torch.tensor([[0.1, -0.2, 1.0], [0.3, 2.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.float64)
    adv, returns = advantages_of("reinforce_pp", token_rewards, mask, gamma=gamma)
    g02 = 1.0
    g01 = -0.2 + gamma * g02
    g00 = 0.1 + gamma * g01
    g11 = 2.0
    g10 = 0.3 + gamma * g11
    valid = [g00, g01, g02, g10, g11]
    mean, std = statistics.mean(valid), statistics.stdev(valid)
    expected = [[g00, g01, g02], [g10, g11, None]]
    expected = [[0.0 if g is None else (g - mean) / (std + EPS) for g in row] for row in expected]
    assert torch.allclose(adv, torch.tensor(expected, dtype=torch.float64))
    assert torch.allclose(returns, torch.tensor([[g00, g01, g02], [g10, g11, 0.0]], dtype=torch.float64))


def test_reinforce_pp_baseline_by_hand():
    lengths, rewards, groups = [2, 1, 3], [1.0, 3.0, 5.0], torch.tensor([0, 0, 1])
    mask = right_padded(lengths, 3)
    token_rewards = outcome_rewards(rewards, lengths, 3)
    adv, _ = advantages_of("reinforce_pp_baseline", token_rewards, mask, group_ids=groups)
    # group 0: mean 2 -> -1 on 2 tokens, +1 on 1 token; group 1 alone: 0 on 3 tokens
    tokens = [-1.0, -1.0, 1.0, 0.0, 0.0, 0.0]
    mean, std = statistics.mean(tokens), statistics.stdev(tokens)
    centred = [[-1.0, -1.0, None], [1.0, None, None], [0.0, 0.0, 0.0]]
    expected = [[0.0 if c is None else (c - mean) / (std + EPS) for c in row] for row in centred]
    assert torch.allclose(adv, torch.tensor(expected, dtype=torch.float64))


def test_critic_free_returns_are_reward_to_go():
    token_rewards = torch.tensor([[0.5, 0.0, 2.0]], dtype=torch.float64)
    mask = torch.ones(1, 3)
    for estimator in GROUP_ESTIMATORS + ["reinforce_pp"]:
        _, returns = advantages_of(estimator, token_rewards, mask, group_ids=torch.tensor([0]), gamma=0.5)
        expected = [[0.5 + 0.5 * 0.0 + 0.25 * 2.0, 0.0 + 0.5 * 2.0, 2.0]]
        assert torch.allclose(returns, torch.tensor(expected, dtype=torch.float64))


# ---------------------------------------------------------------- properties on random batches


@st.composite
def batches(draw):
    """A random padded batch: rewards on every token, ragged lengths (some 0), shuffled group ids."""
    n = draw(st.integers(1, 12))
    width = draw(st.integers(1, 7))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    lengths = torch.randint(0, width + 1, (n,), generator=gen)
    mask = torch.arange(width)[None, :] < lengths[:, None]
    token_rewards = torch.randn(n, width, generator=gen, dtype=torch.float64)
    values = torch.randn(n, width, generator=gen, dtype=torch.float64)
    group_ids = torch.randint(0, draw(st.integers(1, 4)), (n,), generator=gen) * 10 - 5
    return token_rewards, mask, group_ids, values


def per_sequence(adv):
    return adv[:, 0]


@settings(max_examples=50, deadline=None)
@given(batches())
def test_grpo_advantages_have_zero_mean_per_group(batch):
    token_rewards, mask, group_ids, _ = batch
    for scale in ("group", "batch", "none"):
        adv, _ = advantages_of("grpo", token_rewards, mask, group_ids=group_ids, scale_rewards=scale)
        real = mask.any(-1)
        for g in group_ids.unique():
            rows = real & (group_ids == g)
            if rows.any():
                assert abs(float(per_sequence(adv)[rows].mean())) < 1e-9


@settings(max_examples=50, deadline=None)
@given(batches())
def test_rloo_is_scaled_group_centred_reward(batch):
    token_rewards, mask, group_ids, _ = batch
    adv, _ = advantages_of("rloo", token_rewards, mask, group_ids=group_ids)
    rewards = (token_rewards * mask).sum(-1)
    real = mask.any(-1)
    for i in torch.nonzero(real).flatten():
        rows = real & (group_ids == group_ids[i])
        n = int(rows.sum())
        expected = 0.0 if n == 1 else n / (n - 1) * float(rewards[i] - rewards[rows].mean())
        assert math.isclose(float(adv[i, 0]), expected, abs_tol=1e-9)


@settings(max_examples=50, deadline=None)
@given(batches())
def test_reinforce_pp_is_whitened_over_valid_tokens(batch):
    token_rewards, mask, _, _ = batch
    eps = 1e-6
    adv, returns = advantages_of("reinforce_pp", token_rewards, mask, gamma=0.9, eps=eps)
    if mask.sum() >= 2:
        assert abs(float(masked_mean(adv, mask))) < 1e-6
        # (returns - mean) / (std + eps): a unit spread, less where the returns are nearly constant
        # (std 4e-3 gives 0.99976), and all 0 where they are constant.
        std = float(masked_var(returns, mask).sqrt())
        assert float(masked_var(adv, mask).sqrt()) == pytest.approx(std / (std + eps), abs=1e-9)


@settings(max_examples=50, deadline=None)
@given(batches(), st.sampled_from([float("nan"), float("inf"), -1e30]))
def test_padding_never_affects_any_output(batch, garbage):
    token_rewards, mask, group_ids, values = batch
    dirty = {
        "token_rewards": torch.where(mask, token_rewards, garbage),
        "values": torch.where(mask, values, garbage),
    }
    common = {"group_ids": group_ids, "gamma": 0.9, "lam": 0.7}
    for estimator in ADVANTAGE_ESTIMATORS:
        clean = compute_advantages(
            estimator, token_rewards=token_rewards, values=values, mask=mask.double(), **common
        )
        noisy = compute_advantages(estimator, **dirty, mask=mask, **common)
        for a, b in zip(clean, noisy):
            assert torch.equal(a, b), estimator
            assert torch.all(b[~mask] == 0)


# ---------------------------------------------------------------- edge cases and errors


@pytest.mark.parametrize("estimator", list(ADVANTAGE_ESTIMATORS))
def test_singleton_flat_group_and_empty_row_are_finite_and_zero(estimator):
    # group 0: one sample; group 1: three equal rewards; group 2: one real row and one all-padding row
    lengths, rewards = [2, 3, 1, 2, 2, 0], [1.0, 0.5, 0.5, 0.5, 2.0, 0.0]
    mask = right_padded(lengths, 3)
    token_rewards = outcome_rewards(rewards, lengths, 3)
    group_ids = torch.tensor([0, 1, 1, 1, 2, 2])
    adv, returns = compute_advantages(
        estimator, token_rewards=token_rewards, mask=mask, group_ids=group_ids, values=torch.zeros(6, 3)
    )
    assert torch.isfinite(adv).all() and torch.isfinite(returns).all()
    assert torch.all(adv[5] == 0) and torch.all(returns[5] == 0)
    if estimator in ("grpo", "rloo"):
        assert torch.allclose(adv, torch.zeros_like(adv), atol=1e-6)  # no one to compare with


def test_all_padding_batch_is_zero():
    for estimator in ADVANTAGE_ESTIMATORS:
        adv, returns = compute_advantages(
            estimator,
            token_rewards=torch.ones(2, 3),
            mask=torch.zeros(2, 3),
            group_ids=torch.tensor([0, 0]),
            values=torch.ones(2, 3),
        )
        assert torch.all(adv == 0) and torch.all(returns == 0)


@pytest.mark.parametrize("estimator", GROUP_ESTIMATORS)
def test_missing_group_ids_says_which_argument(estimator):
    with pytest.raises(ValueError, match="group_ids"):
        compute_advantages(estimator, token_rewards=torch.ones(2, 3), mask=torch.ones(2, 3))


def test_missing_values_says_which_argument():
    with pytest.raises(ValueError, match="values"):
        compute_advantages("gae", token_rewards=torch.ones(2, 3), mask=torch.ones(2, 3))


def test_wrong_group_ids_shape_is_reported():
    with pytest.raises(ValueError, match="one id per sequence"):
        advantages_of("grpo", torch.ones(2, 3), torch.ones(2, 3), group_ids=torch.tensor([0, 0, 1]))


def test_unknown_estimator_and_scale_list_valid_names():
    with pytest.raises(ValueError, match="'gae', 'grpo', 'rloo', 'reinforce_pp', 'reinforce_pp_baseline'"):
        compute_advantages("ppo", token_rewards=torch.ones(2, 3), mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match="'group', 'batch', 'none'"):
        ones, pair = torch.ones(2, 3), torch.tensor([0, 0])
        advantages_of("grpo", ones, ones, group_ids=pair, scale_rewards="x")
