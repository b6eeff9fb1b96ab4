"""Policy, value, KL and preference losses, and entropy: hand-worked values, properties, edge cases."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmrl.algos import (
    KL_ESTIMATORS,
    POLICY_LOSSES,
    PREFERENCE_LOSSES,
    aggregate_loss,
    compute_advantages,
    entropy_from_logits,
    kl_penalty,
    policy_loss,
    preference_loss,
    value_loss,
    value_loss_metrics,
)

METRICS = {"clipfrac_low", "clipfrac_high", "clipfrac_dual", "approx_kl", "ratio_mean", "ratio_max"}


def tensor(rows):
    return torch.tensor(rows, dtype=torch.float64)


def ppo(logprobs, old_logprobs, advantages, mask, **kwargs):
    return policy_loss(
        "ppo_clip", logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, mask=mask, **kwargs
    )


# ---------------------------------------------------------------- policy losses by hand


def test_ppo_clip_by_hand():
    ratios = [1.5, 0.5, 1.1, 1.25]
    old = tensor([[-1.0, -2.0, -0.5, -1.5]])
    new = old + torch.log(tensor([ratios]))
    adv = tensor([[1.0, -1.0, 2.0, 1.0]])
    mask = torch.ones(1, 4)
    loss, metrics = ppo(new, old, adv, mask, epsilon=0.2)
    # max(-A r, -A clip(r, 0.8, 1.2)) per token
    expected = [max(-1.5, -1.2), max(0.5, 0.8), max(-2.2, -2.2), max(-1.25, -1.2)]
    assert torch.allclose(loss, tensor([expected]))
    assert metrics["clipfrac_high"] == pytest.approx(2 / 4)  # tokens 0 and 3: r > 1.2 with A > 0
    assert metrics["clipfrac_low"] == pytest.approx(1 / 4)  # token 1: r < 0.8 with A < 0
    assert metrics["ratio_mean"] == pytest.approx(sum(ratios) / 4)
    assert metrics["ratio_max"] == pytest.approx(1.5)
    assert metrics["approx_kl"] == pytest.approx(sum(r - 1 - math.log(r) for r in ratios) / 4)

    higher, metrics = ppo(new, old, adv, mask, epsilon=0.2, epsilon_high=0.28)
    assert higher[0, 3] == pytest.approx(-1.25)  # 1.25 < 1.28: not clipped any more
    assert metrics["clipfrac_high"] == pytest.approx(1 / 4)


def test_dual_clip_bounds_negative_advantages_by_hand():
    old = torch.zeros(1, 3, dtype=torch.float64)
    new = torch.log(tensor([[5.0, 5.0, 2.0]]))
    adv = tensor([[-1.0, 1.0, -1.0]])
    loss, metrics = ppo(new, old, adv, torch.ones(1, 3), epsilon=0.2, dual_clip=3.0)
    # A<0, r=5: min(max(5, 1.2), 3) = 3; A>0, r=5: max(-5, -1.2) = -1.2; A<0, r=2 < c: max(2, 1.2) = 2
    assert torch.allclose(loss, tensor([[3.0, -1.2, 2.0]]))
    assert metrics["clipfrac_dual"] == pytest.approx(1 / 3)


def test_vanilla_pg_is_reinforce():
    logprobs = tensor([[-0.5, -2.0, -9.0]]).requires_grad_()
    adv = tensor([[1.5, -0.5, 3.0]])
    mask = tensor([[1, 1, 0]])
    loss, metrics = policy_loss(
        "vanilla_pg", logprobs=logprobs, old_logprobs=logprobs.detach() - 0.1, advantages=adv, mask=mask
    )
    assert torch.allclose(loss, tensor([[-1.5 * -0.5, 0.5 * -2.0, 0.0]]))
    loss.sum().backward()
    assert torch.allclose(logprobs.grad, tensor([[-1.5, 0.5, 0.0]]))
    assert metrics["ratio_mean"] == pytest.approx(math.exp(0.1))
    assert metrics["clipfrac_low"] == metrics["clipfrac_high"] == 0


def test_gspo_by_hand():
    # Sequence 0: log-ratios 0.1, 0.3 (mean 0.2); sequence 1: 0.0, -0.2 and a padded token.
    old = tensor([[-1.0, -1.0, -1.0], [-2.0, -2.0, -2.0]])
    logprobs = (old + tensor([[0.1, 0.3, 0.0], [0.0, -0.2, 7.0]])).requires_grad_()
    adv = tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    mask = tensor([[1, 1, 0], [1, 1, 0]])
    loss, metrics = policy_loss(
        "gspo", logprobs=logprobs, old_logprobs=old, advantages=adv, mask=mask, epsilon=0.1,
        epsilon_high=0.3,
    )
    s0, s1 = math.exp((0.1 + 0.3) / 2), math.exp((0.0 - 0.2) / 2)
    # s0 = 1.22 in [0.9, 1.3]: unclipped; s1 = 0.905 in range too
    assert torch.allclose(loss, tensor([[-s0, -s0, 0.0], [-s1, -s1, 0.0]]))
    assert metrics["ratio_mean"] == pytest.approx((2 * s0 + 2 * s1) / 4)
    # GSPO-token: d loss_t / d log pi_t = -A * s_i (the sequence ratio, not the token's own ratio)
    loss.sum().backward()
    assert torch.allclose(logprobs.grad, tensor([[-s0, -s0, 0.0], [-s1, -s1, 0.0]]))


def test_gspo_clips_the_sequence_ratio():
    old = torch.zeros(1, 2, dtype=torch.float64)
    logprobs = tensor([[0.4, 0.0]]).requires_grad_()  # s = exp(0.2) = 1.22 > 1 + 0.1
    ones = torch.ones(1, 2)
    loss, metrics = policy_loss(
        "gspo", logprobs=logprobs, old_logprobs=old, advantages=ones, mask=ones, epsilon=0.1
    )
    assert torch.allclose(loss, tensor([[-1.1, -1.1]]))
    assert metrics["clipfrac_high"] == 1.0
    loss.sum().backward()
    assert torch.all(logprobs.grad == 0)


def test_value_loss_by_hand():
    values = tensor([[1.0, 0.0, 3.0]])
    old_values = tensor([[0.5, 0.1, 100.0]])
    returns = tensor([[2.0, 1.0, 1e6]])
    mask = tensor([[1, 1, 0]])
    loss = value_loss(values, old_values, returns, mask, clip_range=0.2)
    # token 0: clip(1.0, 0.3, 0.7) = 0.7 -> max((1-2)^2, (0.7-2)^2) = 1.69; token 1: inside the range
    assert torch.allclose(loss, tensor([[0.5 * 1.69, 0.5 * 1.0, 0.0]]))
    metrics = value_loss_metrics(values, old_values, returns, mask, clip_range=0.2)
    assert metrics["vf_clipfrac"] == pytest.approx(0.5)  # token 0 of the two real ones


def test_kl_estimators_by_hand():
    logprobs, ref = tensor([[-1.0, -3.0]]), tensor([[-1.5, -2.0]])
    assert torch.allclose(kl_penalty(logprobs, ref, "k1"), tensor([[0.5, -1.0]]))
    assert torch.allclose(kl_penalty(logprobs, ref, "k2"), tensor([[0.5 * 0.25, 0.5 * 1.0]]))
    k3 = [math.exp(-0.5) + 0.5 - 1, math.exp(1.0) - 1.0 - 1]
    assert torch.allclose(kl_penalty(logprobs, ref, "k3"), tensor([k3]))


def test_preference_losses_by_hand():
    chosen, rejected = tensor([-10.0, -4.0]), tensor([-12.0, -3.0])
    ref_chosen, ref_rejected = tensor([-11.0, -4.5]), tensor([-11.5, -2.0])
    beta, ls = 0.5, 0.1
    h = [(-10 + 11) - (-12 + 11.5), (-4 + 4.5) - (-3 + 2)]  # 1.5, 1.5
    log_sig = [math.log(1 / (1 + math.exp(-beta * x))) for x in h]
    log_sig_neg = [math.log(1 / (1 + math.exp(beta * x))) for x in h]
    expected = {
        "sigmoid": [-(1 - ls) * a - ls * b for a, b in zip(log_sig, log_sig_neg)],
        "ipo": [(x - 1 / (2 * beta)) ** 2 for x in h],
        "hinge": [max(0.0, 1 - beta * x) for x in h],
        "robust": [((1 - ls) * -a - ls * -b) / (1 - 2 * ls) for a, b in zip(log_sig, log_sig_neg)],
    }
    for name, values in expected.items():
        loss, chosen_rewards, rejected_rewards = preference_loss(
            name, chosen_logps=chosen, rejected_logps=rejected, ref_chosen_logps=ref_chosen,
            ref_rejected_logps=ref_rejected, beta=beta, label_smoothing=ls,
        )
        assert torch.allclose(loss, tensor(values)), name
        assert torch.allclose(chosen_rewards, tensor([beta * 1.0, beta * 0.5]))
        assert torch.allclose(rejected_rewards, tensor([beta * -0.5, beta * -1.0]))


def test_preference_rewards_are_detached_and_bad_settings_are_reported():
    logps = torch.zeros(2, requires_grad=True)
    pairs = {"chosen_logps": logps, "rejected_logps": logps, "ref_chosen_logps": logps.detach()}
    pairs["ref_rejected_logps"] = logps.detach()
    _, chosen_rewards, _ = preference_loss("sigmoid", **pairs)
    assert not chosen_rewards.requires_grad
    with pytest.raises(ValueError, match="label_smoothing < 0.5"):
        preference_loss("robust", **pairs, label_smoothing=0.5)
    with pytest.raises(ValueError, match="beta"):
        preference_loss("ipo", **pairs, beta=0.0)


# ---------------------------------------------------------------- properties


@st.composite
def rollouts(draw):
    """Random ``(logprobs, old_logprobs, advantages, mask)``; ratios within e^+-0.7, |A| >= 0.1."""
    n, width = draw(st.integers(1, 6)), draw(st.integers(1, 8))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    old = -torch.rand(n, width, generator=gen, dtype=torch.float64) * 5
    logprobs = old + (torch.rand(n, width, generator=gen, dtype=torch.float64) - 0.5) * 1.4
    sign = torch.where(torch.rand(n, width, generator=gen) < 0.5, -1.0, 1.0).double()
    advantages = sign * (0.1 + 2 * torch.rand(n, width, generator=gen, dtype=torch.float64))
    mask = torch.arange(width)[None, :] < torch.randint(0, width + 1, (n, 1), generator=gen)
    return logprobs, old, advantages, mask


@settings(max_examples=50, deadline=None)
@given(rollouts(), st.floats(0.05, 0.3))
def test_ppo_clip_symmetric_equals_textbook_ppo(rollout, epsilon):
    logprobs, old, adv, mask = rollout
    ratio = torch.exp(logprobs - old)
    textbook = torch.max(-adv * ratio, -adv * torch.clamp(ratio, 1 - epsilon, 1 + epsilon)) * mask
    same_high, _ = ppo(logprobs, old, adv, mask, epsilon=epsilon, epsilon_high=epsilon)
    default_high, _ = ppo(logprobs, old, adv, mask, epsilon=epsilon)
    assert torch.allclose(same_high, textbook) and torch.equal(same_high, default_high)


@settings(max_examples=50, deadline=None)
@given(rollouts(), st.floats(0.05, 0.3), st.floats(0.0, 0.2), st.sampled_from([None, 1.3, 3.0]))
def test_ppo_clip_gradient_is_zero_exactly_where_a_clip_is_active(rollout, epsilon, extra_high, dual_clip):
    logprobs, old, adv, mask = rollout
    logprobs = logprobs.clone().requires_grad_()
    high = epsilon + extra_high
    loss, _ = ppo(logprobs, old, adv, mask, epsilon=epsilon, epsilon_high=high, dual_clip=dual_clip)
    loss.sum().backward()
    ratio = torch.exp(logprobs.detach() - old)
    active = ((adv > 0) & (ratio > 1 + high)) | ((adv < 0) & (ratio < 1 - epsilon))
    if dual_clip is not None:
        active |= (adv < 0) & (ratio > dual_clip)
    assert torch.all(logprobs.grad[active | ~mask] == 0)
    assert torch.all(logprobs.grad[~active & mask] != 0)


@settings(max_examples=50, deadline=None)
@given(rollouts(), st.sampled_from([float("nan"), float("inf"), -1e30]))
def test_padding_never_affects_policy_and_value_losses(rollout, garbage):
    logprobs, old, adv, mask = rollout
    dirty = [torch.where(mask, x, garbage) for x in (logprobs, old, adv)]
    for name in POLICY_LOSSES:
        clean_loss, clean_metrics = policy_loss(
            name, logprobs=logprobs, old_logprobs=old, advantages=adv, mask=mask.double()
        )
        leaf = dirty[0].clone().requires_grad_()
        loss, metrics = policy_loss(
            name, logprobs=leaf, old_logprobs=dirty[1], advantages=dirty[2], mask=mask
        )
        loss.sum().backward()
        assert torch.equal(loss, clean_loss) and torch.all(loss[~mask] == 0), name
        assert torch.isfinite(leaf.grad).all() and torch.all(leaf.grad[~mask] == 0), name
        assert metrics.keys() == clean_metrics.keys() == METRICS
        for key, value in metrics.items():
            assert value.dim() == 0 and not value.requires_grad, key
            assert torch.equal(value, clean_metrics[key]), key
    clean = value_loss(logprobs, old, adv, mask, clip_range=0.2)
    assert torch.equal(value_loss(*dirty, mask, clip_range=0.2), clean) and torch.all(clean[~mask] == 0)


def test_extreme_log_ratios_stay_finite():
    old = torch.zeros(2, 2, dtype=torch.float64)
    logprobs = tensor([[1e4, -1e4], [800.0, -800.0]]).requires_grad_()
    adv = tensor([[1.0, -1.0], [-1.0, 1.0]])
    for name in POLICY_LOSSES:
        loss, metrics = policy_loss(
            name, logprobs=logprobs, old_logprobs=old, advantages=adv, mask=torch.ones(2, 2), dual_clip=3.0
        )
        (grad,) = torch.autograd.grad(loss.sum(), logprobs)
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all(), name
        assert all(torch.isfinite(v) for v in metrics.values()), name
    for name in KL_ESTIMATORS:
        assert torch.isfinite(kl_penalty(logprobs.detach().float(), old.float(), name)).all(), name
    assert torch.all(kl_penalty(tensor([[-1e12, 1e12]]), torch.zeros(1, 2), "k3") >= 0)


@settings(max_examples=50, deadline=None)
@given(rollouts())
def test_kl_estimators_are_zero_at_equal_policies_and_k2_k3_nonnegative(rollout):
    logprobs, ref, _, _ = rollout
    for name in KL_ESTIMATORS:
        assert torch.all(kl_penalty(ref, ref, name) == 0), name
    assert torch.all(kl_penalty(logprobs, ref, "k2") >= 0)
    assert torch.all(kl_penalty(logprobs, ref, "k3") >= 0)
    for far in (ref - 50, ref + 50):  # beyond the clamp
        assert torch.all(kl_penalty(far, ref, "k3") >= 0)


# ---------------------------------------------------------------- entropy


@pytest.mark.parametrize("shape", [(3, 5, 17), (2, 3, 32000), (4, 7)])
def test_entropy_matches_naive_definition(shape):
    logits = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 4
    probs = torch.softmax(logits.double(), dim=-1)
    naive = -(probs * torch.log(probs)).sum(-1)
    for chunk_elements in (32000, 64, 2**24):  # chunks of one or a few positions, and none
        entropy = entropy_from_logits(logits, chunk_elements=chunk_elements)
        assert entropy.dtype == torch.float32 and entropy.shape == shape[:-1]
        assert torch.allclose(entropy.double(), naive, atol=1e-5, rtol=0)


def test_entropy_of_non_contiguous_bf16_logits_and_its_gradient():
    full = torch.randn(2, 6, 50, dtype=torch.float64, requires_grad=True)
    logits = full[:, :-1]  # as a trainer slices off the last position
    weights = torch.randn(2, 5, dtype=torch.float64)
    (entropy_from_logits(logits, chunk_elements=120) * weights).sum().backward()
    grad = full.grad.clone()
    full.grad = None
    probs = torch.softmax(logits, -1)
    (-(probs * torch.log(probs)).sum(-1) * weights).sum().backward()
    assert torch.allclose(grad, full.grad)
    low = entropy_from_logits(full.detach()[:, :-1].bfloat16(), chunk_elements=120)
    assert low.dtype == torch.float32 and torch.isfinite(low).all()
    base = torch.zeros(1, 4, requires_grad=True)
    banned = base.masked_fill(torch.tensor([[False, True, False, True]]), -float("inf"))
    entropy = entropy_from_logits(banned)  # two tokens left, equally likely
    entropy.sum().backward()
    assert torch.allclose(entropy, torch.tensor([math.log(2)])) and torch.isfinite(base.grad).all()


# ---------------------------------------------------------------- unknown names


ONE = torch.ones(1, 1)
UNKNOWN_NAME_CALLS = {
    "'gae', 'grpo', 'rloo'": lambda: compute_advantages("ppo", token_rewards=ONE, mask=ONE),
    "'ppo_clip', 'vanilla_pg', 'gspo'": lambda: policy_loss(
        "ppo", logprobs=ONE, old_logprobs=ONE, advantages=ONE, mask=ONE
    ),
    "'k1', 'k2', 'k3'": lambda: kl_penalty(ONE, ONE, "k4"),
    "'token_mean', 'seq_mean_token_mean'": lambda: aggregate_loss(ONE, ONE, "mean"),
    "'sigmoid', 'ipo', 'hinge', 'robust'": lambda: preference_loss(
        "dpo", chosen_logps=ONE, rejected_logps=ONE, ref_chosen_logps=ONE, ref_rejected_logps=ONE
    ),
}


@pytest.mark.parametrize("valid", list(UNKNOWN_NAME_CALLS))
def test_unknown_names_list_the_valid_ones(valid):
    with pytest.raises(ValueError, match=valid):
        UNKNOWN_NAME_CALLS[valid]()


def test_dual_clip_must_exceed_one():
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        ppo(torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1, 1), dual_clip=0.5)


def test_registries_are_plain_dicts():
    for registry in (POLICY_LOSSES, KL_ESTIMATORS, PREFERENCE_LOSSES):
        assert type(registry) is dict
